"""What a job is: frozen dataclasses loaded from a YAML job file (or built by `kvbatch generate`).

Precedence: command-line overrides > the job's own fields > the file's `defaults:` > the defaults below.
Every field carries its doc; docs/job-file.md is generated from these declarations (jobs/reference.py).
Computed values (resolved paths, output format) are returned by functions here, never written back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import string
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kvbatch.errors import SpecError
from kvbatch.runner.config import EngineConfig, SamplingParams, setting
from kvbatch.runner.request import GenerationEngine
from kvbatch.runner.structured_outputs import ConstraintError, StructuredOutputs

from .compressed import data_suffix
from .constraints import read_schema_files
from .reasoning import template_marks_reasoning
from .schema import build
from .shard import parse_shard
from .yaml_nodes import Node, child_path, from_plain, load_yaml, merge

MIB = 2**20
MAX_INT64 = 2**63 - 1
OUTPUT_EXTENSIONS = {".arrow": "arrow", ".parquet": "parquet", ".jsonl": "jsonl", ".hf": "hf"}
_EXTENSION_OF = {"arrow": ".arrow", "parquet": ".parquet", "jsonl": ".jsonl", "openai": ".jsonl", "hf": ".hf"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class InputSpec:
    """Where the rows come from."""

    path: str = setting(
        doc="a .parquet, .jsonl or .arrow file (a JSON lines file may be compressed: .jsonl.gz, .zst, .bz2, .lz4), "
        "a datasets folder (save_to_disk, or data files as a dataset repository lays them out: "
        "`data/train-00000-of-00002.parquet`), or a dataset name in the local HF cache",
        nonempty=True,
    )
    format: Literal["auto", "jsonl", "parquet", "arrow", "hf", "openai"] = setting(
        "auto", "auto: a folder is hf, a file is read by its extension"
    )
    split: str | None = setting(None, "datasets: which split of a DatasetDict or of a repository folder")
    # The upper bounds are what the readers can pass on (islice, readline, Arrow's int64 batch sizes).
    limit: int | None = setting(
        None, "read at most this many rows (0: an empty output, no model loaded)", min=0, max=MAX_INT64
    )
    max_line_bytes: int = setting(8 * MIB, "JSONL: longer lines become error rows", min=1, max=MAX_INT64 - 1)
    batch_rows: int = setting(1024, "Parquet/datasets: rows per record batch read", min=1, max=MAX_INT64)
    config: str | None = setting(
        None,
        "datasets: which configuration of a dataset in the local HF cache or a repository folder with several "
        "(load_dataset's second argument: cais/mmlu's 'abstract_algebra')",
        nonempty=True,
    )


# Arguments of transformers' apply_chat_template that steer the call rather than fill the template: from a job's
# or a row's chat_template_kwargs they would replace the template (and turn a row's text into control tokens),
# return ids instead of text, or cut the prompt.
TEMPLATE_CALL_ARGUMENTS = frozenset(
    {
        "chat_template", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
        "return_tensors", "return_assistant_tokens_mask", "padding", "truncation", "max_length", "tokenizer_kwargs",
        "conversation", "messages", "sanitize_control_tokens",
    }
)  # fmt: skip


@dataclass(frozen=True)
class PromptSpec:
    """How a row becomes a prompt (set at most one of column, messages_column, template)."""

    column: str | None = setting(None, "one user message per row; unset: column 'prompt'")
    messages_column: str | None = setting(
        None,
        "a list of {role, content} messages per row (objects, structs or maps; JSON text of the list; datasets' "
        "Sequence of fields); their other fields (name, tool_calls, reasoning_content, ...) go to the template too",
    )
    template: str | None = setting(None, "a user message with {column} placeholders: 'Summarise: {text}'")
    system: str | None = setting(
        None, "a system message before the row's messages, unless they start with one (or a developer one)"
    )
    chat_template: bool = setting(
        True, "false: the raw text, no chat template (nor its file, kwargs or tools, which are then refused)"
    )
    allow_special_tokens: bool = setting(
        False, "true: text in rows may become control tokens (unsafe with untrusted data)"
    )
    chat_template_kwargs: dict[str, Any] | None = setting(
        None,
        "passed to the chat template: {enable_thinking: false} for Qwen3-style models; a null value is left out (a "
        "job's `enable_thinking: null` takes away the defaults')",
    )
    chat_template_kwargs_column: str | None = setting(
        None,
        "a column of mappings over chat_template_kwargs, per row (objects, structs, maps or JSON text); a null "
        "value leaves the job's",
    )
    chat_template_file: str | None = setting(None, "a Jinja chat template used instead of the model's (job-relative)")
    continue_final_message: bool = setting(False, "the last message is continued (no generation prompt after it)")
    tools_column: str | None = setting(
        None, "a column of tool definitions (OpenAI's list, or JSON text of one) given to the template"
    )
    split_reasoning: bool | None = setting(
        None, "thinking text (<think>...</think>) to the `reasoning` column; unset: where the template has <think>"
    )

    def __post_init__(self) -> None:
        # A null is the value left out, as in a row's column: passed on, None is false to a template reading
        # `enable_thinking is defined and not enable_thinking`, where leaving it out keeps the template's default.
        if self.chat_template_kwargs is not None:
            values = {k: v for k, v in self.chat_template_kwargs.items() if v is not None}
            object.__setattr__(self, "chat_template_kwargs", values or None)


@dataclass(frozen=True)
class OutputSpec:
    """Where and how results are written."""

    path: str | None = setting(None, "relative to output_dir; unset: '<job name>.arrow'")
    format: Literal["auto", "arrow", "parquet", "jsonl", "openai", "hf"] = setting(
        "auto",
        "auto: from path's extension (another format set must agree with a known extension); hf: a datasets "
        "save_to_disk folder (.hf)",
    )
    mode: Literal["resume", "overwrite", "error"] = setting("resume", "what to do when the output already exists")
    part_rows: int = setting(1024, "rows per committed part", min=1)
    part_seconds: float = setting(60.0, "commit a part at least this often, seconds", gt=0)
    parsed: bool = setting(
        False,
        "a `parsed` column: each row's JSON output as Arrow data typed from sampling.structured_outputs' json "
        "schema (docs/structured-output.md)",
    )


def _engine_section() -> type:
    """The job file's `engine:` section: every EngineConfig field but `model` (the job's own), each optional (left
    out, the engine's default holds, which docs/job-file.md shows), declared once in runner/config.py; plus
    `offline`."""
    hints = typing.get_type_hints(EngineConfig)
    fields = [
        (f.name, hints[f.name] | None, field(default=None, metadata={**f.metadata, "engine_default": f.default}))
        for f in dataclasses.fields(EngineConfig)
        if f.name != "model"
    ]
    offline_doc = "true: never download, whatever allow_download says (as HF_HUB_OFFLINE=1)"
    fields.append(("offline", bool | None, field(default=None, metadata={"doc": offline_doc})))
    return dataclasses.make_dataclass(
        "EngineSpec", fields, frozen=True, namespace={"settings": _engine_settings, "__module__": __name__}
    )


def _engine_settings(self: Any) -> dict[str, Any]:
    """Only the fields that were set, for EngineConfig(**settings); `offline` becomes allow_download=False."""
    settings = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    if settings.pop("offline", False):
        settings["allow_download"] = False
    return settings


EngineSpec = _engine_section()


@dataclass(frozen=True)
class ParallelSpec:
    """How a job is spread over processes and machines (docs/scaling.md). It never changes the results, so it is
    not part of the spec hash: shards and parallel runs of one job resume and merge with each other."""

    shard: str | None = setting(None, "'I/N': only rows with index % N == I; Slurm array tasks set it")
    data: int = setting(1, "engine processes on this node, fed disjoint shards, merged at the end", min=1)
    tensor: int = setting(1, "processes (GPUs) per engine, heads and MLP split across them", min=1)
    ray_address: str | None = setting(None, "runner ray: the cluster for ray.init; unset: the running or a local Ray")
    ray_actors: int = setting(1, "engines in the Ray actor pool", min=1)
    ray_gpus_per_actor: float = setting(0.0, "GPUs per Ray actor; 0 on CPU-only clusters", min=0)
    ray_batch_rows: int = setting(256, "rows per map_batches call", min=1)


@dataclass(frozen=True)
class JobSpec:
    """One job: its input, prompt, sampling, engine and output."""

    name: str = setting(doc="names the job and its default output file", nonempty=True)
    model: str = setting(
        "default", "default (the embedded SmolLM2-135M-Instruct), a folder, a .gguf file, a hub name", nonempty=True
    )
    input: InputSpec = setting(None, "required")  # type: ignore[assignment]  # checked in validate()
    prompt: PromptSpec = field(default_factory=PromptSpec, metadata={"doc": "how a row becomes a prompt"})
    id_column: str | None = setting(
        None, "copied to the output; must be unique (duplicates become error rows)", no_empty_string=True
    )
    keep_columns: tuple[str, ...] = setting((), "input columns copied to the output", no_empty_string=True)
    constraint_column: str | None = setting(
        None, "a column holding each row's structured-output constraint (docs/structured-output.md); null: the job's"
    )
    adapters: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "doc": "LoRA adapters rows may name: name -> PEFT folder (relative to the job file) or cached hub name",
            "nonempty": True,  # an empty path is the job file's own folder
        },
    )
    adapter: str | None = setting(
        None, "every row's LoRA adapter: a name in adapters, a folder or a cached hub name", nonempty=True
    )
    adapter_column: str | None = setting(None, "a column naming each row's adapter (in adapters; null: `adapter`)")
    sampling: SamplingParams = field(default_factory=SamplingParams, metadata={"doc": "how each row is sampled"})
    sampling_columns: tuple[str, ...] = setting(
        (), "columns named like sampling fields: a row's own values (a mapping field's as an object, map or JSON text)"
    )
    sampling_column: str | None = setting(
        None, "a column holding a mapping of sampling fields per row (an object, struct, map or JSON text)"
    )
    output: OutputSpec = field(default_factory=OutputSpec, metadata={"doc": "where results go"})
    output_dir: str = setting("out", "outputs stay inside it; relative to the job file's folder")
    engine: EngineSpec = field(default_factory=EngineSpec, metadata={"doc": "engine settings; unset: its default"})
    sort_window: int = setting(1024, "rows sorted by length within this window; 1 = off", min=1)
    runner: Literal["local", "ray"] = setting("local", "ray: through Ray Data on a Ray cluster (parallel.ray_*)")
    task: Literal["generate", "score", "score_rolling"] = setting(
        "generate",
        "score: each row's continuations are scored after its prompt; score_rolling: each row's text is scored "
        "whole, in windows of the context (lm-eval's loglikelihood_rolling); nothing is generated",
    )
    continuations_column: str = setting(
        "continuations",
        "task score: the column holding each row's continuations (a list of strings, or JSON text of one)",
    )
    parallel: ParallelSpec = field(default_factory=ParallelSpec, metadata={"doc": "shards, processes, Ray"})
    progress: Literal["auto", "bar", "lines", "off"] = setting(
        "auto",
        "auto: a live bar on a terminal that has a width and is not TERM=dumb, else lines (Slurm logs, cron, CI); "
        "off: none (--quiet)",
    )
    progress_seconds: float = setting(30.0, "lines: one progress line at most this often, seconds", gt=0)
    base_dir: str = setting(".", "the job file's folder (set by the loader)", internal=True)
    # The fields whose values the job takes from the file's `defaults:` (dotted, as the loader found them): a value
    # meant for the file's other jobs is passed over where this job does not read it, beyond the load's own checks
    # (a row's sampling_column value, template values for a model without a template).
    from_defaults: tuple[str, ...] = setting((), "fields taken from `defaults:` (set by the loader)", internal=True)
    # Where the job file gave each field (dotted -> "jobs.yaml:7", "command line" for --set), set by the loader: a
    # refusal made once the model is loaded (check_job_on_engine) names the line as the load's do. Not part of the
    # spec: spec_dict leaves it out (an output's spec does not change with the file's layout) and jobs compare
    # without it.
    written_at: tuple[tuple[str, str], ...] = field(
        default=(), compare=False, repr=False, metadata={"doc": "where each field was written", "internal": True}
    )

    def takes_from_defaults(self, name: str) -> bool:
        """Whether field `name` (dotted) has its value from the file's `defaults:`, itself or a mapping above it."""
        return any(name == f or name.startswith(f"{f}.") for f in self.from_defaults)

    def where_written(self, name: str) -> str | None:
        """Where field `name` (dotted) was written, else the nearest mapping above it (a field left at its default,
        a value inside a constraint); None for a job built in Python."""
        written = dict(self.written_at)
        while name:
            if name in written:
                return written[name]
            name = name.rpartition(".")[0]
        return None

    @property
    def is_scoring(self) -> bool:
        """task score or score_rolling: each row gets `scores`, and nothing is generated."""
        return self.task != "generate"


@dataclass(frozen=True)
class JobsFile:
    path: str
    jobs: tuple[JobSpec, ...]

    def select(self, names: list[str] | None) -> list[JobSpec]:
        if not names:
            return list(self.jobs)
        known = {j.name: j for j in self.jobs}
        missing = [n for n in names if n not in known]
        if missing:
            raise SpecError(
                f"no job named {', '.join(map(repr, missing))} in {self.path} (jobs: {', '.join(known)})", field="--job"
            )
        return [known[n] for n in dict.fromkeys(names)]  # `-j a -j a` runs a once, in the order first named


# Settings that are one value however they are spelt: a job's replaces the defaults', --set's the job's, as a row's
# replaces the job's. A constraint (one of json, regex, ..., any JSON under it) merged key by key took the
# defaults' schema properties too, or made two constraints; a logit_bias mapping (a list of pairs replaced) was
# merged into the defaults', which `{}` could not clear.
WHOLE_VALUES = frozenset(
    f.name for f in dataclasses.fields(SamplingParams) if "parse" in f.metadata or f.name == "logit_bias"
)


# The ways a row becomes a prompt (PromptSpec): one choice, so one set later replaces another set before it (a job's
# template the defaults' column), as a whole value does; two set in one place are refused by validate.
PROMPT_SOURCES = ("column", "messages_column", "template")


def over(base: Node, override: Node) -> Node:
    """`override` merged over `base` field by field (merge), WHOLE_VALUES and a prompt source replacing base's."""
    prompt = override.value.get("prompt") if isinstance(override.value, dict) else None
    chosen = prompt is not None and isinstance(prompt.value, dict)
    if chosen and any(k in prompt.value and prompt.value[k].value is not None for k in PROMPT_SOURCES):
        earlier = base.value.get("prompt") if isinstance(base.value, dict) else None
        if earlier is not None and isinstance(earlier.value, dict):
            kept = {k: v for k, v in earlier.value.items() if k not in PROMPT_SOURCES}
            base = dataclasses.replace(base, value={**base.value, "prompt": dataclasses.replace(earlier, value=kept)})
    return merge(base, override, WHOLE_VALUES)


def load_jobs_file(
    path: str | Path, overrides: dict[str, Any] | None = None, select: list[str] | None = None
) -> JobsFile:
    """Read and check a job file. `overrides` (dotted keys -> values) apply, over the file, to the jobs named in
    `select` (--job; None: every job), the jobs that will run; the others are checked as the file writes them (or,
    where that fails, as the overrides complete them)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"job file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read job file {path}: {exc}") from None
    root = load_yaml(text, str(path))
    if not isinstance(root.value, dict):
        raise root.error("a job file is a mapping with `jobs:` (and optionally `defaults:`)")
    for key, node in root.value.items():
        if key not in ("defaults", "jobs"):
            raise node.error("unknown top-level field (expected 'defaults' and 'jobs')")
    jobs_node = root.value.get("jobs")
    if jobs_node is None or not isinstance(jobs_node.value, list) or not jobs_node.value:
        raise (jobs_node or root).error("`jobs:` must be a non-empty list of jobs")
    defaults = root.value.get("defaults", Node({}, "defaults", None, str(path)))
    if not isinstance(defaults.value, dict):
        raise defaults.error("`defaults:` must be a mapping of job fields")
    if "name" in defaults.value:
        raise defaults.value["name"].error("a default cannot set the job name")
    override_node = overrides_to_node(overrides or {})
    if "name" in override_node.value and select:  # --job picks jobs by the names the file gives them
        raise SpecError("cannot rename the jobs --job selects by name", field="name", where="command line")
    # A job file read from a pipe (`kvbatch run /dev/stdin`, `<(...)`) has no folder: its paths, as the command
    # line's, are the working folder's, not /proc/PID/fd's.
    base_dir = str(path.resolve().parent if path.is_file() else Path.cwd())
    jobs = []
    # A --set value a selected job does not read (a temperature on a scoring job beside generating ones) is meant
    # for the others, as a value from `defaults:` is: passed over there, and refused where every job passes it over.
    passed_over: list[tuple[Node, set[str]]] = []

    def build_job(node: Node, passed: set[str] | None = None) -> JobSpec:
        job = job_from_node(node, base_dir=base_dir, passed=passed)
        return dataclasses.replace(job, written_at=tuple(_written_at(node)))

    for job_node in jobs_node.value:
        if not isinstance(job_node.value, dict):
            raise job_node.error("each job must be a mapping with at least `name` and `input`")
        merged = over(defaults, job_node)
        name = job_node.value.get("name")
        if not select or (name is not None and name.value in select):
            passed: set[str] = set()
            job = build_job(over(merged, override_node), passed)
            if passed:  # the job as the file gives it there: its spec (and resume) untouched by values it drops
                job = build_job(over(merged, _without(override_node, passed)))
            jobs.append(job)
            passed_over.append((merged, passed))
            continue
        # --set is meant for the jobs that run: over a job --job left out it could make that job invalid (a
        # temperature on a scoring job) and stop the file. Yet a file may leave to it what every job needs (the
        # input path): such a job is taken as --set completes it, and fails the file only where neither loads.
        try:
            jobs.append(build_job(merged))
        except SpecError:
            if not override_node.value:
                raise
            jobs.append(build_job(over(merged, override_node)))
    if passed_over and set.intersection(*(passed for _, passed in passed_over)):
        # No job that runs reads it: refused as each job refuses its own, naming the field.
        job_from_node(over(next(m for m, passed in passed_over if passed), override_node), base_dir=base_dir)
    names = [j.name for j in jobs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise jobs_node.value[i].value["name"].error(f"duplicate job name {name!r}")
    jobs_file = JobsFile(str(path), tuple(jobs))
    # Only the jobs that run: one that --job left out writes nothing this time, whatever path it names.
    chosen = {job.name for job in jobs_file.select(select)}
    writers: dict[Path, str] = {}
    for i, job in enumerate(jobs):
        if job.name not in chosen:
            continue
        try:
            target = output_path(job)
        except SpecError:  # the job fails on its own, naming its output, when it runs
            continue
        if target in writers:  # the second would refuse to resume the first's output, or overwrite it
            raise jobs_node.value[i].error(f"jobs {writers[target]!r} and {job.name!r} both write {target}")
        writers[target] = job.name
    return jobs_file


def _without(node: Node, fields: set[str], prefix: str = "") -> Node:
    """`node` (--set values) without the dotted `fields`, and without the mappings that leaves empty."""
    if not isinstance(node.value, dict):
        return node
    kept = {}
    for key, child in node.value.items():
        name = child_path(prefix, key)
        if name in fields:
            continue
        pruned = _without(child, fields, name)
        emptied = isinstance(pruned.value, dict) and not pruned.value and bool(child.value)
        if not emptied:
            kept[key] = pruned
    return dataclasses.replace(node, value=kept)


class _Null:
    """An override's value null (`--set sampling.seed=null`), as `seed: null` in the job file; None is an option not
    given. It is how a seed, system prompt or constraint the job file sets is taken away from the command line."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def overrides_to_node(overrides: dict[str, Any]) -> Node:
    """{"sampling.temperature": 0.5} -> a nested Node tree, each value attributed to the command line. A value None is
    not given; NULL sets the field to null."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        if value is NULL:
            value = None
        keys = dotted.split(".")
        target = nested
        for depth, key in enumerate(keys[:-1]):
            target = target.setdefault(key, {})
            if not isinstance(target, dict):  # --set sampling=1 --set sampling.n=2
                raise SpecError(
                    f"is set to {target!r} and cannot also take {'.'.join(keys[depth + 1 :])}",
                    field=".".join(keys[: depth + 1]),
                    where="command line",
                )
        target[keys[-1]] = _set_over(target.get(keys[-1]), value, keys[-1])
    return from_plain(nested, "", "command line")


def _set_over(earlier: Any, value: Any, key: str) -> Any:
    """A later --set over an earlier one, field by field as the command line goes over the job: `--set
    engine.device=cpu --set 'engine={seed: 1}'` keeps the device. Copied, never the caller's own mappings."""
    if isinstance(value, dict) and key not in WHOLE_VALUES:
        base = earlier if isinstance(earlier, dict) else {}
        return {**base, **{k: _set_over(base.get(k), v, k) for k, v in value.items()}}
    return value


def job_from_node(
    node: Node,
    base_dir: str,
    loaded: bool = False,
    from_defaults: list[str] | None = None,
    passed: set[str] | None = None,
) -> JobSpec:
    """`loaded`: `node` is a job that loaded once (spec_dict's values), none of them written by hand, and
    `from_defaults` the fields it took from its file's `defaults:` (None: those `node` shows). `passed`: collects
    the --set fields this job does not read, passed over rather than refused (see load_jobs_file)."""
    _check_home_folders(node)
    read_schema_files(node, base_dir)
    job = build(JobSpec, node)
    given = node.value.get("model") if isinstance(node.value, dict) else None
    in_file = given is not None and given.line is not None  # a --model on the command line is the caller's own
    model = _model_location(job.model, base_dir) if in_file else _callers_model(job.model, base_dir)
    # not found beside the job file ("default" always names the embedded model)
    bare = model == job.model and model != "default" and not Path(model).expanduser().is_absolute()
    if in_file and bare and Path(model).exists() and Path(base_dir).resolve() != Path.cwd():
        # Not beside the job file, but a folder of that name where kvbatch was started: a rerun from elsewhere
        # would load another model under the same spec. Say which is meant.
        raise given.error(
            f"model {model!r} is no folder beside the job file ({Path(base_dir) / model}) but is one in the "
            "working folder; write its path relative to the job file, or an absolute one"
        )
    adapters = {name: _model_location(path, base_dir) for name, path in job.adapters.items()}
    adapter = job.adapter if job.adapter is None or job.adapter in adapters else _model_location(job.adapter, base_dir)
    job = dataclasses.replace(
        job,
        base_dir=base_dir,
        model=model,
        adapters=adapters,
        adapter=adapter,
        from_defaults=tuple(sorted(from_defaults if from_defaults is not None else _from_defaults(node))),
    )
    validate(job, node, loaded, passed)
    return job


# The fields that name files or folders, where `~` and `~user` are read as home folders (`*`: every value of a
# mapping: `adapters` maps names to folders).
HOME_PATHS = (
    ("input", "path"),
    ("output_dir",),
    ("model",),
    ("prompt", "chat_template_file"),
    ("adapter",),
    ("adapters", "*"),
    ("sampling", "structured_outputs", "json"),
)


def _check_home_folders(node: Node) -> None:
    """Refuse, naming file, line and field, a path that starts with a home folder this machine cannot name: `~`
    with HOME unset and no home in the user database, `~user` for no such user. pathlib raises RuntimeError for it
    wherever the path is read, a traceback, not a refusal."""
    for keys in HOME_PATHS:
        for found in _nodes_at(node, keys):
            value = found.value
            if not isinstance(value, str) or not value.startswith("~") or not os.path.expanduser(value)[:1] == "~":
                continue
            user = re.split(r"[/\\]", value[1:], maxsplit=1)[0]
            if user:
                problem = f"starts with the home folder of user {user!r}, whom this machine does not know"
            else:
                problem = "starts with ~, but HOME is unset and the user database gives this user no home folder"
            raise found.error(f"{value!r} {problem}; write the path without ~")


def _nodes_at(node: Node, keys: tuple[str, ...]) -> list[Node]:
    """The nodes under `node` at dotted `keys` (`*`: every key of a mapping)."""
    if not keys:
        return [node]
    if not isinstance(node.value, dict):
        return []
    children = node.value.values() if keys[0] == "*" else [node.value[keys[0]]] if keys[0] in node.value else []
    return [found for child in children for found in _nodes_at(child, keys[1:])]


def _from_defaults(node: Node, prefix: str = "") -> list[str]:
    """The dotted fields of a job's merged node that came from `defaults:` (a mapping's key once, not its keys)."""
    found: list[str] = []
    if isinstance(node.value, dict):
        for key, child in node.value.items():
            name = child_path(prefix, key)
            if child.path.startswith("defaults."):
                found.append(name)
            else:
                found.extend(_from_defaults(child, name))
    return found


def _written_at(node: Node, prefix: str = "") -> list[tuple[str, str]]:
    """Each dotted field of a job's merged node (its mappings' keys, at any depth) with where it was written."""
    found: list[tuple[str, str]] = []
    if isinstance(node.value, dict):
        for key, child in node.value.items():
            name = child_path(prefix, key)
            if child.where is not None:
                found.append((name, child.where))
            found.extend(_written_at(child, name))
    return found


def _model_location(model: str, base_dir: str) -> str:
    """A model given as a relative path is relative to the job file's folder, like every path in the file.
    `default` and hub names ("org/name") that are no folder there stay as written."""
    if model == "default":
        return model
    path = Path(model).expanduser()
    candidate = path if path.is_absolute() else Path(base_dir) / path
    if path.is_absolute() or model.startswith(("./", "../", "~")) or candidate.exists():
        return os.path.normpath(candidate)
    return model


def _callers_model(model: str, base_dir: str) -> str:
    """The caller's own model (--model, --set model=..., the Python API): one of that name beside the job file, else
    a path relative to the working folder, named absolutely, so that a rerun from another folder is the same job
    and loads the same model; else a hub name as written. `./m` is a path whether or not it exists, so its load
    error names the folder it looked in."""
    if model == "default":
        return model
    beside = _model_location(model, base_dir)
    if beside != model and Path(beside).exists():
        return os.path.abspath(beside)
    path = Path(model).expanduser()
    if path.is_absolute() or path.exists() or model.startswith(("./", "../")):
        return os.path.abspath(path)
    return model


def job_from_dict(
    data: dict[str, Any], base_dir: str = ".", under: dict[str, Any] | None = None, source: str = "command line"
) -> JobSpec:
    """Build a job from plain values (kvbatch generate, tests); errors name `source` and the field, without a line.
    `under`: dotted values (`--set`) that `data` overrides field by field. A `base_dir` in `data` (spec_dict's,
    which an output's `kvbatch.job` metadata holds) is the folder its relative paths were read from, and wins."""
    loaded = isinstance(data, dict) and isinstance(data.get("base_dir"), str)
    from_defaults = None
    if loaded:
        data = dict(data)
        base_dir = data.pop("base_dir")
        from_defaults = data.pop("from_defaults", None)
        if not (isinstance(from_defaults, list) and all(isinstance(f, str) for f in from_defaults)):
            from_defaults = []
    node = from_plain(data, "", source)
    return job_from_node(over(overrides_to_node(under), node) if under else node, base_dir, loaded, from_defaults)


# Prompt settings only a chat template reads: without one the raw text goes to the model and these are dropped.
TEMPLATE_VALUES = ("chat_template_kwargs", "chat_template_kwargs_column", "tools_column")


# What an OpenAI Batch input's rows hold of each body besides custom_id (jobs/read_jsonl.py's openai_row), the
# only columns keep_columns may name; the fields after it name input columns, which such an input does not have.
OPENAI_ROW_COLUMNS = ("messages", "model", "tools", "chat_template_kwargs")
OPENAI_UNREAD_FIELDS = (
    ("prompt", "column"),
    ("prompt", "messages_column"),
    ("prompt", "template"),
    ("prompt", "tools_column"),
    ("prompt", "chat_template_kwargs_column"),
    ("id_column",),
    ("sampling_columns",),
    ("sampling_column",),
    ("constraint_column",),
    ("adapter_column",),
)


# The sampling fields of a row's end that a constrained row does not read (runner/stopping.py): its text is whole.
UNCONSTRAINED_STOPS = ("stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output")


# The sampling fields a scoring job's requests read (jobs/pipeline.py, runner/engine.py's scoring sequences):
# prompt_logprobs (task score; score_rolling refuses it), and those check_output_settings refuses with reasons of
# their own, from `defaults:` too. Every other field is generation's, which scores are computed without.
SCORING_SAMPLING = frozenset(
    {"prompt_logprobs", "truncate_prompt_tokens", "n", "logprobs", "top_logprobs", "structured_outputs"}
)


def unread_sampling(job: JobSpec) -> dict[str, str]:
    """The sampling fields no row of `job` reads, each with why: dropped without a word, whether the job sets
    them or a column (sampling_columns) gives each row its own."""
    unread: dict[str, str] = {}
    if job.sampling.structured_outputs is not None:
        # A row's null (constraint column, sampling values, a body's text response_format) keeps the job's
        # constraint, so every row is constrained and ends where its grammar ends: these would be dropped on all.
        for name in UNCONSTRAINED_STOPS:
            unread[name] = (
                "does not apply to a constrained row, which ends where its grammar ends, and the job's "
                "sampling.structured_outputs constrains every row (docs/structured-output.md)"
            )
    if job.is_scoring:  # a scoring row reads none of generation's settings
        for f in dataclasses.fields(SamplingParams):
            if f.name not in SCORING_SAMPLING:
                unread.setdefault(
                    f.name,
                    f"task {job.task} generates no tokens, so sampling.{f.name} has nothing to apply to (each row "
                    "gets `scores`)",
                )
    return unread


# A Ray run spreads the rows over its actors itself; a shard from a Slurm array's environment reaches a job at run.
RAY_SHARD_REFUSAL = "runner: ray spreads rows over its actors; leave parallel.shard unset"


def validate(job: JobSpec, node: Node, loaded: bool = False, passed: set[str] | None = None) -> None:
    """Checks that involve more than one field. `loaded`, `passed`: see job_from_node."""

    def at(*keys: str) -> Node:
        current = node
        for key in keys:
            if not isinstance(current.value, dict) or key not in current.value:
                return current
            current = current.value[key]
        return current

    def own(*keys: str, unread: bool = True) -> bool:
        """Whether the job or the command line sets the field, not `defaults:`, which may set it for the
        file's other jobs: a setting this job would drop is refused only where it is its own. A loaded job's
        spec holds every field, its defaults' and those it left at their default (score_rolling's chat_template)
        too: none is its own, or the spec an output carries would not load back. With `passed`, a --set value this
        job would not read (`unread`) is meant for the other jobs that run: noted there and passed over
        (load_jobs_file refuses one that every job passes over)."""
        found = at(*keys)
        if loaded or found.path.startswith("defaults."):
            return False
        if unread and passed is not None and found.source == "command line":
            passed.add(".".join(keys))
            return False
        return True

    if not _SAFE_NAME.match(job.name):
        raise at("name").error(
            "job names use letters, digits, '_', '.', '-' and start with a letter, digit or '_' "
            "(it names the default output file)"
        )
    if job.input is None:
        raise node.error("missing required field 'input'")
    if job.input.split is not None and input_format(job) != "hf":  # else it would be ignored without a word
        raise at("input", "split").error(f"a split is for a datasets input, not a {input_format(job)} one")
    if job.input.config is not None and input_format(job) != "hf":
        raise at("input", "config").error(f"a configuration is for a datasets input, not a {input_format(job)} one")
    if job.input.format == "openai":  # each line's body is its request: a column named here would be ignored
        for keys in OPENAI_UNREAD_FIELDS:
            if getattr(job.prompt if keys[0] == "prompt" else job, keys[-1]) and own(*keys):
                raise at(*keys).error(
                    "an OpenAI Batch input has no columns: each line's custom_id is its id, and its body gives the "
                    "messages, tools, chat_template_kwargs, sampling and response_format"
                )
        unread = [c for c in job.keep_columns if c not in OPENAI_ROW_COLUMNS]
        if unread and own("keep_columns"):
            raise at("keep_columns").error(
                f"an OpenAI Batch input has no column {unread[0]!r}: its rows hold each body's "
                f"{', '.join(OPENAI_ROW_COLUMNS)}"
            )
        if job.keep_columns and output_format(job) == "openai" and own("keep_columns"):
            # The lines are OpenAI's own shape: the kept values were read, and written nowhere.
            raise at("keep_columns").error(
                "OpenAI Batch output lines have no place for kept columns; set output.format to arrow, parquet or "
                "jsonl to keep them"
            )
        if job.task == "score":
            raise at("task").error(
                "task score reads each row's continuations from a column (continuations_column), and an OpenAI "
                "Batch input has none"
            )
    try:  # rules across engine fields, declared once in EngineConfig: named here, not as the engine starts
        EngineConfig(**job.engine.settings())
    except ValueError as exc:
        raise at("engine").error(str(exc)) from None
    chosen = [k for k in PROMPT_SOURCES if getattr(job.prompt, k) is not None]
    if len(chosen) > 1:
        raise at("prompt").error(f"set only one of column, messages_column, template (got {', '.join(chosen)})")
    if job.prompt.template is not None:
        template_columns(job.prompt.template, at("prompt", "template"))
    # The raw text goes to the model: these would be dropped without a word.
    no_template = "prompt.chat_template: false turns off" if not job.prompt.chat_template else None
    if job.task == "score_rolling":
        no_template = "task score_rolling does not apply"
    # chat_template is on by default: only a job's own `true` asks for what score_rolling would not do.
    asked = at("prompt", "chat_template")
    if job.task == "score_rolling" and job.prompt.chat_template and asked.path.endswith(".chat_template"):
        if own("prompt", "chat_template"):
            raise asked.error("task score_rolling scores each text raw, without the chat template; leave it out")
    if no_template is not None:
        for name in ("chat_template_file", *TEMPLATE_VALUES):
            if getattr(job.prompt, name) is not None and own("prompt", name):
                raise at("prompt", name).error(
                    f"is given to the chat template, which {no_template} (the raw text goes to the model as it is)"
                )
    if job.prompt.chat_template_file is not None:
        _check_chat_template_file(chat_template_path(job), at("prompt", "chat_template_file"))
    steering = sorted(TEMPLATE_CALL_ARGUMENTS & set(job.prompt.chat_template_kwargs or {}))
    if steering:
        raise at("prompt", "chat_template_kwargs").error(
            f"{steering[0]!r} is an argument of the template call, not a template value "
            "(use prompt.chat_template_file, prompt.continue_final_message)"
        )
    if job.output.path is not None:
        ext = Path(job.output.path).suffix.lower()
        if job.output.format == "auto" and ext not in OUTPUT_EXTENSIONS:
            raise at("output", "path").error(
                f"cannot tell the format from {ext or 'no extension'!r}; use .arrow, .parquet, .jsonl or .hf, or "
                "set output.format"
            )
        named = OUTPUT_EXTENSIONS.get(ext)
        # Written anyway, a Parquet file named out.jsonl fails whatever reads it by its name; a name without a
        # known extension is the format's to decide.
        mismatch = named is not None and job.output.format not in ("auto", named)
        if mismatch and (named, job.output.format) != ("jsonl", "openai"):
            raise at("output", "format").error(
                f"is {job.output.format}, but output.path {job.output.path!r} has the extension of {named}; name it "
                f"{Path(job.output.path).stem}{_EXTENSION_OF[job.output.format]} or leave output.format out"
            )
    if job.output.format == "openai" and input_format(job) != "openai":
        raise at("output", "format").error(
            "the OpenAI Batch output format needs an OpenAI Batch input (input.format: openai)"
        )
    if job.id_column is not None and job.id_column in RESERVED_COLUMNS:
        raise at("id_column").error(f"{job.id_column!r} is an output column name; rename it in the input")
    if job.id_column is not None and job.id_column in job.keep_columns:
        raise at("keep_columns").error(f"{job.id_column!r} is already the id column")
    for col in job.keep_columns:
        if col in RESERVED_COLUMNS:
            raise at("keep_columns").error(f"{col!r} is an output column name; rename it in the input")
    if job.sampling.structured_outputs is not None:
        from kvbatch.runner.structured import check_constraint  # xgrammar and torch load only for such a job

        try:
            check_constraint(job.sampling.structured_outputs)
        except ConstraintError as exc:
            raise at("sampling", "structured_outputs").error(str(exc)) from None
    unread = unread_sampling(job)
    for name, why in unread.items():
        if getattr(job.sampling, name) != getattr(SamplingParams(), name) and own("sampling", name):
            raise at("sampling", name).error(why)
    unknown = [c for c in job.sampling_columns if c not in {f.name for f in dataclasses.fields(SamplingParams)}]
    if unknown:
        raise at("sampling_columns").error(
            f"{', '.join(map(repr, unknown))} is no sampling field; sampling_columns are named like the fields"
        )
    # A column of them is read on every row to be dropped there, as the job's own value would be.
    for name in [c for c in job.sampling_columns if c in unread]:
        if own("sampling_columns"):
            raise at("sampling_columns").error(f"each row's {name} would be dropped: {unread[name]}")
    if job.parallel.shard is not None:
        try:
            parse_shard(job.parallel.shard)
        except SpecError as exc:
            raise at("parallel", "shard").error(exc.message) from None
        # The job's own value. One from the command line or a Slurm array's environment is meant for the file's
        # local jobs too: it stays on this job, which refuses it at its turn (ray_run.py), and the others run.
        from_command_line = at("parallel", "shard").source == "command line"
        if job.runner == "ray" and not from_command_line and own("parallel", "shard"):
            raise at("parallel", "shard").error(RAY_SHARD_REFUSAL)
    # A row runs on an adapter its column or its OpenAI body's `model` names, else on `adapter`: without a
    # column every other adapter is loaded for no row, and the rows meant for it run on another model.
    if job.adapter_column is None and job.input.format != "openai":
        unnamed = [name for name in job.adapters if name != job.adapter and own("adapters", name)]
        if unnamed:
            rows_run_on = f"adapter {job.adapter!r}" if job.adapter is not None else "the base model"
            raise at("adapters", unnamed[0]).error(
                f"no row can name adapter {unnamed[0]!r}: set adapter_column to the column that names each row's "
                f"adapter (without one, every row runs on {rows_run_on})"
            )
    if job_adapters(job) and (job.runner == "ray" or job.parallel.tensor > 1):
        raise at("adapters" if job.adapters else "adapter").error(
            "LoRA adapters run on a local engine of one process (runner: local, parallel.tensor: 1)"
        )
    if job.task != "score" and job.continuations_column != JobSpec.continuations_column and own("continuations_column"):
        raise at("continuations_column").error(f"is for task: score, and this job's task is {job.task}")
    if job.runner == "local":  # else a job file's ray_address or ray_actors would run the job locally without a word
        for name in ("ray_address", "ray_actors", "ray_gpus_per_actor", "ray_batch_rows"):
            if getattr(job.parallel, name) != getattr(ParallelSpec(), name) and own("parallel", name):
                raise at("parallel", name).error(
                    "is for runner: ray, and this job runs locally (runner: local); set runner: ray (or --ray-address)"
                )
    if job.runner == "ray" and (job.parallel.data > 1 or job.parallel.tensor > 1):
        # named by the value to change: the runner is the point of the job, the engine count is what is wrong
        raise at("parallel", "data" if job.parallel.data > 1 else "tensor").error(
            "with runner: ray, scale with parallel.ray_actors (one engine per actor), not data/tensor"
        )
    if "\0" in job.output_dir:  # caught here, it names the file and line (output_path says it too, without them)
        raise at("output_dir").error("holds a NUL character; no folder name can")
    for keys, value in ((("output_dir",), job.output_dir), (("output", "path"), job.output.path)):
        if value is not None and _URI.match(value):  # caught here too, for the file and line
            raise at(*keys).error(_uri_refusal(value))
    if job.output.path is not None:  # caught here, it names the file and line
        try:
            output_path(job)
        except SpecError as exc:
            raise at(*(exc.field or "output.path").split(".")).error(exc.message) from None
    try:  # caught here, it names the file and line
        check_output_settings(job)
    except SpecError as exc:
        keys = (exc.field or "output").split(".")
        # From `defaults:`, meant for the file's other jobs too, it fails this job alone at its turn (jobs/job_io.py).
        # A value the job cannot honour, not one it would not read: from the command line it is refused here.
        if own(*keys, unread=False):
            raise at(*keys).error(exc.message) from None


def rows_may_constrain(job: JobSpec) -> bool:
    """Whether rows may bring constraints of their own: a constraint column, an OpenAI body, their own sampling
    values."""
    return (
        job.constraint_column is not None
        or input_format(job) == "openai"
        or job.sampling_column is not None
        or "structured_outputs" in job.sampling_columns
    )


def check_output_settings(job: JobSpec) -> None:
    """Refuse output settings this job has no column for, or that would fill their column with nothing. Checked as
    the job file loads (validate names the file and line), not when the job's turn comes after the jobs before it
    ran; the output's layout (jobs/job_io.py) checks them again for a job built or changed in code."""
    openai_out = job.input.format == "openai" and output_format(job) == "openai"
    if openai_out and job.is_scoring:
        raise SpecError(
            f"task {job.task} writes a `scores` column, which OpenAI Batch output has no place for; "
            "set output.format to arrow, parquet or jsonl",
            field="task",
        )
    if openai_out and job.sampling.prompt_logprobs:
        # The rows would compute them (a logits row per prompt token) and the lines be written without them.
        raise SpecError(
            "prompt log-probabilities have no place in OpenAI Batch output lines; set output.format to arrow, "
            "parquet or jsonl",
            field="sampling.prompt_logprobs",
        )
    if job.task == "score_rolling" and job.sampling.prompt_logprobs:
        # The windows score every token, but a text longer than the context has no one prompt to align them to.
        raise SpecError(
            "task score_rolling writes each text's log-likelihood in `scores`; prompt_logprobs (each prompt token's "
            "log-probability) applies to task generate and task score, for prompts that fit the context",
            field="sampling.prompt_logprobs",
        )
    if job.is_scoring:  # else their columns would be written, null on every row (n's a list of one)
        # A constraint, too, would be compiled for the model (and stop the job where it does not compile) to
        # constrain nothing; a parsed column would be null on every row.
        asked = {
            "sampling.n": job.sampling.n != 1,
            "sampling.logprobs": job.sampling.logprobs,
            "sampling.top_logprobs": job.sampling.top_logprobs,
            "sampling.structured_outputs": job.sampling.structured_outputs is not None,
            "constraint_column": job.constraint_column is not None,
            "output.parsed": job.output.parsed,
        }
        for name in [k for k, v in asked.items() if v][:1]:
            raise SpecError(
                f"task {job.task} generates no tokens, so {name} has nothing to apply to (each row gets `scores`)",
                field=name,
            )
        if job.sampling.truncate_prompt_tokens is not None:
            raise SpecError(
                f"task {job.task} scores each text as given; sampling.truncate_prompt_tokens cuts generation prompts",
                field="sampling.truncate_prompt_tokens",
            )
    if not job.output.parsed:
        return
    constraint = job.sampling.structured_outputs
    job_schema = constraint is not None and (constraint.json is not None or constraint.json_object)
    if not job_schema and not rows_may_constrain(job):
        raise SpecError(
            "output.parsed needs JSON output: sampling.structured_outputs with json or json_object, or "
            "constraint_column",
            field="output.parsed",
        )
    if openai_out:
        raise SpecError("output.parsed has no place in OpenAI Batch output lines", field="output.parsed")
    if "parsed" in (job.id_column, *job.keep_columns):
        raise SpecError("the output's `parsed` column is taken by an input column; rename it", field="keep_columns")


def job_adapters(job: JobSpec) -> dict[str, str]:
    """The adapters a job's engine serves: its `adapters`, and `adapter` under its own spelling when it is a path."""
    adapters = dict(job.adapters)
    if job.adapter is not None and job.adapter not in adapters:
        adapters[job.adapter] = job.adapter
    return adapters


def check_chat_template(job: JobSpec, tokenizer: Any) -> None:
    """Refuse a job that gives its chat template tools or values when the model's tokenizer has no template and the
    job no chat_template_file: its prompts go to the model as raw text (jobs/tokenize.py), and the tools and values
    would be dropped without a word, as the job file's load refuses them beside `prompt.chat_template: false`. And
    refuse a prompt.system the template the rows render with (the job's file, else the model's) refuses, which would
    fail every row."""
    prompt = job.prompt
    if not prompt.chat_template or job.task == "score_rolling":
        return
    if prompt.chat_template_file is not None:  # the rows render with it, whatever the model's template is
        if prompt.system:
            _check_system_role(job, tokenizer, chat_template_path(job).read_text(encoding="utf-8"))
        return
    if getattr(tokenizer, "chat_template", None) is not None:
        if prompt.system:
            _check_system_role(job, tokenizer)
        return
    for name in TEMPLATE_VALUES:
        # From `defaults:`, meant for the file's jobs on chat models, it is passed over as the load passes it over.
        if getattr(prompt, name) is not None and not job.takes_from_defaults(f"prompt.{name}"):
            raise SpecError(
                "is given to the chat template, and this model's tokenizer has none (the raw text goes to the model "
                "as it is); give the job one with prompt.chat_template_file",
                field=f"prompt.{name}",
            )


def _check_system_role(job: JobSpec, tokenizer: Any, template: str | None = None) -> None:
    """Refuse the job's prompt.system where its template (`template`, the job's file; None: the model's) refuses a
    system message it renders the same conversation without (Gemma's, Mistral's first ones): every row would be a
    chat_template error. A template that fails without it too is left to the rows, which name their own errors. And
    refuse it where the template writes it nowhere (Phi-3 medium's, which has no system turn): every row would run
    without it."""
    options = dict(job.prompt.chat_template_kwargs or {})
    if template is not None:
        options["chat_template"] = template

    def render(messages: list[dict[str, str]]) -> str | Exception:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
        except Exception as exc:  # noqa: BLE001 - a template raises what it likes (raise_exception: TemplateError)
            return exc

    user = {"role": "user", "content": "Hello."}
    with_system, without = render([{"role": "system", "content": job.prompt.system}, user]), render([user])
    if isinstance(with_system, Exception) and isinstance(without, str):
        raise SpecError(
            f"the chat template refuses a system message ({type(with_system).__name__}: {with_system}); every row "
            "would fail: leave prompt.system out, or give the job a template that takes it "
            "(prompt.chat_template_file)",
            field="prompt.system",
        )
    # A template with no system turn (Phi-3 medium's) writes it nowhere: another system text renders the same too.
    # One that writes a default system prompt when given none (Qwen2.5's) renders the job's the same where the job
    # gives that default's very text, and another text differently.
    other = render([{"role": "system", "content": f"Not {job.prompt.system}"}, user])
    if with_system == without and other == without:
        raise SpecError(
            "the chat template writes no system message (it renders the conversation the same without it); every "
            "row would run without it: leave prompt.system out, or give the job a template that takes it "
            "(prompt.chat_template_file)",
            field="prompt.system",
        )


def check_token_ids(job: JobSpec, vocab_size: int) -> None:
    """Refuse a job whose `sampling:` (its own or the file's `defaults:`) names token ids the model does not have.

    Every row that keeps the job's value would fail on it, so the job stops before any row runs, as it does on a
    max_model_len over the model's context. A row's own value (a sampling column, an OpenAI body) stays that row's
    bad_request error row: the engine checks each request with the same SamplingParams.token_ids_outside."""
    outside = job.sampling.token_ids_outside(vocab_size)
    if outside is not None:
        name, ids = outside
        raise SpecError(
            f"token ids {ids} are outside the model's vocabulary of {vocab_size} tokens (ids 0 to {vocab_size - 1})",
            field=f"sampling.{name}",
        )


def check_job_constraint(job: JobSpec, problem: Callable[[StructuredOutputs], str | None]) -> None:
    """Refuse a job whose own `sampling.structured_outputs` no row could begin with this model's tokenizer: it does
    not compile for that vocabulary, or no token may begin its text (`root ::= []`, a JSON object in a vocabulary
    without `{`). Its load checked only what any tokenizer would refuse; else each row that keeps it would fail
    alike. `problem` is the engine's check (GenerationEngine.constraint_problem), or the plan's with the same
    message. A row's own constraint stays that row's bad_constraint error row."""
    constraint = job.sampling.structured_outputs
    message = problem(constraint) if constraint is not None else None
    if message is not None:
        raise SpecError(f"{message}; no row under it could run", field="sampling.structured_outputs")


def check_job_adapter(job: JobSpec, problem: Callable[[str], str | None]) -> None:
    """Refuse a job whose own `adapter` (every row's but those that name one of their own) cannot run: missing,
    unreadable, of another base model, not plain LoRA. Each row on it would fail alike as bad_adapter. `problem` is
    the engine's check (GenerationEngine.adapter_problem), or the plan's with the same message. A row's own
    adapter (adapter_column, an OpenAI body's model) stays that row's bad_adapter error row."""
    message = problem(job.adapter) if job.adapter is not None else None
    if message is not None:
        raise SpecError(f"{message}; no row without an adapter of its own could run", field="adapter")


def check_job_on_engine(job: JobSpec, engine: GenerationEngine) -> None:
    """The checks a job passes once its model is loaded, before any row (a run, the Python API, a Ray Data batch;
    a plan makes the same ones from its sizing): what every row would fail on stops the job instead."""
    with named_where_written(job):
        check_chat_template(job, engine.tokenizer)
        check_token_ids(job, engine.vocab_size)
        check_job_constraint(job, engine.constraint_problem)
        check_job_adapter(job, engine.adapter_problem)


@contextlib.contextmanager
def named_where_written(job: JobSpec) -> Iterator[None]:
    """A SpecError about a field of `job` raised within names where the job file (or --set) gave the field, as the
    load's refusals do; raised where the job was built in Python, it stays as it is."""
    try:
        yield
    except SpecError as exc:
        where = job.where_written(exc.field) if exc.field and exc.where is None else None
        if where is None:
            raise
        raise SpecError(exc.message, field=exc.field, where=where) from None


RESERVED_COLUMNS = (
    "row",
    "text",
    "finish_reason",
    "finish_reasons",
    "stop_reason",
    "error",
    "error_kind",
    "prompt_tokens",
    "output_tokens",
    "logprobs",
)


def template_columns(template: str, node: Node | None = None) -> list[str]:
    """The column names a prompt template uses. Only plain `{column}` fields: no attributes, indexes or formats."""
    columns = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise (
            node.error(f"bad template: {exc}") if node else SpecError(f"bad template: {exc}", field="prompt.template")
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or any(c in name for c in ".[]") or spec or conversion:
            field_text = name + ("!" + conversion if conversion else "") + (":" + spec if spec else "")
            message = f"template fields are plain {{column}} names, got {{{field_text}}}"
            raise node.error(message) if node else SpecError(message, field="prompt.template")
        columns.append(name)
    if not columns:
        message = "a template needs at least one {column} placeholder"
        raise node.error(message) if node else SpecError(message, field="prompt.template")
    return columns


def _check_chat_template_file(path: Path, node: Node) -> None:
    """The file exists and compiles as transformers compiles chat templates: a syntax error fails the job before
    the model loads, not every row after it."""
    if not path.is_file():
        raise node.error(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise node.error(f"cannot read {path}: {exc}") from None
    from jinja2 import TemplateSyntaxError
    from transformers.utils import chat_template_utils

    # transformers' own compile (its sandbox, its {% generation %} tag); a version without it checks per row.
    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    if compile_template is None:
        return
    try:
        compile_template(text)
    except TemplateSyntaxError as exc:
        raise node.error(f"{path}, line {exc.lineno}: {exc.message}") from None


def chat_template_path(job: JobSpec) -> Path:
    """The job's own chat template file, relative to the job file's folder."""
    assert job.prompt.chat_template_file is not None, "only for a job with prompt.chat_template_file"
    path = Path(job.prompt.chat_template_file).expanduser()
    return path if path.is_absolute() else Path(job.base_dir) / path


# The input formats `input.format: auto` reads from a file's extension.
INPUT_EXTENSIONS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}


# How a data file of a format no reader opens is read: `datasets` reads a folder's data files (CSV, text...) as it
# reads a repository, and no input.format names such a file alone, so "set input.format" would lead nowhere.
OTHER_DATA_FILES = (
    "a data file of another format that `datasets` reads (.csv, .tsv, .txt) is read from a folder of its own"
)


def input_format(job: JobSpec) -> str:
    """The input format, with `auto` decided from the path."""
    if job.input.format != "auto":
        return job.input.format
    path = input_path(job)
    # A folder is read as datasets reads a repository, whatever its name: Spark, Dask and pyarrow's dataset
    # writer name their folder of part files `out.parquet/`, which no single-file reader opens.
    if path.is_dir():
        return "hf"
    if data_suffix(path) in INPUT_EXTENSIONS:  # DATA.JSONL, as Windows tools name files, and data.jsonl.gz too
        return INPUT_EXTENSIONS[data_suffix(path)]
    if path.suffix and path.exists():
        raise SpecError(
            f"cannot tell the input format of {path.name!r}: kvbatch reads {', '.join(INPUT_EXTENSIONS)} files and "
            f"folders; {OTHER_DATA_FILES}. Set input.format for a file of those formats under another name",
            field="input.format",
        )
    # A name that is no file or folder: a dataset in the local Hugging Face cache, whose name may hold a dot
    # (teknium/OpenHermes-2.5); the reader says when it is in no cache either.
    return "hf"


def input_path(job: JobSpec) -> Path:
    path = Path(job.input.path).expanduser()
    candidate = path if path.is_absolute() else Path(job.base_dir) / path
    # A bare dataset name ("user/dataset") that is not a local path stays as written for the HF reader.
    return candidate


def output_format(job: JobSpec) -> str:
    if job.output.format != "auto":
        return job.output.format
    if job.output.path is None:
        return "openai" if input_format(job) == "openai" else "arrow"  # OpenAI Batch in, OpenAI Batch out
    fmt = OUTPUT_EXTENSIONS[Path(job.output.path).suffix.lower()]
    return "openai" if fmt == "jsonl" and input_format(job) == "openai" else fmt


def output_dir(job: JobSpec) -> Path:
    path = Path(job.output_dir).expanduser()
    return path if path.is_absolute() else Path(job.base_dir) / path


# A scheme, as pyarrow and fsspec read a URI: the output would land in a local folder named after it.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _uri_refusal(value: str) -> str:
    return (
        f"{value!r} is a URI; kvbatch writes its outputs to a folder of this machine (for runner: ray, one every "
        "node mounts): set a local path, and copy the output to object storage after the run"
    )


def output_path(job: JobSpec) -> Path:
    """The output file, confined to output_dir: no absolute paths, no `..`, no symlink that leads out."""
    ext = _EXTENSION_OF[output_format(job)]
    relative = Path(job.output.path) if job.output.path is not None else Path(job.name + ext)
    for field_name, value in (("output_dir", job.output_dir), ("output.path", str(relative))):
        if "\0" in value:  # os.path.realpath would raise ValueError: no file name holds one
            raise SpecError(f"{field_name} {value!r} holds a NUL character", field=field_name)
        if _URI.match(value):  # a Path reads s3://bucket/out as the local folder s3:/bucket/out
            raise SpecError(f"{field_name} {_uri_refusal(value)}", field=field_name)
    if relative.is_absolute() or ".." in relative.parts:
        raise SpecError(
            f"output.path {str(relative)!r} must be a relative path inside output_dir ({job.output_dir}); set "
            "output_dir to write elsewhere",
            field="output.path",
        )
    root = output_dir(job).resolve()
    target = (root / relative).resolve()  # follows symlinks, so a link out of output_dir is caught too
    if target != root and root not in target.parents:
        raise SpecError(
            f"output.path {str(relative)!r} resolves to {target}, outside output_dir {root}", field="output.path"
        )
    source = input_path(job).resolve()
    if target == source:  # `overwrite` would replace the input
        raise SpecError(
            f"output.path {str(relative)!r} is the input file {target}; write the output elsewhere", field="output.path"
        )
    if target in source.parents or source in target.parents:  # an hf output replaces its folder whole
        raise SpecError(
            f"output.path {str(relative)!r} ({target}) holds or lies inside the input folder {source}; write the "
            "output elsewhere",
            field="output.path",
        )
    if output_format(job) != "hf" and target.is_dir():  # else found only when the finished rows are written out
        raise SpecError(
            f"output.path {str(relative)!r} is a directory ({target}), not a file: remove it or choose another "
            "output.path",
            field="output.path",
        )
    return target


# Fields whose change makes earlier results invalid for a resumed run. Of the engine's settings, these change
# results by design (the others change speed, and in bf16 at most the rounding): the weights' dtype, the seed of
# unseeded rows, the context (which rows fit, how far they may run), float32 logits.
_RESULT_FIELDS = ("model", "input", "prompt", "id_column", "keep_columns", "sampling")
# Fields added since the first manifests: part of the fingerprint only when set, so earlier outputs still resume.
_RESULT_FIELDS_SINCE = ("sampling_columns", "sampling_column", "task", "continuations_column")
_RESULT_ENGINE_FIELDS = ("dtype", "seed", "max_model_len", "float32_logits")


# The sampling fields of the first manifests: always in the fingerprint. A field added since counts only when it is
# set to other than its default, so an output written before the field existed keeps its hash and resumes.
_SAMPLING_FIELDS_V1 = (
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
    "stop_token_ids", "n", "logprobs", "ignore_eos",
)  # fmt: skip


def _sampling_fingerprint(sampling: SamplingParams) -> dict[str, Any]:
    return {
        f.name: _jsonable(getattr(sampling, f.name))
        for f in dataclasses.fields(sampling)
        if f.name in _SAMPLING_FIELDS_V1 or getattr(sampling, f.name) != _default(f)
    }


# The prompt fields of the first manifests; a field added since counts only when set (as for sampling).
_PROMPT_FIELDS_V1 = ("column", "messages_column", "template", "system", "chat_template", "allow_special_tokens")


def _prompt_fingerprint(job: JobSpec) -> dict[str, Any]:
    fingerprint = {
        f.name: _jsonable(getattr(job.prompt, f.name))
        for f in dataclasses.fields(job.prompt)
        if f.name in _PROMPT_FIELDS_V1 or getattr(job.prompt, f.name) != _default(f)
    }
    if job.prompt.chat_template_file is not None:  # the template's text, not only its path, makes the prompts
        fingerprint["chat_template_sha256"] = hashlib.sha256(chat_template_path(job).read_bytes()).hexdigest()
    if splits_reasoning(job):  # an output of a reasoning model written before the split does not resume into one
        fingerprint["split_reasoning"] = True
    return fingerprint


def splits_reasoning(job: JobSpec) -> bool:
    """Whether the output has a `reasoning` column: prompt.split_reasoning, unset: the template knows <think>;
    never for scores, which have no text to split."""
    if job.is_scoring:
        return False
    if job.prompt.split_reasoning is not None:
        return job.prompt.split_reasoning
    if not job.prompt.chat_template:
        return False
    template_file = chat_template_path(job) if job.prompt.chat_template_file else None
    return template_marks_reasoning(job.model, template_file)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def result_fingerprint(job: JobSpec) -> dict[str, Any]:
    """The part of the spec that decides the results; stored with the output to detect a changed rerun."""
    data = {k: _jsonable(getattr(job, k)) for k in _RESULT_FIELDS if k != "sampling"}
    if job.input.config is None:  # a field added since the first manifests: earlier outputs keep their hash
        del data["input"]["config"]
    data["sampling"] = _sampling_fingerprint(job.sampling)
    data["prompt"] = _prompt_fingerprint(job)
    for f in dataclasses.fields(job):
        if f.name in _RESULT_FIELDS_SINCE and getattr(job, f.name) != _default(f):
            data[f.name] = _jsonable(getattr(job, f.name))
    if job.constraint_column is not None:  # only when set, so earlier outputs keep their hash
        data["constraint_column"] = job.constraint_column
    data["output_format"] = output_format(job)
    if job.output.parsed:  # the output has one more column: a rerun without it must not resume into it
        data["output_parsed"] = True
    engine = {k: _result_value(k, getattr(job.engine, k)) for k in _RESULT_ENGINE_FIELDS}
    engine = {k: v for k, v in engine.items() if v is not None}
    if engine:  # left out when these are defaults, so such outputs keep the hash earlier versions gave them
        data["engine"] = engine
    for name in ("adapters", "adapter", "adapter_column"):  # likewise: only a job that uses adapters hashes them
        if getattr(job, name):
            data[name] = _jsonable(getattr(job, name))
    return data


_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": None}


def _result_value(name: str, value: Any) -> Any:
    """One spelling per meaning: fp32 is float32, auto and false are what leaving the field out means."""
    if name == "dtype":
        return _DTYPE_NAMES.get(value, value)
    if name == "float32_logits":
        return value or None
    return value


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def spec_hash(job: JobSpec) -> str:
    return fingerprint_hash(result_fingerprint(job))


def describe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints: ["sampling.temperature: 0.0 -> 0.7"]."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = child_path(prefix, key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(describe_changes(a, b, name))
        elif a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return changes


def spec_dict(job: JobSpec) -> dict[str, Any]:
    data = _jsonable(job)
    del data["written_at"]  # where the file gave each field: its layout, not the job
    # The folder the job's relative paths are read from now: a Python job's "." (the working folder) loaded back
    # from another would read that folder's files.
    data["base_dir"] = os.path.abspath(job.base_dir)
    return data


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
