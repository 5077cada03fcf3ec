"""JSON Schema and regular expressions as xgrammar reads them: what it would parse and not enforce, or read
otherwise than JSON Schema or Python's `re` mean, is refused before it compiles (the row's `bad_constraint`).

Refusing is the point: a row whose output ends with `stop` validates against its constraint. Each rule was found
by running xgrammar's own matcher over values the schema or regex must refuse (tests/runner/test_structured.py).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

# JSON Schema keywords xgrammar parses but does not enforce: a schema using them could yield text that ends
# with `stop` and still fails validation, so it is refused up front. (`allOf` of several schemas is not merged;
# `contains` lets `[]` through and refuses arrays that hold a match; `oneOf` is generated as `anyOf`, refused only
# where a value may match two of its schemas: _one_of_problem.)
_UNENFORCED_KEYWORDS = (
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "contains",
    "minContains",
    "maxContains",
    "$dynamicRef",  # xgrammar leaves these unresolved: the value is unconstrained
    "$recursiveRef",
)
# Keywords of one JSON type that xgrammar enforces only beside an explicit "type".
_NEEDS_TYPE = (
    "pattern",
    "minLength",
    "maxLength",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
)
# Where one of these is present xgrammar generates from it alone and drops the keywords beside it that constrain
# the value (`{"anyOf": [{"type": "integer"}], "minimum": 5}` lets 3 through); annotations beside it are harmless.
# Of several, the first here is the one it keeps.
_GENERATES_ALONE = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf")
_VALUE_KEYWORDS = (
    "type",
    *_NEEDS_TYPE,
    "minItems",
    "maxItems",
    "items",
    "prefixItems",
    "additionalItems",
    "uniqueItems",
    "unevaluatedItems",
    "properties",
    "patternProperties",
    "additionalProperties",
    "required",
    "minProperties",
    "maxProperties",
    "propertyNames",
    "unevaluatedProperties",
)
_INSTEAD = {
    "anyOf": "move {it} into each of its schemas",
    "oneOf": "move {it} into each of its schemas",
    "allOf": "move {it} into its schema",
    "$ref": "move {it} into the schema it references",
    "enum": "list only values that satisfy {it}",
    "const": "give a value that satisfies {it}",
}
# Formats JSON Schema defines that xgrammar leaves unchecked (any string passes); jsonschema's format checker checks
# them. Formats JSON Schema does not define are annotations, which no validator checks, and pass.
_UNENFORCED_FORMATS = ("idn-email", "idn-hostname", "iri", "iri-reference", "regex")
# Of these string keywords xgrammar generates from one alone and drops the others: `format` before `pattern`
# before the lengths (`{"pattern": "[a-z]+", "maxLength": 3}` let "elephant" through).
_STRING_SHAPES = ("format", "pattern", ("minLength", "maxLength"))
# xgrammar enforces `multipleOf` only on integers, by a whole number up to this, and (but for 1) with no bound beside.
_MAX_MULTIPLE_OF = 1024
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties", "not")
# Regex escapes xgrammar reads as Python's re does. It takes any other letter after a backslash as the letter
# itself (`\A`, `\Z`, `\z`, `\G` ...), except these, which it refuses with its own message.
_REGEX_ESCAPES = frozenset("dDsSwWnrtfvxu")
_REGEX_ENGINE_REFUSES = frozenset("bBpPk")
_REGEX_ANCHOR_ESCAPES = frozenset("AZzG")
_REGEX_REPEAT = re.compile(r"\{\d+(,\d*)?\}")
_DIGITS = frozenset("0123456789")
_OCTAL = frozenset("01234567")
_HEX = frozenset("0123456789abcdefABCDEF")
_HEX_ESCAPES = {"x": 2, "u": 4}
_CONTROL_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "f": 0x0C, "v": 0x0B, "0": 0x00}


def unsupported_keyword(schema: Any, path: str = "#", root: Any = None) -> str | None:
    """Where the schema uses a keyword that would not be enforced, as a message; None when it has none. `root`: the
    whole schema, which `$ref`s point into (the schema itself at the top)."""
    if not isinstance(schema, dict):
        return None
    root = schema if root is None else root
    for keyword in _UNENFORCED_KEYWORDS:
        if keyword in schema:
            return f"unsupported JSON Schema keyword {keyword!r} at {path}"
    for keyword in ("anyOf", "allOf", "type"):
        if schema.get(keyword) == []:  # the metaschema refuses these; xgrammar let `{"a": }` through for anyOf
            what = "type" if keyword == "type" else "schema"
            return f"{keyword!r} at {path} is an empty list; JSON Schema needs at least one {what} there"
    if schema.get("uniqueItems") is True:
        return f"unsupported JSON Schema keyword 'uniqueItems' at {path}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"unsupported JSON Schema keyword 'allOf' with {len(schema['allOf'])} schemas at {path}"
    problem = (
        _dropped_beside(schema, path)
        or _multiple_of_problem(schema, path)
        or _min_properties_problem(schema, path)
        or _string_problem(schema, path)
        or _reference_problem(schema, path)
        or _one_of_problem(schema, path, root)
        or _big_integer_problem(schema, path)
        or _property_names_problem(schema, path)
    )
    if problem:
        return problem
    if "type" not in schema and not any(k in schema for k in _GENERATES_ALONE):
        typed = next((k for k in _NEEDS_TYPE if k in schema), None)
        if typed:  # xgrammar lets any value through where the type is not given
            return f'keyword {typed!r} at {path} needs a "type" beside it'
    if isinstance(schema.get("pattern"), str):
        problem = unsupported_regex(schema["pattern"]) or _unescaped_in_json(schema["pattern"])
        if problem:
            return f"unsupported 'pattern' at {path}: {problem}"
    if isinstance(schema.get("patternProperties"), dict):
        for key in schema["patternProperties"]:
            problem = unsupported_regex(key) or _unescaped_in_json(key)
            if problem:
                return f"unsupported 'patternProperties' regex {key!r} at {path}: {problem}"
    problem = _pattern_properties_overlap(schema, path)
    if problem:
        return problem
    required = schema.get("required")
    if isinstance(required, list):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        missing = [name for name in required if name not in properties]
        if missing:  # xgrammar enforces only the required fields it has a schema for
            return f"required field {missing[0]!r} at {path} is not among its properties"
    children: list[tuple[str, Any]] = []
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            children += [(f"{path}/{key}/{name}", sub) for name, sub in schema[key].items()]
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            children += [(f"{path}/{key}/{i}", sub) for i, sub in enumerate(schema[key])]
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), (dict, list)):
            subs = schema[key] if isinstance(schema[key], list) else [schema[key]]
            children += [(f"{path}/{key}", sub) for sub in subs]
    for child_path, child in children:
        problem = unsupported_keyword(child, child_path, root)
        if problem:
            return problem
    return None


def _dropped_beside(schema: dict, path: str) -> str | None:
    """Keywords beside anyOf, allOf, $ref, enum or const that xgrammar would drop, as a message."""
    alone = [k for k in _GENERATES_ALONE if k in schema]
    if not alone:
        return None
    if alone == ["const", "enum"] and isinstance(schema["enum"], list) and schema["const"] in schema["enum"]:
        alone = ["const"]  # xgrammar generates the const, which the enum allows
    dropped = [k for k in _VALUE_KEYWORDS if k in schema and not (k == "type" and _type_is_implied(schema))]
    dropped += alone[1:]
    if not dropped:
        return None
    names = ", ".join(repr(k) for k in dropped)
    instead = _INSTEAD[alone[0]].format(it="it" if len(dropped) == 1 else "them")
    return (
        f"{names} at {path} beside {alone[0]!r} would not be enforced (the grammar engine generates from "
        f"{alone[0]!r} alone); {instead}"
    )


def _pattern_properties_overlap(schema: dict, path: str) -> str | None:
    """A `properties` name that a `patternProperties` regex also matches, as a message: JSON Schema holds its value
    to both schemas, xgrammar to its `properties` schema alone (`{"name": "a"}` got through a pattern `a` of type
    integer)."""
    properties, patterns = schema.get("properties"), schema.get("patternProperties")
    if not isinstance(properties, dict) or not isinstance(patterns, dict):
        return None
    for key in patterns:
        try:
            regex = re.compile(key)
        except re.error:  # xgrammar's dialect only (`\u{e9}`): it refuses the key itself, or reads it so
            continue
        name = next((name for name in properties if regex.search(name)), None)
        if name is not None:
            return (
                f"property {name!r} at {path} also matches 'patternProperties' regex {key!r}, whose schema the "
                f"grammar engine would not apply to it; give the property one schema"
            )
    return None


def _string_problem(schema: dict, path: str) -> str | None:
    """`format`, `pattern` and the length bounds where xgrammar would drop one, or a format it leaves unchecked."""
    fmt = schema.get("format")
    if fmt in _UNENFORCED_FORMATS:
        return f"format {fmt!r} at {path} is not enforced by the grammar engine; give a 'pattern' instead"
    present = [shape for shape in _STRING_SHAPES if any(k in schema for k in _keywords(shape))]
    if len(present) < 2:
        return None
    kept, dropped = present[0], [k for shape in present[1:] for k in _keywords(shape) if k in schema]
    names = ", ".join(repr(k) for k in dropped)
    instead = "write the lengths into the pattern" if kept == "pattern" else "give a 'pattern' alone instead"
    return (
        f"{names} at {path} beside {kept!r} would not be enforced (the grammar engine generates from {kept!r} "
        f"alone); {instead}"
    )


def _keywords(shape: str | tuple[str, ...]) -> tuple[str, ...]:
    return shape if isinstance(shape, tuple) else (shape,)


def _reference_problem(schema: dict, path: str) -> str | None:
    """A `$ref` that xgrammar leaves unresolved (an anchor, another document): anything would pass there."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        return (
            f"'$ref' {ref!r} at {path} is not supported: only references into the schema itself ('#/...') are "
            f"resolved; inline the schema or put it under '$defs'"
        )
    return None


