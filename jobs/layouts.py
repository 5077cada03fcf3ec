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

import pyarrow as pa
import pyarrow.parquet as pq

from kvbatch.errors import OutputError, shown_path

from .arrow_io import remove_path
from .lock import OutputLock
from .manifest import Manifest
from .merge import find_shards
from .ray_parts import part_files
from .shard import Shard, split_shard_name
from .summary import summary_path
from .writer import parts_dir, work_dir


@dataclass(frozen=True)
class Committed:
    """Rows an earlier run committed for one of an output's files: the whole output, or one shard of it."""

    path: Path
    shard: Shard
    num_rows: int
    ray: bool = False  # a Ray run's folder of parts (runner: ray), not a local run's file
    finished: bool = False  # a shard's run finished it: a merge, not a rerun, makes the output of it


def overlaps(a: Shard, b: Shard) -> bool:
    """Whether shards `a` and `b` share a row: some r with r % a.count == a.index and r % b.count == b.index."""
    return (a.index - b.index) % math.gcd(a.count, b.count) == 0


def committed_elsewhere(base: Path, target: Shard, layout: Collection[Path]) -> list[Committed]:
    """The files of output `base` (the whole output, every shard of it, and a Ray run's folder of parts) that hold
    rows of `target` committed by an earlier run, other than the files of this run's `layout`: rows that this run
    would do again and that a later merge or run would find twice. An unfinished run's parts count, and a shard's
    finished file (a finished whole output is the job's, done already)."""
    found = []
    for path in [base, *find_shards(base)]:
        named = split_shard_name(path)
        shard = Shard(0, 1) if named is None else named[1]
        if not overlaps(shard, target):
            continue
        manifest = _manifest(path)
        if manifest is None:
            continue  # none, or unreadable: its own run says why, and nothing here is taken for committed rows
        if path == base and not (manifest.complete and base.exists()) and parts_dir(base) not in layout:
            # A Ray run names no parts in the manifest (its checkpoint keeps its rows): its folder's rows count,
            # finished or not, until `kvbatch merge` writes the output file from them.
            num_rows = _folder_rows(parts_dir(base))
            if num_rows:
                found.append(Committed(parts_dir(base), shard, num_rows, ray=True))
        if path in layout:
            continue
        if manifest.complete:
            num_rows = shard.num_rows(manifest.num_rows or 0) if named is not None and path.exists() else 0
        else:
            num_rows = len(manifest.done_rows())
        if num_rows:
            found.append(Committed(path, shard, num_rows, finished=manifest.complete))
    return found


def _manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.load(work_dir(path) / "manifest.json")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _folder_rows(folder: Path) -> int:
    """The rows of a Ray run's committed Parquet parts, from their footers; a file that cannot be read counts none."""
    if not folder.is_dir():
        return 0
    rows = 0
    for file in part_files(folder):
        with contextlib.suppress(OSError, pa.ArrowException):
            rows += pq.read_metadata(file).num_rows
    return rows


def finished(output: Path, ray: bool = False) -> bool:
    """Whether a run finished `output`: its manifest says so, and its file is there (`ray`: or a Ray run's folder,
    which a local run does not take for its output)."""
    manifest = _manifest(output)
    done = output.exists() or (ray and parts_dir(output).is_dir())
    return manifest is not None and manifest.complete and done


def refuse_other_layouts(
    base: Path, target: Shard, layout: Collection[Path], mode: str, held: Path | None = None
) -> None:
    """Refuse a run whose rows an earlier run of another layout (--data-parallel N, --shard I/N, one process, a
    Ray run) committed beside it: the run would do them again, and leave them to be found twice. output.mode
    overwrite removes them instead, as it starts again from nothing. `layout`: this run's own files (a Ray run's:
    its folder of parts); `held`: the output whose lock this process holds. Called before the run's own output
    is opened: a local run opening a Ray run's finished output marks it unfinished, to run it again."""
    found = committed_elsewhere(base, target, layout)
    if not found:
        return
    if mode == "overwrite":
        for other in found:
            _remove_committed(other, base, held)
        return
    listed = ", ".join(f"{c.path.name} ({c.num_rows} rows)" for c in found)
    raise OutputError(
        f"{shown_path(base)}: rows of this job are committed by an earlier run of another layout ({listed}); "
        f"{_resume_advice(found, base, target, parts_dir(base) in layout)}, or set output.mode: overwrite to start "
        "again"
    )


def _resume_advice(found: list[Committed], base: Path, target: Shard, ray: bool) -> str:
    """What makes the output of the rows `found`: where they are all the shards of the output, finished,
    `kvbatch merge`; where some of them finished (a Slurm array's tasks), the others, then the merge; else (a
    killed run, a Ray run's folder) a rerun in the layout that committed them, which resumes them and merges.
    `ray`: this run is a Ray run."""
    merge = f"merge them (kvbatch merge {shown_path(base)})"
    if target == Shard(0, 1):  # `kvbatch merge` writes whole outputs only
        counts = {c.shard.count for c in found}
        if not any(c.ray for c in found) and len(counts) == 1 and (count := counts.pop()) > 1:
            left = sorted(set(range(count)) - {c.shard.index for c in found if c.finished})
            if not left:
                return merge
            if len(left) < count:
                shards = ", ".join(f"--shard {i}/{count}" for i in left)
                runner = " and runner: local" if ray else ""
                return f"rerun the {_plural(len(left), 'shard')} left ({shards}{runner}), then {merge}"
    return f"rerun it {_layout_advice(found[0], target, ray)} to resume them"


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{n} {noun}s"


def _layout_advice(earlier: Committed, target: Shard, ray: bool) -> str:
    """How to run `target` again in the layout that committed `earlier`'s rows; `ray`: this run is a Ray run."""
    if earlier.ray:
        return "with runner: ray"
    if earlier.shard.count % target.count == 0 and earlier.shard.index % target.count == target.index:
        ways = earlier.shard.count // target.count  # the earlier run split `target` this many ways
        advice = "as one process (parallel.data: 1)"
        if ways > 1:
            advice = f"with parallel.data: {ways} (--data-parallel {ways})"
    elif earlier.shard.count == 1:
        advice = "as one process, without --shard or parallel.data"
    else:
        advice = f"as that run's shards (--shard I/{earlier.shard.count})"
    return f"{advice} and runner: local" if ray else advice


def _remove_committed(committed: Committed, base: Path, held: Path | None) -> None:
    """Remove an earlier run's rows: a local run's file, summary and work folder (its lock too, unless this run
    holds it: a folder left with its lock alone would still be found as a shard of the output), or a Ray run's
    folder and checkpoint. The output's lock is taken first unless this process holds it, so that a run writing
    it is not pulled from under (exit 4); a run waiting on it locks the file made again at its path
    (jobs/lock.py)."""
    owner = base if committed.ray else committed.path  # whose lock guards these files
    lock = contextlib.nullcontext() if owner == held else OutputLock(work_dir(owner) / "lock")
    with lock:
        if committed.ray:
            remove_path(committed.path)
            remove_path(work_dir(base) / "ray-checkpoint")
            return
        remove_path(committed.path)
        with contextlib.suppress(FileNotFoundError):
            summary_path(committed.path).unlink()
        if owner != held:
            remove_path(work_dir(committed.path))
            return
        # This run's own output (a run of one process rerun with --data-parallel or on Ray): its lock is the one
        # held, and removing its file would let a run started now lock a new file at the path beside this one.
        for item in work_dir(committed.path).iterdir():
            if item.name != "lock":
                remove_path(item)
