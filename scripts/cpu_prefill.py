"""CPU prefill of one long prompt: kvbatch's engine against transformers' own forward on the same weights.

    python scripts/cpu_prefill.py                    # the default model, a 5,043-token prompt, 2 rounds
    python scripts/cpu_prefill.py --tokens 2048 --rounds 3

Each round times the engine (one request, max_new_tokens 1: the prefill and one sampled token, chunked by the
CPU's default max_num_batched_tokens of 4,096) and then transformers' forward (sdpa attention, float32,
logits of the last position only); rounds alternate so both meet the same machine load. Prints every time and
the best of each. Not part of the test suite; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import load_model, source_kwargs
from kvbatch.runner.request import GenerationRequest, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5043)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="cpu", help="the engine's attention backend: cpu or torch")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    loaded = load_model("default", device="cpu")
    source, kwargs = source_kwargs("default", False)
    reference = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="sdpa", **kwargs
    ).eval()
    rng = random.Random(0)
    prompt = [rng.randrange(100, 40000) for _ in range(args.tokens)]
    engine_s, reference_s = [], []
    for round_ in range(args.rounds):
        engine = Engine.from_loaded(
            loaded, EngineConfig(device="cpu", prefix_cache=False, attention_backend=args.backend)
        )
        start = time.perf_counter()
        result = next(iter(engine.generate([GenerationRequest(round_, prompt, SamplingParams(max_new_tokens=1))])))
        engine_s.append(time.perf_counter() - start)
        with torch.inference_mode():
            start = time.perf_counter()
            logits = reference(torch.tensor([prompt]), logits_to_keep=1).logits
            reference_s.append(time.perf_counter() - start)
        tokens = (result.completions[0].token_ids[0], int(logits[0, -1].argmax()))
        print(f"round {round_}: engine {engine_s[-1]:.1f} s, transformers {reference_s[-1]:.1f} s, tokens {tokens}")
    best = f"engine {min(engine_s):.1f} s, transformers {min(reference_s):.1f} s"
    print(f"{args.tokens} tokens, best of {args.rounds}: {best}")


if __name__ == "__main__":
    main()
