"""A fake engine and tokenizer with the real ones' interface, for testing the job glue without a model.

FakeTokenizer: one id per character (ord), special tokens parsed unless split_special_tokens, a tiny
ChatML-like template. FakeEngine implements runner.request.GenerationEngine, as the real engine does: it pulls
requests lazily, answers out of order, echoes the prompt length, and refuses prompts over its context as the real
engine does (kind prompt_too_long).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbatch.errors import ErrorKind
from kvbatch.runner.config import EngineConfig
from kvbatch.runner.request import Completion, EngineStats, GenerationRequest, GenerationResult

SPECIALS = {"<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 0}


class FakeTokenizer:
    chat_template = "fake"
    all_special_tokens = list(SPECIALS)
    bos_token, bos_token_id = None, None
    eos_token_id = SPECIALS["<|endoftext|>"]

    def __init__(self, chat_template: bool = True) -> None:
        if not chat_template:
            self.chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for special, sid in SPECIALS.items():
                if not split_special_tokens and text.startswith(special, i):
                    ids.append(sid)
                    i += len(special)
                    break
            else:
                ids.append(1000 + ord(text[i]))
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        inverse = {v: k for k, v in SPECIALS.items()}
        if skip_special_tokens:
            ids = [i for i in ids if i not in inverse]
        return "".join(inverse[i] if i in inverse else chr(i - 1000) if i >= 1000 else "?" for i in ids)

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass
class FakePoolSize:
    num_blocks: int = 100
    block_size: int = 16

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return f"{self.num_blocks} blocks of {self.block_size} tokens = {self.num_tokens} tokens"


class FakeEngine:
    def __init__(self, max_model_len: int = 200, chat_template: bool = True, fail_after: int | None = None) -> None:
        self.tokenizer = FakeTokenizer(chat_template)
        self.max_model_len = max_model_len
        self.vocab_size = 1000 + 0x110000  # every id FakeTokenizer makes: 1000 + a code point
        self.pool_size = FakePoolSize()
        self.kv_in_use = 0.0  # what kv_usage() reports
        self.stats = EngineStats(peak_kv_usage=0.25)
        self.fail_after = fail_after  # raise after yielding this many results (an engine crash)
        self.requests: list[GenerationRequest] = []
        self.config = EngineConfig()
        self.built_with: tuple[str, dict[str, Any]] | None = None  # the factory's (model, settings)

    @property
    def source(self) -> str:
        return self.config.model

    def kv_usage(self) -> float:
        return self.kv_in_use

    def constraint_problem(self, constraint: Any) -> str | None:
        return None  # the fake answers every row alike, constrained or not

    def adapter_problem(self, name: str) -> str | None:
        return None  # the fake serves any adapter a row names

    def generate(self, requests: Any, on_step: Any = None):
        window: list[GenerationRequest] = []
        yielded = 0
        for request in requests:
            self.requests.append(request)
            window.append(request)
            if on_step is not None:  # a step per request taken in
                on_step()
            if len(window) == 3:  # answer in a different order than asked, like the real engine
                for r in reversed(window):
                    if self.fail_after is not None and yielded >= self.fail_after:
                        raise RuntimeError("simulated engine crash")
                    yield self._answer(r)
                    yielded += 1
                window = []
        for r in reversed(window):
            yield self._answer(r)

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        n = len(request.prompt_token_ids)
        self.stats.num_prompt_tokens += n
        self.stats.num_prefill_tokens += n
        if n >= self.max_model_len:
            message = f"the prompt has {n} tokens; at most {self.max_model_len - 1} fit, leaving room for one new token"
            return GenerationResult(request.request_id, n, [], error=message, error_kind=ErrorKind.PROMPT_TOO_LONG)
        completions = []
        for i in range(request.sampling.n):
            text = f"echo {n}" + (f" #{i}" if request.sampling.n > 1 else "")
            ids = list(range(min(request.sampling.max_new_tokens, 3)))
            logprobs = [-0.5] * len(ids) if request.sampling.logprobs else None
            reason = "length" if request.sampling.max_new_tokens <= 3 else "stop"
            completions.append(Completion(text, ids, reason, logprobs))
        self.stats.num_output_tokens += sum(len(c.token_ids) for c in completions)
        return GenerationResult(request.request_id, n, completions)


def fake_factory(**kwargs: Any):
    engines: list[FakeEngine] = []

    def factory(model: str, settings: dict[str, Any]) -> FakeEngine:
        engine = FakeEngine(**kwargs)
        engine.built_with = (model, settings)
        engine.config = EngineConfig(model=model)
        engines.append(engine)
        return engine

    factory.engines = engines  # type: ignore[attr-defined]
    return factory
