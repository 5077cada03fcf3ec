"""A row's output constraint (structured output), as plain data: no torch, no grammar library.

The names are vLLM's `structured_outputs`: exactly one of `json` (a JSON Schema), `regex`, `choice` (a list of
strings), `grammar` (EBNF/GBNF) or `json_object` (any JSON object). The value is frozen and hashable, so rows
that share a constraint share one compiled grammar (runner/structured.py). A schema is kept as compact JSON
text in its own key order: the order of `properties` is the order the fields are generated in.

Whether the constraint compiles is only known to the grammar library; what is checked here is its shape.
"""

from __future__ import annotations

import json as json_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


class ConstraintError(ValueError):
    """A constraint that is malformed or cannot compile; its row fails with `bad_constraint`."""


def _doc(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output: set exactly one field. A row that completes it ends with `stop`."""

    json: str | None = _doc(None, "a JSON Schema: a mapping, or the path of a .json file (held as JSON text)")
    regex: str | None = _doc(None, "a regular expression the whole output matches")
    choice: tuple[str, ...] | None = _doc(None, "the output is exactly one of these strings")
    grammar: str | None = _doc(None, "an EBNF grammar, GBNF dialect (`root ::= ...`)")
    json_object: bool = _doc(False, "any JSON object")

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ConstraintError(
                f"set exactly one of {', '.join(KINDS)}; got {', '.join(set_kinds) if set_kinds else 'none'}"
            )
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConstraintError(f"{name} must be a string, got {value!r}")
        # An empty regex, or a choice of "", is met by the empty output (the grammar engine allows only an
        # end-of-sequence token first); an empty schema or grammar is not one at all, and no choice matches nothing.
        for name in ("json", "grammar"):
            if getattr(self, name) == "":
                raise ConstraintError(f"{name} must be a non-empty string, got ''")
        if self.choice is not None:
            if not isinstance(self.choice, tuple) or not self.choice:
                shown = list(self.choice) if isinstance(self.choice, tuple) else self.choice  # as it was given
                raise ConstraintError(f"choice must be a non-empty list of strings, got {shown!r}")
            if not all(isinstance(c, str) for c in self.choice):
                raise ConstraintError(f"choice must hold strings, got {list(self.choice)!r}")
        if not isinstance(self.json_object, bool):
            raise ConstraintError(f"json_object must be true or false, got {self.json_object!r}")
        # JSON text may spell half a surrogate pair (`"\ud800"`), which no UTF-8 text holds: the grammar engine
        # cannot take it, and a message quoting the constraint could not be written to the output.
        for name in ("json", "regex", "grammar", "choice"):
            value = getattr(self, name)
            for text in value if isinstance(value, tuple) else (value,) if value is not None else ():
                lone = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
                if lone is not None:
                    raise ConstraintError(f"{name} holds a lone surrogate (\\u{ord(lone):04x}), which is not text")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def describe(self, width: int = 60) -> str:
        """One short line naming the constraint, for logs, plan and error messages."""
        value = getattr(self, self.kind)
        text = (
            "any JSON object"
            if self.kind == "json_object"
            else json_module.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)
        )
        if len(text) > width:
            text = text[: width - 3] + "..."
        return f"{self.kind} {text}" if self.kind != "json_object" else "json_object"

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputs:
        """From a mapping with one of KINDS (a `json` schema may be a mapping or JSON text), as a job file, a
        row's column or an OpenAI body gives it. Raises ConstraintError naming what is wrong."""
        if isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, Mapping):
            raise ConstraintError(f"a constraint is a mapping with one of {', '.join(KINDS)}, got {value!r}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ConstraintError(f"unknown constraint field(s) {', '.join(map(str, unknown))}; use one of {KINDS}")
        fields = dict(value)
        if fields.get("json") is not None:  # null is unset, as for the other kinds (an Arrow struct's other fields)
            fields["json"] = schema_text(fields["json"])
        if isinstance(fields.get("choice"), list):
            fields["choice"] = tuple(fields["choice"])
        if fields.get("json_object") is None:
            fields.pop("json_object", None)
        return cls(**fields)

    @classmethod
    def from_schema(cls, schema: Any) -> StructuredOutputs:
        return cls(json=schema_text(schema))

    def to_value(self) -> dict[str, Any]:
        """The inverse of from_value, as plain JSON data (the schema parsed back), for metadata and hashes."""
        if self.json is not None:
            return {"json": json_module.loads(self.json)}
        if self.choice is not None:
            return {"choice": list(self.choice)}
        return {self.kind: getattr(self, self.kind)}


# The fields of OpenAI's response_format.json_schema around the schema itself.
_OPENAI_WRAPPER = frozenset({"name", "schema", "strict", "description"})


def schema_text(schema: Any) -> str:
    """A JSON Schema (a mapping, a bool, or JSON text of one) as compact JSON text, keys in their order."""
    if isinstance(schema, str):
        try:
            schema = json_module.loads(schema)
        except ValueError as exc:
            raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from None
        except RecursionError:  # a row's text may nest deeper than Python's parser goes: that row's error
            raise ConstraintError("the JSON schema is not valid JSON: nested too deeply") from None
    if not isinstance(schema, (Mapping, bool)):
        raise ConstraintError(f"a JSON schema is an object, got {type(schema).__name__}")
    if isinstance(schema, Mapping) and "schema" in schema and set(schema) <= _OPENAI_WRAPPER:
        # its keys are no JSON Schema keywords: as a schema it would allow any JSON
        raise ConstraintError(
            "this is OpenAI's json_schema wrapper ({name, schema, strict}), not a JSON Schema; give its 'schema' as "
            "the JSON Schema"
        )
    try:
        return json_module.dumps(schema, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"the JSON schema cannot be written as JSON: {exc}") from None
    except RecursionError:
        raise ConstraintError("the JSON schema cannot be written as JSON: nested too deeply") from None
