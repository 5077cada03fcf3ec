"""The job's progress bar: rows done of the total, output tokens/s, KV-cache use, prefix-cache hits, errors."""

from __future__ import annotations

import io

import pytest
from job_fakes import FakeEngine

from kvbatch.jobs import progress as progress_module
from kvbatch.jobs.progress import JobProgress


def test_the_bar_shows_rows_tokens_kv_use_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    engine = FakeEngine()
    engine.stats.num_output_tokens = 100  # tokens of an earlier job on the same engine do not count
    progress = JobProgress("answers", total=10, engine=engine, initial=2)
    progress.bar.fp = io.StringIO()
    clock[0] += 4.0
    engine.kv_in_use = 0.25
    engine.stats.num_output_tokens += 40  # 40 made in 4 s, only 12 of them in rows that finished
    progress.update(12, error=False)
    progress.update(0, error=True)
    assert (progress.bar.n, progress.bar.total, progress.errors, progress.output_tokens) == (4, 10, 1, 12)
    assert progress.peak_kv_usage == 0.25
    assert progress.bar.postfix == "10.0 tok/s, KV 25%, 1 errors"
    progress.close()
