"""Load YAML into a tree of `Node`s that remember their line, so spec errors can name `file:line: field`.

Only the safe subset: we compose with `yaml.SafeLoader` (no Python tags, no object construction) and build
scalars with its constructor. Duplicate mapping keys are an error here, where `yaml.safe_load` would silently keep
the last one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from kvbatch.errors import SpecError


@dataclass(frozen=True)
class Node:
    """A YAML value with where it came from. `value` is a scalar, a dict[str, Node] or a list[Node]."""

    value: Any
    path: str  # dotted field path, e.g. "jobs[0].sampling.temperature"
    line: int | None = None  # 1-based; None for values from the command line
    source: str | None = None  # the file name, or "command line"
    # A plain scalar as written, where YAML 1.1 (PyYAML's) reads it otherwise than YAML 1.2 and JSON do: `yes`,
    # `no`, `on`, `off` (true or false here, text there) and an exponent without a dot or sign (`1e3`: text here,
    # a number there). A typed field checks the value it got; a free-form JSON value (a schema) cannot, so it
    # refuses these (jobs/schema.py).
    yaml11: str | None = None

    @property
    def where(self) -> str | None:
        if self.source and self.line:
            return f"{self.source}:{self.line}"
        return self.source

    def error(self, message: str) -> SpecError:
        return SpecError(message, field=self.path, where=self.where)

    def plain(self) -> Any:
        """The value without line information (what yaml.safe_load would have returned)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def child_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def load_yaml(text: str, source: str) -> Node:
    """Parse YAML text into Nodes. Syntax errors become SpecError with the line."""
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses non-printable characters (\x01, U+FFFE) right here
    except yaml.reader.ReaderError as exc:
        line = f"{source}:{text.count(chr(10), 0, exc.position) + 1}"
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise SpecError(f"YAML error: the character {char!r} is not allowed in YAML text", where=line) from None
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{source}:{mark.line + 1}" if mark else source
        raise SpecError(f"YAML syntax error: {exc.problem or exc}", where=line) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML error: {exc}", where=source) from None
    except RecursionError:  # the parser recurses once per nesting level
        raise SpecError("YAML error: nested too deeply", where=source) from None
    finally:
        loader.dispose()
    if root is None:
        return Node({}, "", 1, source)
    try:
        return _convert(root, "", source, yaml.SafeLoader(""), [MAX_VALUES])
    except RecursionError:  # deep nesting, or an alias inside the node it names (`jobs: &a [*a]`)
        raise SpecError("YAML error: nested too deeply (or an alias inside itself)", where=source) from None


MAX_VALUES = 100_000  # values a job file may expand to: aliases (&a / *a) could otherwise nest to billions
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _convert(node: yaml.Node, path: str, source: str, constructor: yaml.SafeLoader, budget: list[int]) -> Node:
    line = node.start_mark.line + 1
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError(
            f"the job file expands to more than {MAX_VALUES} values (nested YAML aliases?)",
            field=path,
            where=f"{source}:{line}",
        )
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
        # The safe loader would build nothing from `!!python/object/apply:... [..]` either, but a tag that is
        # silently dropped hides what the author meant: job files hold plain values only.
        raise SpecError(
            f"unsupported YAML tag {node.tag!r}; job files hold plain values only", field=path, where=f"{source}:{line}"
        )
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SpecError(
                    "YAML merge keys (<<) are not supported; use `defaults:`", field=path, where=f"{source}:{line}"
                )
            key = _scalar(key_node, path, source, constructor)
            if isinstance(key, int) and not isinstance(key, bool):  # a token id (logit_bias: {50256: -100})
                key = str(key)
            if not isinstance(key, str):
                raise SpecError(
                    f"field names must be strings, got {key!r}",
                    field=path,
                    where=f"{source}:{key_node.start_mark.line + 1}",
                )
            sub = child_path(path, key)
            if key in out:
                raise SpecError(
                    f"duplicate field (first at line {out[key].line})",
                    field=sub,
                    where=f"{source}:{key_node.start_mark.line + 1}",
                )
            # A field's line is its key's line: for a block value (`sampling:` then indented fields) the value
            # starts on the next line, but the user wrote the field where the key is.
            value = _convert(value_node, sub, source, constructor, budget)
            out[key] = Node(value.value, value.path, key_node.start_mark.line + 1, value.source, value.yaml11)
        return Node(out, path, line, source)
    if isinstance(node, yaml.SequenceNode):
        items = [_convert(item, child_path(path, i), source, constructor, budget) for i, item in enumerate(node.value)]
        return Node(items, path, line, source)
    value = _scalar(node, path, source, constructor)
    return Node(value, path, line, source, _yaml11_text(node, value))


