"""The benchmark workloads: random token prompts with fixed output lengths (EOS off).

a       512 prompts of 100-1024 tokens, 256 output tokens each (the reference workload)
b       256 prompts, input and output lengths each 100-1024 (nano-vllm's published workload)
c       64 prompts of ~8,000 tokens, 1,024 output tokens each (the LoRAX case; run it with a pool
        smaller than their sum, so admission and preemption are exercised)
prefix  2,000 prompts: one shared 2,000-token system prompt + 100-token questions, 128 output tokens
chat    128 prompts of 20-60 tokens, 64 output tokens (short chat rows, the CPU case)
lora    chat's rows spread evenly over LORA_COUNT LoRA adapters (row i on adapter lora{i % 8}; bench/lora.py)
json    a's rows, each constrained by JSON_SCHEMA (structured output; needs a real tokenizer, --tokenizer)
score   1,000 prompts of 256 tokens, each scored against 4 continuations of 3-12 tokens (lm-eval's
        multiple-choice loglikelihood requests; nothing is generated)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.request import GenerationRequest


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[GenerationRequest]

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens, and a scoring request's continuations (which it reads as prompt tokens)."""
        return sum(len(r.prompt_token_ids) + sum(map(len, r.continuations or ())) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(0 if r.continuations is not None else r.sampling.max_new_tokens for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        return max(len(r.prompt_token_ids) + _longest_extension(r) for r in self.requests)

    def describe(self) -> str:
        tokens = f"{self.num_prompt_tokens} prompt tokens, {self.num_output_tokens} output tokens"
        return f"{self.name}: {len(self.requests)} prompts, {tokens}"


def _longest_extension(request: GenerationRequest) -> int:
    if request.continuations is not None:
        return max(map(len, request.continuations))
    return request.sampling.max_new_tokens


LORA_COUNT = 8
# One string longer than any row's output: no row completes the object, so every row runs its 256 tokens (as EOS-off
# rows do) and the grammar masks every row at every step, the host's worst case.
JSON_SCHEMA = (
    '{"type": "object", "properties": {"answer": {"type": "string", "minLength": 4000}}, "required": ["answer"]}'
)


def _request(i: int, prompt: list[int], max_new_tokens: int, adapter: str | None = None) -> GenerationRequest:
    # ignore_eos: every row runs to its length, as the peers' figures do.
    return GenerationRequest(i, prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True), adapter)


WORKLOADS = ("a", "b", "c", "prefix", "chat", "lora", "json", "score")


def make_workload(name: str, vocab_size: int, num_prompts: int | None = None, seed: int = 0) -> Workload:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab_size - 10) for _ in range(n)]

    if name in ("a", "json"):
        rows = [(tokens(rng.randint(100, 1024)), 256) for _ in range(num_prompts or 512)]
    elif name == "b":
        rows = [(tokens(rng.randint(100, 1024)), rng.randint(100, 1024)) for _ in range(num_prompts or 256)]
    elif name == "c":
        rows = [(tokens(rng.randint(7900, 8100)), 1024) for _ in range(num_prompts or 64)]
    elif name == "prefix":
        system = tokens(2000)
        rows = [(system + tokens(100), 128) for _ in range(num_prompts or 2000)]
    elif name == "score":
        scored = []
        for i in range(num_prompts or 1000):
            continuations = [tokens(rng.randint(3, 12)) for _ in range(4)]
            scored.append(GenerationRequest(i, tokens(256), continuations=continuations))
        return Workload(name, scored)
    elif name in ("chat", "lora"):
        rows = [(tokens(rng.randint(20, 60)), 64) for _ in range(num_prompts or 128)]
    else:
        raise ValueError(f"unknown workload {name!r}; choose {', '.join(WORKLOADS)}")
    adapters = [f"lora{i % LORA_COUNT}" if name == "lora" else None for i in range(len(rows))]
    requests = [_request(i, prompt, out, a) for i, ((prompt, out), a) in enumerate(zip(rows, adapters))]
    if name == "json":
        constrained = SamplingParams(max_new_tokens=256, structured_outputs={"json": JSON_SCHEMA})
        requests = [replace(r, sampling=constrained) for r in requests]
    return Workload(name, requests)


def relabelled(workload: Workload, vocab_size: int, seed: int) -> Workload:
    """The workload again in other token ids, each id swapped for another by one random permutation of the ids
    make_workload draws from: every prompt and continuation keeps its length and the rows that shared a system
    prompt share another, so a second run (the profiled one) is the same work, none of whose blocks the first run
    left in the prefix cache."""
    ids = range(10, vocab_size - 10)
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    swap = dict(zip(ids, shuffled))

    def new(tokens: list[int]) -> list[int]:
        return [swap[t] for t in tokens]

    requests = [
        replace(
            r,
            prompt_token_ids=new(r.prompt_token_ids),
            continuations=None if r.continuations is None else [new(c) for c in r.continuations],
        )
        for r in workload.requests
    ]
    return Workload(workload.name, requests)
