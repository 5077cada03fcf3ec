"""Signals: SIGTERM, SIGINT and SIGUSR1 stop admission, let rows in flight finish, commit, and exit with code 3;
a second signal (or the end of the grace period) stops at once without damaging committed parts.

The fake engine sends the signals to this very process at chosen results, so each test is exact and fast.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from job_fakes import FakeEngine
from reliability_helpers import read_output, write_jsonl
from typer.testing import CliRunner

from kvbatch import cli
from kvbatch.errors import ExitCode, InterruptedJob
from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.signals import DEFAULT_GRACE_S, grace_seconds
from kvbatch.jobs.spec import job_from_dict
from kvbatch.jobs.writer import work_dir

NUM_ROWS = 40


class SignallingEngine(FakeEngine):
    """Sends `signals[k]` to this process right after yielding result number k; `stall` stops yielding after the
    first signal, like a long generation that does not finish within the grace period."""

    def __init__(self, signals: dict[int, signal.Signals], stall: bool = False) -> None:
        super().__init__()
        self.signals = signals
        self.stall = stall
        self.yielded = 0

    def generate(self, requests, on_step=None):
        for result in super().generate(requests, on_step):
            yield result
            self.yielded += 1
            if self.yielded in self.signals:
                os.kill(os.getpid(), self.signals[self.yielded])
                if self.stall:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        time.sleep(0.01)


def factory_for(engine: FakeEngine):
    def factory(model, settings):
        return engine

    return factory


@pytest.fixture
def job(tmp_path: Path):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(NUM_ROWS)])
    data = {
        "name": "sig",
        "input": {"path": "in.jsonl"},
        "output": {"path": "out.arrow", "part_rows": 3},
        "sort_window": 1,
    }
    return job_from_dict(data, base_dir=str(tmp_path))


def committed(tmp_path: Path) -> tuple[Manifest, set[int]]:
    """The manifest, and the rows its parts really hold (each part opened and read in full)."""
    folder = work_dir(tmp_path / "out" / "out.arrow")
    manifest = Manifest.load(folder / "manifest.json")
    rows: set[int] = set()
    for part in manifest.parts:
        table = pa.ipc.open_file(pa.memory_map(str(folder / part.file))).read_all()
        assert table.num_rows == part.num_rows
        rows |= set(table.column("row").to_pylist())
    assert rows == manifest.done_rows()
    return manifest, rows


def finish_and_check(job, tmp_path: Path) -> None:
    engine = FakeEngine()
    outcome = run_jobs([job], engine_factory=factory_for(engine))[0]
    assert outcome.error is None, outcome.error
    rows = read_output(tmp_path / "out" / "out.arrow")
    assert [r["row"] for r in rows] == list(range(NUM_ROWS))
    assert all(r["error"] is None for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_first_signal_stops_admission_finishes_in_flight_and_commits(job, tmp_path: Path, sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    engine = SignallingEngine({5: sig})
    outcome = run_jobs([job], engine_factory=factory_for(engine))[0]
    assert isinstance(outcome.error, InterruptedJob)
    assert f"stopped by {sig.name}" in str(outcome.error) and "rerun to resume" in str(outcome.error)
    asked = {r.request_id for r in engine.requests}
    assert len(asked) < NUM_ROWS, "admission stopped"
    _, rows = committed(tmp_path)
    assert rows == asked, "every admitted row finished and was committed; nothing else"
    assert signal.getsignal(sig) is before, "the previous handler is back"
    finish_and_check(job, tmp_path)


def test_second_signal_stops_at_once_and_keeps_committed_parts_whole(job, tmp_path: Path) -> None:
    engine = SignallingEngine({4: signal.SIGTERM, 5: signal.SIGTERM})
    outcome = run_jobs([job], engine_factory=factory_for(engine))[0]
    manifest, rows = committed(tmp_path)
    assert isinstance(outcome.error, InterruptedJob) and outcome.error.job == "sig"
    assert outcome.error.detail == (
        f"stopped at once (second SIGTERM); rows in flight dropped, {len(rows)} rows committed, rerun to resume"
    )
    assert 5 <= len(rows) < NUM_ROWS and not manifest.complete
    assert not list(work_dir(tmp_path / "out" / "out.arrow").glob("*.incomplete"))
    finish_and_check(job, tmp_path)


def test_grace_period_drops_rows_in_flight(job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVBATCH_STOP_GRACE_S", "0.2")
    engine = SignallingEngine({6: signal.SIGTERM}, stall=True)
    outcome = run_jobs([job], engine_factory=factory_for(engine))[0]
    assert isinstance(outcome.error, InterruptedJob) and "stopped at once (grace period after SIGTERM ended)" in str(
        outcome.error
    )
    _, rows = committed(tmp_path)
    assert len(rows) == 6, "the results that arrived are committed; the stalled rows are left for the rerun"
    finish_and_check(job, tmp_path)


@pytest.mark.parametrize("grace", ["inf", "1e10", "nan"])
def test_a_grace_period_no_timer_holds_still_stops_on_the_first_signal(
    job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grace: str
) -> None:
    """KVBATCH_STOP_GRACE_S=inf (or 1e10) reached setitimer inside the signal handler, which raised OverflowError
    wherever the main thread was: a failed job, or a step the engine retried, the signal lost and the run going on
    to its end. nan waited however long without a word. A grace period past what a timer holds now waits however
    long, as 0 does; nan is not a number, warned about, and the default applies."""
    monkeypatch.setenv("KVBATCH_STOP_GRACE_S", grace)
    assert grace_seconds() == (DEFAULT_GRACE_S if grace == "nan" else 0.0)
    engine = SignallingEngine({5: signal.SIGTERM})
    outcome = run_jobs([job], engine_factory=factory_for(engine))[0]
    assert isinstance(outcome.error, InterruptedJob) and "stopped by SIGTERM" in str(outcome.error)
    asked = {r.request_id for r in engine.requests}
    assert len(asked) < NUM_ROWS, "admission stopped"
    assert committed(tmp_path)[1] == asked
    finish_and_check(job, tmp_path)


def test_a_signal_between_jobs_starts_no_further_job(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(6)])
    jobs = [job_from_dict({"name": f"j{i}", "input": {"path": "in.jsonl"}}, base_dir=str(tmp_path)) for i in range(2)]
    engine = SignallingEngine({6: signal.SIGTERM})  # the last row of job 0
    outcomes = run_jobs(jobs, engine_factory=factory_for(engine))
    assert outcomes[0].error is None and outcomes[0].summary.rows == 6
    assert isinstance(outcomes[1].error, InterruptedJob) and "not started" in str(outcomes[1].error)


@pytest.mark.parametrize("signals", [{5: signal.SIGTERM}, {4: signal.SIGUSR1, 5: signal.SIGINT}], ids=["once", "twice"])
def test_cli_exits_with_code_3_for_a_requeue(job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signals) -> None:
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(
        "jobs:\n  - name: sig\n    input: {path: in.jsonl}\n    output: {path: out.arrow, part_rows: 3}\n"
    )
    engine = SignallingEngine(signals)
    monkeypatch.setattr(cli, "run_jobs", functools.partial(run_jobs, engine_factory=factory_for(engine)))
    result = CliRunner().invoke(cli.app, ["run", str(jobs_file)])
    assert result.exit_code == ExitCode.INTERRUPTED == 3, result.output
    assert "rerun to resume" in result.output


def test_a_hard_stop_names_the_job_and_its_committed_rows(job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the grace period ended (or a second signal came) the run printed only `kvbatch: error: interrupted;
    committed rows are kept, rerun to resume`, where the graceful stop names the job and the rows committed. The
    hard stop names them too, and still exits 3."""
    monkeypatch.setenv("KVBATCH_STOP_GRACE_S", "0.2")
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(
        "jobs:\n  - name: sig\n    input: {path: in.jsonl}\n    output: {path: out.arrow, part_rows: 3}\n"
        "    sort_window: 1\n"
    )
    engine = SignallingEngine({6: signal.SIGTERM}, stall=True)
    monkeypatch.setattr(cli, "run_jobs", functools.partial(run_jobs, engine_factory=factory_for(engine)))
    result = CliRunner().invoke(cli.app, ["run", str(jobs_file)])
    assert result.exit_code == ExitCode.INTERRUPTED, result.output
    assert result.stderr.endswith(
        "kvbatch: job sig interrupted: stopped at once (grace period after SIGTERM ended); rows in flight dropped, "
        "6 rows committed, rerun to resume\n"
    ), result.stderr
    assert len(committed(tmp_path)[1]) == 6


