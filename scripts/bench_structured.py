"""What a JSON schema costs per output token: the embedded SmolLM2 chat job with and without one.

    .venv/bin/python scripts/bench_structured.py [--prompts 64] [--new-tokens 64] [--repeats 2]

Both runs give every row exactly --new-tokens tokens, so each step has the same rows: unconstrained rows ignore
EOS; constrained rows fill a string that must be longer than the limit ({"answer": "<at least 4000 chars>"}), so
the mask is computed for every row at every step, the worst case for the host. Runs alternate (free,
constrained, free, ...) so a change in machine load falls on both. Prints seconds and ms per output token.
"""

from __future__ import annotations

import argparse
import json
import time

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.structured_outputs import StructuredOutputs

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 4000}}, "required": ["answer"]}
TOPICS = ["the sea", "a compiler", "autumn", "photosynthesis", "a spider", "Brazil", "rainbows", "focus"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # 1 GiB of KV pages holds about 11,000 tokens of SmolLM2: every row of the default run at once.
    engine = Engine(EngineConfig(model="default", seed=0, kv_cache_gib=1.0))
    tokenizer = engine.tokenizer
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Question {i}: describe {TOPICS[i % len(TOPICS)]} as JSON."}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(args.prompts)
    ]
    free = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    constrained = SamplingParams(
        max_new_tokens=args.new_tokens, structured_outputs=StructuredOutputs.from_schema(SCHEMA)
    )
    figures: dict[str, list[float]] = {"free": [], "json": []}
    for _ in range(args.repeats):
        for name, params in (("free", free), ("json", constrained)):
            requests = [GenerationRequest(i, p, params) for i, p in enumerate(prompts)]
            started = time.perf_counter()
            results = list(engine.generate(requests))
            seconds = time.perf_counter() - started
            tokens = sum(r.num_output_tokens for r in results)
            assert tokens == args.prompts * args.new_tokens, (name, tokens)
            figures[name].append(seconds / tokens * 1000)
            print(json.dumps({"run": name, "seconds": round(seconds, 2), "output_tokens": tokens,
                              "ms_per_token": round(seconds / tokens * 1000, 3)}), flush=True)  # fmt: skip
    free_ms, json_ms = min(figures["free"]), min(figures["json"])
    print(json.dumps({"free_ms_per_token": round(free_ms, 3), "json_ms_per_token": round(json_ms, 3),
                      "overhead": f"{(json_ms / free_ms - 1) * 100:+.1f}%"}))  # fmt: skip


if __name__ == "__main__":
    main()
