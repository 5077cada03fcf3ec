"""`kvbatch bench`: throughput on random models of real shapes, the peers beside it, kernels, and GPU-vs-reference.

Results print as one JSON object per line (and go to --json), so docs/benchmarks.md can quote them with the
command that made them. Nothing here asserts a speed: the figures are read, not tested.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from kvbatch.bench.shapes import SHAPES
from kvbatch.bench.workloads import WORKLOADS, Workload, make_workload, relabelled

if TYPE_CHECKING:  # torch, transformers and the engine load when a bench command runs, not with the CLI
    import torch

    from kvbatch.runner.engine import Engine

bench_app = typer.Typer(
    help="Benchmarks on random models of real shapes (see docs/benchmarks.md).", no_args_is_help=True
)


def _clean_errors(command):
    """The command, with what kvbatch refuses (a device, dtype or model the bench cannot use: a KvbatchError) or the
    system refuses (a file it cannot read or write) ending it with the message and its exit code, as kvbatch's
    other commands end, not a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from kvbatch.errors import KvbatchError, exit_code_of

        try:
            return command(*args, **kwargs)
        except (KvbatchError, OSError) as exc:
            typer.echo(f"kvbatch: error: {exc}", err=True)
            raise typer.Exit(exit_code_of(exc) if isinstance(exc, KvbatchError) else 1) from None

    return run


