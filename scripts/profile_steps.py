"""Where one decode step and one prefill step spend GPU time, kernel by kernel (GPU only).

    python scripts/profile_steps.py [llama-1b|llama-8b|qwen3-0.6b]

A random model of the shape, bf16, the engine's runner called directly on made-up steps: 512 decodes at contexts
of 100-1,280 tokens, and about 30 fresh prompts filling 16,384 tokens. Prints each step's time (eager, and the
decode replayed from a CUDA graph), a few GEMMs of the same shapes alone, and the top kernels of each step from
torch.profiler. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from kvbatch.bench.models import random_model
from kvbatch.cache.metadata import AttentionMetadata
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_runner import StepInputs

BLOCK_SIZE = 16


def make_step(engine: Engine, q_lens: list[int], seq_lens: list[int], rng: np.random.Generator) -> StepInputs:
    """A step of sequences with q_lens new tokens each at the end of seq_lens tokens, on shuffled pages."""
    device, n = engine.device, len(seq_lens)
    width = max(-(-s // BLOCK_SIZE) for s in seq_lens)
    tables = rng.permutation(engine.pool_size.num_blocks)[: n * width].reshape(n, width).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    positions = np.concatenate([np.arange(s - q, s) for q, s in zip(q_lens, seq_lens)])
    rows = np.concatenate([np.full(q, i) for i, q in enumerate(q_lens)])
    slots = tables[rows, positions // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + positions % BLOCK_SIZE

    def dev(a: np.ndarray, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, dtype)

    meta = AttentionMetadata(
        dev(starts),
        dev(np.array(seq_lens)),
        dev(tables),
        dev(slots, torch.int64),
        num_decodes=sum(q == 1 for q in q_lens),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE,
    )
    ids = torch.randint(0, engine.model.config.vocab_size, (1, int(starts[-1])), device=device)
    return StepInputs(ids, dev(positions, torch.int64)[None], dev(starts[1:] - 1, torch.int64), n, meta)


def ms_per_call(fn, n: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main(shape: str) -> None:
    loaded = random_model(shape, "cuda", "bfloat16", max_model_len=4096)
    engine = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=512, cuda_graphs=False, block_size=BLOCK_SIZE))
    runner, rng = engine.runner, np.random.default_rng(0)
    decode = make_step(engine, [1] * 512, list(rng.integers(100, 1281, 512)), rng)
    lens: list[int] = []
    while sum(lens) < 16384 - 1024:
        lens.append(int(rng.integers(100, 1025)))
    lens.append(16384 - sum(lens))
    prefill = make_step(engine, lens, lens, rng)
    with torch.inference_mode():
        print(f"decode, eager: {ms_per_call(lambda: runner.forward_eager(decode)):.3f} ms")
        graph = torch.cuda.CUDAGraph()
        runner.forward_eager(decode)
        with torch.cuda.graph(graph):
            runner.forward_eager(decode)
        print(f"decode, CUDA graph: {ms_per_call(graph.replay):.3f} ms")
        print(f"prefill of {len(lens)} prompts: {ms_per_call(lambda: runner.forward_eager(prefill), 5):.3f} ms")
        hidden, inter = loaded.model.config.hidden_size, loaded.model.config.intermediate_size
        for m, k, n in [
            (16384, hidden, 2 * inter),
            (16384, inter, hidden),
            (512, hidden, 2 * inter),
            (512, hidden, hidden),
        ]:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            ms = ms_per_call(lambda a=a, b=b: torch.nn.functional.linear(a, b))
            print(f"GEMM {m}x{k}x{n}: {ms:.3f} ms, {2 * m * k * n / ms / 1e9:.0f} TFLOP/s")
        for name, step, n in (("decode", decode, 5), ("prefill", prefill, 3)):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    runner.forward_eager(step)
                torch.cuda.synchronize()
            events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
            print(f"== {name} step: {sum(e.self_device_time_total for e in events) / n / 1e3:.3f} ms of kernels")
            for e in events[:20]:
                if e.self_device_time_total > 0:
                    print(f"{e.self_device_time_total / n / 1e3:8.3f} ms {e.count // n:5d}x  {e.key[:100]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "llama-1b")