def _property_names_problem(schema: dict, path: str) -> str | None:
    """`propertyNames` where xgrammar would not enforce it, as a message: beside `additionalProperties: false`
    (it let `{"a": 1}` through), or beside a declared property whose name breaks it (it applies only to the other
    keys). A name is judged by the `pattern`, lengths, `const` and `enum` of propertyNames; of any other keyword
    there, every declared name is taken to break it."""
    names = schema.get("propertyNames")
    if not isinstance(names, dict):
        return None
    if schema.get("additionalProperties") is False:
        return (
            f"'propertyNames' at {path} beside 'additionalProperties': false would let any key through (the grammar "
            "engine drops the false); leave one of them out"
        )
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    broken = next((name for name in properties if not _name_allowed(name, names)), None)
    if broken is not None:
        return (
            f"property {broken!r} at {path} breaks its 'propertyNames', which the grammar engine does not apply to the "
            "properties it names; rename it or widen 'propertyNames'"
        )
    return None


def _name_allowed(name: str, names: dict) -> bool:
    judged = {"type", "pattern", "minLength", "maxLength", "const", "enum", "title", "description"}
    if not set(names) <= judged or names.get("type", "string") != "string":
        return False
    pattern = names.get("pattern")
    try:
        if isinstance(pattern, str) and not re.search(pattern, name):
            return False
    except re.error:
        return False
    low, high = names.get("minLength", 0), names.get("maxLength", len(name))
    if not isinstance(low, int) or not isinstance(high, int) or not low <= len(name) <= high:
        return False
    if "const" in names and names["const"] != name:
        return False
    return not (isinstance(names.get("enum"), list) and name not in names["enum"])


