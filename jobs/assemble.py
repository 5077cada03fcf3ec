"""The final output file from committed parts: input order, each row once, in the requested format.

Parts are Arrow IPC files (kvbatch's own, never read by others), memory-mapped, so joining them and reordering
costs one int64 per row plus one output chunk at a time, whatever the output's size, and no open file per part.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvbatch.errors import JobError

from . import json_text
from .arrow_io import write_hf_folder, write_stream
from .atomic import atomic_file
from .nano_time import python_rows, python_values
from .openai_format import output_line
from .records import nested_types

log = logging.getLogger(__name__)
CHUNK_ROWS = 8192


def read_parts(paths: list[Path]) -> pa.Table:
    return unify([read_part(p) for p in paths])


def read_part(path: Path) -> pa.Table:
    """One part, memory-mapped. O_NOFOLLOW: a part swapped for a link (in a folder others can write) is an
    OSError, never the rows of the file it points to.

    No file stays open: the table's buffers keep the map alive once Arrow's file is closed. Python's mmap kept a
    descriptor of its own for each part, so assembling more parts than the open-file limit (1024 is a common
    soft limit: a job of a million rows at part_rows 1024) failed with "Too many open files", in every rerun."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        source = pa.memory_map(_descriptor_path(fd))  # the file opened above, whatever is at `path` by now
    finally:
        os.close(fd)
    try:
        return pa.ipc.open_file(source).read_all()
    finally:
        source.close()


def _descriptor_path(fd: int) -> str:
    """A path that opens the file `fd` has open (Linux's /proc, elsewhere /dev/fd)."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def unify(tables: list[pa.Table]) -> pa.Table:
    """Concatenate parts whose inferred input-column types may differ (a null-only part, int vs float...)."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    # Truly conflicting types (text in one part, numbers in another): keep such columns as JSON text. Only those:
    # a column that promotion can join (int in one part, float in another) keeps its type, whatever the others do.
    names = tables[0].column_names
    conflicting = [n for n in names if not _joinable([t.select([n]) for t in tables])]
    log.warning("columns %s have different types in different rows; they are written as JSON text", conflicting)
    fixed = []
    for t in tables:
        for name in conflicting:
            values = [None if v is None else _text(v) for v in python_values(t.column(name))]
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, pa.string()))
        fixed.append(t)
    return pa.concat_tables(fixed, promote_options="permissive")


def _joinable(tables: list[pa.Table]) -> bool:
    try:
        pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def input_order(table: pa.Table, num_rows: int) -> np.ndarray:
    """Indexes into `table` that list rows 0..num_rows-1 once each; raise if any row is missing."""
    rows = table.column("row").to_numpy()
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = sorted_rows[1:] != sorted_rows[:-1]
    if not keep.all():
        # The manifest makes this unreachable; if it ever happens, the first commit of a row wins.
        log.warning("%d duplicate rows in the parts were dropped", int((~keep).sum()))
        order, sorted_rows = order[keep], sorted_rows[keep]
    expected = np.arange(num_rows)
    if len(sorted_rows) != num_rows or not np.array_equal(sorted_rows, expected):
        extra = sorted_rows[(sorted_rows < 0) | (sorted_rows >= num_rows)]
        if len(extra):  # results for rows the input no longer has: it shrank since they were committed
            raise JobError(
                f"{len(extra)} results are for rows beyond the input's {num_rows} rows (first: {extra[:10].tolist()}); "
                "the input changed since they were written: rerun with output.mode: overwrite"
            )
        missing = np.setdiff1d(expected, sorted_rows)
        raise JobError(
            f"{len(missing)} input rows have no result (first: {missing[:10].tolist()}); rerun the job to finish them"
        )
    return order


def write_output(
    table: pa.Table,
    order: np.ndarray,
    path: Path,
    fmt: str,
    metadata: dict[bytes, bytes],
    *,
    model: str = "",
    id_column: str | None = None,
) -> int:
    """Write `table` reordered by `order` to `path` atomically; return the bytes written.

    Arrow is written as an IPC stream, the format Hugging Face `datasets` reads (`Dataset.from_file`); hf is a
    `save_to_disk` folder (`datasets.load_from_disk`)."""
    if fmt == "parquet":
        table = _parquet_safe(table)
    schema = table.schema.with_metadata(metadata)
    if fmt == "hf":
        return write_hf_folder(path, schema, _chunks(table, order))
    with atomic_file(path) as f:
        if fmt == "arrow":
            write_stream(f, schema, _chunks(table, order))
        elif fmt == "parquet":
            with pq.ParquetWriter(f, schema) as writer:
                for chunk in _chunks(table, order):
                    writer.write_table(chunk.replace_schema_metadata(metadata))
        elif fmt in ("jsonl", "openai"):
            _write_jsonl(f, table, order, fmt, model, id_column)
        else:
            raise ValueError(f"unknown output format {fmt!r}")
        size = f.tell()
    return size


