"""Greedy output of the engine equals transformers' generate(), token for token, in float32."""

import random

import pytest
import torch
from tiny_models import EOS_ID, VOCAB_SIZE, hf_reference, tiny_loaded

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest


def random_prompts(count: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS_ID,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    ("policy", "backend"),
    [("reserve", "cpu"), ("optimistic", "cpu"), ("reserve", "torch"), ("optimistic", "torch")],
)
def test_greedy_equals_generate(arch: str, policy: str, backend: str) -> None:
    """Both CPU backends: cpu (the default, float32 through torch's flash kernel) and the float64 reference."""
    prompts = random_prompts(10, 1, 60, seed=7)
    config = EngineConfig(
        policy=policy, block_size=4, num_blocks_override=256, max_num_batched_tokens=64, attention_backend=backend
    )
    engine = Engine.from_loaded(tiny_loaded(arch), config)
    assert engine.backend.name == backend
    params = SamplingParams(max_new_tokens=24)
    got = {r.request_id: r for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))}
    reference = hf_reference(arch)
    for i, prompt in enumerate(prompts):
        want = hf_greedy(reference, prompt, 24)
        assert got[i].completions[0].token_ids == want, f"prompt {i} ({len(prompt)} tokens) diverged"
        assert got[i].finish_reason == ("stop" if want[-1] == EOS_ID else "length")
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_a_truncated_prompt_gives_generates_tokens_for_its_last_tokens() -> None:
    """truncate_prompt_tokens keeps the prompt's last k tokens (vLLM's left truncation): the tokens equal
    generate() on those alone, the result counts them, and a prompt longer than the context runs once cut."""
    prompts = random_prompts(6, 1, 60, seed=11)
    keep = 20
    engine = Engine.from_loaded(
        tiny_loaded("llama"), EngineConfig(block_size=4, num_blocks_override=128, max_model_len=48)
    )
    params = SamplingParams(max_new_tokens=12, truncate_prompt_tokens=keep)
    got = {r.request_id: r for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))}
    reference = hf_reference("llama")
    assert any(len(p) > 48 for p in prompts) and any(len(p) < keep for p in prompts)
    for i, prompt in enumerate(prompts):
        assert got[i].error is None and got[i].num_prompt_tokens == min(len(prompt), keep)
        assert got[i].completions[0].token_ids == hf_greedy(reference, prompt[-keep:], 12), f"prompt {i} diverged"