def _big_integer_problem(schema: dict, path: str) -> str | None:
    """An integer past 64 bits in a const or enum, as a message: xgrammar writes it as a float
    (12345678901234567890 as 1.2345678901234567e+19), which the const or enum does not allow."""
    for keyword in ("const", "enum"):
        stack = [schema[keyword]] if keyword in schema else []
        while stack:
            value = stack.pop()
            if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                return (
                    f"integer {value} in {keyword!r} at {path} is past 64 bits, which the grammar engine writes as a "
                    "float; give it as a string"
                )
            if isinstance(value, list):
                stack += value
            elif isinstance(value, dict):
                stack += value.values()
    return None


def _one_of_problem(schema: dict, path: str, root: Any) -> str | None:
    """A `oneOf` whose schemas a value may match two of, as a message. xgrammar generates it as `anyOf` (any one of
    its schemas); the two agree where no value matches two: their JSON types are apart, each allows a few values
    (const, enum) and no two share one, or each is an object that requires a property of one name with its own
    const value (a discriminated union, as pydantic writes `Field(discriminator=...)`)."""
    branches = schema.get("oneOf")
    if not isinstance(branches, list) or not branches:
        return None  # an empty list or a wrong type: xgrammar's compile names it
    resolved = [_resolved(branch, root) for branch in branches]
    if all(b is not None for b in resolved) and _apart(resolved, root):  # type: ignore[arg-type]
        return None
    return (
        f"'oneOf' at {path} is generated as 'anyOf', and a value may match more than one of its schemas; use "
        "'anyOf', or give each schema a required property of its own const value (a discriminator)"
    )


