"""`--data-parallel N`: N engine processes on one node, each on a disjoint shard of the rows, merged at the end.

    parent (no model) ──spawn──> child 0: CUDA_VISIBLE_DEVICES=0   run_job(shard 0/N) -> NAME.shard-0000-of-000N.EXT
                      ──spawn──> child 1: CUDA_VISIBLE_DEVICES=1   run_job(shard 1/N) -> NAME.shard-0001-of-000N.EXT
                      ...
           all done ──> merge_shards -> NAME.EXT (input order), shard files removed

Each child sees only its own GPU(s) (`--tensor-parallel T` gives each child T of them), so every engine is the
ordinary single-device engine. On the CPU the children share the cores. Shard outputs are ordinary resumable
outputs: an interrupted run, run again, resumes every shard. Inside a Slurm shard I/N the children run the
splits of that shard and the merge writes the shard's own output.

Signals: children ignore SIGINT and SIGUSR1 (a terminal's Ctrl-C, Slurm's --signal); the parent, which gets them,
tells every child through an Event, once: no new rows, finish those in flight, commit. When the parent stops at
once (a second signal, the grace period over, an error) it sets that Event and sends the children SIGTERM, which
stops a stopping child at once: rows in flight are dropped, finished rows committed. SIGTERM from elsewhere
(scancel, Slurm's time limit or preemption, which signal every process of the step) is a child's first signal:
it stops as the parent does, finishing its rows in flight within the parent's grace period.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from kvbatch.errors import InterruptedJob, JobError, KvbatchError, OutputError, SpecError
from kvbatch.jobs.job_io import job_manifest
from kvbatch.jobs.layouts import refuse_other_layouts
from kvbatch.jobs.lock import OutputLock
from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.merge import merge_shards
from kvbatch.jobs.shard import Shard
from kvbatch.jobs.shard_output import job_shard
from kvbatch.jobs.signals import SIGNALS, StopFlag, StopNow, exit_now
from kvbatch.jobs.spec import JobSpec, output_format, output_path
from kvbatch.jobs.summary import RunCounts, Summary, already_complete, build_summary, summary_path
from kvbatch.jobs.writer import make_work_dir, remove_output, resume_refusal, work_dir
from kvbatch.runner.parallel.log_settings import LogSettings

log = logging.getLogger(__name__)
POLL_S = 0.5
KILL_AFTER_S = 30.0  # after SIGTERM, a child that has not committed and exited by then is killed


class _ParentStop(StopFlag):
    """A child's stop flag: set when the parent says so, or when the parent is gone."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event
        self.parent = os.getppid()

    @property
    def stopped(self) -> bool:
        if self.signal_name is None and (self.event.is_set() or os.getppid() != self.parent):
            self.signal_name = "the data-parallel parent"
        return self.signal_name is not None


