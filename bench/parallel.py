"""Tensor- and data-parallel checks and throughput on random models of real shapes (issue: several GPUs).

    python -m kvbatch.bench.parallel check --shape llama-8b --tensor-parallel 2
        greedy token ids of one GPU vs N ranks, same seeded weights (tp_random.py): rows identical, first divergence
    python -m kvbatch.bench.parallel throughput --shape llama-8b --workload a [--tensor-parallel 2] [--data-parallel 2]
        tokens/s of one layout; run it once per layout (1 GPU, TP2, DP2, ...) and compare
    python -m kvbatch.bench.parallel throughput --shape llama-70b --tensor-parallel 8

Data parallel here splits the workload's requests i % N over N processes that each see their own GPUs and
start together after loading; the figure is all output tokens over the slowest process's time.
On the CPU (gloo) the same commands run with --shape tiny, which is how they were checked.
Results print as one JSON object per line (and append to --json), like `kvbatch bench`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from pathlib import Path
from queue import Empty
from typing import Annotated, Any

import torch
import typer

from kvbatch.bench.cli import _one_of, emit_record
from kvbatch.bench.random_weights import RandomLoader
from kvbatch.bench.shapes import SHAPES
from kvbatch.bench.workloads import Workload, make_workload
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import resolve_device
from kvbatch.runner.parallel import tensor_parallel

app = typer.Typer(
    help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
ShapeOpt = Annotated[str, typer.Option(help=f"Model shape: {', '.join(SHAPES)}.", callback=_one_of(tuple(SHAPES)))]
# The workloads this bench's engines can run: lora's rows need adapters and json's a real tokenizer, which it does
# not load, and score generates nothing for its output tokens/s to count.
GENERATING = ("a", "b", "c", "prefix", "chat")
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Append the result lines to this file.")]


def _settings(dtype: str, max_model_len: int, max_num_seqs: int, device: str) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "device": device,
        "cuda_graphs": False,
    }


def _engine(shape: str, settings: dict[str, Any], tp: int, loader: RandomLoader) -> Engine:
    if tp > 1:
        return tensor_parallel.start_tensor_parallel(f"random:{shape}", settings, tp, loader)
    device = resolve_device(settings["device"])
    loaded = loader(f"random:{shape}", settings, device)
    loader.materialize(loaded.model, device, 0, 1)
    return Engine(EngineConfig(model=f"random:{shape}", **settings), loaded)


def _generate(engine: Engine, work: Workload) -> tuple[dict[Any, list[int]], float]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    started = time.perf_counter()
    tokens = {r.request_id: r.completions[0].token_ids if r.completions else [] for r in engine.generate(work.requests)}
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return tokens, time.perf_counter() - started


def _close(engine: Engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@app.command()
def check(
    shape: ShapeOpt = "llama-8b",
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel", min=2)] = 2,
    num_prompts: Annotated[int, typer.Option(min=1)] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    dtype: Annotated[str, typer.Option(help="float32 gives the fewest near-ties between logits.")] = "float32",
    init_std: Annotated[
        float, typer.Option(help="Weight std: larger means more peaked logits, fewer near-ties.")
    ] = 0.05,
    device: Annotated[str, typer.Option()] = "auto",
    json_path: JsonOpt = None,
) -> None:
    """Greedy token ids with tensor parallel against one device, same weights: how many rows are identical."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loader = RandomLoader(std=init_std)
    work = make_workload("chat", 1 << 30, num_prompts)  # short prompts; vocab clipped below
    settings = _settings(dtype, 4096, num_prompts, device)
    single = _engine(shape, settings, 1, loader)
    vocab = single.model.config.vocab_size
    work = Workload(
        work.name,
        [
            dataclasses.replace(
                r,
                prompt_token_ids=[t % vocab for t in r.prompt_token_ids],
                sampling=dataclasses.replace(r.sampling, max_new_tokens=max_new_tokens),
            )
            for r in work.requests
        ],
    )
    expected, _ = _generate(single, work)
    _close(single)
    del single
    engine = _engine(shape, settings, tensor_parallel_size, loader)
    try:
        got, _ = _generate(engine, work)
    finally:
        tensor_parallel.shutdown()
    diverge = {
        rid: next((i for i, (a, b) in enumerate(zip(expected[rid], got[rid])) if a != b), None) for rid in expected
    }
    different = {rid: at for rid, at in diverge.items() if at is not None or len(expected[rid]) != len(got[rid])}
    emit_record(
        {
            "check": "tensor_parallel",
            "shape": shape,
            "tensor_parallel": tensor_parallel_size,
            "dtype": dtype,
            "init_std": init_std,
            "rows": len(expected),
            "rows_identical": len(expected) - len(different),
            "tokens_per_row": max_new_tokens,
            "first_divergence": sorted(different.values(), key=lambda v: -1 if v is None else v)[:10],
        },
        json_path,
    )


