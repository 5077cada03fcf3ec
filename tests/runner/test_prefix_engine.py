"""The prefix cache end to end on a tiny model: the same tokens and log-probabilities with it on and off,
under eviction and preemption of sequences that share blocks, with n samples, and after a failed step."""

import random

import pytest
from broken_steps import Poison
from tiny_models import VOCAB_SIZE, tiny_loaded

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", seed=7)


def make_engine(loaded, prefix_cache: bool, **overrides) -> Engine:
    config = dict(block_size=BLOCK_SIZE, num_blocks_override=512, max_num_batched_tokens=64, prefix_cache=prefix_cache)
    config.update(overrides)
    return Engine.from_loaded(loaded, EngineConfig(**config))


def shared_prefix_requests(count: int, seed: int) -> list[GenerationRequest]:
    """Rows over three system prompts (one shorter than a block) with their own questions; every fifth asks
    for 2 greedy samples, every seventh for 3 seeded random ones."""
    rng = random.Random(seed)
    systems = [[rng.randrange(2, VOCAB_SIZE) for _ in range(n)] for n in (21, 34, 3)]
    requests = []
    for i in range(count):
        question = [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(1, 14))]
        params = SamplingParams(max_new_tokens=10, logprobs=True, ignore_eos=True, n=2 if i % 5 == 0 else 1)
        if i % 7 == 0:
            params = SamplingParams(max_new_tokens=10, logprobs=True, temperature=0.9, seed=i, n=3)
        requests.append(GenerationRequest(i, systems[i % 3] + question, params))
    # Crossed rows: the first block of one system prompt, then the later blocks of another. Only the first
    # block may be a hit; the later ones hold other K/V after a different first block.
    crossed = systems[1][:BLOCK_SIZE] + systems[0][BLOCK_SIZE:20]
    requests += [
        GenerationRequest(f"crossed{i}", crossed + [2 + i], SamplingParams(max_new_tokens=10, logprobs=True))
        for i in range(2)
    ]
    return requests


def outputs(engine: Engine, requests: list[GenerationRequest]) -> dict:
    results = {r.request_id: r for r in engine.generate(requests)}
    assert results.keys() == {r.request_id for r in requests}
    assert all(r.error is None for r in results.values())
    return {k: [(c.token_ids, c.logprobs) for c in r.completions] for k, r in results.items()}


@pytest.mark.parametrize(
    "policy,num_blocks,expect_preemption",
    [("optimistic", 512, False), ("optimistic", 48, True), ("reserve", 48, False)],
)
def test_outputs_and_logprobs_are_identical_with_the_cache_on_and_off(
    loaded, policy, num_blocks, expect_preemption
) -> None:
    requests = shared_prefix_requests(30, seed=1)
    want = outputs(make_engine(loaded, False, policy=policy, num_blocks_override=num_blocks), requests)
    engine = make_engine(loaded, True, policy=policy, num_blocks_override=num_blocks)
    got = outputs(engine, requests)
    for key, samples in want.items():
        assert got[key] == samples, f"request {key} differs with the prefix cache"
    stats = engine.stats
    assert stats.num_cached_prompt_tokens > 0 and 0 < stats.prefix_hit_rate < 1
    assert (stats.num_preemptions > 0) == expect_preemption, stats
    if num_blocks < 512:
        assert engine.pool.num_evictions > 0, "the small pool should have evicted cached blocks"
    assert engine.pool.num_free_blocks == num_blocks
    engine.pool.check_invariants()


def test_a_cached_prefix_gives_the_same_bits_as_computing_it(loaded) -> None:
    rng = random.Random(2)
    prompt = [rng.randrange(2, VOCAB_SIZE) for _ in range(23)]
    params = SamplingParams(max_new_tokens=12, logprobs=True, ignore_eos=True)
    [alone] = make_engine(loaded, False).generate([GenerationRequest(0, prompt, params)])

    engine = make_engine(loaded, True)
    # Another prompt computes the first 17 tokens (4 full blocks); ours then starts after them.
    list(engine.generate([GenerationRequest("other", prompt[:17] + [5, 6, 7], params)]))
    [hit] = engine.generate([GenerationRequest(0, prompt, params)])
    assert engine.stats.num_cached_prompt_tokens == 16
    # Run again: everything but the last block of the prompt comes from the cache (5 blocks, 20 tokens).
    [again] = engine.generate([GenerationRequest(0, prompt, params)])
    assert engine.stats.num_cached_prompt_tokens == 16 + 20
    for result in (hit, again):
        assert result.completions[0].token_ids == alone.completions[0].token_ids
        assert result.completions[0].logprobs == alone.completions[0].logprobs
    # One token past 100 cached blocks: the prompt's last token is a chunk of one row, alone in its step (the
    # fused decoder then runs the last layer for every row), and must get the bits it has at the end of a longer
    # chunk (where the last layer runs for the sampling rows alone). At 400 tokens the CPU attention's calls
    # for a prompt row and for a generated row give other bits.
    long = [rng.randrange(2, VOCAB_SIZE) for _ in range(401)]
    [long_alone] = make_engine(loaded, False).generate([GenerationRequest(1, long, params)])
    list(engine.generate([GenerationRequest("other", long[:400] + [5], params)]))
    [long_hit] = engine.generate([GenerationRequest(1, long, params)])
    assert engine.stats.num_cached_prompt_tokens == 16 + 20 + 400
    assert long_hit.completions[0].logprobs == long_alone.completions[0].logprobs


def test_a_failed_steps_blocks_are_not_reused(loaded, break_steps) -> None:
    rng = random.Random(3)
    system = [rng.randrange(2, 400) for _ in range(18)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    good = GenerationRequest("good", system + [9, 8], params)
    [want] = make_engine(loaded, False).generate([good])
    poison = min(set(range(400, VOCAB_SIZE)) - set(want.completions[0].token_ids))  # in no prompt nor output
    engine = make_engine(loaded, True)
    break_steps(loaded.model, Poison(poison))
    # Both rows fail together, then each runs alone: the good one must not read the system prompt's blocks
    # registered by the failed step (their pages were never written).
    results = {r.request_id: r for r in engine.generate([GenerationRequest("bad", system + [poison], params), good])}
    assert results["bad"].finish_reason == "error"
    assert results["good"].completions[0].token_ids == want.completions[0].token_ids
    assert engine.stats.num_failed_steps >= 2 and engine.pool.num_free_blocks == engine.pool.num_blocks
    engine.pool.check_invariants()
