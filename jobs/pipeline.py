"""The row pipeline: a row becomes an engine request or an error row; an engine result becomes an output row.

    Row ──ids, build_prompt──> Prompt ──PromptTokenizer──> ids + SamplingParams ──> GenerationRequest
     │ unreadable, duplicate id, bad value, bad template, bad per-row setting
     └──────────────────────────────────────────────────────────────────────> RowResult (an error row)

    GenerationResult ──> RowResult (texts, finish reasons, logprobs, scores; or the engine's error, by kind)

With `task: score` a row's continuations (jobs/continuations.py) go with its prompt in one scoring request; with
`task: score_rolling` its text is one rolling request, scored whole in windows of the engine's context.

Every runner uses this one piece: a local run, each data-parallel process (a local run of its shard), each Ray
actor, and `kvbatch plan`. It writes nothing: the caller sends requests to an engine and rows to its writer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kvbatch.errors import ErrorKind, SpecError
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.request import GenerationRequest, GenerationResult
from kvbatch.runner.structured_outputs import ConstraintError

from .constraints import column_constraint
from .continuations import continuation_texts, encode_for_rolling, encode_for_scoring
from .prompts import build_prompt, prompt_columns, prompt_spec
from .reasoning import split_reasoning
from .records import Layout, RowResult
from .row_sampling import row_sampling, sampling_columns
from .rows import KnownDuplicates, Row, RowError, SeenIds, set_fields
from .spec import TEMPLATE_VALUES, JobSpec, chat_template_path, check_output_settings, input_format, job_adapters
from .token_bytes import TokenBytes
from .tokenize import PromptTokenizer

log = logging.getLogger(__name__)


def input_columns(job: JobSpec, layout: Layout) -> list[str]:
    """Every input column a run of `job` reads (readers of Parquet and datasets read only these): the request's
    (request_columns), then the id and kept columns."""
    return list(dict.fromkeys([*request_columns(job), *layout.data_columns()]))


def request_columns(job: JobSpec) -> list[str]:
    """The input columns a row's request is made of: the prompt's, the rows' own sampling values, constraint,
    adapter and continuations."""
    own = [job.constraint_column, job.adapter_column, job.continuations_column if job.task == "score" else None]
    columns = [*prompt_columns(prompt_spec(job)), *sampling_columns(job), *(c for c in own if c is not None)]
    return list(dict.fromkeys(columns))


@dataclass
class _Pending:
    """What a row keeps while its request is in the engine: the output row is built from it."""

    row: Row
    id: Any
    kept: dict[str, Any]
    adapter: str | None = None
    json_output: bool = False  # its constraint is json or json_object: its output may fill `parsed`
    # Its constraint holds from the first token, so its whole text is the structure: a `</think>` in it (a
    # string's text) is no end of thinking.
    constrained: bool = False


class RowPipeline:
    """Turns rows into requests (or error rows) and results into output rows, for one job and one tokenizer.

    `ids`: the job's id check (a duplicate id fails its row); a runner that checks ids elsewhere passes a layout
    without an id column, or the duplicates found over the whole input beforehand (KnownDuplicates, a Ray run).
    Rows a runner skips (done by an earlier run, owned by another shard) still go through `note_id`, so a later
    duplicate of their id is an error here too."""

    def __init__(
        self, job: JobSpec, tokenizer: Any, layout: Layout, ids: SeenIds | KnownDuplicates | None = None
    ) -> None:
        self.job = job
        self.pspec = prompt_spec(job)
        template = chat_template_path(job).read_text(encoding="utf-8") if self.pspec.chat_template_file else None
        self.tokenizer = PromptTokenizer(
            tokenizer,
            self.pspec.allow_special_tokens,
            self.pspec.chat_template,
            template,
            self.pspec.continue_final_message,
        )
        if not self.tokenizer.use_chat_template and input_format(job) != "openai":
            # Template values from `defaults:` serve the file's jobs on chat models; check_chat_template passed
            # them over for this model, which has no template: its rows go as raw text without them.
            given = [name for name in TEMPLATE_VALUES if job.takes_from_defaults(f"prompt.{name}")]
            self.pspec = dataclasses.replace(self.pspec, **dict.fromkeys(given))
        self.layout = layout
        self.token_bytes = TokenBytes(tokenizer) if layout.token_bytes else None
        self.top_bytes = self.token_bytes or TokenBytes(tokenizer)  # the top_logprobs' tokens
        self.base_params: SamplingParams = job.sampling
        self.ids = ids if ids is not None else SeenIds(layout.id_column)
        self.pending: dict[int, _Pending] = {}
        self.openai = input_format(job) == "openai"
        # Its mappings are Arrow structs, which hold every field any row of the column has.
        self.structs = input_format(job) in ("parquet", "arrow", "hf")
        self.adapter_rows: Counter[str] = Counter()  # rows run on each LoRA adapter (the summary names them)

    def note_id(self, row: Row) -> None:
        """Remember a skipped row's id exactly as `request` would, without running the row."""
        self.ids.error(row)

    def request(self, row: Row) -> GenerationRequest | RowResult:
        """The row's engine request, or its error row."""
        data = row.data or {}
        pending = _Pending(
            row,
            data.get(self.layout.id_column) if self.layout.id_column else None,
            {c: data.get(c) for c in self.layout.keep_columns},
        )
        error = row.error or self.ids.error(row)
        if self.structs and row.data:  # read as the row set them; its kept values (above) are written as they are
            row = dataclasses.replace(row, data={c: set_fields(v) for c, v in row.data.items()})
            data = row.data
        if error is not None:
            return self._error_row(pending, error)
        continues = data.get("continue_final_message") if self.openai else None
        if continues is not None and continues != self.pspec.continue_final_message:
            message = (
                f"{row.where}: the body asks continue_final_message: {str(continues).lower()}, but this job "
                f"builds prompts with prompt.continue_final_message: {str(self.pspec.continue_final_message).lower()}"
            )
            return self._error_row(pending, RowError(ErrorKind.BAD_REQUEST, message))
        try:
            # A scored text may be blank: a context may be empty (lm-eval's unconditional case), and whitespace
            # alone has tokens to score; a text with none is the engine's empty_prompt.
            prompt = build_prompt(row, self.pspec, allow_empty=self.job.is_scoring, roles=self.tokenizer.roles)
            if isinstance(prompt, RowError):
                return self._error_row(pending, prompt)
            continuations = rolling_prefix = None
            if self.job.task == "score_rolling":
                rolling = encode_for_rolling(self.tokenizer, prompt)
                if isinstance(rolling, RowError):
                    return self._error_row(pending, RowError(rolling.kind, f"{row.where}: {rolling.message}"))
                ids, rolling_prefix = rolling
            else:
                ids = self.tokenizer.encode(prompt)
            if self.job.task == "score" and not isinstance(ids, RowError):
                texts = continuation_texts(row, self.job.continuations_column)
                if isinstance(texts, RowError):
                    return self._error_row(pending, texts)
                encoded = encode_for_scoring(self.tokenizer, prompt, ids, texts)
                if isinstance(encoded, RowError):
                    return self._error_row(pending, RowError(encoded.kind, f"{row.where}: {encoded.message}"))
                ids, continuations = encoded
        except Exception as exc:  # noqa: BLE001 - a tokenizer or template that chokes on one row fails that row only
            log.warning("%s: the prompt could not be built or tokenized", row.where, exc_info=True)
            message = f"{row.where}: the prompt could not be built or tokenized ({type(exc).__name__}: {exc})"
            return self._error_row(pending, RowError(ErrorKind.TOKENIZE, message))
        if isinstance(ids, RowError):
            return self._error_row(pending, RowError(ids.kind, f"{row.where}: {ids.message}"))
        params = self.base_params
        overrides = row_sampling(row, self.job)
        if isinstance(overrides, RowError):
            return self._error_row(pending, overrides)
        if overrides:
            try:
                params = dataclasses.replace(self.base_params, **overrides)
            except ConstraintError as exc:
                message = f"{row.where}: bad structured-output constraint: {exc}"
                return self._error_row(pending, RowError(ErrorKind.BAD_CONSTRAINT, message))
            except (ValueError, TypeError) as exc:
                message = f"{row.where}: bad sampling parameters: {exc}"
                return self._error_row(pending, RowError(ErrorKind.BAD_REQUEST, message))
            if self.openai and params.top_logprobs and not params.logprobs:  # the API's rule, over the job's default
                message = f"{row.where}: top_logprobs needs logprobs: true"
                return self._error_row(pending, RowError(ErrorKind.BAD_REQUEST, message))
            refused = _refused_for_the_job(self.job, params)
            if refused is not None:
                return self._error_row(pending, RowError(ErrorKind.BAD_REQUEST, f"{row.where}: {refused}"))
            unplaced = self.layout.unplaced(params)
            if unplaced is not None:
                return self._error_row(pending, RowError(ErrorKind.BAD_REQUEST, f"{row.where}: {unplaced}"))
        keep = params.truncate_prompt_tokens
        if keep is not None and not self.job.is_scoring:  # scoring refuses it, by its request's error
            ids = self.tokenizer.truncated(prompt, ids, keep)
        if self.job.constraint_column is not None:
            try:
                constraint = column_constraint(data.get(self.job.constraint_column))
            except ConstraintError as exc:
                message = f"{row.where}: bad constraint in column {self.job.constraint_column!r}: {exc}"
                return self._error_row(pending, RowError(ErrorKind.BAD_CONSTRAINT, message))
            if constraint is not None and overrides.get("structured_outputs") is not None:
                message = (
                    f"{row.where}: the row sets a constraint twice, in its sampling values and in column "
                    f"{self.job.constraint_column!r}; give one"
                )
                return self._error_row(pending, RowError(ErrorKind.BAD_CONSTRAINT, message))
            if constraint is not None:
                params = dataclasses.replace(params, structured_outputs=constraint)
        adapter = self._adapter(row)
        if isinstance(adapter, RowError):
            return self._error_row(pending, adapter)
        pending.adapter = adapter
        constraint = params.structured_outputs
        pending.json_output = constraint is not None and (constraint.json is not None or constraint.json_object)
        pending.constrained = constraint is not None
        self.pending[row.index] = pending
        return GenerationRequest(
            row.index, ids, params, continuations=continuations, rolling_prefix=rolling_prefix, adapter=adapter
        )

    def _adapter(self, row: Row) -> str | None | RowError:
        """The row's LoRA adapter: an OpenAI body's `model` naming one of the job's adapters, else the row's
        `adapter_column` value, else the job's `adapter` (None: the base model). A column may name only the job's
        adapters; the engine checks those."""
        data = row.data or {}
        if self.openai and isinstance(data.get("model"), str) and data["model"] in self.job.adapters:
            return data["model"]
        column = self.job.adapter_column
        if column is not None and not self.openai:
            value = data.get(column)  # a row without the column reads as null, as for the other per-row columns
            if value is not None and (not isinstance(value, str) or not value):
                message = f"{row.where}: column {column!r} must name an adapter (a string or null), got {value!r}"
                return RowError(ErrorKind.WRONG_TYPE, message)
            if value and value not in job_adapters(self.job):
                # The engine may serve other jobs' adapters too (one engine per model): refused here, by the job.
                self.adapter_rows[value] += 1  # counted as the engine's refusals are
                known = ", ".join(sorted(self.job.adapters)) or "none"
                message = f"{row.where}: adapter {value!r} is not registered (the job's adapters: {known})"
                return RowError(ErrorKind.BAD_ADAPTER, message)
            if value:
                return value
        return self.job.adapter

    def discard(self, request: GenerationRequest) -> None:
        """Forget a request that will not run (`kvbatch plan` builds them only to measure them)."""
        self.pending.pop(request.request_id, None)

    def error_row(self, row: Row, error: RowError) -> RowResult:
        """An error row for a row that never became a request (or whose request the engine lost)."""
        pending = self.pending.pop(row.index, None)
        return RowResult(row.index, pending.id if pending else None, pending.kept if pending else {}, error=error)

    def _error_row(self, pending: _Pending, error: RowError) -> RowResult:
        return RowResult(pending.row.index, pending.id, pending.kept, error=error)

    def result(self, result: GenerationResult) -> RowResult:
        """The output row of a request this pipeline made."""
        pending = self.pending.pop(result.request_id)
        if pending.adapter is not None:
            self.adapter_rows[pending.adapter] += 1
        if result.error is not None:
            kind = result.error_kind or ErrorKind.ENGINE
            error = RowError(kind, f"{pending.row.where}: {result.error}")
            return RowResult(
                pending.row.index, pending.id, pending.kept, error=error, prompt_tokens=result.num_prompt_tokens
            )
        completions = result.completions
        logprobs = None
        if self.layout.logprobs and any(c.logprobs for c in completions):
            logprobs = [c.logprobs or [] for c in completions]
        token_bytes = None
        if logprobs and self.token_bytes:
            token_bytes = [self.token_bytes(c.token_ids) if c.logprobs else [] for c in completions]
            if pending.constrained:
                # A constrained row that stopped ends on the end-of-sequence token its grammar accepted, which its
                # text leaves out even where it is no special token: so do the logprobs that spell the text.
                for c, raw in zip(completions, token_bytes):
                    if c.finish_reason == "stop" and raw:
                        raw[-1] = None
        scored = result.scores is not None
        texts, reasonings = [c.text for c in completions], None
        if self.layout.reasoning and pending.constrained:
            reasonings = [None] * len(texts)
        elif self.layout.reasoning:
            reasonings, texts = (list(part) for part in zip(*(split_reasoning(t) for t in texts)))
        return RowResult(
            row=pending.row.index,
            id=pending.id,
            kept=pending.kept,
            texts=texts,
            reasonings=reasonings,
            finish_reasons=[c.finish_reason for c in completions] or (["stop"] if scored else []),
            stop_reasons=[c.stop_reason for c in completions],
            prompt_tokens=result.num_prompt_tokens,
            output_tokens=result.num_output_tokens,
            logprobs=logprobs,
            token_bytes=token_bytes,
            top_logprobs=self._top_logprobs(completions) if self.layout.top_logprobs else None,
            prompt_logprobs=result.prompt_logprobs,
            scores=[score_struct(s) for s in result.scores] if scored else None,
            json_output=pending.json_output,
        )

    def _top_logprobs(self, completions: list) -> list[list[list[dict[str, Any]]]] | None:
        """Per sample, per generated token, its alternatives as records.TOP_LOGPROB structs."""
        if not any(c.top_logprobs for c in completions):
            return None
        out = []
        for completion in completions:
            per_token = []
            for top in completion.top_logprobs or []:
                raw = self.top_bytes(top.token_ids)
                per_token.append(
                    [
                        {"token_id": token_id, "token": self._token_text(token_id, b), "bytes": b, "logprob": logprob}
                        for token_id, b, logprob in zip(top.token_ids, raw, top.logprobs)
                    ]
                )
            out.append(per_token)
        return out

    def _token_text(self, token_id: int, raw: bytes | None) -> str:
        """A token's text: its bytes (U+FFFD for part of a character), or a special token's own text."""
        if raw is not None:
            return raw.decode("utf-8", errors="replace")
        return self.tokenizer.tokenizer.decode([token_id], skip_special_tokens=False)


def score_struct(score: Any) -> dict[str, Any]:
    """A runner.request.ContinuationScore as a records.SCORE struct."""
    return {"logprob": score.logprob, "num_tokens": score.num_tokens, "is_greedy": score.is_greedy}


def _refused_for_the_job(job: JobSpec, params: SamplingParams) -> str | None:
    """Why the job's own rules refuse a row's sampling values (None: they do not), as the job file's load refuses
    the job's: a scoring row asking logprobs was otherwise told to set the job's sampling.logprobs, which that load
    refuses for the task."""
    try:
        check_output_settings(dataclasses.replace(job, sampling=params))
    except SpecError as exc:
        return exc.message
    return None
