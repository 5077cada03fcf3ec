"""The progress bar of a job: rows done of total, output tokens/s, KV-cache use, errors."""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm


class JobProgress:
    def __init__(self, name: str, total: int | None, engine: Any, initial: int = 0) -> None:
        self.engine = engine
        self.start = time.monotonic()
        self.output_tokens = 0
        self.errors = 0
        self.peak_kv_usage = 0.0
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="row", dynamic_ncols=True, mininterval=0.5)

    def kv_usage(self) -> float:
        pool = getattr(self.engine, "pool", None)
        return pool.usage() if pool is not None else 0.0

    def update(self, output_tokens: int, error: bool) -> None:
        self.output_tokens += output_tokens
        self.errors += error
        usage = self.kv_usage()
        self.peak_kv_usage = max(self.peak_kv_usage, usage)
        self.bar.update(1)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.output_tokens / elapsed:.1f} tok/s, KV {usage:.0%}, {self.errors} errors", refresh=False)

    def close(self) -> None:
        self.bar.close()
