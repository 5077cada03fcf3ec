"""Opening a job's input and output: reader, output layout, manifest, writer and summary.

Done before any model loads, so a missing input or column fails fast; shared by local and Ray runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbatch.errors import InputError, ModelLoadError, SpecError
from kvbatch.jobs.first_rows import check_first_rows
from kvbatch.jobs.manifest import DTYPE_KEY, INPUT_KEY, KVBATCH_VERSION, Manifest, input_identity
from kvbatch.jobs.model_identity import adapters_identity, model_identity
from kvbatch.jobs.parsed import ParsedColumn
from kvbatch.jobs.pipeline import input_columns, request_columns
from kvbatch.jobs.prompts import prompt_columns, prompt_spec
from kvbatch.jobs.read_parquet import with_request_values
from kvbatch.jobs.readers import open_reader
from kvbatch.jobs.records import Layout, output_type
from kvbatch.jobs.rows import Reader, Row
from kvbatch.jobs.shard import Shard
from kvbatch.jobs.shard_output import job_shard, writer_for
from kvbatch.jobs.spec import (
    JobSpec,
    check_output_settings,
    describe_changes,
    input_format,
    input_path,
    job_adapters,
    output_format,
    output_path,
    result_fingerprint,
    rows_may_constrain,
    spec_hash,
    splits_reasoning,
)
from kvbatch.jobs.summary import Summary
from kvbatch.jobs.writer import OutputWriter, work_dir
from kvbatch.runner.config import EngineConfig


def layout_for(job: JobSpec, input_types: dict[str, Any]) -> Layout:
    check_output_settings(job)  # the job file's load checked them too; a job built in code may have changed since
    fmt = output_format(job)
    openai = input_format(job) == "openai"
    multi = job.sampling.n > 1 or openai  # OpenAI bodies may ask n per row
    reasoning = splits_reasoning(job)
    layout = Layout(
        parsed=_parsed_column(job),
        id_column="custom_id" if openai else job.id_column,
        keep_columns=job.keep_columns,
        multi=multi,
        # OpenAI bodies may ask these per row too, whatever the output's format.
        logprobs=job.sampling.logprobs or openai,
        token_bytes=fmt == "openai",  # OpenAI's logprobs name each token; the lines are assembled without a tokenizer
        top_logprobs=job.sampling.top_logprobs > 0 or openai,
        prompt_logprobs=job.sampling.prompt_logprobs,
        scores=job.is_scoring,
        reasoning=reasoning,
        input_types=input_types,
    )
    # RESERVED_COLUMNS are refused by the spec; these are the columns this job's settings add (top_logprobs,
    # prompt_logprobs, scores, reasoning, parsed...): a kept column of the same name would be overwritten by ours.
    ours = {f.name for f in layout.fixed_fields()}
    taken = next((c for c in layout.data_columns() if c in ours), None)
    if taken is not None:
        field = "id_column" if taken == layout.id_column else "keep_columns"
        raise SpecError(f"the output's `{taken}` column is taken by an input column; rename it", field=field)
    return layout


def with_input_schema(layout: Layout, schema: Any) -> Layout:
    """The layout with the types of its id and kept columns (records.output_type) and their `datasets` features,
    from the input's Arrow schema."""
    return dataclasses.replace(
        layout, input_types=kept_types(schema, layout), input_features=kept_features(schema, layout)
    )


def kept_types(schema: Any, layout: Layout) -> dict[str, Any]:
    """The output types of the layout's id and kept columns, from the input's Arrow schema (records.output_type)."""
    return {n: output_type(schema.field(n).type) for n in layout.data_columns() if n in schema.names}


