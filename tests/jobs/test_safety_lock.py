"""Overlapping runs: while one `kvbatch run` writes an output, a second one on the same output exits at once with
code 4 and a clear message (or waits, with --wait); the first completes with every row exactly once; a kill -9
leaves no stale lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from job_fakes import fake_factory
from reliability_helpers import (
    cli_env,
    kvbatch_command,
    read_output,
    save_tiny_model,
    word_prompts,
    write_job_file,
    write_jsonl,
)
from typer.testing import CliRunner

from kvbatch import cli
from kvbatch.errors import ExitCode, OutputError, OutputLockedError
from kvbatch.jobs.lock import OutputLock
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import load_jobs_file
from kvbatch.jobs.writer import work_dir

NUM_ROWS = 24


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lock")
    save_tiny_model(folder / "tiny")
    write_jsonl(folder / "in.jsonl", [{"prompt": p} for p in word_prompts(NUM_ROWS, seed=2)])
    write_job_file(
        folder / "jobs.yaml",
        name="locked",
        model=str(folder / "tiny"),
        input={"path": "in.jsonl"},
        sampling={"max_new_tokens": 4},
        output={"path": "out.arrow", "part_rows": 4},
        engine={"device": "cpu", "max_num_seqs": 2, "num_blocks_override": 64, "block_size": 4},
    )
    return folder


def start(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        kvbatch_command("run", "jobs.yaml", *args),
        cwd=folder,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock(lock: Path, process: subprocess.Popen) -> None:
    """Until `process` holds the lock (it writes its pid into the lock file after flock)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip() == str(process.pid):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("the run never took the lock")