LOAD_SCRIPT = """
import os, signal, time
from kvbatch.jobs.signals import graceful_stop

class Finalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs in here, where Python prints and drops what it raises
        sum(range(1000))

with graceful_stop() as stop, stop.while_loading():
    os.kill(os.getpid(), signal.SIGTERM)
    Finalizer()  # freed at once, as transformers frees objects while it loads
    time.sleep(30)  # the rest of a long model load
print("the load went on")
"""


def test_a_second_signal_during_a_model_load_exits_at_once() -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], capture_output=True, text=True, timeout=25)
    assert proc.returncode == 3, proc.stderr
    assert "while loading the model: exiting now" in proc.stderr and "the load went on" not in proc.stdout
    assert time.monotonic() - started < 20


COMMAND_SCRIPT = """
import os, signal, sys, time
import {module}

def working(*args, **kwargs):
    os.kill(os.getpid(), signal.{name})  # as the command works
    time.sleep(30)

{module}.{function} = working
sys.argv = ["kvbatch", *{argv!r}]
from kvbatch.__main__ import main
main()
"""


def run_command_signalled(tmp_path: Path, name: str, module: str, function: str, argv: list[str]) -> str:
    """Runs `kvbatch ARGV` in a subprocess whose `module.function` sends it the signal; returns its stderr."""
    script = COMMAND_SCRIPT.format(name=name, module=module, function=function, argv=argv)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == ExitCode.INTERRUPTED == 3, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_during_merge_says_the_merge_stopped_and_exits_3(tmp_path: Path, name: str) -> None:
    # merge ran under the start-up handler, whose message says no job ran; nothing of a merge is half-written.
    stderr = run_command_signalled(tmp_path, name, "kvbatch.jobs.merge", "merge_shards", ["merge", "out/answers.arrow"])
    assert stderr == (
        f"kvbatch: merge stopped by {name}; its sources are untouched and no output is left half-written: "
        "rerun the merge\n"
    )


