"""Ray Data on a local Ray (2 CPUs): the same rows and greedy texts as one process, through `runner: ray`,
and GenerateBatch used directly with map_batches. One Ray start for the module: it is the slow part."""

from __future__ import annotations

from pathlib import Path

import pytest
from scaling_helpers import rows_of, tiny_engine, tiny_job, write_input

from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import output_path

ray = pytest.importorskip("ray")  # the `ray` extra (in `test`); skipped only where Ray is not installed
HELPERS = Path(__file__).parents[1] / "helpers"


@pytest.fixture(scope="module")
def local_ray():
    env = {"PYTHONPATH": str(HELPERS)}  # so actors import scaling_helpers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def test_ray_runner_equals_one_process(tmp_path, local_ray):
    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    [single] = run_jobs([whole], engine_factory=tiny_engine)
    assert single.error is None, single.error
    job = tiny_job(tmp_path, runner="ray", ray_actors=2, ray_batch_rows=3)
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    assert rows_of(output_path(job)) == rows_of(output_path(whole))
    assert (outcome.summary.rows, outcome.summary.rows_error, outcome.summary.output_tokens) == (
        13,
        2,
        single.summary.output_tokens,
    )

    # the callable class on its own, over any dataset with a prompt column
    from kvbatch.jobs.ray_data import GenerateBatch

    expected = {r["row"]: r["text"] for r in rows_of(output_path(whole)) if r["text"] is not None}
    prompts = [{"row": r, "prompt": p} for r, p in _prompts(tmp_path / "in.jsonl").items() if r in expected]
    ds = ray.data.from_items(prompts).map_batches(
        GenerateBatch,
        fn_constructor_kwargs={"job": whole, "engine_factory": tiny_engine},
        batch_format="pyarrow",
        batch_size=4,
        concurrency=1,
    )
    got = {r["row"]: r["text"] for r in ds.take_all()}
    assert got == expected


def _prompts(path: Path) -> dict[int, str]:
    import json

    out = {}
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            out[i] = json.loads(line)["prompt"]
        except ValueError:
            pass
    return out
