"""Run jobs: reader -> row pipeline -> sort window -> engine -> writer, with progress and a summary.

    reader ──rows──> RowPipeline ──requests──> sort_window ──> engine.generate ──results──> RowPipeline ──> writer
                          └── error rows (unreadable, duplicate id, bad value, bad template) ──────────────────┘

Every input row becomes exactly one output row: a result, or an error row that says why. Finished rows are
committed in parts as they arrive, so an interrupted or failed job keeps them and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import time
import weakref
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any

from kvbatch.errors import ErrorKind, InputError, InterruptedJob, JobError
from kvbatch.jobs.job_io import JobIO, check_input_unchanged, open_job
from kvbatch.jobs.layouts import finished, refuse_other_layouts
from kvbatch.jobs.manifest import KVBATCH_VERSION
from kvbatch.jobs.packing import sort_window
from kvbatch.jobs.pipeline import RowPipeline
from kvbatch.jobs.progress import JobProgress, announce_load
from kvbatch.jobs.records import RowResult
from kvbatch.jobs.rows import Row, RowError
from kvbatch.jobs.shard import Shard
from kvbatch.jobs.shard_output import job_shard
from kvbatch.jobs.signals import StopFlag, hard_stop_named
from kvbatch.jobs.spec import JobSpec, check_job_on_engine, job_adapters, output_path, spec_dict, spec_hash
from kvbatch.jobs.summary import RunCounts, Summary, already_complete, build_summary, summary_path
from kvbatch.jobs.writer import OutputWriter, WriteReport, metadata_strings
from kvbatch.runner.config import EngineConfig
from kvbatch.runner.request import GenerationEngine, GenerationRequest

log = logging.getLogger(__name__)
EngineFactory = Callable[[str, dict[str, Any]], Any]  # (model, EngineConfig fields) -> engine


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic cyclic collection inside: importing torch and transformers and loading a model makes about
    450,000 objects that all live on, and the collector's full passes walk every one of them again (seven passes,
    0.9 s of the chat example's 3.7 s of loading on two cores). The engine collects once and freezes them when
    it is ready (runner.engine.freeze_gc); the collector's earlier state comes back on the way out."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def default_engine_factory(model: str, settings: dict[str, Any]) -> Any:
    tensor_parallel = settings.pop("tensor_parallel", 1)
    adapters = settings.pop("adapters", None)  # LoRA adapters to size the engine's slots for
    if tensor_parallel > 1:
        from kvbatch.runner.parallel.tensor_parallel import start_tensor_parallel

        return start_tensor_parallel(model, settings, tensor_parallel)
    with collector_paused():
        from kvbatch.runner.engine import Engine, EngineConfig

        return Engine(EngineConfig(model=model, **settings), adapters=adapters)


_UNSET = object()
_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


class EngineCache:
    """The engine of the last job's (model, engine settings), shared by the jobs after it that ask for the same: the
    model loads once for a run of such jobs. One engine at a time: a GPU's KV pool takes the memory its weights
    leave (gpu_memory_utilization), so a second engine beside the first found none for its own pages (a base-model
    job then an adapter job, two models, a Python call with other engine settings). A job that asks for another
    engine releases this one first; a later job that asks for the first again loads it again."""

    # The caches holding an engine, in this process: one engine at a time holds across them too (the Python API's,
    # a run_jobs call's, the CLI's).
    _holding: weakref.WeakSet[EngineCache] = weakref.WeakSet()

    def __init__(self, factory: EngineFactory = default_engine_factory) -> None:
        self.factory = factory
        self._engines: dict[tuple, Any] = {}
        self._planned_adapters: dict[tuple, list[tuple[str, str]]] = {}

    def plan(self, jobs: list[JobSpec]) -> None:
        """Note the LoRA adapters of the jobs to come, so that an engine's adapter slots are sized for all of
        them when it is built (an adapter registered later must fit the slots). Two jobs may give one name to
        two folders: both are noted."""
        for job in jobs:
            planned = self._planned_adapters.setdefault(self._key(job), [])
            planned += [pair for pair in job_adapters(job).items() if pair not in planned]

    def _sizing(self, key: tuple, adapters: dict[str, str]) -> dict[str, str]:
        """This job's adapters, and every other planned folder under a name of its own, for the slots' sizing.
        Rows name only their job's adapters, so no row reaches the other names."""
        sizing = dict(adapters)
        for name, path in self._planned_adapters.get(key, []):
            if path not in sizing.values():
                sizing[name if name not in sizing else f"{name} (planned {len(sizing)})"] = path
        return sizing

    def sized_adapters(self, job: JobSpec) -> dict[str, str]:
        """The LoRA adapters the engine of `job` sizes its slots for, when this cache builds it (none: {})."""
        adapters = job_adapters(job)
        return self._sizing(self._key(job), adapters) if adapters else {}

    def _key(self, job: JobSpec) -> tuple:
        # A setting spelled at its default builds the engine that leaving it out builds: not a second model load.
        settings = {k: v for k, v in job.engine.settings().items() if _ENGINE_DEFAULTS.get(k, _UNSET) != v}
        if job.parallel.tensor > 1:
            settings["tensor_parallel"] = job.parallel.tensor
        # An engine built without adapters takes none later, and one with them hooks its layers: one of each kind.
        return (job.model, tuple(sorted(settings.items())), bool(job_adapters(job)))

    def holds(self, job: JobSpec) -> bool:
        """Whether `job`'s engine is loaded already (get() then loads nothing)."""
        return self._key(job) in self._engines

    def get(self, job: JobSpec) -> tuple[Any, bool]:
        """(engine, created_now). An engine shared with earlier jobs registers this job's adapters."""
        key = self._key(job)
        adapters = job_adapters(job)
        if key in self._engines:
            engine = self._engines[key]
            for name, path in adapters.items():
                engine.add_adapter(name, path)
            return engine, False
        release_engines()
        log.info("loading model %s", job.model)
        settings = dict(key[1])
        if adapters:
            settings["adapters"] = self._sizing(key, adapters)
        self._engines[key] = self.factory(job.model, settings)
        EngineCache._holding.add(self)
        return self._engines[key], True

    def release(self) -> None:
        """Close the engines held and drop them: their KV pages, graphs and (with the last reference) weights go
        back to the device before another engine, or another process, measures what is free."""
        EngineCache._holding.discard(self)
        while self._engines:
            _, engine = self._engines.popitem()
            close = getattr(engine, "close", None)  # a test's stand-in may have none
            if close is not None:
                close()
            del engine
        gc.collect()
        torch = sys.modules.get("torch")  # no engine was ever built if torch is not loaded
        if torch is not None and torch.cuda.is_initialized():
            # Engine.close empties the allocator's cache while the engine still holds its weights: once they are
            # collected, they too go back to the device, for a data-parallel job's processes to find free.
            torch.cuda.empty_cache()


