"""Soak: many short prompts through one engine and the crash-safe writer on the CPU, watching for slow leaks.

    python scripts/soak.py                    # 10,000 prompts, a tiny random Llama, report every 1,000 rows
    nice python scripts/soak.py --rows 2000   # a quicker look

Every `--every` rows it prints resident memory (RSS), the KV pool's free blocks and the throughput of that slice;
at the end it checks that the pool is whole again (every block free, invariants hold) and that the output holds
each row once, in input order. What to look for: RSS flat after warm-up, the pool full at the end, rows/s not
decaying from slice to slice. Not part of the test suite (about a minute on one CPU core); figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.records import Layout, RowResult
from kvbatch.jobs.writer import OutputWriter
from kvbatch.runner import attention_hook
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import LoadedModel
from kvbatch.runner.request import GenerationRequest, SamplingParams

VOCAB_SIZE = 512
EOS_ID = 1


def tiny_llama(seed: int) -> LoadedModel:
    """A random 2-layer Llama and a word-level tokenizer ("w17" is id 17), built in memory: nothing is downloaded."""
    attention_hook.register()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0,
                         eos_token_id=EOS_ID, pad_token_id=0, initializer_range=0.2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_hook.ATTN_IMPLEMENTATION, dtype=torch.float32).eval()
    vocab = {f"w{i}": i for i in range(2, VOCAB_SIZE)} | {"<s>": 0, "</s>": EOS_ID}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="w2")
    return LoadedModel(model, tokenizer, "tiny-llama (random)", (EOS_ID,), 512, torch.device("cpu"), torch.float32)


def requests(num_rows: int, seed: int):
    """Short prompts (2-16 tokens), 4-24 new tokens, a third of them sampled with a seed, the rest greedy."""
    rng = random.Random(seed)
    for row in range(num_rows):
        prompt = [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randrange(2, 17))]
        sampled = rng.random() < 1 / 3
        params = SamplingParams(max_new_tokens=rng.randrange(4, 25), temperature=0.8 if sampled else 0.0, seed=row if sampled else None)
        yield GenerationRequest(row, prompt, params)


def rss_mib() -> float:
    """Resident memory now (not the peak): /proc/self/statm's second field, in pages."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000, help="report every this many rows")
    parser.add_argument("--num-blocks", type=int, default=512, help="KV pool size in blocks of 16 tokens")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine.from_loaded(tiny_llama(args.seed), EngineConfig(device="cpu", num_blocks_override=args.num_blocks,
                                                                    max_num_seqs=args.max_num_seqs, seed=args.seed))  # fmt: skip
    pool = engine.pool
    folder = Path(tempfile.mkdtemp(prefix="kvbatch-soak-"))
    output = folder / "soak.arrow"
    writer = OutputWriter(output, "arrow", Layout(), Manifest("soak", "-", {}, output.name, "arrow"), part_rows=1000)
    print(f"soak: {args.rows} rows, pool {pool.num_blocks} blocks, max_num_seqs {args.max_num_seqs}, "
          f"{args.threads} thread(s), output {output}", flush=True)  # fmt: skip
    print(f"{'rows':>7} {'RSS MiB':>8} {'free blocks':>11} {'rows/s':>7} {'out tok/s':>9} {'errors':>6}", flush=True)

    start = slice_start = time.monotonic()
    slice_tokens = errors = done = 0
    rss = [rss_mib()]
    with writer:
        for result in engine.generate(requests(args.rows, args.seed)):
            errors += result.error is not None
            slice_tokens += result.num_output_tokens
            writer.add(RowResult(result.request_id, texts=[c.text for c in result.completions],
                                 finish_reasons=[c.finish_reason for c in result.completions],
                                 prompt_tokens=result.num_prompt_tokens, output_tokens=result.num_output_tokens))  # fmt: skip
            done += 1
            if done % args.every == 0 or done == args.rows:
                elapsed = time.monotonic() - slice_start
                rss.append(rss_mib())
                rows_in_slice = done % args.every or args.every
                print(f"{done:>7} {rss[-1]:>8.1f} {pool.num_free_blocks:>11} {rows_in_slice / elapsed:>7.1f} "
                      f"{slice_tokens / elapsed:>9.1f} {errors:>6}", flush=True)  # fmt: skip
                slice_start, slice_tokens = time.monotonic(), 0
        report = writer.finalize(args.rows)

    import pyarrow as pa

    rows = pa.ipc.open_file(pa.memory_map(str(output))).read_all().column("row").to_pylist()
    pool.check_invariants()
    whole = pool.num_free_blocks == pool.num_blocks
    in_order = rows == list(range(args.rows))
    print(f"done: {done} rows in {time.monotonic() - start:.1f} s; pool {pool.num_free_blocks}/{pool.num_blocks} blocks free "
          f"({'whole' if whole else 'LEAK'}); output {report.num_rows} rows, {report.num_bytes} bytes, "
          f"{'each row once, in order' if in_order else 'ROWS WRONG'}; RSS first report {rss[1]:.1f} MiB, last {rss[-1]:.1f} MiB, "
          f"growth after warm-up {rss[-1] - rss[min(2, len(rss) - 1)]:+.1f} MiB", flush=True)  # fmt: skip
    return 0 if whole and in_order and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
