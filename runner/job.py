"""Run a job: reader -> prompts -> tokens -> engine -> writer, with progress and a summary.

    rows ──build_prompt──> Prompt ──PromptTokenizer──> ids ──sort_window──> engine.generate ──> OutputWriter
      │ bad row               │ bad value                  │ (bad rows go straight to the writer as error rows)
      └───────────────────────┴────────────────────────────┘

Every input row becomes exactly one output row: a result, or an error row that says why. Finished rows are
committed in parts as they arrive, so an interrupted or failed job keeps them and a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbatch import __version__
from kvbatch.jobs import rows as kinds
from kvbatch.jobs.continuations import continuation_texts, encode_for_scoring
from kvbatch.jobs.errors import InputError, InterruptedJob, JobError
from kvbatch.jobs.packing import sort_window
from kvbatch.jobs.prompts import build_prompt
from kvbatch.jobs.records import RowResult
from kvbatch.jobs.rows import Row, RowError, SeenIds
from kvbatch.jobs.shard import Shard
from kvbatch.jobs.spec import JobSpec, spec_dict, spec_hash
from kvbatch.jobs.summary import Summary, add_prefix_counters, summary_path
from kvbatch.jobs.writer import OutputWriter, metadata_strings

from .job_io import open_job
from .progress import JobProgress
from .request import GenerationRequest, GenerationResult, SamplingParams
from .signals import StopFlag
from .token_bytes import TokenBytes
from .tokenize import PromptTokenizer

log = logging.getLogger(__name__)
EngineFactory = Callable[[str, dict[str, Any]], Any]  # (model, EngineConfig fields) -> engine


def default_engine_factory(model: str, settings: dict[str, Any]) -> Any:
    from .engine import Engine, EngineConfig

    tensor_parallel = settings.pop("tensor_parallel", 1)
    if tensor_parallel > 1:
        from .tensor_parallel import start_tensor_parallel

        return start_tensor_parallel(model, settings, tensor_parallel)
    return Engine(EngineConfig(model=model, **settings))


class EngineCache:
    """One engine per (model, engine settings), shared by the jobs of a run: the model loads once."""

    def __init__(self, factory: EngineFactory = default_engine_factory) -> None:
        self.factory = factory
        self._engines: dict[tuple, Any] = {}

    def get(self, job: JobSpec) -> tuple[Any, bool]:
        """(engine, created_now)."""
        settings = job.engine.settings()
        if job.parallel.tensor > 1:
            settings["tensor_parallel"] = job.parallel.tensor
        key = (job.model, tuple(sorted(settings.items())))
        if key in self._engines:
            return self._engines[key], False
        log.info("loading model %s", job.model)
        self._engines[key] = self.factory(job.model, dict(settings))
        return self._engines[key], True


@dataclass
class _Pending:
    row: Row
    id: Any
    kept: dict[str, Any]


def classify_engine_error(message: str) -> str:
    # The engine's messages: "the prompt is empty ...", "the prompt has N tokens; at most M fit ...".
    if "prompt has" in message and "fit" in message:
        return kinds.PROMPT_TOO_LONG
    if "prompt is empty" in message:
        return kinds.EMPTY_PROMPT
    return kinds.ENGINE


def run_job(job: JobSpec, engines: EngineCache, stop: StopFlag | None = None, wait_for_lock: bool = False) -> Summary:
    stop = stop or StopFlag()
    started = time.monotonic()
    io = open_job(job, wait_for_lock)
    io.writer.stop_waiting = lambda: stop.stopped
    shard, out, pspec, reader, writer, summary = io.shard, io.out, io.pspec, io.reader, io.writer, io.summary
    with writer:
        if writer.already_complete:
            log.info("job %s: %s is complete already (same spec); nothing to do", job.name, out)
            return _previous_summary(out, summary)
        with stop.while_loading():
            engine, fresh = engines.get(job)
        writer.metadata = {k.encode(): v.encode() for k, v in _metadata(job, engine).items()}
        writer.model = model_name(job.model)  # OpenAI Batch output names the model, as the API does
        stats_before = _engine_counters(engine)
        done = len(writer.done_rows)
        total = reader.num_rows if shard is None or reader.num_rows is None else shard.num_rows(reader.num_rows)
        progress = JobProgress(job.name, total, engine, initial=done)
        feed = _Feed(
            job,
            pspec,
            writer,
            PromptTokenizer(engine.tokenizer, pspec.allow_special_tokens, pspec.chat_template),
            stop,
            progress,
            shard,
        )
        unreadable: list[InputError] = []  # the input failed part way: finish the rows read before it, then fail
        try:
            requests = _sorted_requests(feed.requests(_until_unreadable(reader, unreadable)), job.sort_window, engine)
            for result in engine.generate(feed.admit(requests), on_step=writer.tick):
                feed.finish(result)
        except JobError:
            raise  # the writer's own errors (disk full...) already say what happened
        except Exception as exc:
            raise JobError(
                f"job {job.name}: the engine failed ({type(exc).__name__}: {exc}); finished rows are saved, rerun to resume"
            ) from exc
        finally:
            progress.close()
        lost = [i for i in feed.submitted if i in feed.pending]
        for index in lost:  # the engine never answered: still exactly one row each
            feed.write_error(
                feed.pending.pop(index).row, RowError(kinds.ENGINE, f"row {index}: the engine returned no result")
            )
        if unreadable:
            writer.commit_part()
            raise InputError(
                f"job {job.name}: {unreadable[0]}; the {len(writer.done_rows)} rows before it are committed, "
                "repair or replace the file to go further"
            )
        if stop.stopped and not (feed.exhausted and not feed.pending):  # rows left: a rerun does them
            writer.commit_part()
            raise InterruptedJob(
                f"job {job.name}: stopped by {stop.signal_name}; {len(writer.done_rows)} rows committed, rerun to resume"
            )
        report = writer.finalize(feed.num_rows)
    counters = _engine_counters(engine)
    summary.rows = report.num_rows
    summary.rows_error = report.finish_reasons.get("error", 0)
    summary.rows_ok = report.num_rows - summary.rows_error
    summary.rows_this_run = feed.num_finished
    summary.finish_reasons, summary.errors_by_kind = report.finish_reasons, report.error_kinds
    summary.prompt_tokens = counters["prompt"] - stats_before["prompt"]
    summary.output_tokens = feed.output_tokens
    summary.elapsed_s = round(time.monotonic() - started, 3)
    summary.output_tokens_per_s = round(summary.output_tokens / max(summary.elapsed_s, 1e-9), 2)
    peak = progress.peak_kv_usage if not fresh else max(progress.peak_kv_usage, counters["peak"])
    summary.peak_kv_usage = round(peak, 4)
    summary.preemptions = counters["preemptions"] - stats_before["preemptions"]
    add_prefix_counters(
        summary,
        [
            {
                "cached_prompt_tokens": counters["cached"] - stats_before["cached"],
                "queried_prompt_tokens": counters["queried"] - stats_before["queried"],
            }
        ],
    )
    summary.output_bytes = report.num_bytes
    summary.write(summary_path(out))
    return summary


class _Feed:
    """Turns rows into engine requests (writing bad rows straight out), and engine results into output rows."""

    def __init__(
        self,
        job: JobSpec,
        pspec,
        writer: OutputWriter,
        tokenizer: PromptTokenizer,
        stop: StopFlag,
        progress: JobProgress,
        shard: Shard | None = None,
    ) -> None:
        self.job, self.pspec, self.writer, self.tokenizer, self.stop, self.progress = (
            job,
            pspec,
            writer,
            tokenizer,
            stop,
            progress,
        )
        self.layout = writer.layout
        self.token_bytes = TokenBytes(tokenizer.tokenizer) if self.layout.token_bytes else None
        self.top_bytes = self.token_bytes or TokenBytes(tokenizer.tokenizer)  # the top_logprobs' tokens
        self.base_sampling = _sampling_dict(job)
        self.base_params = SamplingParams(**self.base_sampling)
        self.pending: dict[int, _Pending] = {}
        self.submitted: set[int] = set()
        self.ids = SeenIds(self.layout.id_column)
        self.num_rows = 0
        self.num_finished = 0
        self.output_tokens = 0
        self.exhausted = False  # the input was read to its end (a signal did not cut it short)
        self.shard = shard  # only its rows are run; num_rows still counts the whole input

    def requests(self, rows: Iterator[Row]) -> Iterator[GenerationRequest]:
        for row in rows:
            self.num_rows = row.index + 1
            if self.stop.stopped:
                return
            if self.shard is not None and not self.shard.owns(row.index):
                self._note_id(row)  # another shard runs it, but a later duplicate of its id is an error here too
                continue
            if row.index in self.writer.done_rows:
                self._note_id(row)  # finished by an earlier run; a later duplicate of its id is still an error
                continue
            request = self._request(row)
            if request is not None:
                yield request
        self.exhausted = not self.stop.stopped

    def admit(self, requests: Iterator[GenerationRequest]) -> Iterator[GenerationRequest]:
        for request in requests:
            if self.stop.stopped:
                return  # tokenized but never admitted: not written, so a rerun does them
            self.submitted.add(request.request_id)
            yield request

    def _request(self, row: Row) -> GenerationRequest | None:
        data = row.data or {}
        id_value = data.get(self.layout.id_column) if self.layout.id_column else None
        kept = {c: data.get(c) for c in self.layout.keep_columns}
        pending = _Pending(row, id_value, kept)
        if row.error is not None:
            return self._fail(pending, row.error)
        id_error = self.ids.error(row)
        if id_error is not None:
            return self._fail(pending, id_error)
        try:
            prompt = build_prompt(row, self.pspec)
            if isinstance(prompt, RowError):
                return self._fail(pending, prompt)
            ids = self.tokenizer.encode(prompt)
            continuations = None
            if self.job.task == "score" and not isinstance(ids, RowError):
                texts = continuation_texts(row, self.job.continuations_column or "continuations")
                if isinstance(texts, RowError):
                    return self._fail(pending, texts)
                ids, continuations = encode_for_scoring(self.tokenizer, prompt, ids, texts)
        except Exception as exc:  # noqa: BLE001 - a tokenizer or template that chokes on one row fails that row only
            log.warning("%s: the prompt could not be built or tokenized", row.where, exc_info=True)
            message = f"{row.where}: the prompt could not be built or tokenized ({type(exc).__name__}: {exc})"
            return self._fail(pending, RowError(kinds.TOKENIZE, message))
        if isinstance(ids, RowError):
            return self._fail(pending, RowError(ids.kind, f"{row.where}: {ids.message}"))
        params = self.base_params
        if row.sampling:
            try:
                params = SamplingParams(**{**self.base_sampling, **_listy(row.sampling)})
            except (ValueError, TypeError) as exc:
                return self._fail(pending, RowError(kinds.BAD_REQUEST, f"{row.where}: bad sampling parameters: {exc}"))
        self.pending[row.index] = pending
        return GenerationRequest(row.index, ids, params, continuations=continuations)

    def _note_id(self, row: Row) -> None:
        """Remember a row's id exactly as _request would, without running the row."""
        self.ids.error(row)

    def _fail(self, pending: _Pending, error: RowError) -> None:
        self.write_error(pending.row, error, pending)
        return None

    def write_error(self, row: Row, error: RowError, pending: _Pending | None = None) -> None:
        self.writer.add(
            RowResult(row.index, pending.id if pending else None, pending.kept if pending else {}, error=error)
        )
        self.num_finished += 1
        self.progress.update(0, error=True)

    def finish(self, result: GenerationResult) -> None:
        pending = self.pending.pop(result.request_id)
        error = None
        if result.error:
            error = RowError(classify_engine_error(result.error), f"{pending.row.where}: {result.error}")
        completions = result.completions if not error else []
        logprobs = (
            [c.logprobs or [] for c in completions]
            if self.layout.logprobs and any(c.logprobs for c in completions)
            else None
        )
        token_bytes = (
            [self.token_bytes(c.token_ids) if c.logprobs else [] for c in completions]
            if logprobs and self.token_bytes
            else None
        )
        scored = result.scores is not None and not error
        self.writer.add(
            RowResult(
                row=pending.row.index,
                id=pending.id,
                kept=pending.kept,
                texts=[c.text for c in completions],
                finish_reasons=[c.finish_reason for c in completions] or (["stop"] if scored else []),
                error=error,
                prompt_tokens=result.num_prompt_tokens,
                output_tokens=result.num_output_tokens,
                logprobs=logprobs,
                token_bytes=token_bytes,
                top_logprobs=self._top_logprobs(completions) if self.layout.top_logprobs else None,
                prompt_logprobs=result.prompt_logprobs if not error else None,
                scores=[score_struct(s) for s in result.scores] if scored else None,
            )
        )
        self.num_finished += 1
        self.output_tokens += result.num_output_tokens
        self.progress.update(result.num_output_tokens, error=error is not None)

    def _top_logprobs(self, completions: list) -> list[list[list[dict[str, Any]]]] | None:
        """Per sample, per generated token, its alternatives as TOP_LOGPROB structs."""
        if not any(c.top_logprobs for c in completions):
            return None
        token_bytes = self.top_bytes
        out = []
        for completion in completions:
            per_token = []
            for top in completion.top_logprobs or []:
                raw = token_bytes(top.token_ids)
                per_token.append(
                    [
                        {
                            "token_id": token_id,
                            "token": b.decode("utf-8", errors="replace")
                            if b is not None
                            else self.tokenizer.tokenizer.decode([token_id], skip_special_tokens=False),
                            "bytes": b,
                            "logprob": logprob,
                        }
                        for token_id, b, logprob in zip(top.token_ids, raw, top.logprobs)
                    ]
                )
            out.append(per_token)
        return out


