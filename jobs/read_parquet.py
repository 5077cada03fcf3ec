"""Parquet inputs, and the Arrow record batches that `datasets` folders are read as too: one batch at a time."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kvbatch.errors import ErrorKind, InputError

from .nano_time import python_rows
from .rows import Reader, Row, RowError

# Column chunks are read through a buffer of this size, a batch's pages at a time: pyarrow's default pre-buffers a
# row group's chunks whole, and a row group may be a million rows (pyarrow's own default) of any length.
_READ_BUFFER_BYTES = 1 << 20


def open_parquet(path: Path, columns: list[str], batch_rows: int) -> Reader:
    try:
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES)
    except FileNotFoundError:
        raise InputError(f"input not found: {path}") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Parquet file {path}: {exc}") from None
    available = parquet.schema_arrow.names
    wanted = [c for c in dict.fromkeys(columns) if c in available]

    # Bounded memory: one record batch of `batch_rows` rows at a time, only the columns the job uses.
    batches = parquet.iter_batches(batch_size=batch_rows, columns=wanted)
    return Reader(rows_of_batches(batches, path.name), parquet.metadata.num_rows, available, parquet.schema_arrow)


def rows_of_batches(batches: Iterator[pa.RecordBatch | pa.Table], name: str, first_index: int = 0) -> Iterator[Row]:
    """Rows from Arrow batches, numbered from `first_index`. A value Python cannot hold (a string column's invalid
    UTF-8) fails its row alone; a batch that cannot be read at all (a damaged page) ends the input with an
    InputError naming the row."""
    index = first_index
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:
            raise InputError(
                f"cannot read {name} from row {index} on ({type(exc).__name__}: {' '.join(str(exc).split())})"
            ) from None
        try:
            rows = python_rows(batch)
        except _UNHOLDABLE:
            rows = [_one_row(batch, i, index + i) for i in range(batch.num_rows)]
        for data in rows:
            yield data if isinstance(data, Row) else Row(index, data)
            index += 1


# Values Python cannot hold: invalid UTF-8 (UnicodeDecodeError is a ValueError), a date past year 9999 or an int64
# sentinel in a timestamp (OverflowError).
_UNHOLDABLE = (ValueError, OverflowError, pa.ArrowException)


def _one_row(batch: pa.RecordBatch | pa.Table, i: int, index: int) -> Row | dict:
    """The row's values; a row with one that cannot be read is an error row that keeps the others (its id)."""
    data: dict = {}
    error = None
    for name in batch.column_names:
        try:
            data[name] = python_rows(batch.select([name]).slice(i, 1))[0][name]
        except _UNHOLDABLE as exc:
            if error is None:
                kind = ErrorKind.INVALID_UTF8 if isinstance(exc, UnicodeDecodeError) else ErrorKind.WRONG_TYPE
                error = RowError(kind, f"row {index}: column {name!r} cannot be read: {exc}")
    return data if error is None else Row(index, data, error)


def with_request_values(rows: Iterator[Row], schema: pa.Schema, columns: list[str]) -> Iterator[Row]:
    """`rows` with the values of `columns` (the request's: prompt, sampling values, ...) as the row's text means
    them. Arrow JSON values (`datasets`' `Json` feature, also as a struct field or list item: a chat dataset whose
    message content is text in some rows and a list of parts in others) as the Python values they spell, as
    `datasets` gives them: read as stored, content "hi" reached the prompt as `"hi"`. float32 and float16 values
    (pandas' float32 columns, `datasets`' Value('float32')) as the shortest decimal of their width: Python's float
    holds their bits exactly, so 19.99 reached a template's prompt as 19.989999771118164 and a row's temperature
    0.7 was 0.699999988079071, where the same row as JSON lines says 19.99 and 0.7. Other columns (ids, kept
    columns) are written back as read."""
    kinds = {
        c: schema.field(c).type
        for c in columns
        if c in schema.names and (_holds_json(schema.field(c).type) or _holds_narrow_float(schema.field(c).type))
    }
    if not kinds:
        return rows
    return (row if row.data is None else _decoded(row, kinds) for row in rows)


def _decoded(row: Row, kinds: dict[str, pa.DataType]) -> Row:
    assert row.data is not None, "only rows that were read are decoded"
    data = dict(row.data)
    for name, kind in kinds.items():
        if name not in data:
            continue
        try:
            data[name] = _json_values(_as_written(data[name], kind), kind)
        except RecursionError:  # json.loads recurses once per nesting level: the row fails, as a JSONL line does
            error = RowError(ErrorKind.BAD_JSON, f"{row.value(name)} holds JSON nested too deeply")
            return row if row.error is not None else dataclasses.replace(row, error=error)
    return dataclasses.replace(row, data=data)


_NARROW_FLOATS = {pa.float32(): np.float32, pa.float16(): np.float16}


def _holds_narrow_float(kind: pa.DataType) -> bool:
    if kind in _NARROW_FLOATS:
        return True
    if pa.types.is_struct(kind):
        return any(_holds_narrow_float(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_map(kind):
        return _holds_narrow_float(kind.key_type) or _holds_narrow_float(kind.item_type)
    if pa.types.is_dictionary(kind) or pa.types.is_run_end_encoded(kind):
        return _holds_narrow_float(kind.value_type)
    value_field = getattr(kind, "value_field", None)  # the list types, views and fixed-size lists alike
    return value_field is not None and _holds_narrow_float(value_field.type)


def _as_written(value: Any, kind: pa.DataType) -> Any:
    """A Python value of `kind` with each float32 and float16 value in it as the shortest decimal of its width."""
    if value is None or not _holds_narrow_float(kind):
        return value
    if kind in _NARROW_FLOATS:
        return float(str(_NARROW_FLOATS[kind](value)))  # numpy's str of a float32 is its shortest round trip
    if pa.types.is_struct(kind) and isinstance(value, dict):
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        return {k: _as_written(v, fields[k]) if k in fields else v for k, v in value.items()}
    if pa.types.is_map(kind):  # its entries, as (key, value) pairs
        return [(_as_written(k, kind.key_type), _as_written(v, kind.item_type)) for k, v in value]
    if pa.types.is_dictionary(kind) or pa.types.is_run_end_encoded(kind):
        return _as_written(value, kind.value_type)
    return [_as_written(v, kind.value_type) for v in value]


def _is_json(kind: pa.DataType) -> bool:
    return getattr(kind, "extension_name", None) == "arrow.json"


def _holds_json(kind: pa.DataType) -> bool:
    if _is_json(kind):
        return True
    if pa.types.is_struct(kind):
        return any(_holds_json(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _holds_json(kind.value_type)
    return False


def _json_values(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if _is_json(kind):
        try:
            return json.loads(value)
        except (TypeError, ValueError):  # not JSON after all: the text as stored
            return value
    if pa.types.is_struct(kind) and isinstance(value, dict):
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        return {k: _json_values(v, fields[k]) if k in fields else v for k, v in value.items()}
    if _holds_json(kind) and isinstance(value, list):
        return [_json_values(v, kind.value_type) for v in value]
    return value
