"""Ray Data: `GenerateBatch` for `Dataset.map_batches` (one engine per actor), and `runner: ray` for kvbatch jobs.

On its own, on any Ray Dataset with a prompt column:

    ds.map_batches(GenerateBatch, fn_constructor_kwargs={"job": {"name": "x", "input": {"path": "-"}, ...}},
                   batch_format="pyarrow", concurrency=4, num_gpus=1)

adds text, finish_reason, error, error_kind, prompt_tokens, output_tokens (and texts, finish_reasons) to each row.

As a job runner (`runner: ray` or `--ray-address`), the driver does what needs the whole input; actors do the rest:

    driver: read rows -> skip done rows, write unreadable rows and duplicate ids as error rows
            -> Dataset of (row, prompt columns as JSON) ──map_batches──> actors: prompt, tokenize, generate
            <── results, any order ── OutputWriter (parts, resume, final file in input order, as run_job)

Rows leave the driver as one in-memory dataset, so the driver holds the prompt columns of the rows still to
do (not the outputs, which are committed in parts as they come back).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import pyarrow as pa

from kvbatch.errors import ErrorKind, InterruptedJob, JobError
from kvbatch.jobs.job_io import layout_for, open_job
from kvbatch.jobs.pipeline import RowPipeline
from kvbatch.jobs.progress import JobProgress
from kvbatch.jobs.prompts import prompt_columns
from kvbatch.jobs.records import RowResult
from kvbatch.jobs.rows import Row, RowError, SeenIds
from kvbatch.jobs.run import EngineFactory, default_engine_factory, job_metadata
from kvbatch.jobs.signals import StopFlag
from kvbatch.jobs.spec import JobSpec, job_from_dict
from kvbatch.jobs.summary import RunCounts, Summary, already_complete, build_summary, summary_path

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("text", pa.string()),
        pa.field("texts", pa.list_(pa.string())),
        pa.field("finish_reason", pa.string()),
        pa.field("finish_reasons", pa.list_(pa.string())),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("logprobs", pa.list_(pa.list_(pa.float32()))),
        pa.field("token_bytes", pa.list_(pa.list_(pa.binary()))),  # OpenAI output only: each token beside its logprob
    ]
)


class GenerateBatch:
    """A callable class for `ray.data.Dataset.map_batches`: each actor loads one engine and keeps it.

    `job` is a JobSpec or its dict (as in a job file; `input.path` is not read); only its model, prompt,
    sampling and engine settings are used. Rows are built from the batch's columns, or from the `data` JSON
    column that `run_job_ray` sends; `row` names each row when present.
    """

    def __init__(self, job: JobSpec | dict[str, Any], engine_factory: EngineFactory = default_engine_factory) -> None:
        self.job = job if isinstance(job, JobSpec) else job_from_dict(job)
        self.engine = engine_factory(self.job.model, self.job.engine.settings())
        # ids and kept columns stay with the driver, which checks ids over the whole input
        layout = dataclasses.replace(layout_for(self.job, {}), id_column=None, keep_columns=())
        self.pipeline = RowPipeline(self.job, self.engine.tokenizer, layout)
        self._next_row = 0  # rows named by position when the batch has no `row` column

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        rows = self._rows(table)
        by_row: dict[int, RowResult] = {}
        requests = []
        for row in rows:
            request = self.pipeline.request(row)
            if isinstance(request, RowResult):
                by_row[row.index] = request
            else:
                requests.append(request)
        for result in self.engine.generate(requests):
            by_row[result.request_id] = self.pipeline.result(result)
        results = _result_table([by_row[row.index] for row in rows])
        passed = table.drop_columns([c for c in RESULT_SCHEMA.names if c in table.column_names])
        return results if passed.num_columns == 0 else _join(passed, results)

    def _rows(self, table: pa.Table) -> list[Row]:
        records = table.to_pylist()
        if "row" in table.column_names:
            indexes = [int(r["row"]) for r in records]
        else:
            indexes = list(range(self._next_row, self._next_row + len(records)))
            self._next_row += len(records)
        if "data" in table.column_names and "line" in table.column_names:  # sent by run_job_ray
            return [
                Row(
                    i,
                    json.loads(r["data"]),
                    line=r["line"] if r["line"] >= 0 else None,
                    sampling=json.loads(r["sampling"]),
                )
                for i, r in zip(indexes, records)
            ]
        return [Row(i, r) for i, r in zip(indexes, records)]


def _join(passed: pa.Table, results: pa.Table) -> pa.Table:
    for field in results.schema:
        passed = passed.append_column(field, results.column(field.name))
    return passed


def _result_table(results: list[RowResult]) -> pa.Table:
    columns = {
        "row": [r.row for r in results],
        "text": [r.texts[0] if r.texts else None for r in results],
        "texts": [r.texts for r in results],
        "finish_reason": [r.finish_reason for r in results],
        "finish_reasons": [r.finish_reasons for r in results],
        "error": [r.error.message if r.error else None for r in results],
        "error_kind": [r.error.kind if r.error else None for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "output_tokens": [r.output_tokens for r in results],
        "logprobs": [r.logprobs for r in results],
        "token_bytes": [r.token_bytes for r in results],
    }
    return pa.table(columns, schema=RESULT_SCHEMA)


# ---- runner: ray -----------------------------------------------------------------------------------------


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (auto: the running one), or keep the one this process already joined."""
    import ray

    if ray.is_initialized():
        return
    log.info("connecting to Ray at %s", address or "a new local instance")
    ray.init(address=address, include_dashboard=False, log_to_driver=False)


