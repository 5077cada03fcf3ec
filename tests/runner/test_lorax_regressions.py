"""The two ways LoRAX died, as regression tests.

1. Big inputs (max-input-length 8096, max-total-tokens 18000): "Out of available cache blocks: asked 1024,
   only 172 free blocks". Here: prompts near 8k tokens with max_new_tokens 1024 against a pool smaller than
   their sum, plus one that can never fit. Every request finishes or gets its own error; nothing raises.
2. Concurrent short prompts: "FlashCausalLMBatch.concatenate() takes 2 positional arguments but 4 were given".
   Here: 200 ~30-token prompts at once under a large batch-token budget; each output equals its run alone.
"""

import dataclasses
import random

import torch
from tiny_models import EOS_ID, tiny_model, word_tokenizer

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import LoadedModel
from kvbatch.runner.request import GenerationRequest


def long_context_model() -> LoadedModel:
    # The tiny Llama with a 16k context (rotary positions need no table; only the limit changes).
    return LoadedModel(
        tiny_model("llama", seed=3),
        word_tokenizer(),
        "tiny-llama-16k",
        (EOS_ID,),
        16384,
        torch.device("cpu"),
        torch.float32,
    )


def prompt(rng: random.Random, num_tokens: int) -> list[int]:
    return [rng.randrange(2, 512) for _ in range(num_tokens)]


def test_near_8k_prompts_against_a_pool_smaller_than_their_sum() -> None:
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=1024, ignore_eos=True)
    requests = [GenerationRequest(i, prompt(rng, rng.randint(7900, 8096)), params) for i in range(3)]
    requests.append(GenerationRequest("too-long", prompt(rng, 12000), params))  # more than the whole pool
    pool_tokens = 11000  # one request (~9,100 tokens) fits at a time; the three need ~27,300
    engine = Engine.from_loaded(
        long_context_model(),
        EngineConfig(block_size=16, num_blocks_override=pool_tokens // 16, max_num_batched_tokens=4096),
    )
    results = {r.request_id: r for r in engine.generate(requests)}

    assert set(results) == {0, 1, 2, "too-long"}
    for i in range(3):
        assert results[i].error is None and results[i].finish_reason == "length"
        assert results[i].num_output_tokens == 1024
    assert results["too-long"].finish_reason == "error"
    assert "12000 tokens" in results["too-long"].error and "KV pool" in results["too-long"].error
    assert engine.stats.peak_kv_usage > 0.8  # the pool really was the limit
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    engine.pool.check_invariants()


def test_200_concurrent_short_prompts_equal_their_runs_alone() -> None:
    rng = random.Random(1)
    loaded = dataclasses.replace(long_context_model(), max_model_len=512)
    requests = [
        GenerationRequest(i, prompt(rng, rng.randint(24, 36)), SamplingParams(max_new_tokens=12)) for i in range(200)
    ]
    engine = Engine.from_loaded(
        loaded, EngineConfig(block_size=16, num_blocks_override=2048, max_num_seqs=256, max_num_batched_tokens=16384)
    )
    together = {r.request_id: r for r in engine.generate(requests)}
    assert engine.stats.num_steps <= 13, "all 200 prefill in one step, then decode together"

    assert sorted(together) == list(range(200))
    for request in requests:
        (alone,) = engine.generate([request])
        assert alone.error is None
        assert alone.completions[0].token_ids == together[request.request_id].completions[0].token_ids
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
