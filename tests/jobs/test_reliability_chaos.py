"""Chaos: `python -m kvbatch run` on a real (tiny, random) Llama folder is killed with SIGKILL and SIGTERM at random
points, at least 10 times, then run to the end. The output must equal an uninterrupted run's: the same rows in input
order, the same greedy texts, no row twice, no row missing, and after every kill the committed parts are whole.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from reliability_helpers import (
    cli_env,
    kvbatch_command,
    read_output,
    run_cli,
    save_tiny_model,
    word_prompts,
    write_job_file,
    write_jsonl,
)

from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import load_jobs_file
from kvbatch.jobs.writer import work_dir

NUM_ROWS = 96
MIN_KILLS = 10
SEED = 20261129
EARLY_KILLS = (1, 6)  # which kills may land anywhere from start-up on; the others land mid-generation


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("chaos")
    save_tiny_model(folder / "tiny")
    write_jsonl(
        folder / "in.jsonl", [{"id": f"q{i}", "prompt": p} for i, p in enumerate(word_prompts(NUM_ROWS, seed=1))]
    )
    write_job_file(
        folder / "jobs.yaml",
        name="chaos",
        model="tiny",
        input={"path": "in.jsonl"},
        id_column="id",
        sampling={"max_new_tokens": 16},
        output={"path": "out.arrow", "part_rows": 2},
        # Few sequences at once and a small pool: many steps and commits, so kills land mid-generation.
        engine={"device": "cpu", "max_num_seqs": 2, "num_blocks_override": 64, "block_size": 4},
        sort_window=1,
    )
    (folder / "jobs.yaml").write_text(
        (folder / "jobs.yaml").read_text().replace("model: tiny", f"model: {folder / 'tiny'}")
    )
    return folder


def committed_rows(output: Path) -> set[int]:
    """Rows in committed parts; every part the manifest names must open and hold what the manifest says."""
    manifest_path = work_dir(output) / "manifest.json"
    if not manifest_path.exists():
        return set()
    manifest = Manifest.load(manifest_path)
    rows: set[int] = set()
    for part in manifest.parts:
        table = pa.ipc.open_file(pa.memory_map(str(work_dir(output) / part.file))).read_all()
        assert table.num_rows == part.num_rows, f"{part.file} is damaged"
        part_rows = table.column("row").to_pylist()
        assert not rows & set(part_rows), "a row committed twice"
        rows |= set(part_rows)
    assert rows == manifest.done_rows()
    return rows


def kill_once(folder: Path, sig: signal.Signals, early: bool, rng: random.Random, log_file: Path) -> int | None:
    """Start a run and kill it at a random point; return its exit status, or None if it finished first.

    early: at a random moment up to this run's first commit (start-up, model loading, the first rows);
    else mid-generation, a random moment after this run committed something."""
    output = folder / "out" / "out.arrow"
    before = len(committed_rows(output))
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            kvbatch_command("run", "jobs.yaml"), cwd=folder, env=cli_env(), stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + (rng.uniform(0.3, 4.0) if early else 600)
            while process.poll() is None and time.monotonic() < deadline and len(_manifest_rows(output)) <= before:
                time.sleep(0.005)
            if not early:
                time.sleep(rng.uniform(0.0, 0.05))
            if process.poll() is not None:
                return None
            process.send_signal(sig)
            return process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _manifest_rows(output: Path) -> set[int]:
    try:
        return Manifest.load(work_dir(output) / "manifest.json").done_rows()
    except (OSError, ValueError, KeyError):
        return set()


def test_killed_runs_resume_to_the_uninterrupted_output(job_folder: Path, tmp_path: Path) -> None:
    # The reference: the same job, uninterrupted, in this process (same model folder, another output_dir), on one
    # thread like the subprocesses (OMP_NUM_THREADS=1), so the float sums are the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_jobs(
            load_jobs_file(job_folder / "jobs.yaml", {"output_dir": str(tmp_path / "ref")}).select(None)
        )[0]
    finally:
        torch.set_num_threads(threads)
    assert reference.error is None, reference.error
    expected = read_output(tmp_path / "ref" / "out.arrow")
    assert len(expected) == NUM_ROWS and all(r["error"] is None and r["text"] for r in expected)

    rng = random.Random(SEED)
    output = job_folder / "out" / "out.arrow"
    statuses: list[tuple[str, int]] = []
    progress: list[int] = []  # rows committed after each kill
    while len(statuses) < MIN_KILLS:
        sig = (signal.SIGKILL, signal.SIGTERM)[len(statuses) % 2]
        status = kill_once(job_folder, sig, len(statuses) in EARLY_KILLS, rng, tmp_path / "runs.log")
        assert status is not None, f"the job finished before kill {len(statuses) + 1}; give it more rows"
        # SIGTERM: exit 3 once the handlers are installed (a kill during start-up dies of the signal itself).
        assert status in ((-9,) if sig == signal.SIGKILL else (3, -15)), f"{sig.name}: exit status {status}"
        statuses.append((sig.name, status))
        assert not output.exists()
        progress.append(len(committed_rows(output)))  # whole parts, no row twice, after every kill
    print(f"kills: {statuses}; rows committed after each: {progress}")
    assert ("SIGTERM", 3) in statuses and ("SIGKILL", -9) in statuses, statuses
    assert len(committed_rows(output)) > 0, "the kills left committed work to resume"

    final = run_cli("run", "jobs.yaml", cwd=job_folder)
    assert final.returncode == 0, final.stderr[-2000:]
    got = read_output(output)
    assert [r["row"] for r in got] == list(range(NUM_ROWS)), "each row exactly once, in input order"
    assert got == expected, "the same rows and greedy texts as the uninterrupted run"
    assert not list(work_dir(output).glob("part-*")) and not list(work_dir(output).glob("*.incomplete"))
