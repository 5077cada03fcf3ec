"""A job's progress: rows and tokens, rates and an ETA of this run's work only, refreshed on engine steps; a live
bar on a terminal, a plain line every progress_seconds in a log, nothing with --quiet."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from job_fakes import FakeEngine

from kvbatch.jobs.progress import JobProgress, announce_load, display_mode


@pytest.fixture(autouse=True)
def drawing_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The terminals here draw bars, wherever the tests run (a CI console may be TERM=dumb, which gets lines)."""
    monkeypatch.setenv("TERM", "xterm-256color")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_resume_and_error_rows_do_not_count_as_work() -> None:
    clock, engine = Clock(), FakeEngine()
    engine.stats.num_output_tokens = 500  # an earlier job on the same engine: not this job's
    engine.stats.num_prefill_tokens = 9000
    # 60 of 100 rows were done by an earlier run; 40 are left.
    progress = JobProgress("j", 100, engine, initial=60, mode="lines", every_s=30, stream=io.StringIO(), clock=clock)
    for _ in range(4):  # four error rows: no work, four rows fewer to do
        progress.update(None, 0, error=True)
    clock.now += 10
    engine.stats.num_prefill_tokens += 1000 + 200  # 1000 for the two rows below, 200 for rows still in flight
    engine.stats.num_output_tokens += 100 + 30
    progress.update(500, 50, error=False)
    progress.update(500, 50, error=False)
    snap = progress.snapshot()
    assert (snap.rows_done, snap.errors) == (66, 4)
    assert snap.rows_per_s == pytest.approx(0.2)  # 2 rows in 10 s, not 66 nor 6
    assert (snap.prompt_tokens_per_s, snap.output_tokens_per_s) == (pytest.approx(120.0), pytest.approx(13.0))
    # 34 rows left x 550 tokens each, less the 230 done for rows in flight, at 1330 tokens in 10 s.
    assert snap.eta_s == pytest.approx((34 * 550 - 230) / 133.0)


def test_rows_still_running_longer_than_the_finished_ones_leave_a_time_to_wait() -> None:
    """20 rows prefilled together; the 6 short ones finish first. The 14 running rows have already done more
    work than 14 of the finished rows' average, so the token estimate leaves nothing: the ETA is 0 only when the
    job is done, and here comes from the rows' rate (6 rows in 60 s, 14 left)."""
    clock, engine = Clock(), FakeEngine()
    progress = JobProgress("j", 20, engine, mode="lines", every_s=30, stream=io.StringIO(), clock=clock)
    clock.now += 60
    engine.stats.num_prefill_tokens += 20 * 30  # every prompt computed
    engine.stats.num_output_tokens += 6 * 5 + 14 * 25  # the short rows' 5 tokens, the running rows' 25 so far
    for _ in range(6):
        progress.update(30, 5, error=False)
    assert progress.snapshot().eta_s == pytest.approx(14 * 60 / 6)
    for _ in range(14):
        progress.update(30, 40, error=False)
    assert progress.snapshot().eta_s == 0.0


def test_a_long_prefill_shows_before_any_row_finishes() -> None:
    clock, engine, log = Clock(), FakeEngine(), io.StringIO()
    progress = JobProgress("j", 21, engine, mode="lines", every_s=30, stream=log, clock=clock)
    for _ in range(4):  # engine steps of a long prompt: no row finishes
        clock.now += 10
        engine.stats.num_prefill_tokens += 4000
        engine.kv_in_use = 0.5
        progress.tick()
    lines = log.getvalue().splitlines()
    assert lines == ["j: 0/21 rows (0%), 0.00 rows/s, ETA ?, prompt 400 tok/s, output 0.0 tok/s, KV 50%, 0 errors"]
    assert progress.peak_kv_usage == 0.5


def test_a_log_gets_a_whole_line_every_interval_and_one_at_the_end() -> None:
    clock, log = Clock(), io.StringIO()  # a StringIO is no terminal: lines
    engine = FakeEngine()
    progress = JobProgress("j", 50, engine, every_s=30, stream=log, clock=clock)
    for _ in range(50):
        clock.now += 2.5  # 125 s in all
        engine.stats.num_prefill_tokens += 10
        engine.stats.num_output_tokens += 3
        progress.update(10, 3, error=False)
    progress.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 5  # at 30, 60, 90 and 120 s, and the last state
    assert (
        lines[-1] == "j: 50/50 rows (100%), 0.40 rows/s, ETA 0:00:00, prompt 4 tok/s, output 1.2 tok/s, KV 0%, 0 errors"
    )
    assert lines[0].startswith("j: 12/50 rows (24%), 0.40 rows/s, ETA 0:01:35,")  # 38 rows at 2.5 s


