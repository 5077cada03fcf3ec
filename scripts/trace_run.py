"""A run of workload (a) under torch.profiler: how long the GPU sat idle, and where (GPU only).

    python scripts/trace_run.py [shape] [--out trace.json.gz]

Builds the bench's engine and warm-up, runs workload (a) once under the profiler (fresh prompts: nothing in the
prefix cache), then twice more without it, and prints the run times, the GPU's busy time against the span of its
kernels, and the largest gaps between kernels (length and offset in ms). The Python garbage collector's callbacks
report every collection over 5 ms. With --out, the chrome trace is written gzipped for a closer look.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import tempfile
import time

from torch.profiler import ProfilerActivity, profile

from kvbatch.bench.breakdown import DEVICE_CATS, device_time
from kvbatch.bench.cli import _warm_up, run_engine
from kvbatch.bench.models import random_model
from kvbatch.bench.workloads import make_workload
from kvbatch.runner.engine import Engine, EngineConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shape", nargs="?", default="llama-1b")
    parser.add_argument("--out", help="write the gzipped chrome trace here")
    args = parser.parse_args()
    pauses: list[tuple[int, float]] = []
    started: dict[str, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif time.perf_counter() - started["t"] > 0.005:
            pauses.append((info["generation"], round((time.perf_counter() - started["t"]) * 1e3, 1)))

    gc.callbacks.append(on_gc)
    loaded = random_model(args.shape, "cuda", "bfloat16", max_model_len=4096)
    engine = Engine.from_loaded(loaded, EngineConfig(max_num_seqs=512, block_size=16))
    vocab = loaded.model.config.vocab_size
    _warm_up(engine, "a", vocab)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        print("profiled run", run_engine(engine, make_workload("a", vocab))["seconds"], "s")
    print("GC pauses over 5 ms (generation, ms):", pauses)
    for seed in (2, 3):
        pauses.clear()
        print("later run", run_engine(engine, make_workload("a", vocab, seed=seed))["seconds"], "s; GC pauses:", pauses)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
            device = [e for e in events if e.get("cat") in DEVICE_CATS and e.get("dur", 0) > 0]
            span, busy, gaps = device_time([(e["ts"], e["ts"] + e["dur"]) for e in device])
        if args.out:
            with open(path, "rb") as f, gzip.open(args.out, "wb") as g:
                shutil.copyfileobj(f, g)
    print(f"kernel span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {100 * (1 - busy / span):.1f}%")
    print(
        f"gaps over 0.2 ms: {len(gaps)}, {sum(g for g, _ in gaps) / 1e3:.1f} ms in all; largest (ms, at ms):",
        [(round(g / 1e3, 2), round(t / 1e3, 1)) for g, t in gaps[:20]],
    )


if __name__ == "__main__":
    main()