# Words YAML 1.1 reads as booleans where YAML 1.2 and JSON read text; PyYAML takes each in these three cases.
_YAML_1_1_BOOLEANS = frozenset(
    spelling for word in ("yes", "no", "on", "off") for spelling in (word, word.capitalize(), word.upper())
)
# A number in YAML 1.2 and JSON; PyYAML reads one as text where its exponent has no dot or no sign (1e3, 1.0e3).
_YAML_1_2_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _yaml11_text(node: yaml.ScalarNode, value: Any) -> str | None:
    """The scalar's text where YAML 1.1 reads it otherwise than YAML 1.2 (Node.yaml11), else None."""
    if node.style is not None:  # quoted (or a block scalar): text in every YAML
        return None
    if isinstance(value, bool) and node.value in _YAML_1_1_BOOLEANS:
        return node.value
    if isinstance(value, str) and _YAML_1_2_NUMBER.fullmatch(node.value):
        return node.value
    return None


# Numbers YAML 1.1 (PyYAML's) and YAML 1.2 read apart: a leading zero is octal (`012` is 10, not 12) and colons are
# base 60 (`1:30` is 90, not text). Refused rather than read one way: a seed or length would silently differ.
_YAML_1_1_NUMBER = re.compile(r"[-+]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def _scalar(node: yaml.Node, path: str, source: str, constructor: yaml.SafeLoader) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise SpecError("a mapping key must be a plain value", field=path, where=f"{source}:{node.start_mark.line + 1}")
    if node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and _YAML_1_1_NUMBER.fullmatch(node.value):
        value = constructor.construct_object(node, deep=True)
        raise SpecError(
            f"{node.value!r} reads as {value} in YAML 1.1 but not in YAML 1.2 (a leading zero is octal, colons are "
            "base 60): write the number without them, or quote it for text",
            field=path,
            where=f"{source}:{node.start_mark.line + 1}",
        )
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        # Unknown tags (e.g. !!python/object) land here: the safe loader refuses to build them.
        raise SpecError(
            f"unsupported YAML value: {exc.problem}", field=path, where=f"{source}:{node.start_mark.line + 1}"
        ) from None
    except ValueError as exc:  # a value its tag cannot hold: 2001-02-30, !!int "abc", an int of over 4300 digits
        where = f"{source}:{node.start_mark.line + 1}"
        raise SpecError(f"unsupported YAML value {node.value[:40]!r}: {exc}", field=path, where=where) from None


def from_plain(value: Any, path: str, source: str | None = None) -> Node:
    """Wrap a plain value (command-line overrides) as Nodes without lines."""
    if isinstance(value, dict):
        return Node({k: from_plain(v, child_path(path, k), source) for k, v in value.items()}, path, None, source)
    if isinstance(value, (list, tuple)):
        return Node([from_plain(v, child_path(path, i), source) for i, v in enumerate(value)], path, None, source)
    return Node(value, path, None, source)


def merge(base: Node, override: Node, whole: frozenset[str] = frozenset()) -> Node:
    """Deep-merge two mappings: `override` wins field by field; each value keeps the line where it was written.
    A field named in `whole` is one value, mapping or not: `override`'s replaces `base`'s.

    The merged mapping itself is named after the side written in a file (the job over `defaults:`; the job, not
    the command line), so an error about the whole mapping ("missing required field") points at the job.
    """
    if isinstance(base.value, dict) and isinstance(override.value, dict):
        merged = dict(base.value)
        for key, node in override.value.items():
            merged[key] = merge(merged[key], node, whole) if key in merged and key not in whole else node
        named = override if override.line is not None or base.line is None else base
        return Node(merged, named.path, named.line, named.source)
    return override
