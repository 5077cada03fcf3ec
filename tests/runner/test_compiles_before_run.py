"""On a GPU every Triton kernel variant a run meets is compiled while the engine starts, none mid-run.

Triton compiles a new variant for each new specialisation of a kernel's arguments (an integer that is 1 or a
multiple of 16, a pointer's 16-byte alignment). A compile in the middle of a run stalls the device for 0.1-1 s
(one took 115 ms of the first step of a bench run on the H200), so the engine's start-up (its warm-up, graph
capture and pool profiling) must meet them all. The steps here vary what changes between steps: the number of
sequences (each residue mod 4, which moves pointers into the per-sequence arrays), decodes mixed with prefill
chunks, chunked long prompts, sampling, log-probabilities and scored continuations.

GPU only: in the CPU interpreter nothing is compiled, so there is nothing to check there.
"""

import pytest
import torch

from kvbatch.bench.lora import random_adapters
from kvbatch.bench.models import random_model
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles kernels only on a GPU")


@pytest.mark.parametrize("profile_pool,adapters", [(True, False), (False, False), (True, True)])
def test_no_kernel_compiles_after_the_engine_starts(profile_pool, adapters, tmp_path):
    """With adapters too: their shrink and expand meet every row count and split of in_features."""
    import triton

    loaded = random_model("tiny", "cuda", "bfloat16", max_model_len=2048)
    config = dict(max_num_seqs=64, max_num_batched_tokens=512, block_size=16)
    if not profile_pool:  # a fixed pool skips the profiling pass: its largest step compiles nothing then
        config["num_blocks_override"] = 2048
    else:  # a share of the card that leaves room for other test processes on it (pytest -n)
        config["gpu_memory_utilization"] = 0.3
    paths = random_adapters(loaded.model, tmp_path, 3) if adapters else None
    engine = Engine(EngineConfig(**config), loaded, adapters=paths)
    names = [None, *paths] if paths else [None]
    compiled: list[str] = []
    previous = triton.knobs.runtime.jit_post_compile_hook
    triton.knobs.runtime.jit_post_compile_hook = lambda *args, **kwargs: compiled.append(
        str(kwargs.get("repr", args))[:300]
    )
    try:
        gen = torch.Generator().manual_seed(0)

        def prompt(n: int) -> list[int]:
            return torch.randint(3, loaded.model.config.vocab_size, (n,), generator=gen).tolist()

        greedy = SamplingParams(max_new_tokens=9, ignore_eos=True)
        sampled = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, logprobs=True, ignore_eos=True, seed=1)
        lengths = [1, 2, 5, 16, 17, 33, 100, 250, 700, 31, 64, 3, 129, 8, 9, 47, 15]
        for num_requests in (1, 2, 3, 4, 5, 7, 17):
            requests = [
                GenerationRequest(
                    (num_requests, i),
                    prompt(lengths[(i + num_requests) % len(lengths)]),
                    sampled if i % 3 == 2 else greedy,
                    adapter=names[i % len(names)],
                )
                for i in range(num_requests)
            ]
            # Scoring requests of 1-4 continuations: the scored rows and their targets change count and parity
            # from step to step (the scoring kernel reads both).
            requests += [
                GenerationRequest(
                    ("score", num_requests, i),
                    prompt(lengths[(i + 3 * num_requests) % len(lengths)]),
                    continuations=[prompt(1 + (i + j) % 4) for j in range(1 + (i + num_requests) % 4)],
                )
                for i in range(num_requests % 4)
            ]
            results = list(engine.generate(requests))
            assert len(results) == len(requests) and all(r.error is None for r in results)
    finally:
        triton.knobs.runtime.jit_post_compile_hook = previous
        engine.close()
    assert engine.stats.num_steps > 30
    assert compiled == [], f"{len(compiled)} kernel variant(s) compiled mid-run: {compiled}"
