"""docs/job-file.md, generated from the job's declarations (jobs/spec.py, runner/config.py): one table a section,
each field with its type, default, bounds and doc. tests/jobs/test_reference.py fails when the page is stale;
`python -m kvbatch.jobs.reference > docs/job-file.md` writes it anew.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from .spec import JobSpec

HEADER = """\
# Job file reference

Generated from the settings' own declarations (`jobs/spec.py`, `runner/config.py`) by
`python -m kvbatch.jobs.reference > docs/job-file.md`; a test fails when this page is out of date.

A job file is a mapping with `jobs:` (a list of jobs) and optionally `defaults:` (fields every job takes unless it
sets them). Precedence: `--set` and command-line options > the job's own fields > `defaults:` > the defaults below.
Mappings are merged field by field (`sampling:`, `engine:`, `adapters`, `chat_template_kwargs`), but a list, a
`logit_bias` or a `structured_outputs` constraint is one value: the side that sets it replaces it whole; so is the
prompt's source (a job's `template` replaces the defaults' `column`).
Paths are relative to the job file's folder (to the working folder for a job file read from a pipe, such as
`/dev/stdin`). A wrong field fails the file before any model loads, naming the file,
line and field (and the nearest name for a typo). A setting a job would drop (a column field on an OpenAI Batch
input, chat template settings with `chat_template: false`, Ray settings on a local job) is refused where the job or
the command line sets it; from `defaults:`, meant for the file's other jobs, it is passed over (so is a `--set`
value where another job that runs reads it, chat template values from `defaults:` for a model without a template,
and the values a row's `sampling_column` from `defaults:` gives a job that does not read them). The same checks
hold for a row's own values (an OpenAI Batch body), where a bad value fails that row only.

```yaml
defaults:
  model: default
  sampling: {max_new_tokens: 128}
jobs:
  - name: questions
    input: {path: data/questions.jsonl}
    id_column: id
    sampling: {temperature: 0.7}
    engine: {seed: 1}             # each row its own seed, from 1 and its row index
```
"""


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in inner) + (" \\| null" if len(inner) < len(args) else "")
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple and typing.get_origin(args[0]) is tuple:  # logit_bias: (token id, bias) pairs
        return "mapping of integer: number"
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of name to {_type_name(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return {str: "string", int: "integer", float: "number", bool: "bool"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _default(f: dataclasses.Field, hint: Any) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:  # an `engine:` field left out takes the engine's own default
        value = f.metadata.get("engine_default")
    if dataclasses.is_dataclass(value):
        return "see below"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple) and _type_name(hint).startswith("mapping"):  # logit_bias: held as pairs
        return "`{}`" if not value else f"`{dict(value)}`"
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)}`"
    return f"`{value}`"


def _bounds(meta: typing.Mapping[str, Any]) -> str:
    parts = [f">= {meta['min']}" if "min" in meta else "", f"> {meta['gt']}" if "gt" in meta else ""]
    parts += [f"<= {meta['max']}" if "max" in meta else "", "not empty" if meta.get("nonempty") else ""]
    return ", ".join(p for p in parts if p)


def _section(title: str, cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    doc = (cls.__doc__ or "").split("\n\n")[0].strip() if cls.__module__ != "types" else ""
    lines = [f"## {title}", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [" ".join(doc.split()), ""]
    lines += ["| field | type | default | bounds | what it does |", "| --- | --- | --- | --- | --- |"]
    nested = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or not f.init:
            continue
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if dataclasses.is_dataclass(inner[0]):
            nested.append((f"`{prefix}{f.name}:`", inner[0], f"{prefix}{f.name}."))
        cells = [f"`{f.name}`", _type_name(hint), _default(f, hint), _bounds(f.metadata), f.metadata.get("doc", "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") if i == 4 else c for i, c in enumerate(cells)) + " |")
    lines.append("")
    for title, sub, sub_prefix in nested:
        lines += _section(title, sub, sub_prefix)
    return lines


def job_file_reference() -> str:
    return HEADER + "\n" + "\n".join(_section("A job", JobSpec, "")).rstrip() + "\n"


if __name__ == "__main__":
    print(job_file_reference(), end="")
