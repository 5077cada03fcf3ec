"""Streaming readers: each yields `Row`s in input order with their index, never loading an input whole.

Formats: Parquet (record batches), Arrow IPC streams and files (read_arrow.py), JSONL and OpenAI Batch JSONL
(line by line, read_jsonl.py), Hugging Face datasets (read_hf.py). A row that cannot be read becomes a Row with an
error; an input that cannot be opened at all raises InputError. There is one bad-row policy: a bad row is written
as an error row and counted, and the job goes on (docs/bad-input.md).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from kvbatch.errors import SpecError

from .compressed import STREAM_CODECS, compression
from .read_arrow import open_arrow
from .read_hf import open_hf
from .read_jsonl import open_jsonl
from .read_parquet import open_parquet
from .rows import Reader
from .spec import JobSpec, input_format, input_path


def open_reader(job: JobSpec, needed_columns: list[str]) -> Reader:
    """Open the job's input. Columns missing from a schema'd input fail here, once, naming the field."""
    path = input_path(job)
    codec = compression(path) if path.is_file() else None
    if codec is not None and (codec not in STREAM_CODECS.values() or input_format(job) not in ("jsonl", "openai")):
        raise SpecError(
            f"{path.name} is compressed ({codec}); kvbatch reads JSON lines files compressed with "
            f"{', '.join(STREAM_CODECS)}, and .parquet and .arrow files as they are: decompress it first (Parquet "
            "compresses inside the file)",
            field="input.path",
        )
    if not path.exists() and any(c in job.input.path for c in "*?["):
        raise SpecError(
            f"input not found: {job.input.path} (a local run does not expand globs: give one file, or the folder "
            "that holds the files, which is read as `datasets` reads a repository)",
            field="input.path",
        )
    fmt = input_format(job)
    if fmt != "hf" and path.is_dir():
        raise SpecError(
            f"input.format {fmt} reads one file, and {path} is a folder; a folder (of part files too) is read as "
            "`datasets` reads a repository: leave input.format out (auto) or set it to hf",
            field="input.format",
        )
    if fmt in ("jsonl", "openai"):
        reader = open_jsonl(path, job.input.max_line_bytes, openai=fmt == "openai")
    elif fmt == "parquet":
        reader = open_parquet(path, needed_columns, job.input.batch_rows)
    elif fmt == "arrow":
        reader = open_arrow(path, needed_columns, job.input.batch_rows)
    elif fmt == "hf":
        reader = open_hf(
            job.input.path,
            path,
            job.input.split,
            needed_columns,
            job.input.batch_rows,
            job.input.max_line_bytes,
            job.input.config,
        )
    else:  # the spec's Literal makes this unreachable
        raise SpecError(f"unknown input format {fmt!r}", field="input.format")
    if reader.columns is not None:
        check_columns(reader.columns, needed_columns, path)
    if job.input.limit is not None:
        reader.rows = itertools.islice(reader.rows, job.input.limit)
        if reader.num_rows is not None:
            reader.num_rows = min(reader.num_rows, job.input.limit)
    return reader


def check_columns(available: list[str], needed: list[str], path: Path) -> None:
    missing = [c for c in needed if c not in available]
    if missing:
        raise SpecError(
            f"column {', '.join(map(repr, missing))} not in {path.name} (its columns: "
            # a file's column names are data: one holding an escape sequence would reach the terminal as a command
            f"{', '.join(c if c.isprintable() else ascii(c) for c in available)})",
            field="input",
        )
    repeated = [c for c in dict.fromkeys(needed) if available.count(c) > 1]
    if repeated:  # Parquet allows two columns of one name; which one a row means is then unclear
        raise SpecError(f"column {', '.join(map(repr, repeated))} appears more than once in {path.name}", field="input")
