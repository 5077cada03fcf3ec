"""The manifest: which committed part holds which input rows, and which job spec produced them.

It lives in the output's work folder (`.NAME.kvbatch/manifest.json` beside the output), in two files:

    manifest.json   the job, its spec and the parts known when it was written (written atomically)
    parts.jsonl     one line per part committed since, appended and fsynced after the part is renamed into place

so a commit costs one short line, not a rewrite of every earlier part's rows (which made a job of millions of
rows quadratic). Writing manifest.json again folds the journal in and removes it. Either way the manifest only
ever names whole parts: a part file it does not name (a crash between the rename and the append) is removed on
the next run and its rows are done again, never twice; a line cut short by a crash is not a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from kvbatch.errors import OutputError

from .atomic import fsync_dir, write_json

_PART_NAME = re.compile(r"part-([0-9]{6,})\.arrow")  # what part_name writes
KVBATCH_VERSION = version("kvbatch")  # written into every output's provenance

# 2: the parts journal, and engine settings that change results in the spec hash. Version 1 is still read.
VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class PartEntry:
    file: str
    num_rows: int
    rows: list[list[int]]  # sorted half-open ranges [start, end) of input row indexes

    def row_indexes(self) -> Iterable[int]:
        for start, end in self.rows:
            yield from range(start, end)


class RowSet(Set[int]):
    """Input row indexes, one byte each: the rows a job has committed. A set of ints took about 110 bytes a row,
    so resuming a job of ten million rows built 1.1 GB (in ten seconds) before its first row, and a long run grew as
    much while it went; this is 10 MB, filled a range at a time."""

    def __init__(self, ranges: Iterable[list[int]] = ()) -> None:
        bounds = np.array(list(ranges), dtype=np.int64).reshape(-1, 2)
        if len(bounds) and bounds.min() < 0:
            raise ValueError(f"row indexes are 0 or more, got {bounds.min()}")
        bounds = bounds[bounds[:, 1] > bounds[:, 0]]  # an empty range (or a reversed one, hand-edited) holds none
        # All ranges at once (a resume's parts hold hundreds of thousands): +1 where each starts, -1 where it ends.
        edges = np.zeros(int(bounds.max(initial=0)) + 1, dtype=np.int32)
        np.add.at(edges, bounds[:, 0], 1)
        np.add.at(edges, bounds[:, 1], -1)
        self._marks = np.cumsum(edges[:-1], out=edges[:-1]) > 0
        self._count = int(np.count_nonzero(self._marks))

    def add_range(self, start: int, end: int) -> None:
        """Add rows [start, end)."""
        if start < 0:
            raise ValueError(f"row indexes are 0 or more, got {start}")
        if end > len(self._marks):  # doubling: a run adds rows one at a time
            marks = np.zeros(max(end, 2 * len(self._marks)), dtype=bool)
            marks[: len(self._marks)] = self._marks
            self._marks = marks
        block = self._marks[start:end]
        self._count += len(block) - int(np.count_nonzero(block))
        block[:] = True

    def add(self, index: int) -> None:
        self.add_range(index, index + 1)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, (int, np.integer)) and 0 <= index < len(self._marks) and bool(self._marks[index])

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._marks).tolist())

    @classmethod
    def _from_iterable(cls, it: Iterable[int]) -> set[int]:
        """What Set's operators (`-`, `&`, `|`) build: a plain set of their rows (the constructor takes ranges)."""
        return set(it)


@dataclass
class Manifest:
    job: str
    spec_hash: str
    fingerprint: dict[str, Any]
    output: str
    format: str
    parts: list[PartEntry] = field(default_factory=list)
    complete: bool = False
    num_rows: int | None = None  # the input's row count, known once the input was read to its end
    version: int = VERSION  # of the kvbatch that wrote it (set by load)

    def done_rows(self) -> RowSet:
        return RowSet(r for part in self.parts for r in part.rows)

    def save(self, path: Path) -> None:
        data = {
            "version": self.version,
            "job": self.job,
            "spec_hash": self.spec_hash,
            "fingerprint": self.fingerprint,
            "output": self.output,
            "format": self.format,
            "parts": [{"file": p.file, "num_rows": p.num_rows, "rows": p.rows} for p in self.parts],
            "complete": self.complete,
            "num_rows": self.num_rows,
        }
        write_json(path, data)
        with contextlib.suppress(FileNotFoundError):  # folded into the file just written
            journal_path(path).unlink()

    def append_part(self, path: Path, part: PartEntry) -> None:
        """Name one more committed part, durably, without rewriting the others."""
        journal = journal_path(path)
        created = not journal.exists()
        line = json.dumps({"file": part.file, "num_rows": part.num_rows, "rows": part.rows}, separators=(",", ":"))
        # O_NOFOLLOW: a link planted at the journal's name (the run appends for hours) must not be written through.
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "ab") as f:
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(path.parent)
        self.parts.append(part)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except RecursionError:  # nested past Python's parser: JSON that is no manifest, as any other is refused
            raise ValueError(f"{path.name} is nested too deeply to be a manifest") from None
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"manifest version {data.get('version')} is not one of {READABLE_VERSIONS}")
        parts = [PartEntry(_part_name(p["file"]), p["num_rows"], p["rows"]) for p in data["parts"]]
        known = {p.file for p in parts}
        for entry in _journal_entries(journal_path(path)):
            if entry["file"] not in known:
                parts.append(PartEntry(_part_name(entry["file"]), entry["num_rows"], entry["rows"]))
                known.add(entry["file"])
        return cls(
            data["job"],
            data["spec_hash"],
            data["fingerprint"],
            data["output"],
            data["format"],
            parts,
            data["complete"],
            data.get("num_rows"),
            data["version"],
        )


