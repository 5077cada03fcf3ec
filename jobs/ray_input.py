"""A Ray run's input: the job's files, listed on the driver, read on the cluster with each row's input position.

Ray Data's own readers do not number rows across files, and a run needs every row's input position (the output's
`row` column, as in a local run: it names the row in messages, skips finished rows on a rerun and orders a
single-file output). So the driver lists the input's files in path order (names and row counts only, never rows)
and each file's rows follow the rows of the files before it:

    files, sorted by path      a.parquet (1000 rows)    b.parquet (500 rows)    c.parquet ...
    input positions (`row`)    0 .. 999                 1000 .. 1499            1500 ...

Parquet row counts come from the files' footers; Arrow IPC files (Feather v2) are counted on the driver too, batch
by batch. JSON lines files and Arrow streams (a `datasets` folder's files, kvbatch's `.arrow` outputs) are counted
by Ray tasks on the cluster, one per file (for JSON lines, non-blank lines, as the local reader counts rows).
Positions stay the same from run to run as long as the files do, and the manifest's input identity (each file's
name, size and row count) refuses a rerun over changed files.

`RowsSource` is a Ray Data datasource: one read task per Parquet row group or per other file, each streaming
`batch_rows` rows at a time as blocks of (row, line, data, error_kind, error, sampling). `data` holds the columns
the job uses, pickled (a value keeps its Python type, as the local reader gives it); an unreadable row has none
and carries its error, exactly as the local readers make it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import hashlib
import io
import json
import pickle
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kvbatch.errors import InputError, SpecError

from .arrow_io import FILE_MAGIC
from .compressed import STREAM_CODECS, data_suffix
from .manifest import INPUT_KEY
from .read_arrow import FEATHER_V1_MAGIC, feather_v1_refused
from .read_hf import folder_configs, folder_splits
from .read_jsonl import count_rows_in, jsonl_rows, not_json_lines, openai_row
from .read_parquet import rows_of_batches, with_request_values
from .readers import check_columns
from .rows import Row, id_key
from .spec import JobSpec, input_path

_KINDS = {
    ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
}  # fmt: skip
_GLOB = set("*?[")


@dataclass(frozen=True)
class InputFile:
    path: str  # in the filesystem's own terms (no scheme)
    kind: str  # parquet | jsonl | openai | arrow (an Arrow IPC stream or file: a `datasets` folder's, an output's)
    first_row: int  # input position of its first row
    num_rows: int
    row_groups: tuple[int, ...] = ()  # Parquet: rows in each row group
    shown: str | None = None  # where the input is several files, how its lines' messages name it ("line 3 of a.jsonl")


@dataclass(frozen=True)
class RayInput:
    filesystem: pafs.FileSystem
    files: tuple[InputFile, ...]
    num_rows: int  # rows the run reads (input.limit applied)
    schema: pa.Schema | None  # Parquet and `datasets`: the first file's schema
    identity: dict[str, Any]  # the manifest's input identity


def open_ray_input(job: JobSpec, needed_columns: list[str]) -> RayInput:
    """List the job's input files and their row counts; check the columns a schema'd input must have."""
    filesystem, paths, kind = _list(job)
    if not paths:
        raise InputError(f"no input files found at {job.input.path}")
    counts = _count_rows(filesystem, paths, kind)
    if kind in ("jsonl", "openai"):
        for path, (num_rows, _) in zip(paths, counts):
            with filesystem.open_input_stream(path) as f:
                problem = not_json_lines(path, io.BufferedReader(f), num_rows, job.input.max_line_bytes)
            if problem is not None:
                raise SpecError(problem, field="input.path")
    files, first = [], 0
    common = posixpath.commonpath(paths) if len(paths) > 1 else None
    for path, (num_rows, groups) in zip(paths, counts):
        shown = path[len(common) :].lstrip("/") if common is not None else None  # as a local folder's reader does
        files.append(InputFile(path, kind, first, num_rows, groups, shown))
        first += num_rows
    schema = _schema(filesystem, paths[0], kind)
    if schema is not None:
        check_columns(schema.names, needed_columns, Path(paths[0]))
    num_rows = first if job.input.limit is None else min(first, job.input.limit)
    return RayInput(filesystem, tuple(files), num_rows, schema, _identity(filesystem, files))


def input_found(job: JobSpec) -> bool:
    """Whether the job's input lists at least one file (one that cannot be read for another reason is found)."""
    try:
        return bool(_list(job)[1])
    except InputError:
        return False