def test_a_terminal_gets_the_live_bar_and_off_shows_nothing() -> None:
    clock, terminal = Clock(), Terminal()
    progress = JobProgress("j", 3, FakeEngine(), stream=terminal, clock=clock)
    assert progress.mode == "bar"
    clock.now += 1
    progress.update(10, 3, error=False)
    progress.close()
    assert "\r" in terminal.getvalue() and "1/3 rows" in terminal.getvalue()
    quiet = Terminal()
    progress = JobProgress("j", 3, FakeEngine(), mode="off", stream=quiet, clock=clock)
    progress.update(10, 3, error=False)
    progress.close()
    assert quiet.getvalue() == ""


def test_a_log_says_the_model_is_loading_and_a_terminal_or_off_does_not() -> None:
    log, terminal, quiet = io.StringIO(), Terminal(), io.StringIO()
    announce_load("j [shard 1/2]", "/models/m", "auto", stream=log)
    announce_load("j", "/models/m", "auto", stream=terminal)  # the bar starts after the load
    announce_load("j", "/models/m", "off", stream=quiet)
    assert (log.getvalue(), terminal.getvalue(), quiet.getvalue()) == (
        "j [shard 1/2]: loading model /models/m\n",
        "",
        "",
    )


def test_the_bar_shows_its_figures_once_after_the_elapsed_time() -> None:
    """tqdm puts ", " before a postfix itself: the bar adds no second comma, nor an empty ", ]" before one."""
    clock, terminal = Clock(), Terminal()
    progress = JobProgress("j", 3, FakeEngine(), stream=terminal, clock=clock)
    first = terminal.getvalue()
    clock.now += 1
    progress.update(10, 3, error=False)
    progress.close()
    text = terminal.getvalue()
    assert "0/3 rows [00:00]" in first, first
    assert ", ," not in text and ", ]" not in text, text
    assert "1/3 rows [00:00, ETA " in text, text


def test_a_bar_of_several_processes_takes_its_own_line_and_is_cleared_at_the_end() -> None:
    clock, terminal = Clock(), Terminal()
    progress = JobProgress("j [shard 1/2]", 3, FakeEngine(), position=1, stream=terminal, clock=clock)
    clock.now += 1
    progress.update(10, 3, error=False)
    drawn = terminal.getvalue()
    assert drawn.startswith("\n") and "\x1b[A" in drawn and "j [shard 1/2]:" in drawn  # one line down, and back
    progress.close()
    assert not terminal.getvalue()[len(drawn) :].endswith("\n")  # no newline left to shift the other bars


def test_a_warning_during_the_bar_gets_a_line_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal's warning while the bar runs: written above the bar, not glued to its end; the console handler
    is the user's own again once the bar is closed."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # as logging.basicConfig sets it up
    monkeypatch.setattr(root, "handlers", [console])
    clock = Clock()
    progress = JobProgress("j", 3, FakeEngine(), clock=clock)
    clock.now += 1
    progress.update(10, 3, error=False)
    logging.getLogger("kvbatch.test").warning("SIGINT: stopping")
    progress.close()
    text = terminal.getvalue()
    assert "SIGINT: stopping\n" in text and "]SIGINT" not in text, text
    assert root.handlers == [console]


def test_a_dumb_terminal_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """TERM=dumb (Emacs' shell, some CI consoles) cannot move its cursor: the bar's redraws, and the cursor-up codes
    of several processes' bars, piled up as text there."""
    controller, terminal = pty.openpty()
    try:
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        with open(terminal, "w", closefd=False) as stream:
            monkeypatch.setenv("TERM", "dumb")
            assert display_mode("auto", stream) == "lines" and display_mode("bar", stream) == "bar"
            monkeypatch.setenv("TERM", "xterm-256color")
            assert display_mode("auto", stream) == "bar"
    finally:
        os.close(terminal)
        os.close(controller)


