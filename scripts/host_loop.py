"""The host's share of a step: the engine's loop at workload (a)'s shape with the model replaced by a constant.

    python scripts/host_loop.py [--steps-profile]

512 sequences of 100-1,024 random prompt tokens and 256 new tokens each (EOS off), the `tiny` random model on the
CPU, async scheduling on as on a GPU; `ModelRunner.forward` returns a constant, so what is timed is scheduling,
input preparation, sampling of a small vocabulary and postprocess. On a GPU this loop must stay shorter than a
device step (about 5 ms for llama-1b at 512 decodes), or the device waits for it. Prints ms a step and the
engine's per-phase breakdown (`--steps-profile`: cProfile's top functions instead).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import random
import sys
import time

import torch

from kvbatch.bench.models import random_model
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest


def requests(rng: random.Random, n: int, max_new_tokens: int) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return [
        GenerationRequest(i, [rng.randrange(10, 1000) for _ in range(rng.randint(100, 1024))], params) for i in range(n)
    ]


def main() -> None:
    torch.set_num_threads(1)
    loaded = random_model("tiny", "cpu", "float32", max_model_len=4096)
    engine = Engine.from_loaded(
        loaded,
        EngineConfig(max_num_seqs=512, max_num_batched_tokens=16384, num_blocks_override=40000, async_scheduling=True),
    )
    logits = torch.zeros(1024, loaded.model.config.vocab_size)
    engine.runner.forward = lambda inputs: logits[: inputs.logits_rows.shape[0]]
    rng = random.Random(0)
    list(engine.generate(requests(rng, 64, 8)))  # warm-up
    work = requests(rng, 512, 256)
    profiler = cProfile.Profile() if "--steps-profile" in sys.argv else None
    engine.timer.enabled = profiler is None
    steps = engine.stats.num_steps
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    list(engine.generate(work))
    seconds = time.perf_counter() - start
    steps = engine.stats.num_steps - steps
    print(f"{steps} steps in {seconds:.3f} s: {1e3 * seconds / steps:.2f} ms a step (the model a constant)")
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        print(text.getvalue())
    else:
        for phase, row in engine.timer.report().items():
            print(f"  {phase:16s} {row['ms_per_call']:.3f} ms a step")


if __name__ == "__main__":
    main()