def _list(job: JobSpec) -> tuple[pafs.FileSystem, list[str], str]:
    """(filesystem, file paths in input order, kind)."""
    spec = job.input.path
    if job.input.config is not None:  # else it would be ignored without a word
        raise SpecError(
            "runner: ray reads files, folders and save_to_disk datasets, which hold one configuration each; leave "
            "input.config out (save the configuration with save_to_disk, or run it locally)",
            field="input.config",
        )
    if "://" in spec:
        filesystem, root = pafs.FileSystem.from_uri(spec)
    else:
        filesystem, root = pafs.LocalFileSystem(), str(input_path(job))
    if _GLOB & set(root):
        paths = _glob(filesystem, root)
    else:
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(
                f"input not found: {spec} (runner: ray reads files, folders, globs and URIs; a dataset name from the "
                "Hugging Face cache must be saved with save_to_disk first)"
            )
        if info.type == pafs.FileType.File:
            paths = [root]
        else:
            datasets = _datasets_files(filesystem, root, job.input.split)
            if datasets is not None:
                return filesystem, datasets, "arrow"
            if job.input.split is not None:  # else every split's files would be read as one input
                raise SpecError(
                    f"runner: ray takes input.split for a save_to_disk folder only, and {spec} is a folder of files; "
                    "name the split's files in input.path instead (a glob: data/test-*.parquet)",
                    field="input.split",
                )
            _refuse_several_splits(filesystem, root)
            paths = _folder_files(filesystem, root)
    return filesystem, paths, _kind(job, paths)


def _refuse_several_splits(filesystem: pafs.FileSystem, root: str) -> None:
    """A local run reads one split of a folder laid out as a dataset repository (data/train-*, data/test-*) and
    refuses one of several without input.split, and one of several configurations without input.config; this run
    reads a folder's files as one input, so it would mix them.
    Only a local folder is looked at: `datasets` reaches other filesystems through fsspec, not pyarrow."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return
    configs = folder_configs(Path(root))  # several: each config's files would be read as one input too
    if len(configs) > 1:
        raise SpecError(
            f"{root} has configurations {', '.join(configs)} (as its README lists them), and runner: ray reads a "
            "folder's files as one input; name one configuration's files in input.path (a glob: the data_files "
            "its README gives)",
            field="input.path",
        )
    splits = folder_splits(Path(root))
    if len(splits) > 1:
        raise SpecError(
            f"{root} has splits {', '.join(splits)} (as `datasets` reads its files), and runner: ray reads a "
            f"folder's files as one input; name one split's files in input.path (a glob: data/{splits[0]}-*.parquet)",
            field="input.path",
        )


def _glob(filesystem: pafs.FileSystem, pattern: str) -> list[str]:
    if isinstance(filesystem, pafs.LocalFileSystem):
        return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    parts = pattern.split("/")
    base = "/".join(p for p in parts[: next(i for i, p in enumerate(parts) if _GLOB & set(p))])
    selector = pafs.FileSelector(base, recursive=True)
    found = [i.path for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File]
    return sorted(p for p in found if fnmatch.fnmatchcase(p, pattern))


def _folder_files(filesystem: pafs.FileSystem, root: str) -> list[str]:
    """A folder's data files (by extension, any depth), hidden and `_`-prefixed names left out (as pyarrow does)."""
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    found = []
    for info in infos:
        relative = info.path[len(root) :].lstrip("/")
        hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
        if info.type == pafs.FileType.File and not hidden and _file_kind(info.path) is not None:
            found.append(info.path)
    return sorted(found)