def _apart(branches: list[dict], root: Any) -> bool:
    """Whether no value matches two of `branches` (schemas with their `$ref`s into `root` followed), as far as
    shown here."""
    if len(branches) == 1:
        return True
    types = [_json_types(None, branch) for branch in branches]
    if all(t is not None for t in types) and _pairwise(types, lambda a, b: not any(  # type: ignore[arg-type]
        _type_within(x, b) or _type_within(y, a) for x in a for y in b
    )):  # fmt: skip
        return True
    values = [_allowed_values(branch) for branch in branches]
    if all(v is not None for v in values) and _pairwise(values, lambda a, b: not a & b):  # type: ignore[arg-type]
        return True
    if not all(t == {"object"} for t in types):  # `required` holds only objects: any other value matches each
        return False
    required = [b.get("required") if isinstance(b.get("required"), list) else [] for b in branches]
    shared = set.intersection(*({n for n in names if isinstance(n, str)} for names in required))
    for name in sorted(shared):
        properties = [b.get("properties") if isinstance(b.get("properties"), dict) else {} for b in branches]
        tags = [_allowed_values(_resolved(p.get(name), root)) for p in properties]
        if all(t is not None for t in tags) and _pairwise(tags, lambda a, b: not a & b):  # type: ignore[arg-type]
            return True
    return False


def _pairwise(items: list[Any], apart: Any) -> bool:
    return all(apart(a, b) for i, a in enumerate(items) for b in items[i + 1 :])


def _allowed_values(schema: Any) -> set[tuple[str, Any]] | None:
    """The values a const or enum schema allows, as JSON compares them (1 and 1.0 alike, true and 1 apart), or None
    for a schema that allows others."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        listed = [schema["const"]]
    elif isinstance(schema.get("enum"), list):
        listed = schema["enum"]
    else:
        return None
    keys = set()
    for value in listed:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            keys.add((type(value).__name__, json.dumps(value, sort_keys=True)))
        else:
            keys.add(("number", float(value)))
    return keys


def _resolved(schema: Any, root: Any) -> dict | None:
    """`schema` with its `$ref` chain into `root` followed ("#", "#/$defs/Cat"); None where one cannot be."""
    for _ in range(32):  # a loop of references resolves to nothing
        if not isinstance(schema, dict):
            return None
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        if ref != "#" and not ref.startswith("#/"):
            return None
        schema = root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            schema = schema.get(part) if isinstance(schema, dict) else None
    return None


def _type_is_implied(schema: dict) -> bool:
    """Whether every value that the schema's anyOf, allOf, enum or const allows is of its `type` already."""
    allowed = _json_types(schema["type"])
    inner = _json_types(None, {k: v for k, v in schema.items() if k != "type"})
    return allowed is not None and inner is not None and all(_type_within(t, allowed) for t in inner)


