"""A sequence: one sample of one request as the scheduler sees it.

A request with n samples becomes n sequences. Token accounting:

    token_ids = prompt + output          num_tokens = len(token_ids)
    [0, num_computed_tokens)             K/V already in the sequence's pages
    [num_computed_tokens, num_tokens)    still to run through the model; the logits of the last
                                         of them give the next output token

A decode step has exactly one token left to compute: the token sampled in the step before.
Preemption frees the pages and sets num_computed_tokens back to 0, so the sequence recomputes
prompt and output so far as one prefill when it is admitted again. With the prefix cache, admission
(first or again) starts num_computed_tokens after the longest cached prefix instead.

    block_hashes            prefix-cache hashes of the full blocks of token_ids seen so far (keyed by
                            the LoRA adapter too: two adapters compute other K/V for the same tokens)
    num_registered_blocks   leading block_ids already offered to the prefix cache

Scoring (runner/scoring.py): the logits of row score_rows[i] are scored against score_targets[i], the token
that follows that row; a row may be scored more than once (the prompt's last row, against the first token of
each continuation of a scoring request). A score-only sequence (one continuation of a scoring request) samples
nothing and ends once its tokens are computed. Its cached prefix stops before its first scored row.

With async scheduling the engine launches the next step before the host has seen the tokens of the
one in flight. Those tokens are pending: counted in num_tokens (their positions are taken), not yet in
output_token_ids; a step that computes one reads it on the device from the step that sampled it
(row pending_index of that step's sampled tokens).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kvbatch.cache.prefix_cache import BlockHash, chain_hashes

from .request import FinishReason, GenerationRequest, TopLogprobs


def capacity_tokens(max_model_len: int, num_pool_tokens: int) -> int:
    """The longest sequence (prompt + output) that can ever run: the context, or the pool if smaller."""
    return min(max_model_len, num_pool_tokens)


def capped_new_tokens(max_new_tokens: int, num_prompt_tokens: int, capacity: int) -> int:
    """What a sample of this prompt may generate: its max_new_tokens, capped so that prompt and output fit in
    `capacity` tokens (capacity_tokens). `kvbatch plan` reports the same number."""
    return min(max_new_tokens, capacity - num_prompt_tokens)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: GenerationRequest
    sample_index: int
    max_new_tokens: int  # the request's limit, capped so the sequence always fits the context and the pool
    seed: int
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # with sampling.top_logprobs
    block_ids: list[int] = field(
        default_factory=list
    )  # grows by appending, else replaced whole (runner/host_tables.py)
    num_computed_tokens: int = 0
    num_pending: int = 0  # sampled on the device, not yet appended to output_token_ids
    pending_index: int = -1  # the newest pending token's row in its step's sampled tokens
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_registered_blocks: int = 0
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    # After a failed step, each of its sequences runs alone once, so a row that breaks the model
    # is found and failed without taking its batch-mates with it (after MAX_ISOLATIONS failed steps: alone to the end).
    isolate: bool = False
    num_isolations: int = 0
    num_failures_alone: int = 0  # the engine fails the row at FAILURES_ALONE_TO_ERROR (a fault may be transient)
    finish_reason: FinishReason | None = None
    group: Any = None  # the engine's state of the request this sample belongs to
    matcher: Any = None  # structured output: the grammar's state after output_token_ids (runner/structured.py)
    score_rows: list[int] = field(default_factory=list)  # rows whose logits are scored, ascending (repeats allowed)
    score_targets: list[int] = field(default_factory=list)  # the token each scored row is scored against
    score_only: bool = False  # a continuation being scored: ends when prefilled, samples nothing
    score_logprobs: list[float] = field(default_factory=list)  # per score_targets entry, as steps compute them
    score_greedy: list[bool] = field(default_factory=list)  # per score_targets entry: the target is the argmax
    adapter_key: bytes = b""  # its LoRA adapter's identity (b"": the base model): part of every block hash
    # The length the waiting queue orders it by (0: num_tokens). A scoring request's continuations share their
    # prompt's, so they queue side by side: the first computes the prompt, the others find it in the prefix cache
    # (ordered by their own lengths, other requests' rows came between, and a pool too small to keep every
    # prompt evicted theirs before they ran: 200 four-choice requests computed 2.4x the tokens needed).
    queue_tokens: int = 0
    queue_key: tuple[int, int, int] = field(default=(0, 0, 0), init=False, repr=False)  # the scheduler's, as it queued
    # Plain attributes, not properties: the host reads them for every row of every step.
    num_prompt_tokens: int = field(init=False, repr=False)
    penalised: bool = field(init=False, repr=False)  # penalties or bad words read the tokens so far
    plain_greedy: bool = field(init=False, repr=False)  # argmax alone: no sampling, logits processor or log-probs
    custom_stops: bool = field(init=False, repr=False)  # stop strings or stop token ids beyond EOS

    def __post_init__(self) -> None:
        params = self.request.sampling
        self.num_prompt_tokens = len(self.request.prompt_token_ids)
        self.penalised = params.reads_output
        self.plain_greedy = params.greedy and not params.changes_logits and not params.wants_logprobs
        if self.score_targets:
            assert len(self.score_rows) == len(self.score_targets), (len(self.score_rows), len(self.score_targets))
            self.score_logprobs = [0.0] * len(self.score_targets)
            self.score_greedy = [False] * len(self.score_targets)
        self.custom_stops = bool(params.stop or params.stop_token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Tokens the host holds: prompt and appended output (num_tokens less the pending ones)."""
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_num_tokens(self) -> int:
        """Prompt plus the most output this sequence may produce: what `reserve` admission holds."""
        return self.num_prompt_tokens + self.max_new_tokens

    @property
    def num_cacheable_tokens(self) -> int:
        """Leading tokens the prefix cache may supply: not the last (its logits sample), nor scored rows."""
        return min(self.num_tokens, self.score_rows[0] + 1) if self.score_rows else self.num_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        assert end <= self.num_known_tokens, (
            f"seq {self.seq_id}: tokens up to {end} asked, {self.num_known_tokens} known"
        )
        prompt = self.request.prompt_token_ids
        num_prompt = len(prompt)
        if end <= num_prompt:
            return prompt[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return prompt[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids

    def full_block_hashes(self, num_tokens: int, block_size: int) -> list[BlockHash]:
        """Hashes of the full blocks among the first `num_tokens` tokens (computed once, then kept:
        a sequence's tokens never change)."""
        num_full = num_tokens // block_size
        num_hashed = len(self.block_hashes)
        if num_hashed < num_full:
            parent = self.block_hashes[-1] if num_hashed else None
            new_tokens = self.token_ids(num_hashed * block_size, num_full * block_size)
            self.block_hashes += chain_hashes(parent, new_tokens, block_size, self.adapter_key)
        return self.block_hashes[:num_full]