def test_a_terminal_without_a_width_gets_lines() -> None:
    """A pty whose size was never set (`script`, `docker exec -t` in a script) reports 0 columns: tqdm draws
    nothing there, so a job showed no progress at all; it gets the log's lines instead."""
    controller, terminal = pty.openpty()
    try:
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        with open(terminal, "w", closefd=False) as stream:
            assert display_mode("auto", stream) == "lines"
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        with open(terminal, "w", closefd=False) as stream:
            assert display_mode("auto", stream) == "bar"
    finally:
        os.close(terminal)
        os.close(controller)


# ---- the CLI in a process of its own, with stderr a file (a Slurm log) or a terminal -----------------------
# The process runs `kvbatch run` as the console script does, with the fake engine in place of the model.

HELPERS = Path(__file__).parents[1] / "helpers"
CLI_WITH_FAKE_ENGINE = f"""
import functools, sys
sys.path.insert(0, {str(HELPERS)!r})
from job_fakes import fake_factory
from kvbatch import cli
from kvbatch.jobs import runners
cli.run_jobs = functools.partial(runners.run_jobs, engine_factory=fake_factory())
cli.app(sys.argv[1:], prog_name="kvbatch")
"""


@pytest.fixture
def job_folder(tmp_path: Path) -> Path:
    rows = [{"prompt": f"question {i}"} for i in range(24)] + [{"prompt": ""}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "jobs.yaml").write_text("jobs:\n  - name: p\n    input: {path: in.jsonl}\n")
    return tmp_path


def kvbatch(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", CLI_WITH_FAKE_ENGINE, "run", str(folder / "jobs.yaml"), *args]


def test_a_log_file_holds_whole_lines_and_few_of_them(job_folder: Path) -> None:
    log = job_folder / "slurm.err"
    with open(log, "wb") as stderr:
        done = subprocess.run(kvbatch(job_folder), stderr=stderr, stdout=subprocess.PIPE, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 2 <= len(lines) <= 4 and all(line.startswith("p: ") for line in lines), text  # progress lines only
    assert lines[0] == "p: loading model default"  # a long load no longer leaves the log empty
    assert lines[-1].startswith("p: 25/25 rows (100%),") and lines[-1].endswith(", 1 errors")
    assert "job p: done" in done.stdout.decode()


def test_quiet_shows_only_the_summary(job_folder: Path) -> None:
    done = subprocess.run(kvbatch(job_folder, "--quiet"), capture_output=True, timeout=300)
    assert done.returncode == 0 and done.stderr.decode() == ""
    assert done.stdout.decode().startswith("job p: done")


def test_a_terminal_still_gets_the_bar(job_folder: Path) -> None:
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a real terminal has a width
    try:
        done = subprocess.Popen(kvbatch(job_folder), stderr=terminal, stdout=subprocess.DEVNULL)
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert done.wait(timeout=300) == 0, output
    finally:
        os.close(controller)
    text = output.decode(errors="replace")
    assert "\r" in text and "25/25 rows [" in text and "1 errors" in text


def test_a_log_reader_gone_loses_the_text_not_the_jobs(job_folder: Path) -> None:
    """`kvbatch run jobs.yaml 2>&1 | tee log` whose tee was killed: stdout and stderr are a pipe with no reader.
    The "loading model" line raised BrokenPipeError inside the job, which failed as a bug with nothing written, and
    a summary that could not be printed ended the run before the next job; the exit code was 1."""
    (job_folder / "jobs.yaml").write_text(
        "jobs:\n  - name: p\n    input: {path: in.jsonl}\n  - name: q\n    input: {path: in.jsonl}\n"
    )
    reader, writer = os.pipe()
    os.close(reader)  # the reader exited before kvbatch wrote a thing
    try:
        done = subprocess.run(kvbatch(job_folder), stdout=writer, stderr=writer, timeout=300)
    finally:
        os.close(writer)
    assert done.returncode == 0
    for name in ("p", "q"):
        summary = json.loads((job_folder / "out" / f"{name}.arrow.summary.json").read_text())
        assert (summary["rows"], summary["rows_ok"], summary["rows_error"]) == (25, 24, 1)
