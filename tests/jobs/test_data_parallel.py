"""`--data-parallel 2` on the CPU: two engine processes on disjoint shards, merged, equal to one process."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from scaling_helpers import StopAfter, committed_rows, rows_of, tiny_engine, tiny_job, write_input
from typer.testing import CliRunner

from kvbatch import cli
from kvbatch.errors import ExitCode, InterruptedJob, OutputError, OutputLockedError, SpecError, exit_code_of
from kvbatch.jobs.data_parallel import run_data_parallel
from kvbatch.jobs.lock import OutputLock
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.signals import StopFlag
from kvbatch.jobs.spec import output_path
from kvbatch.jobs.writer import work_dir


def test_data_parallel_two_processes_equal_one(tmp_path):
    """Stopped before it starts: interrupted, nothing written. A shard finished earlier (a lone --shard 0/2 run)
    is resumed, not redone. The merged output equals one process's, and a rerun finds it complete."""
    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    [single] = run_jobs([whole], engine_factory=tiny_engine)
    assert single.error is None, single.error
    job = tiny_job(tmp_path, data=2)
    out = output_path(job)

    stopped = StopFlag()
    stopped.stop("SIGTERM")
    with pytest.raises(InterruptedJob, match="stopped by SIGTERM; rerun to run it"):
        run_data_parallel(job, EngineCache(tiny_engine), stopped)
    assert not out.exists()
    [first] = run_jobs(
        [dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, data=1, shard="0/2"))],
        engine_factory=tiny_engine,
    )
    assert first.summary.rows == 7

    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    assert rows_of(out) == rows_of(output_path(whole))
    summary = outcome.summary
    assert (summary.rows, summary.rows_error, summary.rows_this_run) == (13, 2, 6)  # shard 1/2's rows only
    assert summary.queried_prompt_tokens > 0  # the children's prefix-cache counters are added up, not dropped
    assert summary.prefix_cache_hit_rate == round(summary.cached_prompt_tokens / summary.queried_prompt_tokens, 4)
    assert json.loads(out.with_name("answers.arrow.summary.json").read_text())["rows"] == 13
    left = sorted(p.name for p in out.parent.iterdir() if "answers" in p.name)  # the shard outputs are gone
    assert left == [".answers.arrow.kvbatch", "answers.arrow", "answers.arrow.summary.json"]

    [again] = run_jobs([job], engine_factory=tiny_engine)  # finished: nothing is started again
    assert again.summary.status == "already complete" and again.summary.rows_this_run == 0
    assert work_dir(out).is_dir()

    # Another spec, or an edited input, is refused before any process starts, as one process would refuse it.
    changed = dataclasses.replace(job, sampling=dataclasses.replace(job.sampling, max_new_tokens=3))
    [refused] = run_jobs([changed], engine_factory=tiny_engine)
    assert isinstance(refused.error, OutputError) and "(sampling.max_new_tokens: 6 -> 3)" in str(refused.error)
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write('{"id": "late", "prompt": "a row added after the run"}\n')
    [edited] = run_jobs([job], engine_factory=tiny_engine)
    assert isinstance(edited.error, OutputError) and "input_file.bytes" in str(edited.error)
    assert not list(out.parent.glob("*.shard-*"))


