"""What serving LoRA adapters costs on the CPU: the chat workload on the base model alone against the same rows
spread evenly over eight random rank-16 adapters (bench's `lora` workload), on one random model of a bench shape,
alternating the two runs so that both see the same machine. Prints wall and CPU seconds per run.

    python scripts/lora_overhead.py --shape smollm2-135m --num-prompts 48 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kvbatch.bench.cli import _warm_up, run_engine
from kvbatch.bench.lora import random_adapters
from kvbatch.bench.models import random_model
from kvbatch.bench.workloads import LORA_COUNT, make_workload
from kvbatch.runner.engine import Engine, EngineConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    loaded = random_model(args.shape, "cpu", "auto", max_model_len=4096)
    vocab = loaded.model.config.vocab_size
    settings = EngineConfig(max_num_seqs=512, kv_cache_gib=1.0)
    base = Engine(settings, loaded)
    _warm_up(base, "chat", vocab)
    paths = random_adapters(loaded.model, Path(tempfile.mkdtemp(prefix="kvbatch-lora-")), LORA_COUNT, args.rank)
    lora = Engine(settings, loaded, adapters=paths)
    _warm_up(lora, "lora", vocab)
    runs = {
        "chat": (base, make_workload("chat", vocab, args.num_prompts)),
        "lora": (lora, make_workload("lora", vocab, args.num_prompts)),
    }
    for i in range(args.repeats):
        for name, (engine, work) in runs.items():
            result = run_engine(engine, work)
            print(
                json.dumps(
                    {"run": i, "workload": name, **{k: result[k] for k in ("seconds", "cpu_s", "out_tok_s", "steps")}}
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
