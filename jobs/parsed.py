"""The `parsed` output column (`output.parsed: true`): each JSON-constrained row's output as Arrow data.

Its type comes from the job's JSON schema, once, so every part of the output has the same column:

    schema                                          Arrow
    {"type": "object", "properties": {...}}         struct of the properties (declared order)
    {"type": "array", "items": S}                   list<S's type>
    "string" / "integer" / "number" / "boolean"     string / int64 / float64 / bool
    an enum or const of one of those types          that type
    ["T", "null"]                                   T (nulls are nulls)
    anything else (anyOf, $ref, keys beyond the     string: the value as compact JSON text, each number
    properties, a tuple, an empty object, deep      with the digits it was written with
    nesting)

A row gets a value only when its constraint is JSON (json or json_object) and its sample ended with `stop` (a
constrained row that stops is complete JSON); a row cut at `length`, an error row, a row under a regex, choice or
grammar, or a value its type cannot hold (an integer past int64, a number past float64, a lone surrogate escape)
gets null, and its `text` keeps the output as generated.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pyarrow as pa

from .records import MAX_NESTING

Convert = Callable[[Any], Any]
_INT64 = (-(2**63), 2**63 - 1)
# A UTF-16 surrogate written as an escape: JSON text may hold a lone one (`"\ud800"`, which the grammar engine
# allows), which no UTF-8 string, so no Arrow string, can.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _as_text(value: Any) -> str:
    """Compact JSON text of a parsed value. Numbers were parsed as Decimal, so each keeps its digits: a float would
    turn 1e400 into Infinity (not JSON) and round 0.1000000000000000000001."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_as_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_as_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise OverflowError(f"{value} does not fit int64")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    number = float(value)
    if math.isinf(number):  # JSON has no infinity: `1e400` (the grammar allows any exponent) is past float64
        raise OverflowError(f"{value} does not fit float64")
    return number


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


_SCALARS: dict[str, tuple[pa.DataType, Convert]] = {
    "string": (pa.string(), _string),
    "integer": (pa.int64(), _integer),
    "number": (pa.float64(), _number),
    "boolean": (pa.bool_(), _boolean),
}


def _nullable(convert: Convert) -> Convert:
    return lambda value: None if value is None else convert(value)


_TEXT = (pa.string(), _nullable(_as_text))  # a missing property is null, not the text "null"


def _json_type(schema: dict) -> str | None:
    """The schema's one JSON type: `type` (a name, or a list of one name and "null"), else the enum's or const's."""
    kind = schema.get("type")
    if isinstance(kind, list):
        names = [k for k in kind if k != "null"]
        kind = names[0] if len(names) == 1 else None
    if kind is None and (isinstance(schema.get("enum"), list) or "const" in schema):
        values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]]
        kinds = {_value_type(v) for v in values if v is not None}
        kind = kinds.pop() if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else None


def _value_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _arrow(schema: Any, depth: int = 0) -> tuple[pa.DataType, Convert]:
    """The Arrow type of values of `schema`, and the function that turns such a JSON value into one."""
    if not isinstance(schema, dict) or depth >= MAX_NESTING or any(k in schema for k in ("anyOf", "oneOf", "$ref")):
        return _TEXT
    kind = _json_type(schema)
    if kind in _SCALARS:
        arrow_type, convert = _SCALARS[kind]
        return arrow_type, _nullable(convert)
    if kind == "array" and isinstance(schema.get("items"), dict) and "prefixItems" not in schema:  # no tuples
        item_type, convert_item = _arrow(schema["items"], depth + 1)

        def convert_list(value: Any) -> list:
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            return [convert_item(v) for v in value]

        return pa.list_(item_type), _nullable(convert_list)
    properties = schema.get("properties")
    if kind == "object" and isinstance(properties, dict) and properties and _closed(schema):
        children = {name: _arrow(sub, depth + 1) for name, sub in properties.items()}
        struct = pa.struct([pa.field(name, arrow_type) for name, (arrow_type, _) in children.items()])

        def convert_object(value: Any) -> dict:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return {name: convert(value.get(name)) for name, (_, convert) in children.items()}

        return struct, _nullable(convert_object)
    return _TEXT


def _closed(schema: dict) -> bool:
    """No keys beyond `properties` can appear: a struct of them holds the whole value. Extra keys are allowed by
    any additionalProperties or unevaluatedProperties but false (`{}` is any value), and by patternProperties;
    the grammar engine allows none where the schema says nothing."""
    return (
        schema.get("additionalProperties", False) is False
        and schema.get("unevaluatedProperties", False) is False
        and not schema.get("patternProperties")
    )


@dataclass(frozen=True)
class ParsedColumn:
    """The `parsed` column of one job: its Arrow type, and each sample's value."""

    type: pa.DataType
    convert: Convert

    @classmethod
    def for_schema(cls, schema_text: str | None) -> ParsedColumn:
        """From a json constraint's schema (JSON text); None (json_object: any object) gives JSON text."""
        arrow_type, convert = _arrow(json.loads(schema_text)) if schema_text is not None else _TEXT
        return cls(arrow_type, convert)

    def value(self, text: str | None, finish_reason: str | None) -> Any:
        if text is None or finish_reason != "stop":
            return None
        try:
            value = json.loads(text, parse_float=Decimal)
            if _SURROGATE_ESCAPE.search(text):  # rare, so only such texts pay for the check
                json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")  # UnicodeEncodeError: a lone one
            return self.convert(value)
        except (ValueError, TypeError, OverflowError, RecursionError):  # text keeps what the model wrote
            return None