def test_a_second_run_on_the_output_exits_4_before_any_process_starts(tmp_path):
    """The children locked only their own shards: of two runs started at once on one output each took some shards'
    locks and both failed with exit 4, and a run holding the output itself did not stop the shards from running
    beside it. The output's own lock is taken first."""
    write_input(tmp_path / "in.jsonl")
    job = tiny_job(tmp_path, data=2)
    out = output_path(job)
    work_dir(out).mkdir(parents=True)
    with OutputLock(work_dir(out) / "lock"):  # another run on the output
        [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert isinstance(outcome.error, OutputLockedError) and exit_code_of(outcome.error) == ExitCode.LOCKED == 4
    assert not list(out.parent.glob("*.shard-*")) and not out.exists()
    [outcome] = run_jobs([job], engine_factory=tiny_engine)  # free again: the run merges under the lock it holds
    assert outcome.error is None and outcome.summary.rows == 13


def test_children_share_the_threads_one_process_would_use(tmp_path, monkeypatch):
    """Each child got os.cpu_count() // N threads: under Slurm that counts every core of the node, not the CPUs the
    job was given (--cpus-per-task) nor OMP_NUM_THREADS, so on 4 CPUs of a 128-core node two children ran 64
    threads each. torch's own default, which follows both, is what they share."""
    import torch

    from kvbatch.jobs import data_parallel

    class Started(Exception):
        pass

    def record(jobs, devices, threads, *args):
        seen.append(threads)
        raise Started

    write_input(tmp_path / "in.jsonl")
    seen: list[int] = []
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(data_parallel, "_run_children", record)
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # what OMP_NUM_THREADS or the job's CPUs give one process
    try:
        with pytest.raises(Started):
            run_data_parallel(tiny_job(tmp_path, data=2), EngineCache(tiny_engine), StopFlag())
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


def test_the_children_start_after_this_processs_engine_is_released(tmp_path, monkeypatch):
    """A local job's engine, left in the run's cache, held GPU memory the children then sized their KV pools on
    (or found none left): it is closed before they start."""
    from kvbatch.jobs import data_parallel

    class Started(Exception):
        pass

    def record(*args):
        seen.append(dict(engines._engines))
        raise Started

    write_input(tmp_path / "in.jsonl")
    engines, seen = EngineCache(tiny_engine), []
    engine, _ = engines.get(tiny_job(tmp_path, "local"))
    closed = []
    monkeypatch.setattr(engine, "close", lambda: closed.append(True))
    monkeypatch.setattr(data_parallel, "_run_children", record)
    with pytest.raises(Started):
        run_data_parallel(tiny_job(tmp_path, data=2), engines, StopFlag())
    assert seen == [{}] and closed == [True]


def test_each_process_shows_the_progress_of_its_own_shard(tmp_path, capfd):
    """The children's progress goes to the same log: each line names its shard, whose rows it counts."""
    write_input(tmp_path / "in.jsonl")
    job = dataclasses.replace(tiny_job(tmp_path, data=2), progress="lines")
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    lines = capfd.readouterr().err.splitlines()
    for shard, rows in (("0/2", 7), ("1/2", 6)):
        mine = [line for line in lines if line.startswith(f"answers [shard {shard}]: ")]
        assert mine and mine[-1].startswith(f"answers [shard {shard}]: {rows}/{rows} rows (100%)"), lines
    assert not [line for line in lines if line.startswith("answers: ")], lines


@pytest.fixture
def captured(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_jobs", lambda specs, wait_for_lock=False, **_: calls.append(specs) or [])
    return calls


def test_cli_scaling_options_reach_the_spec(tmp_path, captured, monkeypatch):
    (tmp_path / "jobs.yaml").write_text("jobs:\n  - name: a\n    input: {path: in.jsonl}\n")
    runner = CliRunner()
    result = runner.invoke(
        cli.app,
        ["run", str(tmp_path / "jobs.yaml"), "--shard", "1/4", "--data-parallel", "2", "--tensor-parallel", "2"],
    )
    assert result.exit_code == 0, result.output
    parallel = captured[-1][0].parallel
    assert (parallel.shard, parallel.data, parallel.tensor, captured[-1][0].runner) == ("1/4", 2, 2, "local")

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    result = runner.invoke(
        cli.app, ["generate", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.arrow"), "--ray-address", "auto"]
    )
    assert result.exit_code == 0, result.output
    spec = captured[-1][0]
    assert (spec.parallel.shard, spec.runner, spec.parallel.ray_address) == ("3/4", "ray", "auto")

    result = runner.invoke(cli.app, ["run", str(tmp_path / "jobs.yaml"), "--shard", "4/4"])
    assert result.exit_code == 2 and "need 0 <= I < N" in result.output


def test_set_reaches_fields_that_also_have_options(tmp_path, captured):
    """An option left out must not undo a --set of the same field (it did: input.limit, output.mode, model...)."""
    (tmp_path / "jobs.yaml").write_text("jobs:\n  - name: a\n    input: {path: in.jsonl}\n")
    sets = ["input.limit=7", "output.mode=overwrite", "engine.device=cpu", "parallel.data=2", "model=some/model"]
    result = CliRunner().invoke(cli.app, ["run", str(tmp_path / "jobs.yaml"), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    spec = captured[-1][0]
    assert (spec.input.limit, spec.output.mode, spec.engine.device, spec.parallel.data, spec.model) == (
        7,
        "overwrite",
        "cpu",
        2,
        "some/model",
    )
    result = CliRunner().invoke(cli.app, ["run", str(tmp_path / "jobs.yaml"), "--set", "input.limit=7", "--limit", "3"])
    assert captured[-1][0].input.limit == 3  # the option wins over --set


def test_cli_merge_refuses_with_the_list(tmp_path):
    result = CliRunner().invoke(cli.app, ["merge", str(tmp_path / "answers.arrow")])
    assert result.exit_code == 1
    assert "no shard outputs found beside" in result.output


def test_children_stop_when_the_parent_says_or_is_gone(monkeypatch):
    import multiprocessing

    from kvbatch.jobs import data_parallel

    event = multiprocessing.get_context("spawn").Event()
    flag = data_parallel._ParentStop(event)
    assert not flag.stopped
    event.set()
    assert flag.stopped and flag.signal_name == "the data-parallel parent"
    orphan = data_parallel._ParentStop(multiprocessing.get_context("spawn").Event())
    monkeypatch.setattr(data_parallel.os, "getppid", lambda: orphan.parent + 1)  # re-parented: the parent died
    assert orphan.stopped


def test_a_childs_first_sigterm_finishes_its_rows_and_a_second_stops_it_at_once(monkeypatch):
    """Slurm's time limit or preemption sends SIGTERM to every process of the step: a child stops admitting and
    finishes its rows in flight (the parent's grace period), as the parent does, rather than dropping them. The
    parent's own SIGTERM, sent when it stops at once after setting the Event, stops the child at once."""
    import multiprocessing
    import os
    import signal

    from kvbatch.jobs import data_parallel
    from kvbatch.jobs.signals import StopNow

    saved = {s: signal.getsignal(s) for s in data_parallel.SIGNALS}
    try:
        event = multiprocessing.get_context("spawn").Event()
        flag = data_parallel._ParentStop(event)
        data_parallel._child_signals(flag)
        os.kill(os.getpid(), signal.SIGINT)  # the parent's to relay: ignored here
        assert not flag.stopped
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.stopped and flag.signal_name == "SIGTERM"
        with pytest.raises(StopNow, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)

        told = data_parallel._ParentStop(multiprocessing.get_context("spawn").Event())
        data_parallel._child_signals(told)
        told.event.set()  # the parent stopping at once sets the Event before its SIGTERM
        with pytest.raises(StopNow, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_combined_error_keeps_the_exit_code_kind():
    from kvbatch.errors import JobError, OutputLockedError
    from kvbatch.jobs.data_parallel import _combined_error
    from kvbatch.jobs.shard import Shard

    job = tiny_job(Path("."))
    locked = _combined_error(job, [(Shard(0, 2), OutputLockedError("a")), (Shard(1, 2), OutputLockedError("b"))])
    assert isinstance(locked, OutputLockedError) and "shard 0/2: a; shard 1/2: b" in str(locked)
    mixed = _combined_error(job, [(Shard(0, 2), OutputLockedError("a")), (Shard(1, 2), InterruptedJob("b"))])
    assert isinstance(mixed, InterruptedJob)
    other = _combined_error(job, [(Shard(0, 2), OutputLockedError("a")), (Shard(1, 2), ValueError("b"))])
    assert type(other) is JobError
    # A setting every shard refused in its own words (each read its own first rows): still a setting, exit 2.
    spec = _combined_error(job, [(Shard(0, 2), SpecError("x", field="f")), (Shard(1, 2), SpecError("y", field="f"))])
    assert type(spec) is SpecError and exit_code_of(spec) == ExitCode.USAGE
    assert "shard 0/2: f: x; shard 1/2: f: y" in str(spec)


def test_a_childs_configuration_error_exits_as_a_single_process_would(tmp_path):
    """Every child refused the same setting (a stop token past the model's vocabulary): the run failed with
    exit code 1 and both shards' messages, where one process exits 2 with the setting's own message."""
    write_input(tmp_path / "in.jsonl")
    base = tiny_job(tmp_path, "one")
    sampling = dataclasses.replace(base.sampling, stop_token_ids=(10**6,))
    single = dataclasses.replace(base, sampling=sampling)
    parallel = dataclasses.replace(single, name="two", parallel=dataclasses.replace(single.parallel, data=2))
    [one, two] = run_jobs([single, parallel], engine_factory=tiny_engine)
    assert isinstance(one.error, SpecError) and exit_code_of(one.error) == ExitCode.USAGE
    assert type(two.error) is SpecError and two.error.field == "sampling.stop_token_ids"
    assert str(two.error) == str(one.error)


@pytest.mark.parametrize(("verbose", "quiet"), [(False, True), (True, False)])
def test_children_log_as_the_parent_does(verbose, quiet, monkeypatch):
    """A spawned child starts with Python's and transformers' defaults: it showed the weight-loading bars and
    warnings under -q, and no debug logs under -v. It now takes the parent's settings, carried pickled."""
    import logging
    import pickle

    from transformers.utils import logging as hf_logging

    from kvbatch.jobs import data_parallel

    kvbatch_logger = logging.getLogger("kvbatch")
    for logger in (logging.root, kvbatch_logger):  # put back after the test
        monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logger, "handlers", [])
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as a fresh parent has them
    try:
        cli._logging(verbose, quiet)
        cli._quiet_model_loading(verbose)
        settings = pickle.loads(pickle.dumps(data_parallel.LogSettings.of_this_process()))
        # A fresh interpreter, as the child is: no handler, root at WARNING, transformers' bars on.
        logging.root.handlers = []
        logging.root.setLevel(logging.WARNING)
        kvbatch_logger.setLevel(logging.NOTSET)
        hf_logging.enable_progress_bar()
        settings.apply()
        assert logging.root.level == (logging.INFO if verbose else logging.ERROR)
        assert kvbatch_logger.getEffectiveLevel() == (logging.DEBUG if verbose else logging.ERROR)
        assert len(logging.root.handlers) == 1
        assert logging.root.handlers[0].formatter._fmt == "%(levelname)s %(name)s: %(message)s"
        assert hf_logging.is_progress_bar_enabled() == verbose
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_a_child_whose_parent_is_gone_commits_and_ends_without_a_traceback(tmp_path, monkeypatch, caplog):
    """A parent killed at once (SIGKILL, the OOM killer) leaves its children to stop and commit their rows, as
    they should; each then sent its result into the closed pipe and died on BrokenPipeError twice over (its own
    send, then the one meant for a result that does not pickle): two chained tracebacks per child, exit code 1."""
    import multiprocessing
    import signal

    import torch

    from kvbatch.jobs import data_parallel, run
    from kvbatch.jobs.summary import Summary
    from kvbatch.runner.parallel.log_settings import LogSettings

    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    receiver.close()  # the parent is gone
    ran = []
    monkeypatch.setattr(run, "run_job", lambda *args, **kwargs: ran.append(args) or Summary("answers", "a.arrow"))
    saved = {s: signal.getsignal(s) for s in (*data_parallel.SIGNALS, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        job = tiny_job(tmp_path, shard="0/2")
        data_parallel._child(sender, job, tiny_engine, ctx.Event(), 1, False, LogSettings.of_this_process(), 0)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
    assert len(ran) == 1
    assert "shard 0/2: the data-parallel parent is gone; its finished rows are kept, rerun to resume" in caplog.text


def test_rows_committed_under_another_layout_are_refused_not_done_again(tmp_path):
    """A run stopped under one layout and rerun under another did the committed rows again and left the earlier
    run's parts beside the output: a --data-parallel 2 run rerun as one process (or as --data-parallel 3) redid
    its shards' rows and kept their folders; a run of one process rerun with --data-parallel 2 redid them and left
    the parts in the output's work folder. The rerun is refused, naming the earlier files and the layout that
    resumes them; output.mode overwrite removes them, work folders and locks included, and starts again."""
    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    [single] = run_jobs([whole], engine_factory=tiny_engine)
    job = tiny_job(tmp_path)
    out = output_path(job)

    # One process of a --data-parallel 2 run, stopped part way (its sibling never started).
    child = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, shard="1/2"))
    with pytest.raises(InterruptedJob):
        run_job(child, EngineCache(tiny_engine), StopAfter(10))
    shard_out = out.with_name("answers.shard-0001-of-0002.arrow")
    committed = committed_rows(shard_out)
    assert 0 < committed < 6
    for data in (1, 3):
        [refused] = run_jobs([tiny_job(tmp_path, data=data)], engine_factory=tiny_engine)
        assert isinstance(refused.error, OutputError), refused.error
        assert str(refused.error) == (
            f"{out}: rows of this job are committed by an earlier run of another layout "
            f"(answers.shard-0001-of-0002.arrow ({committed} rows)); rerun it with parallel.data: 2 "
            "(--data-parallel 2) to resume them, or set output.mode: overwrite to start again"
        )
    assert not out.exists() and committed_rows(shard_out) == committed

    overwrite = dataclasses.replace(job, output=dataclasses.replace(job.output, mode="overwrite"))
    [again] = run_jobs([overwrite], engine_factory=tiny_engine)
    assert again.error is None, again.error
    assert single.error is None and rows_of(out) == rows_of(output_path(whole))
    assert again.summary.rows_this_run == 13
    # The earlier run's file and work folder are gone, its lock too: a folder left holding its lock alone was
    # found as a shard of the output, so that a merge (a cron step) refused "no kvbatch manifest" for it.
    assert not list(out.parent.glob("*shard*"))
    merged = CliRunner().invoke(cli.app, ["merge", str(out)])
    assert (merged.exit_code, merged.stdout) == (0, f"already merged -> {out}: 13 rows\n")

    # A run of one process stopped part way, rerun with --data-parallel 2: refused before any process starts.
    other = tiny_job(tmp_path, "other")
    with pytest.raises(InterruptedJob):
        run_job(other, EngineCache(tiny_engine), StopAfter(10))
    committed = committed_rows(output_path(other))
    [refused] = run_jobs([tiny_job(tmp_path, "other", data=2)], engine_factory=tiny_engine)
    assert isinstance(refused.error, OutputError), refused.error
    assert f"(other.arrow ({committed} rows)); rerun it as one process (parallel.data: 1) to resume" in str(
        refused.error
    )
    [lone] = run_jobs([tiny_job(tmp_path, "other", shard="0/2")], engine_factory=tiny_engine)
    assert "rerun it as one process, without --shard or parallel.data to resume" in str(lone.error)
    assert not list(out.parent.glob("other.shard-*")) and committed_rows(output_path(other)) == committed
    [resumed] = run_jobs([other], engine_factory=tiny_engine)
    assert resumed.summary.rows_this_run == 13 - committed
    assert rows_of(output_path(other)) == rows_of(output_path(whole))


def test_an_overwrite_of_its_own_outputs_earlier_rows_keeps_the_lock_it_holds(tmp_path):
    """A run of one process stopped part way, rerun with --data-parallel 2 and output.mode overwrite: the rerun
    holds the output's lock while it removes the earlier run's rows. Removing that run's work folder whole took the
    held lock file with it, so a run started then locked a new file at the path and ran beside it. The lock
    stays, held; the earlier run's file, parts and manifest go."""
    from kvbatch.jobs.layouts import committed_elsewhere, refuse_other_layouts
    from kvbatch.jobs.shard import Shard

    write_input(tmp_path / "in.jsonl")
    job = tiny_job(tmp_path, "own")
    with pytest.raises(InterruptedJob):
        run_job(job, EngineCache(tiny_engine), StopAfter(5))
    out = output_path(job)
    shards = [Shard(i, 2).output_path(out) for i in range(2)]
    assert [c.path for c in committed_elsewhere(out, Shard(0, 1), shards)] == [out]
    held = OutputLock(work_dir(out) / "lock")
    held.acquire()
    try:
        refuse_other_layouts(out, Shard(0, 1), shards, "overwrite", held=out)
        assert committed_elsewhere(out, Shard(0, 1), shards) == []
        assert [p.name for p in work_dir(out).iterdir()] == ["lock"]
        with pytest.raises(OutputLockedError):
            OutputLock(work_dir(out) / "lock").acquire()
    finally:
        held.release()
