"""The manifest: which committed part holds which input rows, and which job spec produced them.

It lives in the output's work folder (`.NAME.kvbatch/manifest.json` beside the output) and is rewritten
atomically after each part is renamed into place, so it only ever names whole parts. A part file that the
manifest does not name (a crash between the two renames) is ignored and removed on the next run; its rows
are simply done again, never twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json

VERSION = 1


@dataclass
class PartEntry:
    file: str
    num_rows: int
    rows: list[list[int]]  # sorted half-open ranges [start, end) of input row indexes

    def row_indexes(self) -> Iterable[int]:
        for start, end in self.rows:
            yield from range(start, end)


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

    def done_rows(self) -> set[int]:
        return {i for part in self.parts for i in part.row_indexes()}

    def save(self, path: Path) -> None:
        data = {
            "version": VERSION,
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

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"manifest version {data.get('version')} is not {VERSION}")
        parts = [PartEntry(p["file"], p["num_rows"], p["rows"]) for p in data["parts"]]
        return cls(data["job"], data["spec_hash"], data["fingerprint"], data["output"], data["format"], parts, data["complete"], data.get("num_rows"))


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
_SAMPLE_BYTES = 1 << 20


def input_identity(path: Path) -> dict[str, Any]:
    """{"input_file": size and hashes of its first and last MiB} for an input file; for a `datasets` folder, a
    hash of its files' names and sizes and of its state.json files (which hold each split's fingerprint); {} for
    a dataset named from the HF cache.

    Stored in the manifest's fingerprint so that a rerun over an edited input (rows added, removed or changed:
    row indexes would then pair old results with new rows) is refused. Cheap by design: an edit in the middle of a
    large file that keeps its size goes unseen.
    """
    if path.is_dir():
        return {INPUT_KEY: _folder_identity(path)}
    if not path.is_file():
        return {}
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(_SAMPLE_BYTES)).hexdigest()[:16]
        f.seek(max(size - _SAMPLE_BYTES, 0))
        tail = hashlib.sha256(f.read(_SAMPLE_BYTES)).hexdigest()[:16]
    return {INPUT_KEY: {"bytes": size, "head_sha256": head, "tail_sha256": tail}}


def _folder_identity(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        if file.name == "state.json":
            digest.update(file.read_bytes())
    return {"files": len(files), "sha256": digest.hexdigest()[:16]}
