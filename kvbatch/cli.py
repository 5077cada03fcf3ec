"""The `kvbatch` command line: thin commands that build job specs and hand them on.

Exit codes (docs/reliability.md): 0 the jobs ran (row errors are counted in the summary), 1 a job failed,
2 bad usage or configuration, 3 interrupted by a signal (rerun to resume), 4 another run holds the output.
Every exception becomes a message and an exit code in `_exit_code`, nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from kvbatch import __version__
from kvbatch.bench.cli import bench_app
from kvbatch.console import ConsoleTyper
from kvbatch.errors import ExitCode, InterruptedJob, KvbatchError, SpecError, exit_code_of
from kvbatch.jobs.run import EngineCache
from kvbatch.jobs.runners import JobOutcome, run_jobs
from kvbatch.jobs.spec import INPUT_EXTENSIONS, NULL, JobSpec, job_from_dict, load_jobs_file
from kvbatch.jobs.yaml_nodes import load_yaml

OK, INTERRUPTED = ExitCode.OK, ExitCode.INTERRUPTED

app = ConsoleTyper(  # the console process: allocator tuned for a batch job, no interpreter teardown at exit
    name="kvbatch",
    help="Offline batch generation for LLMs: YAML jobs over Parquet, JSONL, datasets and OpenAI Batch files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by several commands.
JobsArg = Annotated[Path, typer.Argument(help="The YAML job file.", show_default=False)]
JobOpt = Annotated[list[str] | None, typer.Option("--job", "-j", help="Run only this job (repeatable).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field of every job that runs: --set sampling.temperature=0.7 (repeatable)."),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Model: a local folder, a .gguf file or a cached hub name; default: the embedded SmolLM2-135M-Instruct."
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
LimitOpt = Annotated[int | None, typer.Option(min=0, help="Read at most this many input rows.")]
ModeOpt = Annotated[str | None, typer.Option(help="When the output exists: resume (default), overwrite or error.")]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait", help="Wait for another run on the same output to finish instead of exiting with code 4."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs of kvbatch (and info of the rest).")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress and no warnings: only errors and each job's summary.")
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Run shard I/N only (rows with index % N == I) into NAME.shard-IIII-of-NNNN.EXT; inside a Slurm "
        "array taken from SLURM_ARRAY_TASK_ID/COUNT; 'off' to disable.",
    ),
]
DataParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--data-parallel",
        min=1,
        help="Engine processes on this node, one per GPU (or per --tensor-parallel GPUs; N processes on the CPU), "
        "on disjoint shards, merged at the end.",
    ),
]
TensorParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--tensor-parallel", min=1, help="Processes (GPUs) per engine: attention heads and MLP split across them."
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="Run through Ray Data on this Ray cluster (auto: the running one; local: start one here)."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvbatch {__version__}")
        raise typer.Exit()


# What a signal during a command that runs no job prints before exit 3 (jobs.signals.exit_on_signal). run and
# generate are left out: the start-up handler, whose message says no job ran, holds until their jobs start.
STOPPED_BY_SIGNAL = {
    "plan": "plan stopped by {signal}; it writes nothing: rerun it",
    "inspect": "inspect stopped by {signal}; it writes nothing: rerun it",
    "merge": "merge stopped by {signal}; its sources are untouched and no output is left half-written: rerun the merge",
    "bench": "bench stopped by {signal}; the records printed before it are whole: rerun it for the rest",
}


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """kvbatch: offline batch generation over a paged KV cache."""
    stopped = STOPPED_BY_SIGNAL.get(ctx.invoked_subcommand or "")
    if stopped is not None:
        from kvbatch.jobs.signals import exit_on_signal

        ctx.with_resource(exit_on_signal(stopped))  # until the command returns


@app.command()
def run(
    jobs_file: JobsArg,
    job: JobOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    limit: LimitOpt = None,
    mode: ModeOpt = None,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    data_parallel: DataParallelOpt = None,
    tensor_parallel: TensorParallelOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run the jobs of a YAML job file (see examples/jobs.yaml)."""
    _start_run(verbose, quiet)
    with _errors():
        overrides = _with_options(
            set_,
            {
                "model": model,
                "engine.device": device,
                "input.limit": limit,
                "output.mode": mode,
                "progress": "off" if quiet else None,
                **_scale_overrides(shard, data_parallel, tensor_parallel, ray_address),
            },
        )
        specs = load_jobs_file(jobs_file, overrides, job).select(job)
        _run(specs, wait)