def assign_devices(job: JobSpec, num_children: int, tensor_parallel: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each child, or None for each on the CPU."""
    device = job.engine.device or "auto"
    if device == "cpu":
        return [None] * num_children
    import torch

    if not torch.cuda.is_available():
        if device != "auto":
            raise SpecError(f"engine.device is {device!r} but no GPU is visible", field="engine.device")
        return [None] * num_children
    if device not in ("auto", "cuda"):
        raise SpecError(
            f"with --data-parallel each process takes its own GPUs; set engine.device to auto or cuda, not {device!r}",
            field="engine.device",
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (
        [g.strip() for g in visible.split(",") if g.strip()]
        if visible
        else [str(i) for i in range(torch.cuda.device_count())]
    )
    needed = num_children * tensor_parallel
    if needed > len(gpus):
        raise SpecError(
            f"{num_children} processes x {tensor_parallel} GPUs need {needed} GPUs; {len(gpus)} are visible "
            f"({','.join(gpus)})",
            field="parallel.data",
        )
    return [",".join(gpus[i * tensor_parallel : (i + 1) * tensor_parallel]) for i in range(num_children)]


def run_data_parallel(job: JobSpec, engines: Any, stop: StopFlag, wait_for_lock: bool = False) -> Summary:
    """Run `job` as parallel.data children and merge their shards; the same contract as run_job."""
    started = time.monotonic()
    ways = job.parallel.data
    outer = job_shard(job.parallel.shard)  # a Slurm shard, split further
    target = outer or Shard(0, 1)
    base = output_path(job)
    out = base if outer is None else outer.output_path(base)

    def finished() -> Summary | None:
        if job.output.mode == "resume":
            previous = _complete_summary(job, out)  # raises, before any process starts, if another spec wrote `out`
            if previous is not None:
                log.info("job %s: %s is complete already (same spec); nothing to do", job.name, out)
            return previous
        if job.output.mode == "error" and out.exists():
            raise OutputError(
                f"{out} already exists and output.mode is 'error'; remove it or choose mode resume/overwrite"
            )
        return None

    previous = finished()  # before the lock too: a finished output in a read-only folder is reported, not locked
    if previous is not None:
        return previous
    if stop.stopped:  # a signal during an earlier job: start no processes for nothing
        raise InterruptedJob(f"not started, stopped by {stop.signal_name}; rerun to run it", job=job.name)
    shards = target.split(ways)
    devices = assign_devices(job, ways, job.parallel.tensor)
    import torch

    # The children share the threads one process would use: torch's default follows OMP_NUM_THREADS and the CPUs
    # this process may run on (a Slurm job's --cpus-per-task), where os.cpu_count() counts every core of the node.
    threads = max(1, torch.get_num_threads() // ways)
    children = [
        dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, data=1, shard=str(s))) for s in shards
    ]
    lock = _lock_output(out, wait_for_lock, stop)
    try:
        previous = finished()  # the run this one waited for (--wait) may have finished it
        if previous is not None:
            return previous
        # Rows another layout committed (a killed run of one process, or of another --data-parallel count) would be
        # done again by the children, and left beside the merged output.
        refuse_other_layouts(base, target, [s.output_path(base) for s in shards], job.output.mode, held=out)
        # The children load their own engines: one an earlier job left in this process would hold memory of the
        # devices they size their KV pools on.
        engines.release()
        results = _run_children(children, devices, threads, engines.factory, stop, wait_for_lock)
        failures = [(s, r) for s, r in zip(shards, results) if isinstance(r, BaseException)]
        if failures:
            raise _combined_error(job, failures)
        report = merge_shards(
            out,
            [s.output_path(base) for s in shards],
            target=target,
            overwrite=job.output.mode == "overwrite",
            locked=True,
        )
        for s in shards:  # merged: the shard outputs were only a means
            remove_output(s.output_path(base))
            with contextlib.suppress(FileNotFoundError):
                summary_path(s.output_path(base)).unlink()
        counts = sum((RunCounts.of(part) for part in results), RunCounts())
        first: Summary = results[0]
        about = {"model": job.model, "spec_hash": first.spec_hash, "kvbatch_version": first.kvbatch_version}
        load_s = max(part.load_s for part in results)  # the processes load side by side
        summary = build_summary(job.name, out, report, counts, time.monotonic() - started, load_s, **about)
        summary.write(summary_path(out))
    finally:
        lock.release()
    return summary


def _lock_output(out: Path, wait: bool, stop: StopFlag) -> OutputLock:
    """The output's own lock, held from before the children start until their shards are merged. Each child locks
    only its shard: two runs started at once on one output took some shards' locks each, and both failed with
    exit 4; a plain run on the output ran beside them."""
    lock = OutputLock(make_work_dir(out) / "lock")
    lock.acquire(wait=wait, stop_waiting=lambda: stop.stopped)
    return lock


def _run_children(
    jobs: list[JobSpec], devices: list[str | None], threads: int, factory: Any, stop: StopFlag, wait_for_lock: bool
) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA is never inherited half-initialised
    event = ctx.Event()
    log_settings = LogSettings.of_this_process()
    procs, conns = [], []
    try:
        for child_job, gpus in zip(jobs, devices):
            receiver, sender = ctx.Pipe(duplex=False)
            with _environ(CUDA_VISIBLE_DEVICES=gpus):
                proc = ctx.Process(
                    target=_child,
                    args=(sender, child_job, factory, event, threads, wait_for_lock, log_settings, len(procs)),
                    name=f"kvbatch-dp-{child_job.parallel.shard}",
                )
                proc.start()
            sender.close()
            procs.append(proc)
            conns.append(receiver)
        results: list[Any] = [None] * len(jobs)
        pending = dict(enumerate(conns))
        while pending:
            if stop.stopped and not event.is_set():
                log.warning("telling %d data-parallel processes to stop", len(pending))
                event.set()
            for conn in wait(list(pending.values()), timeout=POLL_S):
                i = conns.index(conn)  # type: ignore[arg-type]
                try:
                    results[i] = conn.recv()
                except EOFError:
                    procs[i].join()
                    results[i] = JobError(
                        f"data-parallel process {i} died (exit code {procs[i].exitcode}) before reporting; rerun "
                        "to resume"
                    )
                del pending[i]
        for proc in procs:
            proc.join()
        return results
    finally:
        event.set()  # first, so that a child takes the SIGTERM below as its second signal: stop at once
        for proc in procs:  # the parent stops at once (second signal, error): so do the children, committing
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=KILL_AFTER_S)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _child(
    conn: Connection,
    job: JobSpec,
    factory: Any,
    event: Any,
    threads: int,
    wait_for_lock: bool,
    log_settings: LogSettings,
    position: int,
) -> None:
    log_settings.apply()
    stop = _ParentStop(event)
    _child_signals(stop)
    import torch

    from kvbatch.jobs.run import EngineCache, run_job

    torch.set_num_threads(threads)
    try:
        # each process's bar on a line of its own: on one line the processes' bars overwrite each other
        result: Any = run_job(job, EngineCache(factory), stop, wait_for_lock, progress_position=position)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, which decides
        result = exc
    finally:
        if "kvbatch.runner.parallel.tensor_parallel" in sys.modules:  # this child's own tensor-parallel workers
            sys.modules["kvbatch.runner.parallel.tensor_parallel"].shutdown()
    try:
        conn.send(result)
    except OSError:  # a closed pipe: the parent was killed at once, and this child stopped on seeing it gone
        shard = job.parallel.shard
        log.warning("shard %s: the data-parallel parent is gone; its finished rows are kept, rerun to resume", shard)
    except Exception as exc:  # noqa: BLE001 - an exception that does not pickle
        conn.send(JobError(f"{type(result).__name__}: {result} ({exc})"))
    conn.close()


def _child_signals(stop: _ParentStop) -> None:
    """SIGINT and SIGUSR1 are the parent's to relay. SIGTERM stops a running child as the parent would (Slurm
    signals every process of a step: the rows in flight get the grace period, not dropped), and a stopping one at
    once (the parent's own SIGTERM, after setting the Event, or a second signal)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    def on_term(signum: int, frame: object) -> None:
        if not stop.stopped:
            log.warning("SIGTERM: no new rows are admitted; finishing the rows in flight, then committing")
            stop.stop("SIGTERM")
            return
        if stop.loading:  # as graceful_stop: a StopNow inside transformers' loading could be swallowed
            exit_now()
        raise StopNow("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)


@contextlib.contextmanager
def _environ(**values: str | None):
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _combined_error(job: JobSpec, failures: list[tuple[Shard, BaseException]]) -> BaseException:
    """One exception for the CLI's exit code: interrupted beats the rest; shards that failed alike (a setting or a
    model that every child refused) give that one error, as a single process raises it; one kind of failure
    keeps its type, and with it its exit code (a locked output stays 4, a setting 2)."""
    lines = "; ".join(f"shard {s}: {exc}" for s, exc in failures)
    if any(isinstance(exc, (InterruptedJob, KeyboardInterrupt)) for _, exc in failures):
        return InterruptedJob(
            f"stopped; finished rows of every shard are saved, rerun to resume ({lines})", job=job.name
        )
    first = failures[0][1]
    if all(type(exc) is type(first) and str(exc) == str(first) for _, exc in failures):
        return first
    kinds = {type(exc) for _, exc in failures}
    kind = kinds.pop() if len(kinds) == 1 else JobError
    message = f"{len(failures)} data-parallel shards failed: {lines}"
    if issubclass(kind, JobError):
        return kind(message, job=job.name)
    if issubclass(kind, KvbatchError):  # SpecError, KVBudgetError, ModelLoadError...: each takes its message
        return kind(message)
    return JobError(message, job=job.name)


def _complete_summary(job: JobSpec, out: Path) -> Summary | None:
    """The summary of an earlier complete run of this spec and input into `out`, or None. Rows another spec or
    input committed there are refused now, as a single process would, not after every shard has run."""
    manifest_path = work_dir(out) / "manifest.json"
    try:
        manifest = Manifest.load(manifest_path)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if manifest.parts or manifest.complete:
        refusal = resume_refusal(out, manifest, job_manifest(job, out, output_format(job)))
        if refusal:
            raise OutputError(refusal)
    if not (manifest.complete and out.exists()):
        return None
    fallback = Summary(job.name, str(out), model=job.model, spec_hash=manifest.spec_hash)
    try:
        return already_complete(out, fallback)
    except (ValueError, TypeError):  # a damaged summary file: the output itself is complete
        return already_complete(out.with_name(out.name + ".missing"), fallback)