def release_engines() -> None:
    """Close every engine an EngineCache of this process holds, before another engine is built (by a cache, or
    the lm-eval model): its pool is sized from the memory the others leave."""
    for cache in list(EngineCache._holding):
        cache.release()


def run_job(
    job: JobSpec,
    engines: EngineCache,
    stop: StopFlag | None = None,
    wait_for_lock: bool = False,
    *,
    progress_position: int | None = None,
) -> Summary:
    stop = stop or StopFlag()
    started = time.monotonic()
    base, shard = output_path(job), job_shard(job.parallel.shard)
    own = base if shard is None else shard.output_path(base)
    if not finished(own):
        # Rows another layout of this job committed (a killed --data-parallel run, rerun as one process) would be
        # done again here, and their parts left behind.
        refuse_other_layouts(base, shard or Shard(0, 1), [own], job.output.mode)
    io = open_job(job, wait_for_lock)
    io.writer.stop_waiting = lambda: stop.stopped
    shard, out, reader, writer = io.shard, io.out, io.reader, io.writer
    # A hard stop names the rows committed, counted once the writer has committed what finished on its way out
    with hard_stop_named(job.name, lambda: len(writer.done_rows)), writer:
        if writer.already_complete:
            log.info("job %s: %s is complete already (same spec); nothing to do", job.name, out)
            return already_complete(out, io.summary)
        if io.missing_input is not None:
            raise io.missing_input
        total = reader.num_rows if shard is None or reader.num_rows is None else shard.num_rows(reader.num_rows)
        if total == 0:  # an empty input, input.limit 0 or a shard past the last row: no model to load for it
            log.info("job %s: no rows to run; writing an empty output without loading the model", job.name)
            writer.metadata = {k.encode(): v.encode() for k, v in job_metadata(job, None).items()}
            writer.model = model_name(job.model)
            report = writer.finalize(reader.num_rows)  # the input's rows, as a shard's merge compares them
            return _summarise(job, io, report, RunCounts(), started, load_s=0.0)
        # A shard's counts are its own rows: its name says so, and tells the processes of --data-parallel apart.
        label = job.name if shard is None else f"{job.name} [shard {shard}]"
        if not engines.holds(job):
            announce_load(label, job.model, job.progress)
        with stop.while_loading():
            engine, fresh = engines.get(job)
        check_job_on_engine(job, engine)
        load_s = time.monotonic() - started if fresh else 0.0
        writer.metadata = {k.encode(): v.encode() for k, v in job_metadata(job, engine).items()}
        writer.model = model_name(job.model)  # OpenAI Batch output names the model, as the API does
        before = dataclasses.replace(engine.stats)
        # The counts are deltas, but a peak has none: the engine's, taken as each step is planned (a scored row's
        # blocks are free again after its step), starts again for this job and gets the earlier jobs' back after.
        engine.stats.peak_kv_usage = 0.0
        done = len(writer.done_rows)
        pipeline = RowPipeline(job, engine.tokenizer, writer.layout)  # before the bar, which only close() ends
        progress = JobProgress(
            label,
            total,
            engine,
            initial=done,
            mode=job.progress,
            every_s=job.progress_seconds,
            position=progress_position,
        )
        feed = _Feed(pipeline, writer, progress, stop, shard)

        def on_step() -> None:  # after every engine step, also while no row finishes (a long prefill)
            writer.tick()
            progress.tick()

        unreadable: list[InputError] = []  # the input failed part way: finish the rows read before it, then fail
        try:
            requests = sorted_requests(
                feed.requests(_until_unreadable(reader, unreadable)), job.sort_window, engine, bool(job_adapters(job))
            )
            for result in engine.generate(feed.admit(requests), on_step=on_step):
                feed.write(feed.pipeline.result(result))
        except JobError:
            raise  # the writer's own errors (disk full...) already say what happened
        except Exception as exc:
            raise JobError(
                f"the engine failed ({type(exc).__name__}: {exc}); finished rows are saved, rerun to resume",
                job=job.name,
            ) from exc
        finally:
            progress.close()
            job_peak_kv_usage = engine.stats.peak_kv_usage
            engine.stats.peak_kv_usage = max(before.peak_kv_usage, job_peak_kv_usage)
        for index in [i for i in feed.submitted if i in feed.pipeline.pending]:  # still exactly one row each
            lost = RowError(ErrorKind.ENGINE, f"row {index}: the engine returned no result")
            feed.write(feed.pipeline.error_row(feed.pipeline.pending[index].row, lost))
        if unreadable:
            writer.commit_part()
            raise InputError(
                f"{unreadable[0]}; the {len(writer.done_rows)} rows before it are committed, "
                "repair or replace the file to go further",
                job=job.name,
            )
        if stop.stopped and not (feed.exhausted and not feed.pipeline.pending):  # rows left: a rerun does them
            writer.commit_part()
            raise InterruptedJob(
                f"stopped by {stop.signal_name}; {len(writer.done_rows)} rows committed, rerun to resume",
                job=job.name,
            )
        writer.commit_part()
        check_input_unchanged(job, writer.manifest)
        report = writer.finalize(feed.num_rows)
    after = engine.stats
    counts = RunCounts(
        rows=feed.num_finished,
        prompt_tokens=after.num_prompt_tokens - before.num_prompt_tokens,
        output_tokens=feed.output_tokens,
        preemptions=after.num_preemptions - before.num_preemptions,
        peak_kv_usage=max(progress.peak_kv_usage, job_peak_kv_usage),
        cached_prompt_tokens=after.num_cached_prompt_tokens - before.num_cached_prompt_tokens,
        queried_prompt_tokens=after.num_queried_prompt_tokens - before.num_queried_prompt_tokens,
        adapters=dict(feed.pipeline.adapter_rows),
    )
    return _summarise(job, io, report, counts, started, load_s)


