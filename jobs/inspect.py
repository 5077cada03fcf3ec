"""`kvbatch inspect`: what an output file holds: schema, counts by finish reason and error kind, sample rows."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvbatch.errors import InputError, MissingOutputError, OutputError

from .arrow_io import read_arrow
from .nano_time import python_rows
from .writer import parts_dir, work_dir


@dataclass
class OutputReport:
    path: str
    format: str
    num_rows: int = 0
    schema: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    finish_reasons: Counter = field(default_factory=Counter)
    error_kinds: Counter = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def format_text(self) -> str:
        lines = [f"{self.path}: {self.format}, {self.num_rows} rows"]
        if self.schema:
            lines += ["schema:", *("  " + s for s in self.schema.splitlines())]
        for key in ("kvbatch.version", "kvbatch.model", "kvbatch.spec_hash", "kvbatch.sampling"):
            if key in self.metadata:
                lines.append(f"{key}: {self.metadata[key]}")
        lines.append(
            "finish reasons: " + (", ".join(f"{k} {v}" for k, v in self.finish_reasons.most_common()) or "none")
        )
        lines.append("error kinds: " + (", ".join(f"{k} {v}" for k, v in self.error_kinds.most_common()) or "none"))
        lines.append("sample rows:")
        lines += ["  " + json.dumps(s, ensure_ascii=False, default=str)[:400] for s in self.samples]
        return "\n".join(lines)


def inspect_output(path: Path, num_samples: int = 3) -> OutputReport:
    _refuse_ray_parts(path)
    if not path.exists():
        staged = work_dir(path)
        if staged.is_dir():  # a run that has not finished: its committed rows wait in parts until it does
            raise InputError(
                f"no such output yet: {path}; a run that has not finished keeps its committed rows in {staged}/ "
                "and writes the output when it completes (rerun the job to finish it)"
            )
        raise MissingOutputError(f"no such output: {path}")
    suffix = path.suffix.lower()  # OUT.Parquet, as a job may name its output
    try:
        if path.is_dir():  # a datasets save_to_disk folder (output.format hf)
            return _from_table(path, "hf", read_arrow(path), num_samples)
        if suffix == ".arrow":
            return _from_table(path, "arrow", read_arrow(path), num_samples)
        if suffix == ".parquet":
            return _from_parquet(path, num_samples)
        if suffix == ".jsonl":
            return _from_jsonl(path, num_samples)
    except (OSError, OutputError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    raise InputError(
        f"cannot tell the format of {path.name}; kvbatch writes .arrow, .parquet, .jsonl and datasets folders"
    )


def _refuse_ray_parts(path: Path) -> None:
    """A Ray run writes no output file, but a folder of Parquet parts beside it (out/answers.parquet.parts/): named
    by the output or by the folder, say so, rather than call the run unfinished or the folder no datasets folder."""
    output = path.with_name(path.name.removesuffix(".parts")) if path.name.endswith(".parts") else path
    parts = parts_dir(output)
    if output.exists() or not parts.is_dir():
        return
    raise InputError(
        f"{output} is a Ray run's output: its rows are the Parquet files of {parts}/ (pyarrow and datasets read the "
        f"folder as it is); `kvbatch merge {output}` writes them into {output} once the run is complete"
    )


def _from_table(path: Path, fmt: str, table: pa.Table, num_samples: int) -> OutputReport:
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    report = OutputReport(str(path), fmt, table.num_rows, table.schema.remove_metadata().to_string(), meta)
    for name, counter in (("finish_reason", report.finish_reasons), ("error_kind", report.error_kinds)):
        if name in table.column_names:
            counter.update(v for v in table.column(name).to_pylist() if v is not None)
    report.samples = python_rows(table.slice(0, num_samples))  # a nanosecond value to the nanosecond
    return report


def _from_parquet(path: Path, num_samples: int) -> OutputReport:
    """Only the two count columns and the first rows are read: an output can be larger than memory."""
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    report = OutputReport(str(path), "parquet", parquet.metadata.num_rows, schema.remove_metadata().to_string(), meta)
    counted = [c for c in ("finish_reason", "error_kind") if c in schema.names]
    counters = {"finish_reason": report.finish_reasons, "error_kind": report.error_kinds}
    if counted:
        for batch in parquet.iter_batches(columns=counted):
            for name in counted:
                counters[name].update(v for v in batch.column(name).to_pylist() if v is not None)
    if num_samples:
        first = next(parquet.iter_batches(batch_size=num_samples), None)
        report.samples = python_rows(first) if first is not None else []
    return report


def _from_jsonl(path: Path, num_samples: int) -> OutputReport:
    report = OutputReport(str(path), "jsonl")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # without the newline, a cut line's column is on this line
            except json.JSONDecodeError as exc:  # its line and column are the text's, where this line is line 1
                message = f"line {line_no} is not JSON: {exc.msg} at column {exc.colno}"
                raise InputError(f"cannot read {path}: {message}") from None
            except (ValueError, RecursionError):  # an integer past Python's digits, or nesting past its parser's
                raise InputError(f"cannot read {path}: line {line_no} is not a kvbatch output row") from None
            try:
                _count_record(report, record)
            except (AttributeError, KeyError, IndexError, TypeError):
                raise InputError(f"cannot read {path}: line {line_no} is not a kvbatch output row") from None
            if len(report.samples) < num_samples:
                report.samples.append(record)
    return report


def _count_record(report: OutputReport, record: dict) -> None:
    """Count one line of a kvbatch JSONL or OpenAI Batch output; a KeyError or TypeError: not such a line."""
    report.num_rows += 1
    if "response" in record and "custom_id" in record:  # an OpenAI Batch output line
        report.format = "openai"
        if record.get("error"):
            report.finish_reasons["error"] += 1
            report.error_kinds[record["error"].get("code", "error")] += 1
        else:
            report.finish_reasons[record["response"]["body"]["choices"][0]["finish_reason"]] += 1
    else:
        report.finish_reasons[record["finish_reason"]] += 1  # every kvbatch row has the field (null on errors)
        if record.get("error_kind"):
            report.error_kinds[record["error_kind"]] += 1