def _datasets_files(filesystem: pafs.FileSystem, root: str, split: str | None) -> list[str] | None:
    """A `datasets` save_to_disk folder's Arrow files, in order (None: not such a folder)."""
    if _exists(filesystem, f"{root}/dataset_dict.json"):
        splits = json.loads(_read_text(filesystem, f"{root}/dataset_dict.json")).get("splits", [])
        if split is None and len(splits) != 1:
            raise SpecError(f"{root} has splits {', '.join(splits)}; choose one with input.split", field="input.split")
        chosen = split if split is not None else splits[0]
        if chosen not in splits:
            raise SpecError(f"{root} has no split {chosen!r} (splits: {', '.join(splits)})", field="input.split")
        root, split = f"{root}/{chosen}", None
    if not _exists(filesystem, f"{root}/state.json"):
        return None
    state = json.loads(_read_text(filesystem, f"{root}/state.json"))
    own = state.get("_split")  # the split a saved Dataset was, if it knows
    if split is not None and own != split:
        which = "names no split" if own is None else f"is split {own!r}"
        raise SpecError(
            f"{root} is one dataset that {which}, not split {split!r}; leave input.split out", field="input.split"
        )
    return [f"{root}/{entry['filename']}" for entry in state.get("_data_files", [])]


def _kind(job: JobSpec, paths: list[str]) -> str:
    if job.input.format == "openai":
        return "openai"
    if job.input.format in ("jsonl", "parquet", "arrow"):
        return job.input.format
    if job.input.format == "hf":
        raise SpecError("runner: ray reads a `datasets` folder (save_to_disk), not a dataset name", field="input.path")
    kinds = {_file_kind(p) for p in paths}
    if len(kinds) != 1 or None in kinds:
        raise SpecError(
            f"cannot tell one input format for {job.input.path} (found {', '.join(sorted(map(str, kinds)))}); "
            "give files of one kind, or set input.format",
            field="input.format",
        )
    return kinds.pop()


def _file_kind(path: str) -> str | None:
    """A file's input kind by its name. pyarrow's input streams decompress a file by its suffix, so a compressed
    JSON lines file (data.jsonl.gz) is one too; a compressed Parquet or Arrow file is none."""
    if Path(path).suffix.lower() in STREAM_CODECS:
        return "jsonl" if _KINDS.get(data_suffix(path)) == "jsonl" else None
    return _KINDS.get(Path(path).suffix.lower())


