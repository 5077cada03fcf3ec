"""Scoring speed, end to end: lm-eval's simple_evaluate on one multiple-choice task, model `kvbatch` against
lm-eval's `hf` model on the same folder.

    python scripts/bench_scoring.py [--model FOLDER] [--docs 200] [--context-tokens 256] [--choices 4]
                                    [--hf-batch-size 16] [--only kvbatch|hf] [--direct --repeats 2]
                                    [--set FIELD=VALUE ...]   (kvbatch's engine settings, as model_args)

The task is written into a temporary folder from local data (no hub): each document a context of
--context-tokens tokens of common English words and --choices choices of 3-12 words. Times the whole
simple_evaluate call (model load included) for each model, checks both gave the same accuracy and prints a
table row for docs/benchmarks.md. Default model folder: the embedded SmolLM2-135M-Instruct's converted folder.

--direct leaves lm-eval out: the same shapes (random token ids, choices of 8 tokens) scored by kvbatch's engine
and by transformers' forward over prompt + choice in batches of --hf-batch-size with a float32 log_softmax (what
lm-eval's hf model runs), alternating in one process, --repeats times each; prints wall and CPU seconds, the
figures to compare on a machine that other work shares (CPU time counts only this process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or had not but "
    "have one their all been has there more when who will would new two time may after only other some could "
    "first these into year also most people many state over then such such well years city made world because "
    "during under school between three century family part like can government use known while being before "
    "through each house end found called water small river island until both long where music great later "
    "around second area same team name high national since war best local public company north south west east"
).split()

TASK = """task: bench_choice
dataset_path: json
dataset_kwargs: {data_files: {test: DATA}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}]
"""


def write_task(folder: Path, tokenizer, docs: int, context_tokens: int, choices: int) -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(docs):
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words))) < context_tokens:
            words.extend(rng.choice(WORDS) for _ in range(8))
        ids = tokenizer.encode(" ".join(words))[:context_tokens]
        context = tokenizer.decode(ids)
        options = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(choices)]
        rows.append({"context": context, "choices": options, "answer": rng.randrange(choices)})
    data = folder / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_choice.yaml").write_text(TASK.replace("DATA", str(data)))


def run(model: str, model_args: str, folder: Path) -> tuple[float, dict]:
    import lm_eval
    import lm_eval.tasks

    import kvbatch.lm_eval  # noqa: F401 - registers the model

    manager = lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False)
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["bench_choice"], task_manager=manager, bootstrap_iters=0
    )
    return time.perf_counter() - started, out["results"]["bench_choice"]


def direct(
    folder_model: str, docs: int, context_tokens: int, choices: int, batch: int, repeats: int, settings: dict
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kvbatch.runner.config import EngineConfig
    from kvbatch.runner.engine import Engine
    from kvbatch.runner.request import GenerationRequest

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(context_tokens)] for _ in range(docs)]
    conts = [[[rng.randrange(100, 40000) for _ in range(8)] for _ in range(choices)] for _ in range(docs)]
    hf = AutoModelForCausalLM.from_pretrained(folder_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    engine = Engine(EngineConfig(model=folder_model, device="cpu", **settings))

    def run_hf() -> None:
        rows = torch.tensor([p + c[:-1] for p, cs in zip(prompts, conts) for c in cs])
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                torch.log_softmax(hf(rows[i : i + batch]).logits.float(), dim=-1)

    def run_kvbatch() -> None:
        requests = [GenerationRequest(i, p, continuations=cs) for i, (p, cs) in enumerate(zip(prompts, conts))]
        for result in engine.generate(requests):
            assert result.error is None, result.error

    for _ in range(repeats):
        for name, run_once in (("hf", run_hf), ("kvbatch", run_kvbatch)):
            wall, cpu = time.perf_counter(), time.process_time()
            run_once()
            print(f"{name}: wall {time.perf_counter() - wall:.1f} s, cpu {time.process_time() - cpu:.1f} s", flush=True)


def main() -> None:
    from kvbatch.runner.default_model import default_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--only", choices=["kvbatch", "hf"], default=None)
    parser.add_argument("--direct", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="kvbatch's engine: FIELD=VALUE")
    args = parser.parse_args()
    from kvbatch.bench.cli import engine_settings

    settings = engine_settings(args.sets)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    folder_model = args.model or str(default_model_path())
    if args.direct:
        direct(folder_model, args.docs, args.context_tokens, args.choices, args.hf_batch_size, args.repeats, settings)
        return

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder_model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_task(folder, tokenizer, args.docs, args.context_tokens, args.choices)
        runs = {
            "kvbatch": ",".join([f"model={folder_model}", "device=cpu", *args.sets]),
            "hf": f"pretrained={folder_model},device=cpu,dtype=float32,batch_size={args.hf_batch_size}",
        }
        seconds = {}
        for name, model_args in runs.items():
            if args.only and name != args.only:
                continue
            seconds[name], results = run(name, model_args, folder)
            print(f"{name}: {seconds[name]:.1f} s, acc {results['acc,none']:.4f}", flush=True)
        if len(seconds) == 2:
            print(f"kvbatch is {seconds['hf'] / seconds['kvbatch']:.2f}x faster than hf (batch {args.hf_batch_size})")


if __name__ == "__main__":
    main()
