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
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


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
    request_id: Hashable  # the job uses the input row index
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a LoRA adapter registered with the engine (Engine.add_adapter); None: the base model

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_token_ids, list):  # a tuple or numpy array: `prompt + output` must concatenate
            object.__setattr__(self, "prompt_token_ids", [int(t) for t in self.prompt_token_ids])


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """One per request; `completions` holds its n samples in sample order."""

    request_id: Hashable
    num_prompt_tokens: int
    completions: list[Completion]
    error: str | None = None  # set when finish_reason is "error"
    error_kind: str | None = None  # what kind of error, where the engine knows it ("bad_adapter")
    num_preemptions: int = 0

    @property
    def finish_reason(self) -> FinishReason:
        return "error" if self.error else self.completions[0].finish_reason

    @property
    def text(self) -> str:
        return self.completions[0].text if self.completions else ""

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)
