"""Which input rows a shard owns, how its output is named, and where the shard comes from (Slurm or a flag).

Partition: row `i` belongs to shard `i % N`. Round-robin rather than contiguous ranges, because:
- it needs no row count up front, so a streamed JSONL input is sharded without a first pass;
- prompts of every length land in every shard, so shards finish at about the same time even when an input
  is sorted by length or topic;
- merging is pure arithmetic: the k-th row of shard I is input row k * N + I.

A shard of a shard is a shard: rows of shard I/N split M ways are the shards (I + N*j)/(N*M), j < M, which is
how `--data-parallel M` composes with `--shard I/N`.

    rows:   0  1  2  3  4  5  6  7  8  9
    shard:  0  1  2  3  0  1  2  3  0  1      (N = 4)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvbatch.errors import SpecError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^.]+)$")


@dataclass(frozen=True, order=True)
class Shard:
    index: int  # 0-based
    count: int  # N >= 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard is I/N with 0 <= I < N, got {self.index}/{self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, row: int) -> bool:
        return row % self.count == self.index

    def num_rows(self, num_input_rows: int) -> int:
        """How many of the first `num_input_rows` rows this shard owns."""
        return len(range(self.index, num_input_rows, self.count))

    def rows(self, num_input_rows: int) -> range:
        return range(self.index, num_input_rows, self.count)

    def split(self, ways: int) -> list[Shard]:
        """This shard's rows cut `ways` ways (data parallel inside one Slurm shard)."""
        return [Shard(self.index + self.count * j, self.count * ways) for j in range(ways)]

    def output_path(self, output: Path) -> Path:
        """out/answers.arrow -> out/answers.shard-0003-of-0004.arrow (zero-padded, so names sort in order)."""
        return output.with_name(f"{output.stem}.shard-{self.index:04d}-of-{self.count:04d}{output.suffix}")


def parse_shard(text: str, field: str = "--shard") -> Shard | None:
    """ "3/4" -> Shard(3, 4); "off" -> None."""
    if text.strip().lower() in ("off", "none"):
        return None
    match = _SHARD.match(text)
    if not match:
        raise SpecError(f"expected I/N such as 0/4 (or off), got {text!r}", field=field)
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise SpecError(f"shard {text!r}: need 0 <= I < N (shards are numbered from 0)", field=field)
    return Shard(index, count)


def shard_from_env(env: Mapping[str, str]) -> Shard | None:
    """The shard of a Slurm array task, or None outside an array job.

    Slurm sets SLURM_ARRAY_TASK_ID with _MIN, _MAX, _STEP and _COUNT; `--array=0-3` gives ids 0..3 and count 4,
    `--array=1-8:2` ids 1, 3, 5, 7. Shard I is the task's position in that range. Arrays with gaps
    (`--array=0,2,7`) have no such position: pass --shard explicitly for those.
    """
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or "1")
        if "SLURM_ARRAY_TASK_MAX" in env:
            count = (int(env["SLURM_ARRAY_TASK_MAX"]) - low) // step + 1
        else:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        declared = int(env.get("SLURM_ARRAY_TASK_COUNT", str(count)))
    except KeyError as exc:
        raise SpecError(
            f"SLURM_ARRAY_TASK_ID is set but {exc.args[0]} (or SLURM_ARRAY_TASK_MAX) is not; pass --shard I/N",
            field="--shard",
        ) from None
    except ValueError as exc:
        raise SpecError(f"cannot read the Slurm array variables: {exc}; pass --shard I/N", field="--shard") from None
    index, rest = divmod(task - low, step)
    if rest or declared != count or not 0 <= index < count:
        raise SpecError(
            f"Slurm array task {task} (min {low}, step {step}, {declared} tasks) is not a position in an evenly "
            "spaced array such as --array=0-3; pass --shard I/N explicitly (or --shard off)",
            field="--shard",
        )
    return Shard(index, count)


def split_shard_name(path: Path) -> tuple[Path, Shard] | None:
    """out/a.shard-0003-of-0004.arrow -> (out/a.arrow, Shard(3, 4)); None for other names."""
    match = _SHARD_NAME.match(path.name)
    if not match:
        return None
    index, count = int(match["index"]), int(match["count"])
    if count < 1 or index >= count:
        return None
    return path.with_name(match["stem"] + match["suffix"]), Shard(index, count)