@app.command()
def generate(
    input: Annotated[
        str,
        typer.Argument(
            help=(
                "Input: .jsonl, .parquet, .arrow, a datasets folder, or an OpenAI Batch .jsonl "
                "(with --input-format openai)."
            ),
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output file (.arrow, .parquet, .jsonl) or datasets folder (.hf).",
            show_default=False,
        ),
    ],
    model: ModelOpt = None,
    prompt_column: Annotated[
        str | None, typer.Option(help="Column sent as one user message (default: prompt).")
    ] = None,
    messages_column: Annotated[
        str | None, typer.Option(help="Column holding a list of {role, content} messages.")
    ] = None,
    template: Annotated[str | None, typer.Option(help="Prompt template with {column} placeholders.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    no_chat_template: Annotated[
        bool, typer.Option("--no-chat-template", help="Send raw text, without the model's chat template.")
    ] = False,
    id_column: Annotated[str | None, typer.Option(help="Column copied to the output as the row's id.")] = None,
    keep_column: Annotated[
        list[str] | None, typer.Option(help="Input column copied to the output (repeatable).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Most tokens to generate per row (default: 256).")
    ] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="0 = greedy (default: 0).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (default: 1).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of sampled rows (engine.seed): reproducible, each row its own stream.")
    ] = None,
    limit: LimitOpt = None,
    format: Annotated[
        str | None,
        typer.Option("--format", help="arrow, parquet, jsonl, openai or hf (default: from the output's extension)."),
    ] = None,
    input_format: Annotated[
        str | None, typer.Option(help="auto, jsonl, parquet, arrow, hf or openai (default: auto).")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="The split of a datasets input that has several (input.split).")
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="The configuration of a datasets input that has several (input.config).")
    ] = None,
    device: DeviceOpt = None,
    mode: ModeOpt = None,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    set_: SetOpt = None,
    shard: ShardOpt = None,
    data_parallel: DataParallelOpt = None,
    tensor_parallel: TensorParallelOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run one job without a YAML file; --set reaches every job field (sampling.stop, sampling.n, engine.*...)."""
    _start_run(verbose, quiet)
    with _errors():
        sets = _parse_sets(set_ or [])
        for key, value in sets.items():
            # INPUT and -o always name these: a --set of them would be passed over without a word. So would a
            # whole input or output that is no mapping (`input=other.jsonl`): the options' mapping replaces it.
            whole = key in ("input", "output") and (not isinstance(value, dict) or "path" in value)
            for field in [key, f"{key}.path"] if whole else [key]:
                if field in _GENERATE_FIXED:
                    raise SpecError(_GENERATE_FIXED[field], field=f"--set {field}")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", output.stem).lstrip(".-") or "generate"  # names start with [A-Za-z0-9_]
        input_path = os.path.abspath(input) if _local_input(input, input_format) else input
        data = {
            "name": name,
            "model": model,
            "input": {"path": input_path, "format": input_format, "limit": limit, "split": split, "config": config},
            "prompt": {
                "column": prompt_column,
                "messages_column": messages_column,
                "template": template,
                "system": system,
                "chat_template": False if no_chat_template else None,
            },
            "id_column": id_column,
            "keep_columns": keep_column,
            # --seed is the engine's (as vLLM's): sampling.seed would give every row one stream, the same samples
            "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p},
            "output": {"path": output.name, "format": format, "mode": mode},
            "output_dir": str(output.parent),
            "engine": {"device": device, "seed": seed},
            "progress": "off" if quiet else None,
        }
        scale = _scale_overrides(shard, data_parallel, tensor_parallel, ray_address)
        data["runner"] = scale.pop("runner")
        data["parallel"] = {key.partition(".")[2]: value for key, value in scale.items()}
        # --set fields (sampling.presence_penalty=0.5, prompt.chat_template_kwargs={...}) under the options given
        if "name" in sets:  # the name taken from -o is a default, not an option given
            del data["name"]
        spec = job_from_dict(_drop_none(data), base_dir=os.getcwd(), under=sets)
        _run([spec], wait)


@app.command()
def plan(
    jobs_file: JobsArg,
    job: JobOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    limit: LimitOpt = None,
    verbose: VerboseOpt = False,
    shard: ShardOpt = None,
) -> None:
    """Without generating: token lengths, KV capacity, rows that fit at once, rows that will fail and why (of one
    shard's rows with --shard or in a Slurm array task, as `run` picks them).

    On the CPU only the model's config and tokenizer are read, not its weights. On a GPU (and with tensor
    parallelism) the model is loaded, because the KV pool is sized by profiling a forward pass of it.
    """
    from kvbatch.jobs.plan import plan_job

    _logging(verbose, quiet=False)
    _quiet_model_loading(verbose)
    with _errors():
        overrides = _with_options(
            set_,
            {"model": model, "engine.device": device, "input.limit": limit, "parallel.shard": _shard_option(shard)},
        )
        specs = load_jobs_file(jobs_file, overrides, job).select(job)
        engines = EngineCache()
        engines.plan(specs)  # an engine's adapter slots, and a CPU pool's room, as the run sizes them for its jobs
        codes = [OK]
        for spec in specs:  # a job that fails is reported and the next is planned, as `run` runs it
            try:
                typer.echo(plan_job(spec, engines).format())
            except KvbatchError as exc:
                # Named, as `run` names the job that failed: a refusal of the model's (a token id outside its
                # vocabulary, a template setting) says only the field, which several jobs of a file may set.
                message = JobOutcome(spec.name, error=exc).error_message
                typer.echo(f"kvbatch: error: job {spec.name}: {message}", err=True)
                codes.append(exit_code_of(exc))
        if max(codes) != OK:
            raise typer.Exit(max(codes))


@app.command()
def inspect(
    output: Annotated[Path, typer.Argument(help="An output file written by kvbatch.", show_default=False)],
    rows: Annotated[int, typer.Option(min=0, help="How many sample rows to show.")] = 3,
) -> None:
    """Show an output's schema, counts by finish reason and error kind, and a few rows."""
    from kvbatch.jobs.inspect import inspect_output

    with _errors():
        # More rows than any output holds means all of them; past int64 Arrow's slice would overflow
        typer.echo(inspect_output(output, min(rows, 2**63 - 1)).format_text())


