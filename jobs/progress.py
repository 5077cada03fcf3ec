"""The progress bar of a job: rows done of total, output tokens/s, KV-cache use, prefix-cache hit rate, errors."""

from __future__ import annotations

import time

from tqdm import tqdm

from kvbatch.runner.request import GenerationEngine


class JobProgress:
    def __init__(self, name: str, total: int | None, engine: GenerationEngine | None, initial: int = 0) -> None:
        self.engine = engine
        self.start = time.monotonic()
        self.output_tokens = 0
        self.errors = 0
        self.peak_kv_usage = 0.0
        self._prefix_before = self._prefix_counters()
        self._tokens_before = self._engine_output_tokens()
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="row", dynamic_ncols=True, mininterval=0.5)

    def kv_usage(self) -> float:
        return self.engine.kv_usage() if self.engine is not None else 0.0

    def _prefix_counters(self) -> tuple[int, int]:
        if self.engine is None:  # a Ray run's engines are in its actors
            return 0, 0
        stats = self.engine.stats  # the engine outlives the job: its counters start elsewhere
        return stats.num_queried_prompt_tokens, stats.num_cached_prompt_tokens

    def _engine_output_tokens(self) -> int | None:
        return self.engine.stats.num_output_tokens if self.engine is not None else None

    def tokens_per_s(self) -> float:
        """Output tokens/s since the job started: every token the engine made, in finished rows or not, so the rate
        does not read 0 while long rows are still generating."""
        now = self._engine_output_tokens()
        tokens = (
            now - self._tokens_before if now is not None and self._tokens_before is not None else self.output_tokens
        )
        return tokens / max(time.monotonic() - self.start, 1e-9)

    def prefix_hit_rate(self) -> float | None:
        """Share of this job's looked-up prompt tokens the prefix cache held; None while nothing was looked up."""
        queried, cached = (now - before for now, before in zip(self._prefix_counters(), self._prefix_before))
        return cached / queried if queried else None

    def update(self, output_tokens: int, error: bool) -> None:
        self.output_tokens += output_tokens
        self.errors += error
        usage = self.kv_usage()
        self.peak_kv_usage = max(self.peak_kv_usage, usage)
        self.bar.update(1)
        hit_rate = self.prefix_hit_rate()
        prefix = f", prefix hit {hit_rate:.0%}" if hit_rate is not None else ""
        self.bar.set_postfix_str(
            f"{self.tokens_per_s():.1f} tok/s, KV {usage:.0%}{prefix}, {self.errors} errors", refresh=False
        )

    def close(self) -> None:
        self.bar.close()