def test_second_run_is_refused_with_code_4_and_the_first_completes(job_folder: Path, tmp_path: Path) -> None:
    output = job_folder / "out" / "out.arrow"
    lock = work_dir(output) / "lock"
    first = start(job_folder)
    try:
        wait_for_lock(lock, first)
        # Pause the first run while it holds the lock, so that it is surely still running whatever the machine's
        # speed: a stopped process keeps its lock like a busy one.
        first.send_signal(signal.SIGSTOP)
        waiting_log = tmp_path / "waiting.log"
        with open(waiting_log, "w") as log:
            waiting = subprocess.Popen(
                kvbatch_command("run", "jobs.yaml", "--wait"),
                cwd=job_folder,
                env=cli_env(),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        second = subprocess.run(
            kvbatch_command("run", "jobs.yaml"),
            cwd=job_folder,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == ExitCode.LOCKED == 4, second.stderr
        message = (
            f"another kvbatch run (pid {first.pid}) is writing this output (lock {lock}); wait for it, or pass --wait"
        )
        assert message in second.stderr

        # The same through the job API and the CLI in this process (flock is per open file, so it conflicts here too).
        specs = load_jobs_file(job_folder / "jobs.yaml").select(None)
        outcome = run_jobs(specs, engine_factory=fake_factory())[0]
        assert isinstance(outcome.error, OutputLockedError) and message in str(outcome.error)
        result = CliRunner().invoke(cli.app, ["run", str(job_folder / "jobs.yaml")])
        assert result.exit_code == 4 and message in result.output

        deadline = time.monotonic() + 60
        while "waiting for it" not in waiting_log.read_text() and time.monotonic() < deadline:
            assert waiting.poll() is None, waiting_log.read_text()
            time.sleep(0.02)
        assert (
            f"another kvbatch run (pid {first.pid}) is writing this output; waiting for it" in waiting_log.read_text()
        )
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 0, first.communicate()
        out, _ = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, waiting_log.read_text()
        assert "already complete" in out, "--wait waited for the first run, then found the job done"
    finally:
        for process in (first, locals().get("waiting")):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    rows = read_output(output)
    assert [r["row"] for r in rows] == list(range(NUM_ROWS)) and all(r["error"] is None for r in rows)


def test_kill_9_leaves_no_stale_lock(tmp_path: Path) -> None:
    # A process that takes the output lock the way `kvbatch run` does (the chaos test kills real runs with -9 and
    # reruns them; this one looks at the lock alone, without a model to load).
    lock = tmp_path / "lock"
    holder = (
        "import sys, time\nfrom kvbatch.jobs.lock import OutputLock\n"
        "OutputLock(__import__('pathlib').Path(sys.argv[1])).acquire()\ntime.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder, str(lock)], env=cli_env())
    try:
        wait_for_lock(lock, process)
        with pytest.raises(OutputLockedError, match=f"another kvbatch run \\(pid {process.pid}\\)"):
            OutputLock(lock).acquire()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert lock.read_text().strip() == str(process.pid), (
        "the lock file stays, naming the dead run; only the kernel's lock matters"
    )
    fresh = OutputLock(lock)
    fresh.acquire()  # at once, without --wait: there is never a stale lock to clean by hand
    fresh.release()


def test_a_signal_ends_a_wait_for_the_lock(tmp_path: Path) -> None:
    """`--wait` waits for the holder, but a signal (its handler only sets a flag) must end the wait, not be slept
    through; when the holder lets go without one, the waiter takes the lock."""
    import threading

    from kvbatch.errors import InterruptedJob

    lock = tmp_path / "lock"
    holder = OutputLock(lock)
    holder.acquire()
    checks = []
    with pytest.raises(InterruptedJob, match="stopped while waiting for another run's lock"):
        OutputLock(lock).acquire(wait=True, stop_waiting=lambda: checks.append(1) or len(checks) > 2)
    assert len(checks) == 3  # it looked for the signal while it waited
    threading.Timer(0.3, holder.release).start()
    waiter = OutputLock(lock)
    waiter.acquire(wait=True, stop_waiting=lambda: False)
    assert lock.read_text().strip() == str(os.getpid())
    waiter.release()


def test_a_run_waiting_on_a_lock_its_holder_removed_takes_the_one_at_the_path(tmp_path: Path) -> None:
    """A run of another layout with output.mode overwrite removes an earlier shard's work folder, its lock
    included (a folder left holding its lock alone was found as a shard of the output). A run that waited on that
    lock (--wait) must not come out holding the removed file, which a run started after the removal cannot see:
    it takes the lock on the file now at the path, so that the two runs are never both holders."""
    import shutil
    import threading

    folder = tmp_path / ".answers.shard-0000-of-0002.arrow.kvbatch"
    folder.mkdir()
    lock = folder / "lock"
    holder = OutputLock(lock)
    holder.acquire()

    def remove_and_release() -> None:
        shutil.rmtree(folder)
        holder.release()

    threading.Timer(0.3, remove_and_release).start()
    waiter = OutputLock(lock)
    waiter.acquire(wait=True, stop_waiting=lambda: False)
    try:
        assert lock.read_text().strip() == str(os.getpid())  # the folder and lock made again, and locked
        with pytest.raises(OutputLockedError, match="another kvbatch run"):
            OutputLock(lock).acquire()
    finally:
        waiter.release()
    again = OutputLock(lock)
    again.acquire()
    again.release()


def test_a_run_whose_lock_folder_went_before_it_opened_the_lock_makes_it_again(tmp_path: Path) -> None:
    """A run of another layout with output.mode overwrite removes an earlier run's work folder whole. A run that
    made that folder and had not yet opened its lock failed "cannot open the lock file" (exit 1), neither locked
    (exit 4) nor waiting: it makes the folder again and takes the lock there. A link put at the folder's name in
    the meantime is refused, as make_work_dir refuses it."""
    folder = tmp_path / ".answers.shard-0000-of-0002.arrow.kvbatch"
    lock = OutputLock(folder / "lock")
    lock.acquire()
    try:
        assert (folder / "lock").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputLockedError, match="another kvbatch run"):
            OutputLock(folder / "lock").acquire()
    finally:
        lock.release()
    linked = tmp_path / ".linked.arrow.kvbatch"  # a link to a folder not there (yet)
    linked.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(OutputError, match="is a symbolic link"):
        OutputLock(linked / "lock").acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_the_lock_and_the_files_of_an_output_follow_the_umask(tmp_path: Path) -> None:
    """The lock, the parts journal and every file written through a temporary were made 0644 whatever the umask:
    in a team's group folder (umask 002) a teammate resuming an interrupted run could not open the lock for
    writing (Permission denied, exit 1). The umask decides, as it does for pyarrow's parts and the folders."""
    from kvbatch.jobs.manifest import Manifest, PartEntry, journal_path

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in word_prompts(3, seed=2)])
    (tmp_path / "jobs.yaml").write_text("jobs:\n  - name: shared\n    input: {path: in.jsonl}\n")
    umask = os.umask(0o002)
    try:
        [outcome] = run_jobs(load_jobs_file(tmp_path / "jobs.yaml"), engine_factory=fake_factory())
        manifest = Manifest("job", "h1", {"model": "m"}, "out.arrow", "arrow")
        manifest.append_part(tmp_path / "manifest.json", PartEntry("part-000000.arrow", 1, [[0, 1]]))
    finally:
        os.umask(umask)
    assert outcome.error is None, outcome.error
    out = tmp_path / "out" / "shared.arrow"
    files = [work_dir(out) / "lock", work_dir(out) / "manifest.json", out, out.with_name(out.name + ".summary.json")]
    modes = {path.name: path.stat().st_mode & 0o777 for path in [*files, journal_path(tmp_path / "manifest.json")]}
    assert set(modes.values()) == {0o664}, modes
