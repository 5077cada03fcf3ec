"""Rows of one job committed under another layout: the whole output, and its shards of every count, are files of
one job, and a run must not do again, nor leave behind, rows that a run of another layout committed.

    out/answers.arrow                          one process
    out/answers.shard-0000-of-0002.arrow  ┐    --data-parallel 2 (or --shard 0/2, 1/2)
    out/answers.shard-0001-of-0002.arrow  ┘

A run of shard I/N (one process: 0/1) resumes only from its own file's parts: rows another layout committed would
be done again, and their parts left beside the output to be found twice. Such a run is refused, naming the layout
that resumes them (output.mode overwrite removes them). Shards share rows when their indexes agree modulo the gcd
of their counts: 0/2 and 0/3 share rows 0, 6, 12...; 0/2 and 1/4 share none (Slurm tasks and data-parallel
siblings).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from kvbatch.errors import OutputError, shown_path

from .arrow_io import remove_path
from .lock import OutputLock
from .manifest import Manifest
from .merge import find_shards
from .shard import Shard, split_shard_name
from .summary import summary_path
from .writer import work_dir


@dataclass(frozen=True)
class Committed:
    """Rows an earlier run committed for one of an output's files: the whole output, or one shard of it."""

    path: Path
    shard: Shard
    num_rows: int


def overlaps(a: Shard, b: Shard) -> bool:
    """Whether shards `a` and `b` share a row: some r with r % a.count == a.index and r % b.count == b.index."""
    return (a.index - b.index) % math.gcd(a.count, b.count) == 0


def committed_elsewhere(base: Path, target: Shard, layout: Collection[Path]) -> list[Committed]:
    """The files of output `base` (the whole output and every shard of it) that hold rows of `target` committed by
    an earlier run, other than the files of this run's `layout`: rows that this run would do again and that a
    later merge or run would find twice. An unfinished run's parts count, and a shard's finished file (a
    finished whole output is the job's, done already)."""
    found = []
    for path in [base, *find_shards(base)]:
        named = split_shard_name(path)
        shard = Shard(0, 1) if named is None else named[1]
        if path in layout or not overlaps(shard, target):
            continue
        try:
            manifest = Manifest.load(work_dir(path) / "manifest.json")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # none, or unreadable: its own run says why, and nothing here is taken for committed rows
        if manifest.complete:
            num_rows = shard.num_rows(manifest.num_rows or 0) if named is not None and path.exists() else 0
        else:
            num_rows = len(manifest.done_rows())
        if num_rows:
            found.append(Committed(path, shard, num_rows))
    return found


def refuse_other_layouts(
    base: Path, target: Shard, layout: Collection[Path], mode: str, held: Path | None = None
) -> None:
    """Refuse a run whose rows an earlier run of another layout (--data-parallel N, --shard I/N, one process)
    committed beside it: the run would do them again, and leave them to be found twice. output.mode overwrite
    removes them instead, as it starts again from nothing. `held`: the output whose lock this process holds."""
    found = committed_elsewhere(base, target, layout)
    if not found:
        return
    if mode == "overwrite":
        for other in found:
            _remove_committed(other.path, held=other.path == held)
        return
    listed = ", ".join(f"{c.path.name} ({c.num_rows} rows)" for c in found)
    raise OutputError(
        f"{shown_path(base)}: rows of this job are committed by an earlier run of another layout ({listed}); "
        f"rerun it {_layout_advice(found[0].shard, target)} to resume them, or set output.mode: overwrite to "
        "start again"
    )


def _layout_advice(earlier: Shard, target: Shard) -> str:
    """How to run `target` again in the layout that committed shard `earlier`'s rows."""
    if earlier.count % target.count == 0 and earlier.index % target.count == target.index:
        ways = earlier.count // target.count  # the earlier run split `target` this many ways
        return (
            "as one process (parallel.data: 1)" if ways == 1 else f"with parallel.data: {ways} (--data-parallel {ways})"
        )
    if earlier.count == 1:
        return "as one process, without --shard or parallel.data"
    return f"as that run's shards (--shard I/{earlier.count})"


def _remove_committed(path: Path, held: bool) -> None:
    """Remove an earlier run's rows of `path`: its file, summary, parts and manifest. `held`: this process holds its
    lock (a data-parallel run's own output); otherwise the lock is taken first, so a run writing it is not
    pulled from under (exit 4)."""
    lock = contextlib.nullcontext() if held else OutputLock(work_dir(path) / "lock")
    with lock:
        remove_path(path)
        with contextlib.suppress(FileNotFoundError):
            summary_path(path).unlink()
        for item in work_dir(path).iterdir():
            if item.name != "lock":  # another run may be waiting on it (--wait)
                remove_path(item)
