"""Run the jobs of a file in order, each with the runner it asks for: a local run (jobs/run.py), processes on one
node (data_parallel.py) or a Ray cluster (ray_run.py). One engine per model and settings serves every job.

A job that fails is reported and the next one runs; a signal stops the run after the job in progress commits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kvbatch.errors import InterruptedJob, JobError, KvbatchError, TensorParallelLost
from kvbatch.jobs.data_parallel import run_data_parallel
from kvbatch.jobs.ray_run import run_job_ray
from kvbatch.jobs.run import EngineCache, EngineFactory, default_engine_factory, run_job
from kvbatch.jobs.signals import graceful_stop, hard_stop_named
from kvbatch.jobs.spec import JobsFile, JobSpec
from kvbatch.jobs.summary import Summary

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    job: str
    summary: Summary | None = None
    error: BaseException | None = None

    @property
    def error_message(self) -> str:
        """The error's message, without the "job NAME: " it leads with when raised about this job: what says
        "job NAME failed" names it already."""
        if isinstance(self.error, JobError) and self.error.job == self.job:
            return self.error.detail
        return str(self.error)


def run_jobs(
    jobs: JobsFile | JobSpec | Iterable[JobSpec],
    wait_for_lock: bool = False,
    engine_factory: EngineFactory = default_engine_factory,
    on_outcome: Callable[[JobOutcome], None] | None = None,
) -> list[JobOutcome]:
    """Run jobs (a loaded job file's, one, or any iterable of them) in order, sharing engines. A failed job is
    reported and the next one runs; a signal stops all. `on_outcome` hears of each job as it ends: the CLI prints
    its summary then, not after the last job."""
    jobs = _job_list(jobs)
    engines = EngineCache(engine_factory)
    engines.plan(jobs)
    outcomes: list[JobOutcome] = []

    def ended(outcome: JobOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    with graceful_stop() as stop:
        for job in jobs:
            if stop.stopped:  # a signal during an earlier job: start nothing new (no model load for nothing)
                ended(
                    JobOutcome(
                        job.name,
                        error=InterruptedJob(
                            f"not started, stopped by {stop.signal_name}; rerun to run it", job=job.name
                        ),
                    )
                )
                break
            try:
                with hard_stop_named(job.name):  # any runner's; a local run's names its committed rows itself
                    done = JobOutcome(job.name, _job_runner(job)(job, engines, stop, wait_for_lock))
            except InterruptedJob as exc:
                ended(JobOutcome(job.name, error=exc))
                break
            except KvbatchError as exc:  # says what to change: the model, the machine, the budget, the spec
                failed = JobOutcome(job.name, error=exc)
                log.info("job %s failed: %s", job.name, failed.error_message)  # the CLI prints it once
                ended(failed)
            except Exception as exc:
                # A bug: its traceback goes to the log, and the jobs after this one still run.
                log.exception("job %s failed on an unexpected error", job.name)
                error = JobError(
                    f"unexpected {type(exc).__name__}: {exc} (a bug, traceback logged above); "
                    "committed rows are kept, rerun to resume",
                    job=job.name,
                )
                ended(JobOutcome(job.name, error=error))
            except TensorParallelLost as exc:  # a rank is gone: no job of this run can go on
                ended(JobOutcome(job.name, error=exc))
                break
            else:  # outside the try: the callback's own errors are not this job's
                ended(done)
    return outcomes


_TAKES = "pass a loaded job file (kvbatch.load_jobs_file), a JobSpec (kvbatch.job_from_dict) or a list of them"


def _job_list(jobs: object) -> list[JobSpec]:
    """The jobs, listed: read twice, for the plan and the run, a generator would be spent by the plan. Anything
    else is refused by name here: a job file's path was read as one job per character, and failed deep in the
    engine plan with Python's own words."""
    if isinstance(jobs, JobsFile):
        return list(jobs.jobs)
    if isinstance(jobs, JobSpec):
        return [jobs]
    kind = next((k for t, k in _NOT_JOBS if isinstance(jobs, t)), None)
    if kind is None and not isinstance(jobs, Iterable):
        kind = "None" if jobs is None else f"of type {type(jobs).__name__}"
    if kind is not None:
        raise TypeError(f"jobs is {kind}; {_TAKES}")
    listed = list(jobs)
    for index, job in enumerate(listed):
        if not isinstance(job, JobSpec):
            raise TypeError(f"jobs[{index}] is {'None' if job is None else 'a ' + type(job).__name__}; {_TAKES}")
    return listed


# Iterable, or a path, but no jobs: a job file must be loaded first, a job's dict built into a JobSpec.
_NOT_JOBS = ((str, "a string"), ((bytes, bytearray), "bytes"), (os.PathLike, "a path"), (Mapping, "a mapping"))


def _job_runner(job: JobSpec) -> Callable[..., Summary]:
    """run_job, or the runner that spreads the job over a Ray cluster or over processes (docs/scaling.md)."""
    if job.runner == "ray":
        return run_job_ray
    if job.parallel.data > 1:
        return run_data_parallel
    return run_job