def _summarise(
    job: JobSpec,
    io: JobIO,
    report: WriteReport,
    counts: RunCounts,
    started: float,
    load_s: float,
) -> Summary:
    """The run's summary, written beside the output."""
    about = {
        "model": io.summary.model,
        "spec_hash": io.summary.spec_hash,
        "kvbatch_version": io.summary.kvbatch_version,
    }
    summary = build_summary(job.name, io.out, report, counts, time.monotonic() - started, load_s, **about)
    summary.write(summary_path(io.out))
    return summary


def left_out(row: Row, shard: Shard | None, pipeline: RowPipeline, done_rows: Container[int] = ()) -> bool:
    """Whether a run leaves `row` out: another shard's, or done by an earlier run. Its id is noted all the same, so
    a later duplicate of it is still an error (the run's and the plan's one rule)."""
    if (shard is not None and not shard.owns(row.index)) or row.index in done_rows:
        pipeline.note_id(row)
        return True
    return False


class _Feed:
    """A local run's rows: skips what is done or another shard's, sends the rest through the pipeline, writes
    error rows and results as they come, and counts them for the progress bar and the summary."""

    def __init__(
        self, pipeline: RowPipeline, writer: OutputWriter, progress: JobProgress, stop: StopFlag, shard: Shard | None
    ) -> None:
        self.pipeline, self.writer, self.progress, self.stop, self.shard = pipeline, writer, progress, stop, shard
        self.submitted: set[int] = set()  # admitted to the engine and not written yet: the rows in flight
        self.num_rows = 0  # rows read, of the whole input
        self.num_finished = 0
        self.output_tokens = 0
        self.exhausted = False  # the input was read to its end (a signal did not cut it short)

    def requests(self, rows: Iterator[Row]) -> Iterator[GenerationRequest]:
        for row in rows:
            self.num_rows = row.index + 1
            if self.stop.stopped:
                return
            if left_out(row, self.shard, self.pipeline, self.writer.done_rows):
                continue
            request = self.pipeline.request(row)
            if isinstance(request, RowResult):
                self.write(request)
            else:
                yield request
        self.exhausted = not self.stop.stopped

    def admit(self, requests: Iterator[GenerationRequest]) -> Iterator[GenerationRequest]:
        for request in requests:
            if self.stop.stopped:
                return  # tokenized but never admitted: not written, so a rerun does them
            self.submitted.add(request.request_id)
            yield request

    def write(self, row: RowResult) -> None:
        self.writer.add(row)
        self.submitted.discard(row.row)  # kept, every row of a long job would stay here to the end
        self.num_finished += 1
        self.output_tokens += row.output_tokens
        self.progress.update(row.prompt_tokens, row.output_tokens, error=row.error is not None)


