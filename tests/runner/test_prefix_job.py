"""The prefix cache around a job: rows sharing a prefix grouped by the sort window, `kvbatch plan`'s expected
reuse, the summary's and the progress bar's hit rate, and `engine: {prefix_cache: false}` from the YAML."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from job_fakes import FakeEngine
from tiny_models import tiny_loaded

from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.packing import sort_window
from kvbatch.jobs.plan import plan_job
from kvbatch.jobs.progress import JobProgress
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.spec import job_from_dict
from kvbatch.runner.engine import Engine, EngineConfig

S, T = [50, 51, 52, 53, 54, 55, 56, 57], [60, 61, 62, 63, 64, 65, 66, 67]  # two prefixes of 2 blocks of 4


def test_rows_sharing_a_prefix_are_kept_together_and_length_sorted_inside() -> None:
    rows = {"r0": S + [1] * 32, "r1": T + [2] * 12, "r2": S + [3] * 2, "r3": T + [4] * 22, "r4": [9] * 25}
    order = list(sort_window(rows, 8, key=lambda r: len(rows[r]), tokens=lambda r: rows[r], block_size=4))
    assert order == ["r2", "r0", "r1", "r3", "r4"]  # groups S (10, 40), T (20, 30), alone (25)
    assert list(sort_window(rows, 8, key=lambda r: len(rows[r]))) == ["r2", "r1", "r4", "r3", "r0"]
    # A group is the longest prefix another row shares: r0 and r2 share more than the first block of S.
    rows = {"a": S + [1, 1, 1, 1, 7], "b": S[:4] + [8] * 9, "c": S + [1, 1, 1, 1, 6], "d": S[:4] + [9] * 5}
    order = list(sort_window(rows, 8, key=lambda r: len(rows[r]), tokens=lambda r: rows[r], block_size=4))
    assert order == ["d", "b", "a", "c"]  # groups: S's first block (9, 13), all of a and c (13, 13)


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), max_size=10), max_size=30),
    window=st.integers(1, 9),
    grouped=st.booleans(),
)
def test_every_row_comes_out_once_and_windows_stay_apart(prompts, window, grouped) -> None:
    ids = list(range(len(prompts)))
    out = list(
        sort_window(
            ids, window, key=lambda i: len(prompts[i]), tokens=(lambda i: prompts[i]) if grouped else None, block_size=2
        )
    )
    assert sorted(out) == ids
    for start in range(0, len(ids), window):
        assert sorted(out[start : start + window]) == ids[start : start + window]
    if grouped and window > 1:  # no two rows share a full block: exactly the plain length sort
        unique = [[100 + i] + p for i, p in enumerate(prompts)]
        plain = list(sort_window(ids, window, key=lambda i: len(unique[i])))
        assert (
            list(sort_window(ids, window, key=lambda i: len(unique[i]), tokens=lambda i: unique[i], block_size=2))
            == plain
        )


def tiny_factory():
    engines: list[Engine] = []

    def factory(model: str, settings: dict) -> Engine:
        engine = Engine.from_loaded(tiny_loaded("llama", seed=4), EngineConfig(model=model, **settings))
        engines.append(engine)
        return engine

    factory.engines = engines  # type: ignore[attr-defined]
    return factory


def write_rows(tmp_path: Path, num_rows: int) -> None:
    rng = random.Random(5)
    system = " ".join(f"w{rng.randrange(2, 500)}" for _ in range(12))  # 12 one-token words: 3 blocks of 4
    rows = [
        {"id": i, "prompt": system + " " + " ".join(f"w{rng.randrange(2, 500)}" for _ in range(rng.randint(1, 9)))}
        for i in range(num_rows)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_job(tmp_path: Path, name: str, **engine):
    return job_from_dict(
        {
            "name": name,
            "model": "tiny",
            "input": {"path": "in.jsonl"},
            "id_column": "id",
            "sort_window": 16,
            "prompt": {"chat_template": False},
            "sampling": {"max_new_tokens": 6},
            "engine": {
                "device": "cpu",
                "block_size": 4,
                "num_blocks_override": 64,
                "max_num_batched_tokens": 48,
                **engine,
            },
        },
        base_dir=str(tmp_path),
    )


def read_texts(path: Path) -> dict:
    return {r["id"]: r["text"] for r in read_arrow(Path(path)).to_pylist()}


def test_a_job_reuses_the_shared_prefix_and_reports_it(tmp_path: Path) -> None:
    write_rows(tmp_path, 12)
    on_job, off_job = make_job(tmp_path, "on"), make_job(tmp_path, "off", prefix_cache=False)
    assert off_job.engine.prefix_cache is False and on_job.engine.prefix_cache is None

    plan = plan_job(on_job, EngineCache(tiny_factory()))
    assert plan.prefix_cache and plan.reused_prompt_tokens == 11 * 12, "every row after the first reuses 3 blocks"
    assert f"about {11 * 12} of {plan.num_prompt_tokens} prompt tokens" in plan.format()
    assert "prefix cache    off" in plan_job(off_job, EngineCache(tiny_factory())).format()

    on = run_job(on_job, EngineCache(tiny_factory()))
    off = run_job(off_job, EngineCache(tiny_factory()))
    assert read_texts(tmp_path / "out" / "on.arrow") == read_texts(tmp_path / "out" / "off.arrow")
    assert on.cached_prompt_tokens >= 11 * 12 and 0.5 < on.prefix_cache_hit_rate < 1
    assert (off.cached_prompt_tokens, off.prefix_cache_hit_rate) == (0, 0.0)
    assert (
        f"prefix cache hit {on.prefix_cache_hit_rate:.0%} ({on.cached_prompt_tokens} prompt tokens reused)"
        in on.format()
    )
    assert (
        json.loads((tmp_path / "out" / "on.arrow.summary.json").read_text())["cached_prompt_tokens"]
        == on.cached_prompt_tokens
    )


def test_the_progress_bar_shows_this_jobs_hit_rate() -> None:
    engine = FakeEngine()
    engine.stats.num_queried_prompt_tokens, engine.stats.num_cached_prompt_tokens = 1000, 10  # an earlier job's
    progress = JobProgress("p", 2, engine, mode="lines", stream=io.StringIO())
    progress.update(3, 1, error=False)
    assert "prefix hit" not in progress.snapshot().postfix()
    engine.stats.num_queried_prompt_tokens += 200
    engine.stats.num_cached_prompt_tokens += 150
    progress.update(3, 1, error=False)
    assert "KV 0%, prefix hit 75%, 0 errors" in progress.snapshot().postfix()
    progress.close()
