"""The row pipeline: a row becomes an engine request or an error row; an engine result becomes an output row.

    Row ──ids, build_prompt──> Prompt ──PromptTokenizer──> ids + SamplingParams ──> GenerationRequest
     │ unreadable, duplicate id, bad value, bad template, bad per-row setting
     └──────────────────────────────────────────────────────────────────────> RowResult (an error row)

    GenerationResult ──> RowResult (texts, finish reasons, logprobs; or the engine's error, by kind)

Every runner uses this one piece: a local run, each data-parallel process (a local run of its shard), each Ray
actor, and `kvbatch plan`. It writes nothing: the caller sends requests to an engine and rows to its writer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from kvbatch.errors import ErrorKind
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.request import GenerationRequest, GenerationResult

from .prompts import build_prompt, prompt_spec
from .records import Layout, RowResult
from .rows import KnownDuplicates, Row, RowError, SeenIds
from .spec import JobSpec
from .token_bytes import TokenBytes
from .tokenize import PromptTokenizer

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """What a row keeps while its request is in the engine: the output row is built from it."""

    row: Row
    id: Any
    kept: dict[str, Any]


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
        self.tokenizer = PromptTokenizer(tokenizer, self.pspec.allow_special_tokens, self.pspec.chat_template)
        self.layout = layout
        self.token_bytes = TokenBytes(tokenizer) if layout.token_bytes else None
        self.base_params: SamplingParams = job.sampling
        self.ids = ids if ids is not None else SeenIds(layout.id_column)
        self.pending: dict[int, _Pending] = {}

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
        if error is not None:
            return self._error_row(pending, error)
        try:
            prompt = build_prompt(row, self.pspec)
            if isinstance(prompt, RowError):
                return self._error_row(pending, prompt)
            ids = self.tokenizer.encode(prompt)
        except Exception as exc:  # noqa: BLE001 - a tokenizer or template that chokes on one row fails that row only
            log.warning("%s: the prompt could not be built or tokenized", row.where, exc_info=True)
            message = f"{row.where}: the prompt could not be built or tokenized ({type(exc).__name__}: {exc})"
            return self._error_row(pending, RowError(ErrorKind.TOKENIZE, message))
        if isinstance(ids, RowError):
            return self._error_row(pending, RowError(ids.kind, f"{row.where}: {ids.message}"))
        params = self.base_params
        if row.sampling:
            try:
                params = dataclasses.replace(self.base_params, **row.sampling)
            except (ValueError, TypeError) as exc:
                message = f"{row.where}: bad sampling parameters: {exc}"
                return self._error_row(pending, RowError(ErrorKind.BAD_REQUEST, message))
        self.pending[row.index] = pending
        return GenerationRequest(row.index, ids, params)

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
        return RowResult(
            row=pending.row.index,
            id=pending.id,
            kept=pending.kept,
            texts=[c.text for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            prompt_tokens=result.num_prompt_tokens,
            output_tokens=result.num_output_tokens,
            logprobs=logprobs,
            token_bytes=token_bytes,
        )
