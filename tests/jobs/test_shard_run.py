"""A job run as 4 shards on the CPU and merged equals the same job run whole, row for row (tiny model, greedy)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from scaling_helpers import StopAfter, committed_rows, rows_of, tiny_engine, tiny_job, write_input  # noqa: E402
from typer.testing import CliRunner

from kvbatch.cli import app
from kvbatch.errors import InterruptedJob, OutputError
from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import output_path


def test_four_shards_merged_equal_one_process(tmp_path):
    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    [outcome] = run_jobs([whole], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    expected = rows_of(output_path(whole))
    assert [r["error_kind"] for r in expected if r["error_kind"]] == ["bad_json", "duplicate_id"]

    sharded = tiny_job(tmp_path)
    for i in range(4):
        [outcome] = run_jobs(
            [dataclasses.replace(sharded, parallel=dataclasses.replace(sharded.parallel, shard=f"{i}/4"))],
            engine_factory=tiny_engine,
        )
        assert outcome.error is None, outcome.error
        assert outcome.summary.rows == len(range(i, 13, 4))
    out = output_path(sharded)
    assert not out.exists()
    assert [r["row"] for r in rows_of(out.with_name("answers.shard-0001-of-0004.arrow"))] == [1, 5, 9]
    result = CliRunner().invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert "merged 4 shards" in result.output and ": 13 rows" in result.output
    assert rows_of(out) == expected
    # The merged file's provenance is the whole job's, not shard 0's.
    job = json.loads(read_arrow(out).schema.metadata[b"kvbatch.job"])
    assert job["parallel"]["shard"] is None and job["name"] == sharded.name
    [again] = run_jobs([sharded], engine_factory=tiny_engine)  # the same job unsharded: the merge finished it
    assert again.summary.status == "already complete"


def test_more_shards_than_rows_merge(tmp_path):
    """A shard past the last row (3 shards of 2 rows: --data-parallel 3 on a small input or --limit 2) writes an
    empty output that still counts the input's rows, so the merge takes it instead of refusing it as having seen
    another input."""
    write_input(tmp_path / "in.jsonl")

    def first_two(job):
        return dataclasses.replace(job, input=dataclasses.replace(job.input, limit=2))

    whole = first_two(tiny_job(tmp_path, "whole"))
    [outcome] = run_jobs([whole], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    sharded = first_two(tiny_job(tmp_path))
    for i in range(3):
        [outcome] = run_jobs(
            [dataclasses.replace(sharded, parallel=dataclasses.replace(sharded.parallel, shard=f"{i}/3"))],
            engine_factory=tiny_engine,
        )
        assert outcome.error is None, outcome.error
    out = output_path(sharded)
    result = CliRunner().invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert rows_of(out) == rows_of(output_path(whole))


def test_a_rerun_as_one_process_over_finished_shards_advises_the_merge(tmp_path):
    """Shards of a Slurm array, rerun as one process before their merge: the refusal advised rerunning them with
    --data-parallel 3, which redoes the unfinished shards on one node and merges, where the finished ones only
    wanted `kvbatch merge`. The advice fits the state: some shards finished, the others (unfinished or never run)
    and then the merge; all finished, the merge, after which the one-process run finds the output complete."""
    write_input(tmp_path / "in.jsonl")
    job = tiny_job(tmp_path)
    out = output_path(job)

    def shard(i: int):
        return dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, shard=f"{i}/3"))

    [outcome] = run_jobs([shard(0)], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    with pytest.raises(InterruptedJob):
        run_job(shard(1), EngineCache(tiny_engine), StopAfter(13))
    unfinished = committed_rows(out.with_name("answers.shard-0001-of-0003.arrow"))
    assert 0 < unfinished < 4
    [refused] = run_jobs([job], engine_factory=tiny_engine)
    assert isinstance(refused.error, OutputError), refused.error
    assert str(refused.error) == (
        f"{out}: rows of this job are committed by an earlier run of another layout (answers.shard-0000-of-0003.arrow "
        f"(5 rows), answers.shard-0001-of-0003.arrow ({unfinished} rows)); rerun the 2 shards left (--shard 1/3, "
        f"--shard 2/3), then merge them (kvbatch merge {out}), or set output.mode: overwrite to start again"
    )
    for i in (1, 2):
        [outcome] = run_jobs([shard(i)], engine_factory=tiny_engine)
        assert outcome.error is None, outcome.error
    [refused] = run_jobs([job], engine_factory=tiny_engine)
    assert str(refused.error).endswith(
        "answers.shard-0002-of-0003.arrow (4 rows)); "
        f"merge them (kvbatch merge {out}), or set output.mode: overwrite to start again"
    )
    assert not out.exists()
    assert CliRunner().invoke(app, ["merge", str(out)]).exit_code == 0
    [done] = run_jobs([job], engine_factory=tiny_engine)
    assert done.error is None and done.summary.status == "already complete"