@app.command()
def merge(
    target: Annotated[
        Path,
        typer.Argument(
            help="The output to write (out/answers.arrow), or a YAML job file: merge each job's output.",
            show_default=False,
        ),
    ],
    shards: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Shard outputs; default: the NAME.shard-IIII-of-NNNN.EXT files beside the output.", show_default=False
        ),
    ] = None,
    job: Annotated[
        list[str] | None,
        typer.Option("--job", "-j", help="With a job file: merge only this job's output (repeatable)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="With a job file: the run's --set overrides, output_dir included (repeatable)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the output even if another job spec wrote it.")
    ] = False,
) -> None:
    """Join finished shard outputs (or a Ray run's folder of parts) into one output in input order; refuses, with a
    list, if rows are missing or twice."""
    from kvbatch.jobs.merge import merge_shards
    from kvbatch.jobs.merge_parts import merge_parts
    from kvbatch.jobs.spec import output_path, spec_hash
    from kvbatch.jobs.writer import parts_dir

    with _errors():
        if target.suffix in (".yaml", ".yml"):
            if shards:
                raise SpecError(
                    "give shard files only when merging into one output file, not with a job file", field="SHARDS"
                )
            # each job's output, with its spec's hash: a complete output of that spec is merged already
            # the run's --set too: its output_dir or output.path is where the shards are, its spec what they hold
            specs = load_jobs_file(target, _parse_sets(set_ or []), job).select(job)
            outputs = [(output_path(spec), spec_hash(spec)) for spec in specs]
        elif job:  # an output file names no jobs: the option would be ignored
            raise SpecError("--job selects jobs of a job file; this merges the one output file named", field="--job")
        elif set_:
            raise SpecError(
                "--set overrides the jobs of a job file; this merges the one output file named", field="--set"
            )
        else:
            outputs = [(target, None)]
        codes = []
        for output, expected_spec in outputs:  # as `run` goes on after a failed job, a failed merge stops no other
            try:
                if not shards and parts_dir(output).is_dir():  # a Ray run's folder of parts
                    report = merge_parts(output)
                    _say(f"merged {_count(report.num_shards, 'part')} -> {report.output}: {report.num_rows} rows")
                    continue
                report = merge_shards(output, shards or None, overwrite=overwrite, spec_hash=expected_spec)
            except KvbatchError as exc:
                _say(f"kvbatch: error: {exc}", err=True)
                codes.append(exit_code_of(exc))
                continue
            if report.already_merged:
                _say(f"already merged -> {report.output}: {report.num_rows} rows")
                continue
            _say(
                f"merged {_count(report.num_shards, 'shard')} -> {report.output}: {report.num_rows} rows, "
                f"{report.num_bytes} bytes"
            )
        if codes:
            raise typer.Exit(max(codes))


