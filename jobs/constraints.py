"""Where a row's structured-output constraint comes from: the job file (`sampling.structured_outputs`, whose
`json` may name a schema file), a column of the row (`constraint_column`), or an OpenAI Batch body's
`response_format`. Each becomes a `StructuredOutputs`; what is malformed raises ConstraintError, which fails that
row with `bad_constraint` (or the job file, with its line). Whether a constraint compiles is the engine's call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvbatch.runner.structured_outputs import KINDS, ConstraintError, StructuredOutputs

from .rows import mapping_value
from .yaml_nodes import Node, from_plain


def read_schema_files(job: Node, base_dir: str) -> None:
    """`sampling.structured_outputs.json: schemas/person.json` -> the schema that file holds, read now (relative to
    the job file's folder), so the spec and its hash carry the schema itself."""
    node = job
    for key in ("sampling", "structured_outputs", "json"):
        if not isinstance(node.value, dict) or key not in node.value:
            return
        parent, node = node, node.value[key]
    if not isinstance(node.value, str) or node.value.lstrip().startswith("{"):
        return
    path = Path(node.value).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    try:
        text = path.read_text(encoding="utf-8-sig")  # without the byte-order mark some Windows editors write
    except OSError as exc:
        raise node.error(f"cannot read the JSON schema file {path}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL (ValueError) or a lone surrogate (UnicodeEncodeError) in the name
        raise node.error(f"{node.value!r} is no file name (it holds a NUL or a lone surrogate)") from None
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise node.error(f"the JSON schema file {path} is not valid JSON: {exc}") from None
    except RecursionError:  # as an inline schema is refused (runner/structured_outputs.py)
        raise node.error(f"the JSON schema file {path} is not valid JSON: nested too deeply") from None
    parent.value["json"] = from_plain(schema, node.path, node.source)


def column_constraint(value: Any) -> StructuredOutputs | None:
    """A row's constraint column: a JSON Schema (a mapping, or JSON text of one), or a mapping with one of
    json, regex, choice, grammar, json_object (an object, struct, map or JSON text); null means the job's own."""
    if value is None:
        return None
    if isinstance(value, list) and (pairs := mapping_value(value)) is not None:
        value = pairs  # an Arrow map reads as its (key, value) pairs: `{"regex": ...}` in a map<string, string>
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConstraintError(f"the constraint column is not JSON: {exc}") from None
        except RecursionError:  # else it would end the job, not the row
            raise ConstraintError("the constraint column is not JSON: nested too deeply") from None
    # No JSON Schema keyword is one of KINDS: a mapping that names one is a constraint, and a key beside it is refused
    # as unknown. Read as a schema, `{"regex": "[0-9]+", "flags": "i"}` was one of unknown keywords: any JSON value.
    if isinstance(value, Mapping) and set(value) & set(KINDS):
        return StructuredOutputs.from_value(value)
    return StructuredOutputs.from_schema(value)


def response_format_constraint(response_format: Any) -> dict[str, Any] | None:
    """An OpenAI chat request's `response_format` as a `structured_outputs` value; None for plain text."""
    if not isinstance(response_format, Mapping):
        raise ConstraintError(f"response_format must be an object, got {response_format!r}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ConstraintError("response_format json_schema needs a `json_schema` object with a `schema`")
        return {"json": spec["schema"]}
    raise ConstraintError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")