def previous_manifest(path: Path, mode: str) -> Manifest | None:
    """The manifest an earlier run left at `path`, or None where there is none. One that cannot be read (another
    kvbatch's, damaged) is refused, unless output.mode is overwrite, which starts again."""
    if not path.exists():
        return None
    try:
        return Manifest.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        if mode == "overwrite":
            return None
        raise OutputError(f"cannot read {path}: {exc}; set output.mode: overwrite to start again") from None


def part_name(number: int) -> str:
    """The file name of part `number`: six digits at least, more past 999,999."""
    return f"part-{number:06d}.arrow"


def part_number(name: str) -> int:
    """The number in a part's file name (`part_name`'s inverse)."""
    match = _PART_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a part file name")
    return int(match.group(1))


def _part_name(name: Any) -> str:
    """`name` if it is a part's own name ("part-000012.arrow"): a run reads, and then deletes, the parts a manifest
    names, so one naming a path ("../../other.arrow") would reach outside the work folder."""
    if not isinstance(name, str) or not _PART_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a part file name")
    return name


def journal_path(manifest_path: Path) -> Path:
    return manifest_path.with_name("parts.jsonl")


def _journal_entries(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):  # the line a crash cut short (the last one): its part is not committed
            continue
        if isinstance(entry, dict) and {"file", "num_rows", "rows"} <= entry.keys():
            entries.append(entry)
    return entries


def to_ranges(indexes: Iterable[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 3], [5, 7]]"""
    ranges: list[list[int]] = []
    for i in sorted(indexes):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


INPUT_KEY = "input_file"  # the fingerprint's entry for the input file's identity
# The dtype the weights load in, engine.dtype auto resolved on the run's device (a local run's manifest; absent in
# those written before it was kept): rows made in float32 on the cpu and bfloat16 on a GPU must not make one output.
DTYPE_KEY = "weights_dtype"
_SAMPLE_BYTES = 1 << 20


def input_identity(path: Path, split: str | None = None) -> dict[str, Any]:
    """{"input_file": size and hashes of its first and last MiB} for an input file; for a `datasets` folder, a
    hash of the state.json of the split read (all splits without one: each holds its split's fingerprint and data
    file names) and of those data files' sizes; for a folder of data files (a dataset repository's layout), a
    hash of every file's name and identity as a file; {} for a dataset named from the HF cache.

    Stored in the manifest's fingerprint so that a rerun over an edited input (rows added, removed or changed:
    row indexes would then pair old results with new rows) is refused. Cheap by design: an edit in the middle of a
    large file that keeps its size goes unseen.
    """
    if path.is_dir():
        return {INPUT_KEY: _folder_identity(path, split)}
    if not path.is_file():
        return {}
    return {INPUT_KEY: _file_identity(path)}


def _file_identity(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(_SAMPLE_BYTES)).hexdigest()[:16]
        f.seek(max(size - _SAMPLE_BYTES, 0))
        tail = hashlib.sha256(f.read(_SAMPLE_BYTES)).hexdigest()[:16]
    return {"bytes": size, "head_sha256": head, "tail_sha256": tail}


def _folder_identity(path: Path, split: str | None) -> dict[str, Any]:
    # Not every file: `datasets` writes cache-*.arrow files into a folder that a map or filter ran on.
    root = path / split if split and (path / split / "state.json").is_file() else path
    digest = hashlib.sha256()
    num_files = 0
    for state in sorted(root.rglob("state.json")):
        text = state.read_bytes()
        digest.update(f"{state.relative_to(path)}\0".encode() + text)
        try:
            data_files = [entry["filename"] for entry in json.loads(text).get("_data_files", [])]
        except (ValueError, TypeError, KeyError, AttributeError):
            data_files = []
        for name in data_files:
            file = state.parent / name
            digest.update(f"{name}\0{file.stat().st_size if file.exists() else -1}\0".encode())
            num_files += 1
    if num_files == 0:  # no save_to_disk state: a folder of data files, which datasets reads whole
        for file in sorted(root.rglob("*")):
            name = file.relative_to(path)
            if file.is_file() and not any(part.startswith(".") for part in name.parts):  # not .git, .cache
                # each as a file read alone is known: a row edited to the same length changes its hashes
                digest.update(f"{name}\0{json.dumps(_file_identity(file), sort_keys=True)}\0".encode())
                num_files += 1
    return {"files": num_files, "sha256": digest.hexdigest()[:16]}
