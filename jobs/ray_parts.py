"""The files of a Ray run's folder of parts that hold committed rows (out/answers.parquet.parts/part-*.parquet).

Ray Data's checkpointing commits a write task in two steps: a pending checkpoint named after the task's file
(ray-checkpoint/part-RRRR-TTTTTT-<write id>.pending.parquet), then the file, then the checkpoint renamed to
committed. A file whose pending checkpoint is still there was written by a task not yet committed (in flight, or
cut short by a kill): its rows may be partial, and a rerun deletes the file and does them again. So every count of
the folder's rows (the summary, a refusal of another layout) reads only the other files, as the resume does.
"""

from __future__ import annotations

from pathlib import Path

from .writer import work_dir

# Parts are Parquet whatever the output format: Ray's JSON lines writer goes through pandas, which turns an integer
# column holding a null (prompt_tokens of an error row) into floats (12.0). `kvbatch merge` writes the job's format.
PART_EXTENSIONS = ("parquet",)
_PENDING = ".pending.parquet"  # ray.data.checkpoint's PENDING_CHECKPOINT_SUFFIX, with the checkpoint's extension


def checkpoint_dir(output: Path) -> Path:
    return work_dir(output) / "ray-checkpoint"


def part_files(parts: Path, prefix: str = "part-") -> list[str]:
    """The folder's committed part files, sorted: those no pending checkpoint names (see the module's docstring)."""
    output = parts.with_name(parts.name.removesuffix(".parts"))
    checkpoint = checkpoint_dir(output)
    pending = [p.name[: -len(_PENDING)] for p in checkpoint.glob(f"*{_PENDING}")] if checkpoint.is_dir() else []
    return sorted(
        str(p)
        for p in parts.glob(f"{prefix}*")
        if p.suffix.lstrip(".") in PART_EXTENSIONS and not any(p.name.startswith(name) for name in pending)
    )
