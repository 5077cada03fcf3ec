"""Soak: many short prompts through one engine and the crash-safe writer on the CPU, watching for slow leaks.

    python scripts/soak.py                    # 10,000 prompts, a tiny random Llama, report every 1,000 rows
    nice python scripts/soak.py --rows 2000   # a quicker look
    python scripts/soak.py --job 2>/dev/null  # the whole job path: JSONL reader, tokenizer, engine, writer

Every `--every` rows it prints resident memory (RSS), the KV pool's free blocks and the throughput of that slice;
at the end it checks that the pool is whole again (every block free, invariants hold) and that the output holds
each row once, in input order. What to look for: RSS flat after warm-up, the pool full at the end, rows/s not
decaying from slice to slice. Not part of the test suite (about a minute on one CPU core); figures go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.records import Layout, RowResult
from kvbatch.jobs.writer import OutputWriter
from kvbatch.runner import attention_hook
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.cpu_linear import use_onednn_linears
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import LoadedModel
from kvbatch.runner.request import GenerationRequest

VOCAB_SIZE = 512
EOS_ID = 1


def tiny_llama(seed: int) -> LoadedModel:
    """A random 2-layer Llama and a word-level tokenizer ("w17" is id 17), built in memory: nothing is downloaded."""
    attention_hook.register()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        initializer_range=0.2,
    )
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attention_hook.ATTN_IMPLEMENTATION, dtype=torch.float32
    ).eval()
    use_onednn_linears(model)  # as load_model does for a float32 CPU model: its kernels and their caches
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
        params = SamplingParams(
            max_new_tokens=rng.randrange(4, 25), temperature=0.8 if sampled else 0.0, seed=row if sampled else None
        )
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
    parser.add_argument("--job", action="store_true", help="run the rows as a kvbatch job (JSONL in, Arrow out)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine.from_loaded(
        tiny_llama(args.seed),
        EngineConfig(device="cpu", num_blocks_override=args.num_blocks, max_num_seqs=args.max_num_seqs, seed=args.seed),
    )
    if args.job:
        return soak_job(engine, args)
    pool = engine.pool
    folder = Path(tempfile.mkdtemp(prefix="kvbatch-soak-"))
    output = folder / "soak.arrow"
    writer = OutputWriter(output, "arrow", Layout(), Manifest("soak", "-", {}, output.name, "arrow"), part_rows=1000)
    print(
        f"soak: {args.rows} rows, pool {pool.num_blocks} blocks, max_num_seqs {args.max_num_seqs}, "
        f"{args.threads} thread(s), output {output}",
        flush=True,
    )
    reporter = Reporter(pool, args.every)
    errors = 0
    with writer:
        for result in engine.generate(requests(args.rows, args.seed)):
            errors += result.error is not None
            writer.add(
                RowResult(
                    result.request_id,
                    texts=[c.text for c in result.completions],
                    finish_reasons=[c.finish_reason for c in result.completions],
                    prompt_tokens=result.num_prompt_tokens,
                    output_tokens=result.num_output_tokens,
                )
            )
            reporter.count(result.num_output_tokens, last=reporter.done + 1 == args.rows)
        report = writer.finalize(args.rows)

    rows = read_arrow(Path(output)).column("row").to_pylist()
    pool.check_invariants()
    whole = pool.num_free_blocks == pool.num_blocks
    in_order = rows == list(range(args.rows))
    rss = reporter.rss
    print(
        f"done: {reporter.done} rows ({errors} errors) in {time.monotonic() - reporter.start:.1f} s; pool "
        f"{pool.num_free_blocks}/{pool.num_blocks} "
        f"blocks free ({'whole' if whole else 'LEAK'}); output {report.num_rows} rows, {report.num_bytes} bytes, "
        f"{'each row once, in order' if in_order else 'ROWS WRONG'}; RSS first report {rss[0]:.1f} MiB, last "
        f"{rss[-1]:.1f} MiB, "
        f"growth after warm-up (from the 2nd report) {rss[-1] - rss[min(1, len(rss) - 1)]:+.1f} MiB",
        flush=True,
    )
    return 0 if whole and in_order and errors == 0 else 1


class Reporter:
    """Prints one line per `every` results: RSS, free blocks, rows/s and output tokens/s of that slice."""

    def __init__(self, pool, every: int) -> None:
        self.pool, self.every = pool, every
        self.done = self.tokens = 0
        self.start = self.slice_start = time.monotonic()
        self.rss: list[float] = []
        print(f"{'rows':>7} {'RSS MiB':>8} {'free blocks':>11} {'rows/s':>7} {'out tok/s':>9}", flush=True)

    def count(self, num_output_tokens: int, last: bool = False) -> None:
        self.done += 1
        self.tokens += num_output_tokens
        if self.done % self.every == 0 or last:
            elapsed = time.monotonic() - self.slice_start
            self.rss.append(rss_mib())
            rows = self.done % self.every or self.every
            print(
                f"{self.done:>7} {self.rss[-1]:>8.1f} {self.pool.num_free_blocks:>11} {rows / elapsed:>7.1f} "
                f"{self.tokens / elapsed:>9.1f}",
                flush=True,
            )
            self.slice_start, self.tokens = time.monotonic(), 0


def soak_job(engine: Engine, args: argparse.Namespace) -> int:
    """The same rows as a job: the reader, prompt building, tokenizer, engine and crash-safe writer all soak."""
    from kvbatch.jobs.runners import run_jobs
    from kvbatch.jobs.spec import job_from_dict

    folder = Path(tempfile.mkdtemp(prefix="kvbatch-soak-job-"))
    with open(folder / "in.jsonl", "w") as f:
        for request in requests(args.rows, args.seed):
            f.write(
                json.dumps({"id": request.request_id, "prompt": " ".join(f"w{t}" for t in request.prompt_token_ids)})
                + "\n"
            )
    reporter = Reporter(engine.pool, args.every)
    generate = engine.generate

    def counted(stream, **options):  # the job passes generate its own options (on_step): passed on unchanged
        for result in generate(stream, **options):
            reporter.count(result.num_output_tokens, last=reporter.done + 1 == args.rows)
            yield result

    engine.generate = counted  # type: ignore[method-assign]
    spec = job_from_dict(
        {
            "name": "soak",
            "input": {"path": "in.jsonl"},
            "id_column": "id",
            "prompt": {"chat_template": False},
            "sampling": {"max_new_tokens": 16},
            "output": {"path": "soak.arrow"},
        },
        base_dir=str(folder),
    )
    print(
        f"soak (job): {args.rows} rows, pool {engine.pool.num_blocks} blocks, output {folder / 'out' / 'soak.arrow'}",
        flush=True,
    )
    outcome = run_jobs([spec], engine_factory=lambda model, settings: engine)[0]
    if outcome.error is not None:
        print(f"job failed: {outcome.error}")
        return 1
    rows = read_arrow(Path(folder / "out" / "soak.arrow")).column("row").to_pylist()
    engine.pool.check_invariants()
    whole = engine.pool.num_free_blocks == engine.pool.num_blocks
    in_order = rows == list(range(args.rows))
    print(
        f"done: {outcome.summary.rows} rows ({outcome.summary.rows_error} errors) in "
        f"{time.monotonic() - reporter.start:.1f} s; "
        f"pool {engine.pool.num_free_blocks}/{engine.pool.num_blocks} blocks free ({'whole' if whole else 'LEAK'}); "
        f"{'each row once, in order' if in_order else 'ROWS WRONG'}; RSS first report {reporter.rss[0]:.1f} MiB, "
        f"last {reporter.rss[-1]:.1f} MiB, growth after warm-up (from the 2nd report) "
        f"{reporter.rss[-1] - reporter.rss[min(1, len(reporter.rss) - 1)]:+.1f} MiB",
        flush=True,
    )
    return 0 if whole and in_order and outcome.summary.rows_error == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
