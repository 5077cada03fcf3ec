"""Arrow IPC inputs: a stream (what kvbatch writes as `.arrow` and `datasets` keeps its data in) or an IPC file
(Feather v2), memory-mapped and read one record batch at a time, so a job reads another job's output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from kvbatch.errors import InputError

from .arrow_io import is_ipc_file
from .read_parquet import rows_of_batches
from .rows import Reader


def open_arrow(path: Path, columns: list[str], batch_rows: int) -> Reader:
    if _is_feather_v1(path):
        raise feather_v1_refused(str(path))
    try:
        source = pa.memory_map(str(path))
        if is_ipc_file(path):
            file = pa.ipc.open_file(source)
            whole = (file.get_batch(i) for i in range(file.num_record_batches))
            # The footer lists the batches; their headers, memory-mapped, give the count without reading the data.
            num_rows: int | None = sum(file.get_batch(i).num_rows for i in range(file.num_record_batches))
            schema = file.schema
        else:
            stream = pa.ipc.open_stream(source)
            whole, schema = iter(stream), stream.schema
            # A stream lists no batches: a second reader over the same map walks their headers (the bodies stay
            # mapped, unread), as `datasets` does to count its own files, so the progress has a total and an empty
            # stream is known to be empty before a model loads.
            num_rows = sum(batch.num_rows for batch in pa.ipc.open_stream(pa.memory_map(str(path))))
    except FileNotFoundError:
        raise InputError(f"input not found: {path}") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Arrow file {path}: {exc}") from None
    wanted = [c for c in dict.fromkeys(columns) if c in schema.names]
    return Reader(rows_of_batches(_batches(whole, wanted, batch_rows), path.name), num_rows, schema.names, schema)


# Feather version 1's magic; version 2 is an Arrow IPC file.
FEATHER_V1_MAGIC = b"FEA1"


def feather_v1_refused(path: str) -> InputError:
    return InputError(
        f"{path} is a Feather version 1 file, the format before Arrow IPC (pyarrow deprecates it), which kvbatch "
        "does not read: write it as Feather version 2 first (pyarrow.feather.write_feather(pyarrow.feather."
        f"read_table({path!r}), 'in.arrow'))"
    )


def _is_feather_v1(path: Path) -> bool:
    """Whether the file starts with Feather version 1's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(len(FEATHER_V1_MAGIC)) == FEATHER_V1_MAGIC
    except OSError:  # missing or unreadable: the reader says which
        return False


def _batches(whole: Iterator[pa.RecordBatch], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The job's columns, in batches of at most `batch_rows` rows (a writer's batches may be any size)."""
    for batch in whole:
        batch = batch.select(columns)
        for start in range(0, batch.num_rows, batch_rows):
            yield batch.slice(start, batch_rows)
