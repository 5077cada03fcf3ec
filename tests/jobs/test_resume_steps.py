"""Why a resumed run looked slower (output tok/s) than an uninterrupted one: not the resume itself.

The rows a resumed run has left are the same rows an uninterrupted run would do, done in as many engine steps
(the tiny Llama; steps, not seconds). They are the heavier rows: sort_window sorts each window by prompt length,
shortest first, so a run stopped part way has finished the short prompts and left the long ones; a long prompt
costs more prefill per output token, so output tok/s over the rows left is lower than over the whole input.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from scaling_helpers import tiny_engine

from kvbatch.errors import InterruptedJob
from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.signals import StopFlag
from kvbatch.jobs.spec import job_from_dict
from kvbatch.jobs.writer import work_dir

NUM_ROWS = 16


def prompts() -> list[str]:
    rng = random.Random(5)
    return [" ".join(f"w{rng.randrange(2, 500)}" for _ in range(rng.randrange(2, 40))) for _ in range(NUM_ROWS)]


def job(folder: Path, rows: list[str]):
    (folder / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in rows))
    return job_from_dict(
        {
            "name": "r",
            "input": {"path": "in.jsonl"},
            "id_column": "id",
            "prompt": {"chat_template": False},
            "sampling": {"max_new_tokens": 6},
            "output_dir": "out",
            "engine": {"device": "cpu", "num_blocks_override": 64, "max_num_seqs": 4},
            "sort_window": 64,
        },
        base_dir=str(folder),
    )


class Engines:
    """Fresh engines (a rerun is a new process), each stopping the run after `stop_after` results if set."""

    def __init__(self, stop: StopFlag | None = None, stop_after: int | None = None) -> None:
        self.stop, self.stop_after, self.made = stop, stop_after, []

    def __call__(self, model: str, settings: dict):
        engine = tiny_engine(model, settings)
        self.made.append(engine)
        if self.stop is not None:
            generate, stop, stop_after = engine.generate, self.stop, self.stop_after

            def stopping(requests, on_step=None):
                for i, result in enumerate(generate(requests, on_step)):
                    yield result
                    if i + 1 == stop_after:
                        stop.stop("SIGTERM")

            engine.generate = stopping
        return engine


def steps_and_tokens(folder: Path, rows: list[tuple[int, str]]) -> tuple[int, int, int]:
    engines = Engines()
    summary = run_job(job(folder, rows), EngineCache(engines))
    [engine] = engines.made
    return engine.stats.num_steps, summary.output_tokens, summary.prompt_tokens


def test_the_rows_left_take_the_same_steps_resumed_as_run_alone(tmp_path: Path) -> None:
    rows = list(enumerate(prompts()))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    stop = StopFlag()
    with pytest.raises(InterruptedJob):
        run_job(job(interrupted, rows), EngineCache(Engines(stop, stop_after=3)), stop)
    finished = Manifest.load(work_dir(interrupted / "out" / "r.arrow") / "manifest.json").done_rows()
    left = [(i, p) for i, p in rows if i not in finished]
    assert 0 < len(left) < NUM_ROWS
    resumed = Engines()
    summary = run_job(job(interrupted, rows), EngineCache(resumed))
    assert summary.rows_this_run == len(left) and summary.rows == NUM_ROWS

    alone = tmp_path / "alone"
    alone.mkdir()
    steps_alone, output_alone, prompt_alone = steps_and_tokens(alone, left)
    assert resumed.made[0].stats.num_steps == steps_alone  # the resume adds no step
    assert (summary.output_tokens, summary.prompt_tokens) == (output_alone, prompt_alone)

    # The rows left are the long prompts: the first run had finished the shortest ones, so the rows left cost
    # more prefill per output token than the whole input does.
    lengths = {i: len(p.split()) for i, p in rows}
    assert max(lengths[i] for i in finished) <= min(lengths[i] for i, _ in left)
