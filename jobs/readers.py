"""Streaming readers: each yields `Row`s in input order with their index, never loading an input whole.

Formats: Parquet (record batches), JSONL and OpenAI Batch JSONL (line by line, read_jsonl.py), Hugging Face
datasets (read_hf.py). A row that cannot be read becomes a Row with an error; an input that cannot be opened at
all raises InputError. There is one bad-row policy: a bad row is written as an error row and counted, and the
job goes on (README "Bad inputs").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, SpecError
from .rows import INVALID_UTF8, WRONG_TYPE, Row, RowError
from .spec import JobSpec, input_format, input_path


@dataclass
class Reader:
    """An opened input: `columns` when the format has a schema, `num_rows` when cheap to know."""

    rows: Iterator[Row]
    num_rows: int | None
    columns: list[str] | None
    schema: pa.Schema | None = None

    def __iter__(self) -> Iterator[Row]:
        return self.rows


def open_reader(job: JobSpec, needed_columns: list[str]) -> Reader:
    """Open the job's input. Columns missing from a schema'd input fail here, once, naming the field."""
    fmt = input_format(job)
    path = input_path(job)
    if fmt in ("jsonl", "openai"):
        from .read_jsonl import open_jsonl

        reader = open_jsonl(path, job.input.max_line_bytes, openai=fmt == "openai")
    elif fmt == "parquet":
        reader = open_parquet(path, needed_columns, job.input.batch_rows)
    elif fmt == "hf":
        from .read_hf import open_hf

        reader = open_hf(job.input.path, path, job.input.split, needed_columns, job.input.batch_rows)
    else:  # the spec's Literal makes this unreachable
        raise SpecError(f"unknown input format {fmt!r}", field="input.format")
    if reader.columns is not None:
        check_columns(reader.columns, needed_columns, path)
    if job.input.limit is not None:
        reader.rows = itertools.islice(reader.rows, job.input.limit)
        reader.num_rows = job.input.limit if reader.num_rows is None else min(reader.num_rows, job.input.limit)
    return reader


def check_columns(available: list[str], needed: list[str], path: Path) -> None:
    missing = [c for c in needed if c not in available]
    if missing:
        raise SpecError(
            f"column {', '.join(map(repr, missing))} not in {path.name} (its columns: {', '.join(available)})",
            field="input",
        )
    repeated = [c for c in dict.fromkeys(needed) if available.count(c) > 1]
    if repeated:  # Parquet allows two columns of one name; which one a row means is then unclear
        raise SpecError(f"column {', '.join(map(repr, repeated))} appears more than once in {path.name}", field="input")


def open_parquet(path: Path, columns: list[str], batch_rows: int) -> Reader:
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"input not found: {path}") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Parquet file {path}: {exc}") from None
    available = parquet.schema_arrow.names
    wanted = [c for c in dict.fromkeys(columns) if c in available]

    # Bounded memory: one record batch of `batch_rows` rows at a time, only the columns the job uses.
    batches = parquet.iter_batches(batch_size=batch_rows, columns=wanted)
    return Reader(rows_of_batches(batches, path.name), parquet.metadata.num_rows, available, parquet.schema_arrow)


def rows_of_batches(batches: Iterator[pa.RecordBatch | pa.Table], name: str) -> Iterator[Row]:
    """Rows from Arrow batches. A value Python cannot hold (a string column's invalid UTF-8) fails its row alone;
    a batch that cannot be read at all (a damaged page) ends the input with an InputError naming the row."""
    index = 0
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
            rows = batch.to_pylist()
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
            data[name] = batch.column(name)[i].as_py()
        except _UNHOLDABLE as exc:
            if error is None:
                kind = INVALID_UTF8 if isinstance(exc, UnicodeDecodeError) else WRONG_TYPE
                error = RowError(kind, f"row {index}: column {name!r} cannot be read: {exc}")
    return data if error is None else Row(index, data, error)