@pytest.mark.parametrize(
    ("module", "function", "argv", "stopped"),
    [
        (
            "kvbatch.cli",
            "load_jobs_file",
            ["plan", "jobs.yaml"],
            "plan stopped by SIGTERM; it writes nothing: rerun it",
        ),
        (
            "kvbatch.jobs.inspect",
            "inspect_output",
            ["inspect", "out/answers.arrow"],
            "inspect stopped by SIGTERM; it writes nothing: rerun it",
        ),
        (
            "kvbatch.bench.models",
            "random_model",
            ["bench", "throughput"],
            "bench stopped by SIGTERM; the records printed before it are whole: rerun it for the rest",
        ),
    ],
)
def test_a_signal_during_a_command_that_runs_no_job_says_that_command_stopped(
    tmp_path: Path, module: str, function: str, argv: list[str], stopped: str
) -> None:
    # These ran under the start-up handler too: "stopped by SIGTERM before any job ran; rerun to run it".
    assert run_command_signalled(tmp_path, "SIGTERM", module, function, argv) == f"kvbatch: {stopped}\n"


@pytest.mark.parametrize("console", ["closed", "no reader"])
def test_a_signal_exits_3_with_no_console_to_say_it_on(tmp_path: Path, console: str) -> None:
    """`kvbatch plan jobs.yaml >&- 2>&-` from cron, or `2>&1 | tee log` in a Slurm step whose SIGTERM ended tee too:
    writing the message to a stderr that was None, or flushing a pipe with no reader, raised in the handler, and the
    command ended with a traceback and exit 1 instead of 3."""
    script = COMMAND_SCRIPT.format(name="SIGTERM", module="kvbatch.cli", function="load_jobs_file", argv=["plan", "x"])
    reader, writer = os.pipe()
    os.close(reader)
    try:
        if console == "closed":
            proc = subprocess.run(
                [sys.executable, "-c", script], timeout=60, cwd=tmp_path, preexec_fn=lambda: (os.close(1), os.close(2))
            )
        else:
            proc = subprocess.run(
                [sys.executable, "-c", script], stdout=writer, stderr=writer, timeout=60, cwd=tmp_path
            )
    finally:
        os.close(writer)
    assert proc.returncode == ExitCode.INTERRUPTED == 3