def _parquet_safe(table: pa.Table) -> pa.Table:
    """Parquet has no struct without fields: a kept column holding {} is written there as JSON text ("{}")."""
    for i, field in enumerate(table.schema):
        if _has_empty_struct(field.type):
            values = [
                None if v is None else json_text.dumps(v, default=_jsonable) for v in python_values(table.column(i))
            ]
            table = table.set_column(i, field.name, pa.array(values, pa.string()))
    return table


def _has_empty_struct(kind: pa.DataType) -> bool:
    return any(pa.types.is_struct(t) and t.num_fields == 0 for t, _ in nested_types(kind))


def _chunks(table: pa.Table, order: np.ndarray):
    if len(order) == 0:
        yield table.slice(0, 0)
    for start in range(0, len(order), CHUNK_ROWS):
        yield table.take(pa.array(order[start : start + CHUNK_ROWS]))


def _write_jsonl(f: BinaryIO, table: pa.Table, order: np.ndarray, fmt: str, model: str, id_column: str | None) -> None:
    created = int(time.time())
    for chunk in _chunks(table, order):
        for record in python_rows(_float32_as_written(chunk)):  # a time64[ns] value to the nanosecond
            line: dict[str, Any] = (
                output_line(record, model, created, id_column or "custom_id") if fmt == "openai" else record
            )
            f.write(json_text.dumps(line, ensure_ascii=False, default=_jsonable).encode())
            f.write(b"\n")


def _float32_as_written(table: pa.Table) -> pa.Table:
    """`table` with each float32 value, in a column or nested in one, as the float64 of its shortest decimal.

    JSON writes a float with a float64's digits, where a float32's exact value has noise past its ninth digit: a
    logprob or a kept 0.1 was written 0.10000000149011612. Arrow's float32-to-text cast writes the shortest decimal
    that reads back as the same float32 (0.1), which the float64 cast then holds exactly."""
    for i, field in enumerate(table.schema):
        as_text = _float32_as(field.type, pa.string())
        if as_text != field.type:
            column = table.column(i).cast(as_text).cast(_float32_as(field.type, pa.float64()))
            table = table.set_column(i, field.name, column)
    return table


def _float32_as(kind: pa.DataType, to: pa.DataType) -> pa.DataType:
    """`kind` with each float32 in it (struct fields, list values, map keys and items) replaced by `to`."""
    if kind == pa.float32():
        return to
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_float32_as(f.type, to)) for f in kind])
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(kind.value_field.with_type(_float32_as(kind.value_type, to)), kind.list_size)
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_float32_as(kind.value_type, to)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_float32_as(kind.value_type, to)))
    if pa.types.is_map(kind):
        key, item = kind.key_field, kind.item_field
        return pa.map_(
            key.with_type(_float32_as(key.type, to)), item.with_type(_float32_as(item.type, to)), kind.keys_sorted
        )
    return kind


def _text(value: Any) -> str:
    """A value of a column kept as JSON text: a time, date or decimal as the JSONL output writes it (a time64[ns]
    one to the nanosecond), not refused by json for having no JSON type."""
    if not isinstance(value, (str, int, float, bool, dict, list, tuple)):
        value = _jsonable(value)
    return json_text.value_text(value, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """What JSON has no type for: bytes (a top_logprobs token's) as their integers, as OpenAI's `bytes` are; the
    rest (dates, decimals) as text."""
    if isinstance(value, bytes):
        return list(value)
    return str(value)


def count_by(table: pa.Table, column: str) -> dict[str, int]:
    if column not in table.column_names or table.num_rows == 0:
        return {}
    counts = pc.value_counts(table.column(column)).to_pylist()
    return {str(c["values"]): int(c["counts"]) for c in counts if c["values"] is not None}