def _json_types(declared: Any, schema: Any = None) -> set[str] | None:
    """The JSON types a `type` value names or, with `schema`, the types the schema's values may have; None where
    that is not known from the schema alone."""
    if schema is None:
        if isinstance(declared, str):
            return {declared}
        if isinstance(declared, list) and all(isinstance(t, str) for t in declared):
            return set(declared)
        return None
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return {_value_type(schema["const"])}
    if isinstance(schema.get("enum"), list):
        return {_value_type(v) for v in schema["enum"]}
    if "type" in schema:
        return _json_types(schema["type"])
    for key in ("anyOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            branches = [_json_types(None, branch) for branch in schema[key]]
            return None if any(b is None for b in branches) else set().union(*branches)
    return None


def _value_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _type_within(json_type: str, allowed: set[str]) -> bool:
    return json_type in allowed or (json_type == "integer" and "number" in allowed)


def _min_properties_problem(schema: dict, path: str) -> str | None:
    """`minProperties` that keys beyond `properties` must help reach, as a message. xgrammar counts the keys it
    writes, a repeated one too, where JSON keeps one of each: its own matcher ended `{"a": 1, "a": 2}` with `stop`
    under `additionalProperties` and `minProperties: 2`, a value with one property. The required properties are
    distinct keys, and any key is one property, so up to that many is enforced."""
    minimum = schema.get("minProperties")
    if not isinstance(minimum, int) or isinstance(minimum, bool):
        return None
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    num_required = len({name for name in required if isinstance(name, str) and name in properties})
    opener = _extra_keys(schema)
    if minimum <= max(1, num_required) or opener is None:
        return None
    return (
        f"'minProperties' {minimum} at {path} is not enforced beside {opener!r} (the grammar engine counts a "
        f"repeated key, which JSON keeps once); list that many under 'properties' and 'required' instead"
    )


def _extra_keys(schema: dict) -> str | None:
    """The keyword that lets keys beyond `properties` into an object as xgrammar generates it, or None. Where the
    schema says nothing it allows none; a `propertyNames` may open it (it does where there are no `properties`)."""
    if schema.get("additionalProperties", False) is not False:
        return "additionalProperties"
    if schema.get("unevaluatedProperties", False) is not False:
        return "unevaluatedProperties"
    if schema.get("patternProperties"):
        return "patternProperties"
    if "propertyNames" in schema:
        return "propertyNames"
    return None


def _multiple_of_problem(schema: dict, path: str) -> str | None:
    """`multipleOf` where xgrammar would not enforce it, as a message (it refuses a zero or negative one itself)."""
    factor = schema.get("multipleOf")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        return None
    types = _json_types(schema.get("type")) or set()
    if "number" in types:
        return f"'multipleOf' at {path} is not enforced on type 'number' (only on 'integer')"
    if factor != int(factor) or factor > _MAX_MULTIPLE_OF:
        return f"'multipleOf' {factor} at {path} is not enforced: only a whole number up to {_MAX_MULTIPLE_OF} is"
    bound = next((k for k in _BOUNDS if k in schema), None)
    if bound and factor != 1:
        return f"'multipleOf' at {path} is not enforced beside {bound!r}"
    return None


def unsupported_regex(regex: str, constraint: bool = False) -> str | None:
    """Where xgrammar would read the regex other than Python's re does (and not refuse it itself), as a message;
    None when it reads it alike. Checks escapes, character classes, and anchors `^`/`$` inside the pattern, which
    xgrammar drops (`x(^a)` would let "xa" through). `constraint`: a `regex` constraint, not a schema's `pattern`;
    xgrammar parses the two apart, and misreads two more things in the first (_hex_problem, _class_end)."""
    # Per open group: [opens where the match starts, the current alternative has matched something,
    # the current alternative ended with `$`, some alternative ended with `$`].
    groups = [[True, False, False, False]]
    i = 0
    repeated = False  # the item before is a repetition (`*`, `+`, `?`, `{m,n}`), not a lazy mark on one
    while i < len(regex):
        char, top = regex[i], groups[-1]
        repetition = False
        if char == "\\":
            problem = _escape_problem(regex, i, in_class=False, constraint=constraint)
            if problem:
                return problem
            size, atom = 2, True
        elif char == "[":
            end, problem = _class_end(regex, i, constraint)
            if problem:
                return problem
            size, atom = end - i, True
        elif char == "(":
            size, atom = 1, False
            if regex.startswith("(?:", i):
                size = 3
            elif regex.startswith("(?<", i) and regex[i + 3 : i + 4] not in ("=", "!") and ">" in regex[i:]:
                size = regex.index(">", i) - i + 1  # a named group, as xgrammar reads it
            if top[2]:
                return _after_end(i)
            groups.append([top[0] and not top[1], False, False, False])
        elif char == ")" and len(groups) > 1:
            closed = groups.pop()
            size, atom = 1, False
            groups[-1][1] = True
            if closed[3]:  # `(a$|b)c`: what follows the group follows a `$`
                groups[-1][2] = groups[-1][3] = True
        elif char == "|":
            size, atom = 1, False
            top[1] = top[2] = False
        elif char == "^":
            if not top[0] or top[1]:
                return f"'^' at position {i} of the regex is not at its start (the grammar engine would drop it)"
            size, atom = 1, False
        elif char == "$":
            size, atom = 1, False
            top[2] = top[3] = True
        elif char in "*+?":
            if char == "+" and repeated:
                # Python's possessive `a?+`; xgrammar repeated the repetition in a schema's pattern (`a?+b` let
                # "aab" through) and refuses it in a regex constraint.
                return (
                    f"'+' after a repetition at position {i} of the regex is not supported (a possessive quantifier "
                    f"in Python's re; the grammar engine would repeat the repetition)"
                )
            size, atom = 1, False
            repetition = not (char == "?" and repeated)  # `a*?` is lazy: the same text as `a*`
        elif char == "{" and _REGEX_REPEAT.match(regex, i):
            size, atom = _REGEX_REPEAT.match(regex, i).end() - i, False
            repetition = True
        else:
            size, atom = 1, True
        if atom:
            if top[2]:
                return _after_end(i)
            top[1] = True
        repeated = repetition
        i += size
    return None


def _unescaped_in_json(regex: str) -> str | None:
    """Where a schema's regex names a character that a JSON string holds only escaped (`"`, a backslash, U+0000 to
    U+001F), as a message. xgrammar matches the regex against the string's raw text: it keeps these out of `.`,
    `\\W` and character classes, but writes one the regex names as it is (`a"b` gave `"a"b"`, not JSON)."""
    i = 0
    while i < len(regex):
        if regex[i] == "[":
            i = _class_end(regex, i)[0]
            continue
        code, size = _literal_code(regex, i)
        if code is not None and (code < 0x20 or code in (0x22, 0x5C)):
            return (
                f"{chr(code)!r} at position {i} of the regex would be written unescaped in the JSON string, so the "
                f"output would not be JSON (the grammar engine matches the string's raw text); leave it out"
            )
        i += size
    return None


def _literal_code(regex: str, i: int) -> tuple[int | None, int]:
    """The code point of the character the regex names at i (None for a class escape such as \\d), and its size."""
    if regex[i] != "\\":
        return ord(regex[i]), 1
    letter = regex[i + 1 : i + 2]
    if letter in _CONTROL_ESCAPES:
        return _CONTROL_ESCAPES[letter], 2
    digits = {"x": 2, "u": 4}.get(letter, 0)
    code = regex[i + 2 : i + 2 + digits]
    if digits and len(code) == digits and all(c in "0123456789abcdefABCDEF" for c in code):
        return int(code, 16), 2 + digits
    return (None if not letter or letter.isalpha() else ord(letter)), 2


def _after_end(i: int) -> str:
    return f"'$' in the regex is followed by more of it, at position {i} (the grammar engine would drop the '$')"


def _escape_problem(regex: str, i: int, in_class: bool, constraint: bool = False) -> str | None:
    letter = regex[i + 1 : i + 2]
    if letter in _DIGITS:
        return _octal_problem(regex, i, in_class)
    if letter in _HEX_ESCAPES:
        return _hex_problem(regex, i, constraint)
    if not (letter.isascii() and letter.isalpha()):
        return None
    known = _REGEX_ESCAPES | (frozenset("bpP") if in_class else _REGEX_ENGINE_REFUSES)
    if letter in known:
        return None
    hint = "; the whole output matches the regex already, no anchor needed" if letter in _REGEX_ANCHOR_ESCAPES else ""
    return (
        f"escape \\{letter} at position {i} of the regex is not supported (the grammar engine would read it as "
        f"the letter {letter!r}){hint}"
    )


def _octal_problem(regex: str, i: int, in_class: bool) -> str | None:
    """An octal escape as Python's re reads it (`\\012`; in a class also `\\1`), which xgrammar reads as the
    digits (`\\0` then "12"). Outside a class xgrammar refuses `\\1` to `\\9` itself, as backreferences."""
    digits = regex[i + 1 : i + 4]
    digits = digits[: next((k for k, c in enumerate(digits) if c not in _OCTAL), len(digits))]
    if digits == "0" or (not in_class and not digits.startswith("0")):
        return None
    return (
        f"escape \\{digits or regex[i + 1]} at position {i} of the regex is not supported (the grammar engine "
        f"would not read it as an octal escape); write \\x and two hex digits"
    )


def _hex_problem(regex: str, i: int, constraint: bool = False) -> str | None:
    """`\\x` not followed by two hex digits, `\\u` by four (or `{...}`): xgrammar reads the letter itself, so
    `\\x{41}` (Perl's "A") would be 41 x's. In a `regex` constraint it also reads every hex digit after `\\x`,
    so `\\x28a` was U+028A, not "(a"."""
    letter = regex[i + 1]
    size = _HEX_ESCAPES[letter]
    code = regex[i + 2 : i + 2 + size]
    braced = re.match(r"\{([0-9a-fA-F]+)\}", regex[i + 2 :]) if letter == "u" else None
    named = code if len(code) == size and all(c in _HEX for c in code) else braced.group(1) if braced else None
    if named is not None and 0xD800 <= int(named, 16) <= 0xDFFF:
        # JavaScript spells an emoji as a pair of these (`\ud83d\ude00`); xgrammar wrote each as three bytes that
        # are no UTF-8, and the row ended `stop` on them
        return (
            f"escape \\u{code if braced is None else braced.group(0)} at position {i} of the regex names a surrogate "
            f"code point, which no UTF-8 text holds (the grammar engine would write bytes that are not UTF-8); write "
            f"the character itself, or \\u{{...}} with its code point"
        )
    if len(code) == size and all(c in _HEX for c in code):
        after = regex[i + 2 + size : i + 3 + size]
        if constraint and letter == "x" and after and after in _HEX:
            return (
                f"escape \\x{code} at position {i} of the regex is followed by the hex digit {after!r}, which the "
                f"grammar engine would read as part of it; write \\u00{code}"
            )
        return None
    if letter == "u" and re.match(r"\{[0-9a-fA-F]+\}", regex[i + 2 :]):
        return None
    return (
        f"escape \\{letter} at position {i} of the regex is not followed by {size} hex digits (the grammar engine "
        f"would read it as the letter {letter!r})"
    )


def _class_end(regex: str, start: int, constraint: bool = False) -> tuple[int, str | None]:
    """The index after the character class opening at `start`, or a problem with it."""
    negated = regex[start + 1 : start + 2] == "^"
    i = start + 1 + negated
    if regex[i : i + 1] == "]":
        return i, f"']' first in the character class at position {start} of the regex is not supported; write \\]"
    if constraint and not negated and regex[i : i + 1] == "\\" and _literal_code(regex, i)[0] == ord("^"):
        # A `regex` constraint's `[\^a]` (and `[\x5ea]`) was read as `[^a]`: every character but "a".
        return i, (
            f"an escaped '^' first in the character class at position {start} of the regex is not supported (the "
            f"grammar engine would read it as negating the class); put it after another character, or outside a class"
        )
    while i < len(regex) and regex[i] != "]":
        if regex[i] == "\\":
            problem = _escape_problem(regex, i, in_class=True, constraint=constraint)
            if problem:
                return i, problem
            i += 2
        else:
            i += 1
    return i + 1, None
