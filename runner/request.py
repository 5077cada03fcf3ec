"""What goes into the engine and what comes out (requests, results, the counters it keeps): plain dataclasses,
no torch."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kvbatch.errors import ErrorKind
from kvbatch.runner.config import EngineConfig, SamplingParams
from kvbatch.runner.structured_outputs import StructuredOutputs

FinishReason = Literal["stop", "length", "error"]


def _refuse_text(name: str, ids: Any) -> None:
    if isinstance(ids, str | bytes | bytearray):
        kind = "a string" if isinstance(ids, str) else "bytes"
        raise TypeError(f"{name} is {kind}; pass token ids (a list of int), such as the tokenizer's encode(text)")


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt to generate from or, with `continuations`, to score: each continuation's tokens are scored
    after the prompt in one prefill (no decode step), the prompt's full blocks shared through the prefix cache.
    With `rolling_prefix` the prompt itself is scored, as lm-eval's loglikelihood_rolling scores a text: in
    disjoint windows of the engine's context (runner/rolling.py), the first after that token."""

    request_id: Hashable  # the job uses the input row index
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a LoRA adapter registered with the engine (Engine.add_adapter); None: the base model
    continuations: list[list[int]] | None = field(default=None, kw_only=True)  # a scoring request's, by name
    rolling_prefix: int | None = field(default=None, kw_only=True)  # a rolling request's first context token

    @property
    def is_scoring(self) -> bool:
        """A scoring request (continuations or rolling): its result holds `scores`, not completions."""
        return self.continuations is not None or self.rolling_prefix is not None

    @property
    def longest_scored_sequence(self) -> int:
        """Tokens of a scoring request's longest sequence: its prompt and longest continuation less that
        continuation's last token, which is scored and never input (so one token more than the context fits)."""
        assert self.continuations is not None, "only a request with continuations has scored sequences"
        return len(self.prompt_token_ids) + max(map(len, self.continuations), default=1) - 1

    @property
    def num_input_tokens(self) -> int:
        """Tokens its prefills put through the model, at most: the prompt, and each continuation less its last token
        (scored, never input). The prefix cache may hold some of them; samples share the prompt."""
        return len(self.prompt_token_ids) + sum(len(c) - 1 for c in self.continuations or ())

    def __post_init__(self) -> None:
        # Iterable, but of characters or byte values: "123" would be read as the ids [1, 2, 3] without a word.
        _refuse_text("prompt_token_ids", self.prompt_token_ids)
        for index, continuation in enumerate(self.continuations or ()):
            _refuse_text(f"continuations[{index}]", continuation)
        if not isinstance(self.sampling, SamplingParams):  # a dict failed below, on an attribute it does not have
            raise TypeError(
                f"sampling is a {type(self.sampling).__name__}; pass a SamplingParams: SamplingParams(**fields)"
            )
        if not isinstance(self.prompt_token_ids, list):  # a tuple or numpy array: `prompt + output` must concatenate
            object.__setattr__(self, "prompt_token_ids", [int(t) for t in self.prompt_token_ids])
        if self.continuations is not None:
            object.__setattr__(self, "continuations", [[int(t) for t in c] for c in self.continuations])
        keep = self.sampling.truncate_prompt_tokens
        if keep is not None and not self.is_scoring and len(self.prompt_token_ids) > keep:
            # vLLM's left truncation: the end of the prompt (the question, the generation prompt) is what the
            # model answers. Done here, so admission, packing and the prompt's token count see the kept tokens.
            object.__setattr__(self, "prompt_token_ids", self.prompt_token_ids[-keep:])


@dataclass(frozen=True)
class TopLogprobs:
    """The most likely tokens at one position, most likely first."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class ContinuationScore:
    """lm-eval's (logprob, is_greedy) for one continuation, with its token count and per-token log-probabilities."""

    logprob: float  # the sum of token_logprobs
    num_tokens: int
    is_greedy: bool  # every token is the argmax given the prompt and the tokens before it
    token_logprobs: list[float]


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None  # per generated token, with sampling.top_logprobs > 0
    # What stopped it: the stop string, or the id from sampling.stop_token_ids; None for EOS, length and errors.
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class GenerationResult:
    """One per request; `completions` holds its n samples in sample order."""

    request_id: Hashable
    num_prompt_tokens: int
    completions: list[Completion]
    error: str | None = None  # set when finish_reason is "error"
    error_kind: ErrorKind | None = None  # why, as a value (set with error)
    num_preemptions: int = 0
    prompt_logprobs: list[float | None] | None = None  # with sampling.prompt_logprobs; the first token has none
    # One per continuation of a scoring request (no completions); a rolling request's one covers its whole prompt.
    scores: list[ContinuationScore] | None = None

    @property
    def finish_reason(self) -> FinishReason:
        if self.error:
            return "error"
        return self.completions[0].finish_reason if self.completions else "stop"  # a scoring request: done

    @property
    def text(self) -> str:
        return self.completions[0].text if self.completions else ""

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


@dataclass
class EngineStats:
    """What the engine counts while it runs, over all its generate calls."""

    num_steps: int = 0
    num_steps_ahead: int = 0  # planned while the step before was in flight (async scheduling)
    num_spare_tokens: int = 0  # decoded ahead for a sequence that had stopped on the step before, dropped
    num_failed_steps: int = 0
    num_preemptions: int = 0
    peak_kv_usage: float = 0.0
    num_prompt_tokens: int = 0  # of finished requests (counted when a request retires)
    num_prefill_tokens: int = 0  # prompt tokens computed (counted every step: a long prefill moves it)
    num_output_tokens: int = 0
    num_requests: int = 0
    num_errors: int = 0
    # Prefix cache: tokens admissions had to prefill (prompt, plus output so far after a preemption),
    # and how many of those the cache held.
    num_queried_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    # Seconds the host waited for a step's sampled tokens. With async scheduling a run the device bounds spends
    # most of its time here; one the host bounds (the device idle between steps) almost none.
    host_wait_s: float = 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_cached_prompt_tokens / self.num_queried_prompt_tokens if self.num_queried_prompt_tokens else 0.0


class PoolDescription(Protocol):
    num_blocks: int
    block_size: int

    @property
    def num_tokens(self) -> int: ...

    def describe(self) -> str: ...


class GenerationEngine(Protocol):
    """What a job needs of an engine. The engine (runner/engine.py), its tensor-parallel form and the tests' fake
    implement it; jobs/ uses nothing else."""

    config: EngineConfig
    tokenizer: Any  # a transformers tokenizer
    stats: EngineStats
    pool_size: PoolDescription
    max_model_len: int
    vocab_size: int  # the logits' width: token ids run from 0 to vocab_size - 1

    @property
    def source(self) -> str:
        """Where the model was loaded from (a folder, a file, a hub name)."""
        ...

    def kv_usage(self) -> float:
        """The share of KV blocks in use now, 0..1."""
        ...

    def generate(
        self, requests: Iterable[GenerationRequest], on_step: Callable[[], None] | None = None
    ) -> Iterator[GenerationResult]: ...

    def add_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter (called only for jobs that use adapters)."""
        ...

    def constraint_problem(self, constraint: StructuredOutputs) -> str | None:
        """Why every row under this structured-output constraint would fail before its first token (it does not
        compile for this tokenizer, or no token may begin it), or None (called only for a job's own constraint)."""
        ...

    def adapter_problem(self, name: str) -> str | None:
        """Why every request on adapter `name` would fail as bad_adapter (unregistered, missing, unreadable, of
        another model), or None (called for a job's own adapter; each request is checked alike)."""
        ...