def _one_of(choices: tuple[str, ...]):
    """An option callback: a value outside `choices` is a usage error (exit 2), not a traceback."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:  # None: an optional option left out
            raise typer.BadParameter(f"{value!r} is none of {', '.join(choices)}")
        return value

    return check


def _output_file(path: Path | None) -> Path | None:
    """An option callback for a file the bench writes after its run (--json, --trace): one in a folder that does not
    exist, or a folder itself, is a usage error (exit 2) before the run, not an OSError (exit 1) after all of it."""
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise typer.BadParameter(f"{path} is a folder" if path.is_dir() else f"its folder {path.parent} does not exist")
    return path


ShapeOpt = Annotated[str, typer.Option(help=f"Model shape: {', '.join(SHAPES)}.", callback=_one_of(tuple(SHAPES)))]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda ...")]
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="Append the result lines to this file.", callback=_output_file)
]


# Where a benchmark's engine differs from EngineConfig's defaults: every workload's prompts may run at once.
BENCH_ENGINE_DEFAULTS: dict[str, Any] = {"max_num_seqs": 512, "block_size": 16}


def engine_settings(sets: list[str]) -> dict[str, Any]:
    """`--set FIELD=VALUE` engine settings, each checked against EngineConfig's own declaration."""
    from kvbatch.runner.config import EngineConfig, rule_violation, type_violation

    fields = {f.name: f for f in dataclasses.fields(EngineConfig) if f.name != "model"}
    hints = typing.get_type_hints(EngineConfig)
    settings = {}
    for item in sets:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise typer.BadParameter(
                f"expected FIELD=VALUE with an engine field, got {item!r}{hint}", param_hint="--set"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: a date such as 2001-02-30
            raise typer.BadParameter(f"{name}: {raw!r} is not a YAML value ({exc})", param_hint="--set") from None
        if isinstance(value, int) and not isinstance(value, bool) and hints[name] in (float, float | None):
            value = float(value)
        problem = type_violation(hints[name], value) or rule_violation(value, fields[name].metadata)
        if problem:
            raise typer.BadParameter(f"{name} {problem}", param_hint="--set")
        settings[name] = value
    return settings


def emit_record(record: dict[str, Any], json_path: Path | None) -> None:
    line = json.dumps(record)
    typer.echo(line)
    if json_path is not None:
        with open(json_path, "a") as f:
            f.write(line + "\n")


def _device_name(device: torch.device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(engine: Engine, workload: Workload) -> dict[str, Any]:
    """Time one pass of the workload through the engine; counts come from the results, not the workload."""
    before = dataclasses.replace(engine.stats)
    # The counts are deltas, but a peak has none: the engine's starts again for this run (else a run smaller than
    # the warm-up before it shows the warm-up's) and gets the earlier runs' back after, as a job's does.
    engine.stats.peak_kv_usage = 0.0
    _sync(engine.device)
    started, cpu_started = time.perf_counter(), time.process_time()
    out_tokens = errors = 0
    try:
        for result in engine.generate(workload.requests):
            out_tokens += result.num_output_tokens
            errors += result.error is not None
        _sync(engine.device)
    finally:
        peak_kv_usage = engine.stats.peak_kv_usage
        engine.stats.peak_kv_usage = max(before.peak_kv_usage, peak_kv_usage)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started  # this process's CPU time: the work, on a busy shared machine
    queried = engine.stats.num_queried_prompt_tokens - before.num_queried_prompt_tokens
    cached = engine.stats.num_cached_prompt_tokens - before.num_cached_prompt_tokens
    return {
        "seconds": round(seconds, 3),
        "cpu_s": round(cpu_seconds, 3),
        "rows": len(workload.requests),
        "errors": errors,
        "in_tokens": workload.num_prompt_tokens,
        "out_tokens": out_tokens,
        "out_tok_s": round(out_tokens / seconds, 1),
        "total_tok_s": round((workload.num_prompt_tokens + out_tokens) / seconds, 1),
        "steps": engine.stats.num_steps - before.num_steps,
        "steps_ahead": engine.stats.num_steps_ahead - before.num_steps_ahead,
        "spare_tokens": engine.stats.num_spare_tokens - before.num_spare_tokens,
        "preemptions": engine.stats.num_preemptions - before.num_preemptions,
        "peak_kv_usage": round(peak_kv_usage, 3),
        "prefix_hit_rate": round(cached / queried, 3) if queried else None,
        # Low on a GPU: the host, not the device, set the pace (the device sat idle between steps).
        "host_wait_share": round((engine.stats.host_wait_s - before.host_wait_s) / seconds, 3),
    }


def _warm_up(engine: Engine, workload: str, vocab_size: int) -> None:
    """Compile the kernels outside the timed run with 8 rows of the same kind, drawn from another seed so that
    none of their blocks (a shared system prompt included) is in the prefix cache when the timing starts."""
    rows = make_workload(workload, vocab_size, num_prompts=8, seed=1).requests
    run_engine(
        engine, Workload("warm-up", [dataclasses.replace(r, request_id=("warm", i)) for i, r in enumerate(rows)])
    )


@bench_app.command()
@_clean_errors
def throughput(
    shape: ShapeOpt = "llama-1b",
    workload: Annotated[
        str, typer.Option(help=f"{', '.join(WORKLOADS)} (bench/workloads.py).", callback=_one_of(WORKLOADS))
    ] = "a",
    num_prompts: Annotated[int | None, typer.Option(min=1, help="Override the workload's prompt count.")] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="'hf': also run transformers generate (padded batches) and generate_batch.",
            callback=_one_of(("hf",)),
        ),
    ] = None,
    hf_batch_size: Annotated[int, typer.Option(min=1, help="Batch size of the padded generate peer.")] = 64,
    hf_num_prompts: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Run the peers on the first N prompts only (their tok/s barely depends on N; saves device time).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16, float32.")] = "auto",
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="A model folder whose tokenizer the random model uses; 'default': the default model's. "
            "Structured output needs one (--workload json defaults to 'default')."
        ),
    ] = None,
    kv_pool_tokens: Annotated[
        int | None, typer.Option(min=1, help="Cap the KV pool at this many tokens (workload c).")
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="An engine setting, FIELD=VALUE (docs/job-file.md, engine:), e.g. --set prefix_cache=false. "
            f"The bench's own defaults: {', '.join(f'{k}={v}' for k, v in BENCH_ENGINE_DEFAULTS.items())}.",
        ),
    ] = None,
    profile: Annotated[
        bool, typer.Option(help="Then run again under torch.profiler: device time by phase and kernel kind.")
    ] = False,
    trace: Annotated[
        Path | None, typer.Option(help="With --profile: write the gzipped chrome trace here.", callback=_output_file)
    ] = None,
    timing: Annotated[
        bool, typer.Option(help="Time each engine phase (synchronising around each; slower overall).")
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """Output and total tokens/s of kvbatch on a workload, the share of the roofline, and the peers (--compare hf)."""
    import torch

    from kvbatch.bench.bound import workload_bound
    from kvbatch.bench.models import num_params, random_model
    from kvbatch.runner.engine import Engine, EngineConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    needed = make_workload(workload, SHAPES[shape]["vocab_size"], num_prompts).max_seq_len
    if compare and workload == "score":
        raise typer.BadParameter(
            "the peers generate; --compare does not run a scoring workload", param_hint="--compare"
        )
    # An option of another's run, alone: it would be dropped without a word after the whole run.
    if trace is not None and not profile:
        raise typer.BadParameter("--trace keeps the trace of --profile's run: add --profile", param_hint="--trace")
    if hf_num_prompts is not None and compare is None:
        raise typer.BadParameter(
            "--hf-num-prompts picks the rows of --compare hf's peers: add --compare hf", param_hint="--hf-num-prompts"
        )
    if tokenizer is None and workload == "json":
        tokenizer = "default"
    if tokenizer == "default":
        from kvbatch.runner.default_model import default_model_path

        tokenizer = str(default_model_path())
    loaded = random_model(shape, device, dtype, max_model_len=max(4096, needed), tokenizer=tokenizer)
    work = make_workload(workload, loaded.model.config.vocab_size, num_prompts)
    settings = {**BENCH_ENGINE_DEFAULTS, **engine_settings(sets or [])}
    if kv_pool_tokens:
        settings["num_blocks_override"] = -(-kv_pool_tokens // settings["block_size"])
    started = time.perf_counter()
    adapters = None
    if workload == "lora":  # random adapters of rank 16 on every projection, one per LORA_COUNT rows
        import tempfile

        from kvbatch.bench.lora import random_adapters
        from kvbatch.bench.workloads import LORA_COUNT

        adapters = random_adapters(loaded.model, Path(tempfile.mkdtemp(prefix="kvbatch-lora-")), LORA_COUNT)
    engine = Engine(EngineConfig(**settings), loaded, adapters=adapters)
    _warm_up(engine, workload, loaded.model.config.vocab_size)
    setup_s = time.perf_counter() - started
    base = {
        "shape": shape,
        "params": num_params(loaded.model),
        "workload": work.describe(),
        "device": _device_name(engine.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }
    engine.timer.enabled = timing
    result = run_engine(engine, work)
    if timing:
        result["phases"] = engine.timer.report()
    record = {
        **base,
        "runner": "kvbatch",
        "attention": engine.backend.name,
        "cuda_graphs": engine.uses_cuda_graphs,
        "fused_layers": engine.fused is not None,
        "float32_logits": engine.float32_logits,
        "kv_pool": engine.pool_size.describe(),
        "setup_s": round(setup_s, 1),
        **result,
    }
    bound = workload_bound(loaded.model, loaded.dtype, work, engine.device)
    if bound is not None:
        record.update(bound_s=round(bound.seconds, 3), share_of_bound=round(bound.seconds / result["seconds"], 3))
    emit_record(record, json_path)
    if profile:
        _profile(engine, work, record, json_path, trace)
    if compare == "hf":
        engine.close()
        peer_work = Workload(work.name, work.requests[:hf_num_prompts]) if hf_num_prompts else work
        _compare_hf(
            loaded.model, peer_work, hf_batch_size, {**base, "workload": peer_work.describe()}, result, json_path
        )


def _profile(
    engine: Engine, work: Workload, record: dict[str, Any], json_path: Path | None, trace_path: Path | None
) -> None:
    """Run the workload again (the same lengths in other tokens, so nothing hits the prefix cache) under
    torch.profiler and print where the device time went, by engine phase and kernel kind (bench/breakdown.py); on
    the CPU, which has no kernels to share out, torch's table of its ops by their own time."""
    import gzip
    import tempfile

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from kvbatch.bench.breakdown import breakdown

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    again = relabelled(work, engine.model.config.vocab_size, seed=2)
    with torch_profile(activities=activities) as prof:
        result = run_engine(engine, again)
    if "bound_s" in record:  # the same work, so the same bound, of this run's time
        result["share_of_bound"] = round(record["bound_s"] / result["seconds"], 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
        if trace_path is not None:  # for a closer look (chrome://tracing, Perfetto)
            with gzip.open(trace_path, "wt") as f:
                json.dump({"traceEvents": events}, f)
    table = breakdown(events)
    emit_record({**record, "runner": "kvbatch-profiled", **result, "breakdown": table.as_dict()}, json_path)
    typer.echo(table.table())
    if engine.device.type != "cuda":  # no device kernels to share out: the host's own ops, by their own time
        typer.echo(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def _compare_hf(model, work: Workload, batch_size: int, base: dict, ours: dict, json_path: Path | None) -> None:
    from kvbatch.bench.peers import hf_generate_batch, hf_generate_padded

    for name, run in (
        ("hf-generate-padded", lambda: hf_generate_padded(model, work, batch_size)),
        ("hf-generate_batch", lambda: hf_generate_batch(model, work)),
    ):
        try:
            seconds, out_tokens = run()
        except Exception as exc:  # noqa: BLE001 - a peer that breaks is reported, the other figures stand
            emit_record({**base, "runner": name, "error": f"{type(exc).__name__}: {exc}"[:500]}, json_path)
            continue
        out_tok_s = out_tokens / seconds
        emit_record(
            {
                **base,
                "runner": name,
                "batch": batch_size if "padded" in name else None,
                "seconds": round(seconds, 2),
                "out_tokens": out_tokens,
                "out_tok_s": round(out_tok_s, 1),
                "total_tok_s": round((work.num_prompt_tokens + out_tokens) / seconds, 1),
                "kvbatch_speedup": round(ours["out_tok_s"] / out_tok_s, 2),
            },
            json_path,
        )


@bench_app.command()
def kernels(sweep: Annotated[bool, typer.Option(help="Also time tile and split variants.")] = False) -> None:
    """Triton kernels on the GPU: correctness against the torch reference, decode GB/s at 1k-32k, prefill TFLOP/s."""
    import torch

    from kvbatch.bench.kernels import run_kernel_check
    from kvbatch.errors import ExitCode

    if not torch.cuda.is_available():
        typer.echo(
            "kvbatch: error: bench kernels times the Triton kernels on a CUDA GPU, and none is visible", err=True
        )
        raise typer.Exit(ExitCode.USAGE)  # not 1, which says a kernel is out of tolerance
    ok = run_kernel_check(sweep)
    if not ok:
        raise typer.Exit(1)


def _check_backend_runs_here(name: str) -> None:
    """Refuse kernels that cannot run on this machine before the model is built and the reference runs, which on a
    real shape take far longer than the error they would end in."""
    from kvbatch.cache.backends import BACKEND_NAMES, why_unavailable
    from kvbatch.runner.config import EngineConfig
    from kvbatch.runner.model_loader import resolve_device

    here, block_size = resolve_device("auto"), EngineConfig().block_size  # the device and pages check runs on
    if name not in BACKEND_NAMES:
        problem = f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
    else:
        problem = why_unavailable(name, here, block_size) if name != "auto" else None
    if problem:
        runnable = [n for n in BACKEND_NAMES if n != "auto" and why_unavailable(n, here, block_size) is None]
        raise typer.BadParameter(f"{problem} (here: {', '.join(runnable)})", param_hint="--attention-backend")


@bench_app.command()
@_clean_errors
def check(
    shape: ShapeOpt = "llama-1b",
    model: Annotated[
        str | None,
        typer.Option(
            help="A real model (a folder, a .gguf file or 'default') instead of a random shape; "
            "its prompts come from --prompts."
        ),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="JSONL with a 'prompt' field, sent through the real model's chat template.")
    ] = None,
    attention_backend: Annotated[str, typer.Option(help="The kernels to hold against the torch reference.")] = "triton",
    num_prompts: Annotated[int, typer.Option(min=1)] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    init_std: Annotated[
        float | None, typer.Option(help="Weight init std (random weights give flat logits; larger is sharper).")
    ] = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    float32_logits: Annotated[
        bool | None, typer.Option(help="float32 lm_head output in both runs (off when unset).")
    ] = None,
    fused_layers: Annotated[
        bool | None,
        typer.Option(help="The kernels' run with fused layers on or off (engine default when unset: on for cuda)."),
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Greedy token streams of the GPU kernels against the torch reference path, on one model."""
    from kvbatch.bench.check import chat_prompts, compare_streams, random_prompts
    from kvbatch.bench.models import random_model
    from kvbatch.runner.model_loader import load_model

    if (model is None) != (prompts is None):
        raise typer.BadParameter("--model and --prompts go together: a real model needs real prompts")
    _check_backend_runs_here(attention_backend)
    if model is not None:
        loaded = load_model(model, "auto", dtype, max_model_len=4096)
        token_ids = chat_prompts(loaded.tokenizer, prompts, num_prompts)
    else:
        loaded = random_model(shape, "auto", dtype, max_model_len=4096, init_std=init_std)
        token_ids = random_prompts(loaded.model.config.vocab_size, num_prompts)
    try:
        result = compare_streams(
            loaded,
            attention_backend,
            token_ids,
            max_new_tokens,
            float32_logits=float32_logits,
            fused_layers=fused_layers,
        )
    except Exception as exc:
        if type(exc).__name__ != "BackendUnavailableError":  # the backend cannot run here (triton without a GPU)
            raise
        typer.echo(f"kvbatch: error: {exc}", err=True)
        raise typer.Exit(1) from None
    emit_record(
        {
            "check": model or shape,
            "backend": attention_backend,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "init_std": init_std,
            "float32_logits": result.float32_logits,
            "fused_layers": result.fused_layers,
            "device": _device_name(loaded.device),
            "prompts": result.num_prompts,
            "identical_streams": result.num_identical,
            "reference_vs_itself_identical": result.num_identical_floor,
            "transformers_generate_vs_reference_identical": result.num_identical_transformers,
            "max_new_tokens": max_new_tokens,
            "divergences": result.divergences,
        },
        json_path,
    )