app.add_typer(bench_app, name="bench")  # bench/cli.py: its commands import torch only when they run


# ---- the one place where outcomes and exceptions become messages and exit codes -------------------------


def _run(specs: list[JobSpec], wait: bool) -> None:
    """Run the jobs, printing each job's summary or error as it ends: a log then holds the earlier jobs' summaries
    while a later job runs, and still does if that job is killed."""
    _finish(run_jobs(specs, wait_for_lock=wait, on_outcome=_show))


def _show(outcome: JobOutcome) -> None:
    if outcome.summary is not None:
        _say(outcome.summary.format())  # in NAME.summary.json too, should the console be gone
    else:
        assert outcome.error is not None, "an outcome has a summary or an error"
        ended = "interrupted" if isinstance(outcome.error, InterruptedJob) else "failed"  # exit 3: rerun
        _say(f"kvbatch: job {outcome.job} {ended}: {outcome.error_message}", err=True)


def _say(text: str, err: bool = False) -> None:
    """Print what a job or a merge came to. A console gone (a pipe whose reader exited, a full disk under the log)
    loses the text, not the jobs or merges after this one; the exit code still tells how they went."""
    with contextlib.suppress(OSError):
        typer.echo(text, err=err)


def _finish(outcomes: list[JobOutcome]) -> None:
    codes = [OK, *(exit_code_of(o.error) for o in outcomes if o.error is not None)]
    if max(codes) != OK:
        raise typer.Exit(INTERRUPTED if INTERRUPTED in codes else max(codes))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except (KvbatchError, KeyboardInterrupt) as exc:  # anything else is a bug: it keeps its traceback
        message = str(exc) if isinstance(exc, KvbatchError) else "interrupted; committed rows are kept, rerun to resume"
        typer.echo(f"kvbatch: error: {message}", err=True)
        raise typer.Exit(exit_code_of(exc)) from None


def _with_options(sets: list[str] | None, options: dict[str, Any]) -> dict[str, Any]:
    """`--set` values, overridden by the options given; an option left out leaves its --set value standing."""
    return {**_parse_sets(sets or []), **{k: v for k, v in options.items() if v is not None}}


