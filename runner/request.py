"""What goes into the engine and what comes out: plain dataclasses, no torch."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "error"]


# A temperature below this is greedy: the distribution is a point mass on the top token anyway, and dividing
# the logits by it would overflow float32 (an all-inf row has no softmax).
GREEDY_BELOW_TEMPERATURE = 1e-5
# The OpenAI API's own limit on top_logprobs.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # same seed, same sample, whatever else shares the batch
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    ignore_eos: bool = False
    n: int = 1  # samples per prompt
    logprobs: bool = False  # log-probability of each chosen token under the model
    top_logprobs: int = 0  # the this-many most likely tokens and their log-probabilities at each generated position
    prompt_logprobs: bool = False  # each prompt token's log-probability given the tokens before it

    def __post_init__(self) -> None:
        # Per-row overrides (an OpenAI Batch body) arrive as parsed JSON: a wrong type is refused here, as that
        # row's error, rather than failing inside the engine for the whole batch.
        for name, kind in _FIELD_TYPES.items():
            value = getattr(self, name)
            if name in ("stop", "stop_token_ids"):
                ok = isinstance(value, tuple) and all(_is(kind, v) for v in value)
            else:
                ok = (value is None and name == "seed") or _is(kind, value)
            if not ok:
                raise TypeError(
                    f"{name} must be {_KIND_NAMES[kind]}{' (a list of them)' if name in ('stop', 'stop_token_ids') else ''}, got {value!r}"
                )
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
            ),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def wants_logprobs(self) -> bool:
        """Whether the chosen tokens' distribution is needed (their log-probabilities or the top alternatives)."""
        return self.logprobs or self.top_logprobs > 0


_FIELD_TYPES = {
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "seed": int,
    "stop": str,
    "stop_token_ids": int,
    "ignore_eos": bool,
    "n": int,
    "logprobs": bool,
    "top_logprobs": int,
    "prompt_logprobs": bool,
}
_KIND_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _is(kind: type, value: object) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, not to a request
        return False
    if kind is float:  # JSON and YAML can spell Infinity and NaN, which no sampling setting means
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt to generate from or, with `continuations`, to score: each continuation's tokens are scored
    after the prompt in one prefill (no decode step), the prompt's full blocks shared through the prefix cache."""

    request_id: Hashable  # the job uses the input row index
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    continuations: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_token_ids, list):  # a tuple or numpy array: `prompt + output` must concatenate
            object.__setattr__(self, "prompt_token_ids", [int(t) for t in self.prompt_token_ids])
        if self.continuations is not None:
            object.__setattr__(self, "continuations", [[int(t) for t in c] for c in self.continuations])


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


@dataclass(frozen=True)
class GenerationResult:
    """One per request; `completions` holds its n samples in sample order."""

    request_id: Hashable
    num_prompt_tokens: int
    completions: list[Completion]
    error: str | None = None  # set when finish_reason is "error"
    num_preemptions: int = 0
    prompt_logprobs: list[float | None] | None = None  # with sampling.prompt_logprobs; the first token has none
    scores: list[ContinuationScore] | None = None  # one per continuation of a scoring request (no completions)

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
