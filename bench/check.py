"""GPU kernels against the torch reference path on the same model: greedy token streams, side by side.

The model is random (a shape from bench_shapes, random-token prompts) or real (`bench check --model`, chat
prompts from a JSONL file through its chat template): random weights give near-flat logits, where any bf16
rounding can flip a greedy stream, so the real model shows the agreement users meet.

Both engines load the same weights; the reference runs transformers' own layers with kvbatch's float64 torch
attention, eagerly, the other the fused layers (where the model has them) and the Triton (or flash-attn) kernels
with CUDA graphs. In bf16 a greedy stream can flip where the
top two tokens are within rounding of each other; at each first divergence the report gives both
runs' log-probabilities of their chosen tokens, so a near tie (a gap of a few hundredths) is visible.
Both runs take the same float32_logits setting: with bf16 logits, ties are made by the logits' own rounding.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from kvbatch.bench.peers import hf_greedy_tokens
from kvbatch.errors import SpecError
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import LoadedModel
from kvbatch.runner.request import GenerationRequest


@dataclass(frozen=True)
class StreamComparison:
    num_prompts: int
    num_identical: int  # the kernels' streams equal to the reference's
    num_identical_floor: int  # the reference's streams equal to its own, run in other batches
    num_identical_transformers: int  # transformers' generate (SDPA attention, its own layers) equal to the reference
    float32_logits: bool  # every run's logits came out of the lm_head GEMM in float32
    fused_layers: bool  # the kernels' run used the fused layers (runner/fused_forward.py)
    divergences: list[dict]  # first divergence of each stream of the kernels that differs from the reference


def random_prompts(vocab_size: int, num_prompts: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 10) for _ in range(rng.randint(16, 512))] for _ in range(num_prompts)]


def chat_prompts(tokenizer, path: Path, num_prompts: int) -> list[list[int]]:
    """The first num_prompts "prompt" fields of a JSONL file, each one user message through the chat template."""
    texts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if len(texts) == num_prompts:
                break
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["prompt"]))
                except (ValueError, KeyError, TypeError) as exc:  # a usage error: `bench check` prints it as one
                    raise SpecError(
                        f"{path} line {line_no}: expected a JSON object with a 'prompt' field ({exc})"
                    ) from exc
    if not texts:
        raise SpecError(f"{path} holds no prompts")
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for text in texts
    ]


def _requests(prompts: list[list[int]], max_new_tokens: int) -> list[GenerationRequest]:
    # EOS off: every stream runs its full length, so streams are compared over the same number of tokens.
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, logprobs=True)
    return [GenerationRequest(i, prompt, params) for i, prompt in enumerate(prompts)]


def _run(loaded: LoadedModel, config: EngineConfig, requests: list[GenerationRequest]) -> tuple[dict, bool, bool]:
    """(completions by request id, whether the logits were float32, whether the layers ran fused)."""
    engine = Engine.from_loaded(loaded, config)
    try:
        completions = {r.request_id: r.completions[0] for r in engine.generate(requests)}
        return completions, engine.float32_logits, engine.fused is not None
    finally:
        engine.close()


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def compare_streams(
    loaded: LoadedModel,
    backend: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    float32_logits: bool | None = None,
    fused_layers: bool | None = None,
) -> StreamComparison:
    """The kernels' greedy streams against the reference's; for scale, the reference against itself in other
    batches (steps of 5 sequences) and transformers' own `generate` (SDPA attention) against the reference:
    how often another correct bf16 computation of the same model flips a stream."""
    requests = _requests(prompts, max_new_tokens)
    num_prompts = len(requests)
    reference = EngineConfig(
        attention_backend="torch",
        cuda_graphs=False,
        num_blocks_override=4096,
        prefix_cache=False,
        fused_layers=False,
        float32_logits=bool(float32_logits),
    )
    expected, f32_reference, _ = _run(loaded, reference, requests)
    floor, _, _ = _run(loaded, dataclasses.replace(reference, max_num_seqs=5), requests)
    transformers = hf_greedy_tokens(loaded.model, [r.prompt_token_ids for r in requests], max_new_tokens)
    kernels = EngineConfig(
        attention_backend=backend,
        num_blocks_override=4096,
        max_num_seqs=64,
        prefix_cache=False,
        float32_logits=bool(float32_logits),
        fused_layers=fused_layers,
    )
    got, f32_kernels, fused = _run(loaded, kernels, requests)
    assert f32_reference == f32_kernels
    divergences = []
    for request in requests:
        a, b = expected[request.request_id], got[request.request_id]
        first = _first_divergence(a.token_ids, b.token_ids)
        if first is not None:
            divergences.append(
                {
                    "prompt": request.request_id,
                    "prompt_tokens": len(request.prompt_token_ids),
                    "position": first,
                    "reference_logprob": round(a.logprobs[first], 4),
                    "kernel_logprob": round(b.logprobs[first], 4),
                }
            )
    same_floor = sum(
        _first_divergence(expected[r.request_id].token_ids, floor[r.request_id].token_ids) is None for r in requests
    )
    same_transformers = sum(
        _first_divergence(expected[r.request_id].token_ids, transformers[i]) is None for i, r in enumerate(requests)
    )
    return StreamComparison(
        num_prompts, num_prompts - len(divergences), same_floor, same_transformers, f32_kernels, fused, divergences
    )
