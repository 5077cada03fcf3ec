"""The end-of-job summary: printed, and written as JSON beside the output (`NAME.summary.json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import shown_path


@dataclass
class Summary:
    job: str
    output: str
    status: str = "done"  # done | already complete | interrupted | failed
    rows: int = 0  # rows in the output (all runs)
    rows_ok: int = 0
    rows_error: int = 0
    rows_this_run: int = 0  # rows finished by this run (the rest were resumed from earlier runs)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # this run
    output_tokens: int = 0  # this run
    elapsed_s: float = 0.0
    output_tokens_per_s: float = 0.0
    peak_kv_usage: float = 0.0  # 0..1 share of KV blocks held at the busiest moment
    preemptions: int = 0
    cached_prompt_tokens: int = 0  # this run: prompt tokens whose K/V came from the prefix cache
    prefix_cache_hit_rate: float = 0.0  # 0..1 share of the prompt tokens looked up that the cache held
    queried_prompt_tokens: int = 0  # this run: prompt tokens looked up in the prefix cache (the rate's denominator)
    output_bytes: int = 0
    model: str = ""
    spec_hash: str = ""
    kvbatch_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def format(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        return "\n".join(
            [
                f"job {self.job}: {self.status} -> {shown_path(self.output)}",
                f"  rows        {self.rows} ({self.rows_ok} ok, {self.rows_error} errors; {self.rows_this_run} this run)",
                f"  tokens      {self.prompt_tokens} prompt, {self.output_tokens} output in {self.elapsed_s:.1f} s ({self.output_tokens_per_s:.1f} output tok/s)",
                f"  KV cache    peak {self.peak_kv_usage:.0%} of blocks, {self.preemptions} preemptions, "
                f"prefix cache hit {self.prefix_cache_hit_rate:.0%} ({self.cached_prompt_tokens} prompt tokens reused)",
                f"  errors      {errors}",
            ]
        )


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def add_prefix_counters(total: Summary, parts: list[dict]) -> None:
    """Add prefix-cache counters (an engine's, or shards' summaries) into `total` and compute its hit rate from them."""
    for part in parts:
        total.cached_prompt_tokens += int(part.get("cached_prompt_tokens", 0))
        total.queried_prompt_tokens += int(part.get("queried_prompt_tokens", 0))
    queried = total.queried_prompt_tokens
    total.prefix_cache_hit_rate = round(total.cached_prompt_tokens / queried, 4) if queried else 0.0