def _start_run(verbose: bool, quiet: bool) -> None:
    """What `run` and `generate` do before any job: logging, loading quietly, a torchrun worker's own loop."""
    _logging(verbose, quiet)
    _quiet_model_loading(verbose)  # before a worker serves: it loads its share of the checkpoint too
    _serve_if_torchrun_worker()


def _serve_if_torchrun_worker() -> None:
    """Under `torchrun --nproc-per-node N kvbatch run ... --tensor-parallel N`, ranks > 0 serve rank 0's engine."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        from kvbatch.runner.parallel.tensor_parallel import serve_from_env

        serve_from_env()
        raise typer.Exit(OK)


_GENERATE_FIXED = {
    "input.path": "generate reads the INPUT it is given",
    "output.path": "generate writes the file -o names",
    "output_dir": "generate writes the file -o names",
}


def _scale_overrides(
    shard: str | None, data_parallel: int | None, tensor_parallel: int | None, ray_address: str | None
) -> dict[str, Any]:
    """The scaling options as job-field overrides."""
    return {
        "parallel.shard": _shard_option(shard),
        "parallel.data": data_parallel,
        "parallel.tensor": tensor_parallel,
        "parallel.ray_address": ray_address,
        "runner": "ray" if ray_address else None,
    }


def _shard_option(shard: str | None) -> str | None:
    """The shard to run (or plan): --shard, else a Slurm array task's own shard."""
    from kvbatch.jobs.shard import shard_from_env

    if shard is None:
        from_env = shard_from_env(os.environ)
        shard = str(from_env) if from_env is not None else None
    return shard


def _parse_sets(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"expected KEY=VALUE, got {item!r}", field="--set")
        # The job file's own loader: duplicate keys, tags and merge keys are refused here as they are there. A value
        # YAML reads as a comment alone ("###", "# Rules") is meant as that text, not as an empty mapping.
        if not raw.strip():  # a value forgotten; null is written as null
            raise SpecError(f"{item!r} gives no value; leave the field out to keep its default", field="--set")
        if raw.lstrip().startswith("#"):
            value: Any = raw
        else:
            value = load_yaml(raw, f"--set {key.strip()}").plain()
        overrides[key.strip()] = NULL if value is None else value
    return overrides


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        cleaned = {k: _drop_none(v) for k, v in data.items() if v is not None}
        return {k: v for k, v in cleaned.items() if v != {}}
    return data


def _local_input(path: str, input_format: str | None) -> bool:
    """Whether generate's INPUT is a local file or folder, which the spec names by its absolute path, as the model.

    So the spec, and a resume, name one file from any working folder, and still after the input is removed (a rerun
    after a cleanup finds its output complete): a missing path that a file format or extension marks as a file is
    local too. A dataset name in the local HF cache or a URI stays as written."""
    if "://" in path:
        return False
    if os.path.exists(path):
        return True
    return input_format in {*INPUT_EXTENSIONS.values(), "openai"} or Path(path).suffix.lower() in INPUT_EXTENSIONS


def _logging(verbose: bool, quiet: bool) -> None:
    """Warnings by default; -v: kvbatch's debug logs and the other libraries' info; --quiet: errors only."""
    if verbose and quiet:
        raise typer.BadParameter("--verbose and --quiet contradict each other; give one")
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("kvbatch").setLevel(logging.DEBUG)


def _quiet_model_loading(verbose: bool) -> None:
    """Keep transformers' per-tensor "Loading weights" bar, and datasets' bars as it reads a folder of data files,
    out of the job's own progress bar (shown with -v). datasets reads its setting from the environment, which
    data-parallel children and Ray workers inherit; a value the user set stays."""
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported already: it read the environment then
        sys.modules["datasets"].disable_progress_bars()


__all__ = ["app", "JobSpec"]