@app.command()
def throughput(
    shape: ShapeOpt = "llama-8b",
    workload: Annotated[
        str, typer.Option(help=f"{', '.join(GENERATING)} (bench/workloads.py).", callback=_one_of(GENERATING))
    ] = "a",
    num_prompts: Annotated[int | None, typer.Option(min=1)] = None,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel", min=1)] = 1,
    data_parallel_size: Annotated[int, typer.Option("--data-parallel", min=1)] = 1,
    dtype: Annotated[str, typer.Option()] = "auto",
    max_num_seqs: Annotated[int, typer.Option(min=1)] = 512,
    device: Annotated[str, typer.Option()] = "auto",
    json_path: JsonOpt = None,
) -> None:
    """Output and total tokens/s of one layout (data-parallel processes x tensor-parallel ranks)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = make_workload(workload, SHAPES[shape]["vocab_size"], num_prompts)
    settings = _settings(dtype, max(4096, work.max_seq_len), max_num_seqs, device)
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(data_parallel_size), ctx.Queue()
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count())))).split(",")
    procs = []
    for i in range(data_parallel_size):
        share = Workload(work.name, work.requests[i::data_parallel_size])
        visible = (
            ",".join(gpus[i * tensor_parallel_size : (i + 1) * tensor_parallel_size])
            if torch.cuda.is_available()
            else ""
        )
        env = {"CUDA_VISIBLE_DEVICES": visible} if visible else {}
        threads = max(1, (os.cpu_count() or 1) // data_parallel_size)
        procs.append(
            ctx.Process(
                target=_run_share, args=(shape, settings, tensor_parallel_size, share, barrier, queue, env, threads)
            )
        )
        procs[-1].start()
    results = _collect(queue, procs, barrier)
    for proc in procs:
        proc.join()
    seconds = max(r["seconds"] for r in results)
    out_tokens = sum(r["out_tokens"] for r in results)
    emit_record(
        {
            "shape": shape,
            "workload": work.describe(),
            "data_parallel": data_parallel_size,
            "tensor_parallel": tensor_parallel_size,
            "gpus": data_parallel_size * tensor_parallel_size if torch.cuda.is_available() else 0,
            "dtype": results[0]["dtype"],
            "device": results[0]["device"],
            "seconds": round(seconds, 3),
            "out_tokens": out_tokens,
            "out_tok_s": round(out_tokens / seconds, 1),
            "total_tok_s": round((work.num_prompt_tokens + out_tokens) / seconds, 1),
            "setup_s": max(r["setup_s"] for r in results),
        },
        json_path,
    )


def _collect(queue: Any, procs: list[Any], barrier: Any) -> list[dict]:
    """Each process's result; if one dies first (an OOM, a bad option), stop the others and say which, instead of
    waiting on the queue (and the healthy ones at the barrier) for ever."""
    results: list[dict] = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=2.0))
        except Empty:
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                barrier.abort()
                for proc in procs:
                    proc.join(timeout=10)
                    if proc.is_alive():
                        proc.kill()
                raise SystemExit(
                    f"parallel_bench: process {failed[0].name} exited with code {failed[0].exitcode} (its error is "
                    "above)"
                ) from None
    return results


def _run_share(
    shape: str, settings: dict, tp: int, work: Workload, barrier: Any, queue: Any, env: dict[str, str], threads: int
) -> None:
    os.environ.update(env)  # before CUDA starts in this fresh process
    torch.set_num_threads(threads)  # CPU runs: the processes share the cores
    started = time.perf_counter()
    engine = _engine(shape, settings, tp, RandomLoader())
    warm = Workload(
        "warm-up", [dataclasses.replace(r, request_id=("warm", i)) for i, r in enumerate(work.requests[:4])]
    )
    _generate(engine, warm)
    setup_s = time.perf_counter() - started
    barrier.wait()  # every process starts generating at the same moment
    tokens, seconds = _generate(engine, work)
    queue.put(
        {
            "seconds": seconds,
            "out_tokens": sum(len(t) for t in tokens.values()),
            "setup_s": round(setup_s, 1),
            "dtype": str(engine.loaded.dtype).removeprefix("torch."),
            "device": str(engine.device),
        }
    )
    tensor_parallel.shutdown()


if __name__ == "__main__":
    app()