def sorted_requests(
    requests: Iterator[GenerationRequest], window: int, engine: GenerationEngine, by_adapter: bool = False
) -> Iterator[GenerationRequest]:
    """Length-sorted within the window; with the engine's prefix cache on, rows sharing a prefix kept together;
    `by_adapter`: a window's rows of one LoRA adapter together (fewer adapters waiting for slots at once)."""
    return sort_window(
        requests,
        window,
        key=(lambda r: (r.adapter or "", len(r.prompt_token_ids)))
        if by_adapter
        else (lambda r: len(r.prompt_token_ids)),
        tokens=(lambda r: r.prompt_token_ids) if engine.config.prefix_cache else None,
        block_size=engine.config.block_size,
    )


def model_name(model: str) -> str:
    """A short model name for outputs: the default model's name, a folder's or .gguf file's name, or a hub name."""
    if model == "default":
        from kvbatch.runner.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else model


def job_metadata(job: JobSpec, engine: GenerationEngine | None) -> dict[str, str]:
    """The output's provenance: kvbatch's version, the job, its spec hash, the model, sampling and engine."""
    unsafe = [name for name in ("trust_remote_code", "allow_pickle") if getattr(job.engine, name)]
    pool = engine.pool_size.describe() if engine is not None else None
    return metadata_strings(
        {
            "kvbatch.version": KVBATCH_VERSION,
            "kvbatch.job": spec_dict(job),
            "kvbatch.spec_hash": spec_hash(job),
            "kvbatch.model": engine.source if engine is not None else job.model,
            "kvbatch.sampling": dataclasses.asdict(job.sampling),
            "kvbatch.engine": {**job.engine.settings(), "pool": pool},
            "kvbatch.unsafe": unsafe,
            **({"kvbatch.adapters": job_adapters(job)} if job_adapters(job) else {}),
        }
    )


def _until_unreadable(rows: Iterator[Row], errors: list[InputError]) -> Iterator[Row]:
    try:
        yield from rows
    except InputError as exc:
        errors.append(exc)