def _head(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_file(path) as f:
        return f.read(len(FILE_MAGIC))


def _is_ipc_file(filesystem: pafs.FileSystem, path: str) -> bool:
    return _head(filesystem, path) == FILE_MAGIC


def _ipc_batches(filesystem: pafs.FileSystem, path: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """An Arrow input's schema and record batches, from either IPC format: a stream (a `datasets` folder's
    files, kvbatch's .arrow outputs) or a file (Feather v2, `.arrow` files of other writers)."""
    try:
        if _is_ipc_file(filesystem, path):
            reader = pa.ipc.open_file(filesystem.open_input_file(path))
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        stream = pa.ipc.open_stream(filesystem.open_input_file(path))
        return stream.schema, iter(stream)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Arrow file {path}: {exc}") from None


def _exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.File


def _read_text(filesystem: pafs.FileSystem, path: str) -> str:
    with filesystem.open_input_stream(path) as f:
        return f.read().decode()


def _count_rows(filesystem: pafs.FileSystem, paths: list[str], kind: str) -> list[tuple[int, tuple[int, ...]]]:
    """(rows, rows per row group) of each file: Parquet footers here, other files by Ray tasks on the cluster."""
    heads = [_head(filesystem, path) for path in paths] if kind == "arrow" else []
    # Refused here, as the local reader refuses it: counted by a Ray task, it failed there as no Arrow stream.
    v1 = next((path for path, head in zip(paths, heads) if head.startswith(FEATHER_V1_MAGIC)), None)
    if v1 is not None:
        raise feather_v1_refused(v1)
    if kind == "arrow" and all(head == FILE_MAGIC for head in heads):
        # An IPC file's footer lists its batches: counted here, batch by batch, without a Ray task.
        return [(sum(b.num_rows for b in _ipc_batches(filesystem, path)[1]), ()) for path in paths]
    if kind == "parquet":
        counts = []
        for path in paths:
            try:
                meta = pq.ParquetFile(filesystem.open_input_file(path)).metadata
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"cannot read Parquet file {path}: {exc}") from None
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            counts.append((meta.num_rows, groups))
        return counts
    import ray

    count = ray.remote(_count_file)
    return [(n, ()) for n in ray.get([count.remote(filesystem, path, kind) for path in paths])]


def _count_file(filesystem: pafs.FileSystem, path: str, kind: str) -> int:
    if kind == "arrow":
        return sum(batch.num_rows for batch in _ipc_batches(filesystem, path)[1])
    with filesystem.open_input_stream(path) as f:
        return count_rows_in(f)


def _schema(filesystem: pafs.FileSystem, path: str, kind: str) -> pa.Schema | None:
    if kind == "parquet":
        return pq.read_schema(filesystem.open_input_file(path))
    if kind == "arrow":
        return _ipc_batches(filesystem, path)[0]
    return None


def _identity(filesystem: pafs.FileSystem, files: list[InputFile]) -> dict[str, Any]:
    """{"input_file": ...}: each file's name, size and row count, hashed (a changed file set is refused on resume)."""
    digest = hashlib.sha256()
    sizes = filesystem.get_file_info([f.path for f in files])
    for file, info in zip(files, sizes):
        digest.update(f"{Path(file.path).name}\0{info.size}\0{file.num_rows}\0".encode())
    return {INPUT_KEY: {"files": len(files), "rows": sum(f.num_rows for f in files), "sha256": digest.hexdigest()[:16]}}


# ---- reading, on the cluster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """What one read task reads: a file, or one row group of a Parquet file."""

    file: InputFile
    row_group: int | None
    first_row: int
    num_rows: int


class RowsSource:
    """A Ray Data datasource over a RayInput (built lazily: `datasource()` imports Ray)."""

    def __init__(
        self,
        source: RayInput,
        columns: list[str],
        batch_rows: int,
        max_line_bytes: int,
        request_columns: list[str] | None = None,
    ) -> None:
        self.source, self.columns, self.batch_rows, self.max_line_bytes = source, columns, batch_rows, max_line_bytes
        self.request_columns = request_columns or []  # read as a request reads them (with_request_values)
        # rows an earlier run wrote, sorted, skipped at the read: only where Ray has no checkpointing (ray_run.py)
        self.done_rows = np.zeros(0, np.int64)

    def units(self) -> list[_Unit]:
        units = []
        for file in self.source.files:
            if file.first_row >= self.source.num_rows:
                break
            if file.row_groups:
                first = file.first_row
                for group, num_rows in enumerate(file.row_groups):
                    if num_rows and first < self.source.num_rows:
                        units.append(_Unit(file, group, first, num_rows))
                    first += num_rows
            elif file.num_rows:
                units.append(_Unit(file, None, file.first_row, file.num_rows))
        return units

    def jsonl_rows(self) -> Iterator[Row]:
        """A JSONL input's rows in order with all their keys, read here: the driver reads the first few, to
        check that the job's columns are there (jobs/first_rows.py)."""
        for unit in self.units():
            yield from _rows(self.source.filesystem, unit, None, self.batch_rows, self.max_line_bytes)

    def read(self, unit: _Unit, keys_of: str | None = None) -> Iterator[pa.Table]:
        """The unit's rows as blocks: (row, line, data, error_kind, error, sampling); with `keys_of` (the id
        column) only (row, key) of each readable row with an id, for the search for duplicate ids."""
        rows = _rows(self.source.filesystem, unit, self.columns, self.batch_rows, self.max_line_bytes)
        if self.source.schema is not None:
            rows = with_request_values(rows, self.source.schema, self.request_columns)
        chunk: list[Row] = []
        done = self.done_rows[(self.done_rows >= unit.first_row) & (self.done_rows < unit.first_row + unit.num_rows)]
        for row in rows:
            if row.index >= self.source.num_rows:
                break
            if len(done) and done[min(np.searchsorted(done, row.index), len(done) - 1)] == row.index:
                continue
            chunk.append(row)
            if len(chunk) == self.batch_rows:
                yield block_of_rows(chunk, keys_of)
                chunk = []
        if chunk:
            yield block_of_rows(chunk, keys_of)

    def datasource(self, keys_of: str | None = None) -> Any:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        units, read = self.units(), self.read

        class _Source(Datasource):
            def estimate_inmemory_data_size(self) -> int | None:
                return None

            def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
                return [
                    ReadTask(
                        functools.partial(read, unit, keys_of),
                        BlockMetadata(num_rows=None, size_bytes=None, input_files=[unit.file.path], exec_stats=None),
                    )
                    for unit in units
                ]

            def get_name(self) -> str:
                return "KvbatchRows"

        return _Source()


def _rows(
    filesystem: pafs.FileSystem, unit: _Unit, columns: list[str] | None, batch_rows: int, max_line_bytes: int
) -> Iterator[Row]:
    """The unit's rows with the job's `columns` (None: a JSONL line's every key)."""
    file = unit.file
    if columns is None and file.kind not in ("jsonl", "openai"):
        raise ValueError(f"only JSON lines are read with all their keys, not {file.kind}")
    if file.kind == "parquet":
        parquet = pq.ParquetFile(filesystem.open_input_file(file.path))
        wanted = [c for c in dict.fromkeys(columns) if c in parquet.schema_arrow.names]
        batches = parquet.iter_batches(batch_size=batch_rows, row_groups=[unit.row_group], columns=wanted)
        return rows_of_batches(batches, Path(file.path).name, unit.first_row)
    if file.kind == "arrow":
        schema, batches = _ipc_batches(filesystem, file.path)
        wanted = [c for c in dict.fromkeys(columns) if c in schema.names]
        return rows_of_batches((b.select(wanted) for b in batches), Path(file.path).name, unit.first_row)
    handle = io.BufferedReader(filesystem.open_input_stream(file.path), 1 << 20)
    rows = jsonl_rows(handle, max_line_bytes, unit.first_row, file.shown)
    if file.kind == "openai":
        return (openai_row(row) for row in rows)
    if columns is None:
        return rows
    needed = set(columns)  # only what the job uses travels (a local run's row holds all, and uses the same)
    return (row if row.data is None else dataclasses.replace(row, data={k: v for k, v in row.data.items()
                                                                        if k in needed}) for row in rows)  # fmt: skip


def block_of_rows(rows: list[Row], keys_of: str | None = None) -> pa.Table:
    """Rows as a RowsSource block (or, with `keys_of`, as (row, key) of the id column)."""
    if keys_of is not None:
        keyed = [(r.index, r.data.get(keys_of)) for r in rows if r.error is None and r.data]
        keyed = [(index, id_key(value)) for index, value in keyed if value is not None]
        return pa.table(
            {"row": pa.array([k[0] for k in keyed], pa.int64()), "key": pa.array([k[1] for k in keyed], pa.string())}
        )
    return pa.table(
        {
            "row": pa.array([r.index for r in rows], pa.int64()),
            "line": pa.array([r.line for r in rows], pa.int64()),
            "data": pa.array([None if r.data is None else pickle.dumps(r.data) for r in rows], pa.binary()),
            "error_kind": pa.array([_kind_name(r.error.kind) if r.error else None for r in rows], pa.string()),
            "error": pa.array([r.error.message if r.error else None for r in rows], pa.string()),
            "sampling": pa.array([json.dumps(r.sampling) if r.sampling else None for r in rows], pa.string()),
            "file": pa.array([r.file for r in rows], pa.string()),
        }
    )


def rows_of_block(table: pa.Table) -> list[Row]:
    """The rows of a block `RowsSource` made (in an actor)."""
    from kvbatch.errors import ErrorKind

    from .rows import RowError

    rows = []
    for r in table.select(["row", "line", "data", "error_kind", "error", "sampling", "file"]).to_pylist():
        error = RowError(ErrorKind(r["error_kind"]), r["error"]) if r["error_kind"] else None
        data = pickle.loads(r["data"]) if r["data"] is not None else None
        sampling = json.loads(r["sampling"]) if r["sampling"] else {}
        rows.append(Row(r["row"], data, error, r["line"], sampling, file=r["file"]))
    return rows


def _kind_name(kind: Any) -> str:
    return getattr(kind, "value", kind)
