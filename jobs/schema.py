"""Build frozen dataclasses from `Node` trees, checking every field against the dataclass's type hints.

Declarative on purpose: spec.py only lists fields, types, defaults and bounds (`field(metadata=...)`);
this module turns a wrong field into one SpecError that names it, its line, and (for typos) the nearest name.

Supported field types: str, int, float, bool, Literal[...], X | None, tuple[X, ...], (X, Y) pairs, a mapping of
pairs for tuple[(X, Y), ...], dict[str, X] (dict[str, Any]: free-form), nested dataclasses.
Field metadata: `min`, `max` (inclusive), `gt` (exclusive lower bound), `nonempty` (for strings), `parse` (a
function that reads the field's plain value, raising ValueError).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from typing import Any, Literal, Union

from kvbatch.runner.config import is_finite, rule_violation

from .yaml_nodes import Node


def build(cls: type, node: Node) -> Any:
    """Instantiate dataclass `cls` from a mapping node; raise SpecError on the first wrong field."""
    if not isinstance(node.value, dict):
        raise node.error(f"expected a mapping of fields, got {_kind(node.value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
    for key, sub in node.value.items():
        if key not in fields:
            raise sub.error(_unknown_message(key, list(fields)))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in node.value and "parse" in f.metadata:  # a value with its own reader (a constraint: any JSON)
            kwargs[name] = _parse(f.metadata["parse"], node.value[name])
        elif name in node.value:
            kwargs[name] = _coerce(hints[name], node.value[name], f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise node.error(f"missing required field '{name}'")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a check across fields (min_tokens <= max_new_tokens) or of a pair's bounds
        raise node.error(str(exc)) from None


def _parse(reader: Any, node: Node) -> Any:
    if node.value is None:
        return None
    misread = _yaml11_scalar(node)
    if misread is not None:  # any JSON goes here: no type check catches `enum: [yes, no]` read as [true, false]
        raise misread.error(_yaml11_message(misread.yaml11, misread.value))
    try:
        return reader(node.plain())
    except ValueError as exc:
        raise node.error(str(exc)) from None


def _yaml11_scalar(node: Node) -> Node | None:
    """The first scalar in `node` that YAML 1.1 reads otherwise than YAML 1.2 and JSON (Node.yaml11), or None."""
    if node.yaml11 is not None:
        return node
    children = node.value.values() if isinstance(node.value, dict) else node.value
    if not isinstance(node.value, (dict, list)):
        return None
    return next((found for child in children if (found := _yaml11_scalar(child)) is not None), None)


def _yaml11_message(text: str, value: Any) -> str:
    if isinstance(value, bool):
        return (
            f"{text!r} reads as {json.dumps(value)} in YAML 1.1, which reads job files, but as text in YAML 1.2 and "
            f"JSON: quote it for text ('{text}'), or write {json.dumps(value)}"
        )
    mantissa, _, exponent = text.lower().partition("e")  # PyYAML reads a number with a dot and a signed exponent
    mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
    exponent = exponent if exponent[:1] in ("+", "-") else f"+{exponent}"
    return (
        f"{text!r} reads as text in YAML 1.1, which reads job files, but as a number in YAML 1.2 and JSON: quote it "
        f"for text ('{text}'), or write the number as {mantissa}e{exponent}"
    )


def _unknown_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known fields: {', '.join(sorted(known))})"
    return f"unknown field{hint}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


# A number YAML 1.2 and JSON read, but YAML 1.1 (PyYAML's) reads as text: an exponent without a dot or without a
# sign (1e-3, 1.0e3). PyYAML's floats need both (1.0e-3, 1.0e+3).
_EXPONENT_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _number_kind(value: Any, integer: bool = False) -> str:
    """_kind for a field that takes a number: text that is one in YAML 1.2 says how to write it for YAML 1.1."""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        mantissa, _, exponent = value.lower().partition("e")
        number = float(value)
        mantissa += "" if "." in mantissa else ".0"
        exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
        spelt = str(int(number)) if integer and number.is_integer() else f"{mantissa}e{exponent}"
        return f"{_kind(value)} (YAML reads an exponent without a dot or a sign as text: write {spelt})"
    return _kind(value)


def _text_kind(value: Any) -> str:
    """_kind for a field that takes text: a boolean there was most likely a word YAML 1.1 reads as one."""
    if isinstance(value, bool):
        return f"{_kind(value)} (YAML reads yes, no, on and off as true or false: quote a word meant as text, 'off')"
    return _kind(value)


def _coerce(hint: Any, node: Node, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    value = node.value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, node, meta)
    if dataclasses.is_dataclass(hint):
        return build(hint, node)
    if origin is dict:
        if not isinstance(value, dict):
            raise node.error(f"expected a mapping, got {_kind(value)}")
        if args[1] is Any:  # free-form values for a template (chat_template_kwargs): passed on as written
            return node.plain()
        return {str(key): _coerce(args[1], sub, meta) for key, sub in value.items()}
    if origin is Literal:
        if value not in args:
            raise node.error(f"must be one of {', '.join(map(repr, args))}, got {_text_kind(value)}")
        return value
    if origin is tuple and Ellipsis not in args:  # one (token id, bias) pair, given as [id, bias]
        if not isinstance(value, list) or len(value) != len(args):
            raise node.error(f"expected a list of {len(args)} values, got {_kind(value)}")
        return tuple(_coerce(a, item, {}) for a, item in zip(args, value))
    if origin is tuple and isinstance(value, dict) and typing.get_origin(args[0]) is tuple:
        # A mapping of pairs (logit_bias: {50256: -100}): keys are token ids, as YAML or JSON spells them.
        pairs = []
        for key, sub in value.items():
            # isdigit alone takes "²", which int() refuses, and "٥", which it reads as 5
            is_id = isinstance(key, str) and key.isascii() and key.isdigit()
            key_node = Node(int(key) if is_id else key, sub.path, sub.line, sub.source)
            pairs.append(
                (
                    _check_scalar(typing.get_args(args[0])[0], key_node, {}),
                    _coerce(typing.get_args(args[0])[1], sub, {}),
                )
            )
        return tuple(pairs)
    if origin is tuple:
        items = value if isinstance(value, list) else None
        if items is None:
            # A single value where a list is expected is a common shorthand (`stop: "###"`).
            items = [node] if value is not None and not isinstance(value, dict) else None
            if items is None:
                raise node.error(f"expected a list, got {_kind(value)}")
        return tuple(_coerce(args[0], item, meta) for item in items)
    return _check_scalar(hint, node, meta)


def _check_scalar(hint: Any, node: Node, meta: typing.Mapping[str, Any]) -> Any:
    value = node.value
    if hint is bool:
        if not isinstance(value, bool):
            raise node.error(f"expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise node.error(f"expected an integer, got {_number_kind(value, integer=True)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value):
            raise node.error(f"expected a finite number, got {_number_kind(value)}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise node.error(f"expected a string, got {_text_kind(value)}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # "\ud800" in YAML, or bytes that were not UTF-8 on the command line
                bad = value[exc.start : exc.end]
                raise node.error(
                    f"holds {bad!r} at character {exc.start}: not text (a lone surrogate, or bytes that were not UTF-8)"
                ) from None
    else:
        raise TypeError(f"schema.py does not support field type {hint!r} (field {node.path})")
    problem = rule_violation(value, meta)  # the bounds declared with the field (runner/config.py's one check)
    if problem:
        raise node.error(problem)
    return value
