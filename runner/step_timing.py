"""Wall-clock time per engine phase, for `kvbatch bench throughput --timing`.

Off by default and then free. On, it synchronises the device around every phase, so each phase's time
includes the GPU work it launched: the breakdown of a step, at the price of any overlap between phases.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StepTimer:
    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1

    def report(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "seconds": round(s, 3),
                "calls": self.calls[name],
                "ms_per_call": round(1e3 * s / max(self.calls[name], 1), 3),
            }
            for name, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        }
