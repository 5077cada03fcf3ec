"""A prompt's greedy tokens and their log-probabilities are the same bits alone and packed with 50 others,
under both admission policies, also when a tiny pool forces preemption and recomputation.

On the CPU's 2 threads. With more (7 or 16), torch's SiLU rounds the last elements of each thread's slice in
scalar code, and a few log-probabilities move by up to 3e-6 (docs/design.md, "Batch invariance")."""

import pytest
import torch
from test_exact_vs_generate import random_prompts
from tiny_models import tiny_loaded

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest

PARAMS = SamplingParams(max_new_tokens=16, logprobs=True)


def run(engine: Engine, prompts: dict[int, list[int]]) -> dict[int, tuple[list[int], list[float]]]:
    requests = (GenerationRequest(i, p, PARAMS) for i, p in prompts.items())
    return {r.request_id: (r.completions[0].token_ids, r.completions[0].logprobs) for r in engine.generate(requests)}


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """The bits hold at the CI machine's 2 threads, which docs/design.md states; on a 16-core host torch would
    split SiLU's work 16 ways and move a few last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", seed=3)


@pytest.mark.parametrize(
    "policy,num_blocks,expect_preemption",
    [("reserve", 512, False), ("optimistic", 512, False), ("optimistic", 40, True), ("reserve", 40, False)],
)
def test_alone_equals_packed(loaded, policy: str, num_blocks: int, expect_preemption: bool) -> None:
    prompts = dict(enumerate(random_prompts(51, 1, 90, seed=11)))
    config = EngineConfig(policy=policy, block_size=4, num_blocks_override=num_blocks, max_num_batched_tokens=96)
    engine = Engine.from_loaded(loaded, config)
    packed = run(engine, prompts)
    assert (engine.stats.num_preemptions > 0) == expect_preemption, engine.stats
    alone_engine = Engine.from_loaded(loaded, EngineConfig(block_size=4, num_blocks_override=512))
    for i in (0, 7, 23, 50):
        alone = run(alone_engine, {i: prompts[i]})
        assert alone[i] == packed[i], f"prompt {i} differs alone and packed"
    assert engine.pool.num_free_blocks == num_blocks


def test_every_prompt_matches_across_policies_and_pools(loaded) -> None:
    prompts = dict(enumerate(random_prompts(51, 1, 90, seed=12)))
    runs = []
    for policy, num_blocks in [("reserve", 1024), ("optimistic", 36)]:
        engine = Engine.from_loaded(loaded, EngineConfig(policy=policy, block_size=4, num_blocks_override=num_blocks))
        runs.append(run(engine, prompts))
    assert runs[0] == runs[1]