def run_job_ray(job: JobSpec, engines: Any, stop: StopFlag, wait_for_lock: bool = False) -> Summary:
    """run_job's contract (resumable parts, one output row per input row, a summary), through Ray Data."""
    import ray

    started = time.monotonic()
    io = open_job(job, wait_for_lock)
    shard, out, pspec, layout, reader, writer, summary = (
        io.shard,
        io.out,
        io.pspec,
        io.layout,
        io.reader,
        io.writer,
        io.summary,
    )
    with writer:
        if writer.already_complete:
            return already_complete(out, summary)
        writer.metadata = {k.encode(): v.encode() for k, v in job_metadata(job, None).items()}
        sent = _Sender(job, pspec, layout, writer, shard)
        items = sent.items(iter(reader))
        progress = JobProgress(job.name, len(items), None)
        counts = {"rows": 0, "prompt": 0, "output": 0}
        if items:
            connect(job.parallel.ray_address)
            dataset = ray.data.from_items(items).map_batches(
                GenerateBatch,
                fn_constructor_kwargs={"job": job, "engine_factory": engines.factory},
                batch_size=job.parallel.ray_batch_rows,
                batch_format="pyarrow",
                concurrency=job.parallel.ray_actors,
                num_gpus=job.parallel.ray_gpus_per_actor or None,
            )
            try:
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    for record in batch.select(RESULT_SCHEMA.names).to_pylist():
                        sent.finish(record, counts)
                        progress.update(record["output_tokens"], error=record["error_kind"] is not None)
                    if stop.stopped:
                        break
            except Exception as exc:
                raise JobError(
                    f"job {job.name}: the Ray run failed ({type(exc).__name__}: {exc}); finished rows are saved, rerun to resume"
                ) from exc
            finally:
                progress.close()
        if stop.stopped:
            writer.commit_part()
            raise InterruptedJob(
                f"job {job.name}: stopped by {stop.signal_name}; {len(writer.done_rows)} rows committed, rerun to resume"
            )
        lost = sorted(sent.pending)
        for index in lost:
            writer.add(
                RowResult(
                    index,
                    *sent.pending.pop(index),
                    error=RowError(ErrorKind.ENGINE, f"row {index}: the Ray run returned no result"),
                )
            )
        report = writer.finalize(sent.num_rows)
    run = RunCounts(counts["rows"] + sent.num_written, counts["prompt"], counts["output"])
    about = {"model": summary.model, "spec_hash": summary.spec_hash, "kvbatch_version": summary.kvbatch_version}
    summary = build_summary(job.name, out, report, run, time.monotonic() - started, **about)
    summary.write(summary_path(out))
    return summary


class _Sender:
    """The driver's share of a run: what needs the whole input (duplicate ids, resume, bad rows)."""

    def __init__(self, job: JobSpec, pspec, layout, writer, shard) -> None:
        self.job, self.layout, self.writer, self.shard = job, layout, writer, shard
        self.columns = prompt_columns(pspec)
        self.ids = SeenIds(layout.id_column)
        self.pending: dict[int, tuple[Any, dict[str, Any]]] = {}  # row -> (id, kept columns)
        self.num_rows = 0
        self.num_written = 0

    def items(self, rows) -> list[dict[str, Any]]:
        items = []
        for row in rows:
            self.num_rows = row.index + 1
            data = row.data or {}
            id_value = data.get(self.layout.id_column) if self.layout.id_column else None
            kept = {c: data.get(c) for c in self.layout.keep_columns}
            id_error = self.ids.error(row)  # every row's id is noted, also of rows this run skips
            if (self.shard is not None and not self.shard.owns(row.index)) or row.index in self.writer.done_rows:
                continue
            error = row.error or id_error
            if error is not None:
                self.writer.add(RowResult(row.index, id_value, kept, error=error))
                self.num_written += 1
                continue
            self.pending[row.index] = (id_value, kept)
            prompt_data = {c: data.get(c) for c in self.columns if c in data}
            items.append(
                {
                    "row": row.index,
                    "data": json.dumps(prompt_data, default=str),
                    "line": row.line if row.line is not None else -1,
                    "sampling": json.dumps(row.sampling),
                }
            )
        return items

    def finish(self, record: dict[str, Any], counts: dict[str, int]) -> None:
        id_value, kept = self.pending.pop(record["row"])
        error = RowError(record["error_kind"], record["error"]) if record["error_kind"] else None
        self.writer.add(
            RowResult(
                record["row"],
                id_value,
                kept,
                texts=record["texts"] or [],
                finish_reasons=record["finish_reasons"] or [],
                error=error,
                prompt_tokens=record["prompt_tokens"],
                output_tokens=record["output_tokens"],
                logprobs=record["logprobs"],
                token_bytes=record["token_bytes"],
            )
        )
        counts["rows"] += 1
        counts["output"] += record["output_tokens"] or 0
        counts["prompt"] += (record["prompt_tokens"] or 0) if error is None else 0