def score_struct(score) -> dict[str, Any]:
    return {"logprob": score.logprob, "num_tokens": score.num_tokens, "is_greedy": score.is_greedy}


def _sampling_dict(job: JobSpec) -> dict[str, Any]:
    return dataclasses.asdict(job.sampling)


def _listy(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def _engine_counters(engine: Any) -> dict[str, float]:
    stats = getattr(engine, "stats", None)
    return {
        "prompt": getattr(stats, "num_prompt_tokens", 0),
        "preemptions": getattr(stats, "num_preemptions", 0),
        "peak": getattr(stats, "peak_kv_usage", 0.0),
        "queried": getattr(stats, "num_queried_prompt_tokens", 0),
        "cached": getattr(stats, "num_cached_prompt_tokens", 0),
    }


def _sorted_requests(requests: Iterator[GenerationRequest], window: int, engine: Any) -> Iterator[GenerationRequest]:
    """Length-sorted within the window; with the engine's prefix cache on, rows sharing a prefix kept together."""
    config = getattr(engine, "config", None)
    grouped = getattr(config, "prefix_cache", False)
    return sort_window(
        requests,
        window,
        key=lambda r: len(r.prompt_token_ids),
        tokens=(lambda r: r.prompt_token_ids) if grouped else None,
        block_size=getattr(config, "block_size", 16),
    )


def model_name(model: str) -> str:
    """A short model name for outputs: the default model's name, a folder's or .gguf file's name, or a hub name."""
    if model == "default":
        from .default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else model


def _metadata(job: JobSpec, engine: Any) -> dict[str, str]:
    loaded = getattr(engine, "loaded", None)
    warnings = [
        w
        for w, on in (("trust_remote_code", job.engine.trust_remote_code), ("allow_pickle", job.engine.allow_pickle))
        if on
    ]
    pool = getattr(engine, "pool_size", None)
    return metadata_strings(
        {
            "kvbatch.version": __version__,
            "kvbatch.job": spec_dict(job),
            "kvbatch.spec_hash": spec_hash(job),
            "kvbatch.model": getattr(loaded, "source", None) or job.model,
            "kvbatch.sampling": dataclasses.asdict(job.sampling),
            "kvbatch.engine": {**job.engine.settings(), "pool": pool.describe() if pool is not None else None},
            "kvbatch.unsafe": warnings,
        }
    )


def _previous_summary(out: Path, summary: Summary) -> Summary:
    path = summary_path(out)
    if path.exists():
        data = json.loads(path.read_text())
        summary = Summary(**{k: v for k, v in data.items() if k in Summary.__dataclass_fields__})
    summary.status = "already complete"
    summary.rows_this_run = 0
    return summary


def _until_unreadable(rows: Iterator[Row], errors: list[InputError]) -> Iterator[Row]:
    try:
        yield from rows
    except InputError as exc:
        errors.append(exc)


@dataclass
class JobOutcome:
    job: str
    summary: Summary | None = None
    error: Exception | None = None


def run_jobs(
    jobs: list[JobSpec], wait_for_lock: bool = False, engine_factory: EngineFactory = default_engine_factory
) -> list[JobOutcome]:
    """Run jobs in order, sharing engines. A failed job is reported and the next one runs; a signal stops all."""
    from kvbatch.jobs.errors import SpecError

    from .signals import graceful_stop

    engines = EngineCache(engine_factory)
    outcomes = []
    with graceful_stop() as stop:
        for job in jobs:
            if stop.stopped:  # a signal during an earlier job: start nothing new (no model load for nothing)
                outcomes.append(
                    JobOutcome(
                        job.name,
                        error=InterruptedJob(
                            f"job {job.name}: not started, stopped by {stop.signal_name}; rerun to run it"
                        ),
                    )
                )
                break
            try:
                outcomes.append(JobOutcome(job.name, _job_runner(job)(job, engines, stop, wait_for_lock)))
            except InterruptedJob as exc:
                outcomes.append(JobOutcome(job.name, error=exc))
                break
            except (JobError, SpecError) as exc:
                log.info("job %s failed: %s", job.name, exc)  # the outcome carries it; the CLI prints it once
                outcomes.append(JobOutcome(job.name, error=exc))
            except Exception as exc:  # model loading and budget errors come from the engine's own modules
                if is_user_facing(exc):
                    log.info("job %s failed: %s", job.name, exc)
                    outcomes.append(JobOutcome(job.name, error=exc))
                    continue
                # A bug: its traceback goes to the log, and the jobs after this one still run.
                log.exception("job %s failed on an unexpected error", job.name)
                error = JobError(
                    f"job {job.name}: unexpected {type(exc).__name__}: {exc} (a bug, traceback logged above); "
                    "committed rows are kept, rerun to resume"
                )
                outcomes.append(JobOutcome(job.name, error=error))
            except BaseException as exc:  # a tensor-parallel rank lost (by name: no engine import): no job can run
                if type(exc).__name__ != "TensorParallelLost":
                    raise
                outcomes.append(JobOutcome(job.name, error=exc))
                break
    return outcomes


def _job_runner(job: JobSpec) -> Callable[..., Summary]:
    """run_job, or the runner that spreads the job over a Ray cluster or over processes (README "Scaling out")."""
    if job.runner == "ray":
        from .ray_data import run_job_ray

        return run_job_ray
    if job.parallel.data > 1:
        from .data_parallel import run_data_parallel

        return run_data_parallel
    return run_job


# Errors whose message tells the user what to change (a bug keeps its traceback): the model, the machine (no
# CUDA, a kernel backend missing) or the KV budget. Matched by class name, so the job glue imports no engine module.
USER_FACING_ERRORS = (
    "ModelLoadError",
    "DefaultModelError",
    "KVBudgetError",
    "BackendUnavailableError",
    "FusedLayersError",
    "TensorParallelError",
)


def is_user_facing(exc: BaseException) -> bool:
    return any(cls.__name__ in USER_FACING_ERRORS for cls in type(exc).__mro__)