def kept_features(schema: Any, layout: Layout) -> dict[str, Any]:
    """The `datasets` features of the layout's id and kept columns, from the `huggingface` metadata that `datasets`
    writes into a schema (a ClassLabel's names live only there); none for other inputs."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {n: features[n] for n in layout.data_columns() if n in features}


def _parsed_column(job: JobSpec) -> ParsedColumn | None:
    """output.parsed's column, typed from the job's JSON constraint (check_output_settings refuses it without)."""
    if not job.output.parsed:
        return None
    constraint = job.sampling.structured_outputs
    # One type for every row: rows that may each have a schema of their own get JSON text.
    if rows_may_constrain(job) or constraint is None or constraint.json is None:
        return ParsedColumn.for_schema(None)
    return ParsedColumn.for_schema(constraint.json)


@dataclass
class JobIO:
    """What a run of a job reads and writes, opened before any model loads (so a missing input fails fast)."""

    shard: Shard | None  # None: the whole input
    out: Path
    pspec: Any  # the job's PromptSpec
    layout: Layout
    reader: Any  # a jobs.readers reader; None when the input is gone (missing_input says why)
    writer: OutputWriter
    summary: Summary
    # The input could not be found, but the output looked finished: the run raises this unless its writer (under
    # the lock, checking the spec) finds the output complete.
    missing_input: InputError | None = None


def checked_first_rows(job: JobSpec, rows: Iterator[Row]) -> Iterator[Row]:
    """`rows` of an input without a schema (JSONL), after checking that one of the first has each prompt column,
    each per-row settings column, the id column and each kept column (jobs/first_rows.py); OpenAI Batch lines are
    checked line by line instead."""
    if input_format(job) == "openai":
        return rows
    pspec = prompt_spec(job)
    field = next(f"prompt.{k}" for k in ("template", "messages_column", "column") if getattr(pspec, k) is not None)
    own = {getattr(pspec, k): f"prompt.{k}" for k in ("tools_column", "chat_template_kwargs_column")}
    columns = {c: own.get(c, field) for c in prompt_columns(pspec)}
    # A row's own adapter, sampling values and constraint: most rows may leave them out, but if none of the first
    # rows has the column, its name is taken for a typo, which would otherwise run every row on the job's own.
    for name in ("adapter_column", "sampling_column", "constraint_column"):
        if getattr(job, name) is not None:
            columns.setdefault(getattr(job, name), name)
    for column in job.sampling_columns:
        columns.setdefault(column, "sampling_columns")
    # The id and kept columns too, as a Parquet input's schema checks them: a typo made every row a
    # `missing_column` error, or wrote a kept column of nulls.
    if job.id_column is not None:
        columns.setdefault(job.id_column, "id_column")
    for column in job.keep_columns:
        columns.setdefault(column, "keep_columns")
    return check_first_rows(rows, columns)


def read_as_run(job: JobSpec, reader: Reader, layout: Layout) -> Layout:
    """Set `reader`'s rows as a run of `job` reads them (a run and its plan alike), and return `layout` with the
    input's schema: a JSONL input's first rows checked for each column the job uses, an Arrow input's JSON values
    decoded."""
    if reader.columns is None:
        reader.rows = checked_first_rows(job, reader.rows)
    if reader.schema is not None:
        layout = with_input_schema(layout, reader.schema)
        # Kept columns stay as stored (JSON text); the request's are read as `datasets` reads them.
        reader.rows = with_request_values(reader.rows, reader.schema, request_columns(job))
    return layout


def open_job(job: JobSpec, wait_for_lock: bool = False) -> JobIO:
    """Reader, output layout, manifest, writer and summary of a job: shared by local and Ray runs."""
    shard = job_shard(job.parallel.shard)
    out = output_path(job) if shard is None else shard.output_path(output_path(job))
    fmt = output_format(job)
    pspec = prompt_spec(job)
    layout = layout_for(job, {})
    reader, missing_input = None, None
    try:
        reader = open_reader(job, input_columns(job, layout))  # fails early on a missing input or column
    except InputError as exc:
        if input_path(job).exists() or job.output.mode != "resume" or not looks_complete(out):
            raise
        missing_input = exc  # a finished output needs no input: cleaned up after the run, it is still done
    if reader is not None:
        layout = read_as_run(job, reader, layout)
    manifest = job_manifest(job, out, fmt)
    writer = writer_for(
        shard,
        out,
        fmt,
        layout,
        manifest,
        mode=job.output.mode,
        part_rows=job.output.part_rows,
        part_seconds=job.output.part_seconds,
        model=job.model,
        wait_for_lock=wait_for_lock,
    )
    summary = Summary(
        job.name, str(out), model=job.model, spec_hash=manifest.spec_hash, kvbatch_version=KVBATCH_VERSION
    )
    return JobIO(shard, out, pspec, layout, reader, writer, summary, missing_input)


def looks_complete(out: Path) -> bool:
    """Whether `out` exists and its manifest says it was finished; a hint only, read without the lock (the writer
    decides, holding it, and checks the spec)."""
    try:
        return out.exists() and Manifest.load(work_dir(out) / "manifest.json").complete
    except (OSError, ValueError, KeyError, TypeError):
        return False


def job_manifest(job: JobSpec, out: Path, fmt: str) -> Manifest:
    """The manifest an output of `job` carries: what a resume must match, the input file's and the model files'
    identities included (so an edited input or a model replaced under its path is refused too)."""
    fingerprint = {
        **result_fingerprint(job),
        **input_identity(input_path(job), job.input.split),
        **model_identity(job.model),
        **adapters_identity(job_adapters(job)),
    }
    # A finished output resumed is not run again: it needs no device (nor torch). Overwritten, it is run again,
    # and its rows need their dtype as any run's do (a resume of that run compares it).
    finished = job.output.mode == "resume" and looks_complete(out)
    if not finished and (dtype := weights_dtype(job)) is not None:
        fingerprint[DTYPE_KEY] = dtype
    return Manifest(job.name, spec_hash(job), fingerprint, out.name, fmt)


def weights_dtype(job: JobSpec) -> str | None:
    """The dtype the job's engine loads the weights in (engine.dtype auto: float32 on the cpu, bfloat16 on CUDA),
    resolved as the loader resolves it, or None where engine.device or engine.dtype does not resolve: the load
    reports why."""
    from kvbatch.runner.model_loader import resolve_device, resolve_dtype

    dtype, device = job.engine.dtype or EngineConfig.dtype, job.engine.device or EngineConfig.device
    try:
        return str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")
    except ModelLoadError:
        return None


def check_input_unchanged(job: JobSpec, manifest: Manifest) -> None:
    """Raise InputError if the input file changed since the job opened it: the rows read before and after the
    change would make one output of two inputs, recorded under the first one's identity."""
    before = manifest.fingerprint.get(INPUT_KEY)
    now = input_identity(input_path(job), job.input.split).get(INPUT_KEY)
    if before != now:
        changes = "; ".join(describe_changes({INPUT_KEY: before}, {INPUT_KEY: now}))
        raise InputError(
            f"the input changed while the job ran ({changes}); the output is not written. Restore the input to "
            "resume, or set output.mode: overwrite to start again over the new one",
            job=job.name,
        )
