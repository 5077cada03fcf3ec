"""Ray Data: `GenerateBatch`, a callable class for `Dataset.map_batches` (one engine per actor).

On its own, on any Ray Dataset with a prompt column:

    job = job_from_dict({"name": "x", "input": {"path": "-"}, ...})  # refused here, in the driver, if wrong
    ds.map_batches(GenerateBatch, fn_constructor_kwargs={"job": job}, batch_format="pyarrow", concurrency=4, num_gpus=1)

adds text, finish_reason, error, error_kind, prompt_tokens, output_tokens (and texts, finish_reasons, stop_reasons)
to each row, and the columns the job asks for beyond them, as its own output has them: scores (task: score and
score_rolling), top_logprobs, prompt_logprobs, parsed.

In a `runner: ray` job (ray_run.py) it gets the blocks of ray_input.RowsSource and returns the job's own output
rows (Layout.to_table: row, id, kept columns, text...), which Ray Data's writers write from the workers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pyarrow as pa

from kvbatch.errors import ErrorKind, KvbatchError, SpecError
from kvbatch.jobs.job_io import layout_for
from kvbatch.jobs.pipeline import RowPipeline
from kvbatch.jobs.ray_input import rows_of_block
from kvbatch.jobs.records import Layout, RowResult
from kvbatch.jobs.rows import KnownDuplicates, Row, RowError
from kvbatch.jobs.run import EngineFactory, default_engine_factory
from kvbatch.jobs.spec import JobSpec, check_job_on_engine, job_adapters, job_from_dict

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("text", pa.string()),
        pa.field("texts", pa.list_(pa.string())),
        pa.field("finish_reason", pa.string()),
        pa.field("finish_reasons", pa.list_(pa.string())),
        pa.field("stop_reasons", pa.list_(pa.string())),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("logprobs", pa.list_(pa.list_(pa.float32()))),
        pa.field("token_bytes", pa.list_(pa.list_(pa.binary()))),  # OpenAI output only: each token beside its logprob
        pa.field(
            "reasonings", pa.list_(pa.string())
        ),  # a reasoning model's thinking, per sample (prompt.split_reasoning)
    ]
)


_ASKED_COLUMNS = ("top_logprobs", "prompt_logprobs", "scores", "parsed")


class GenerateBatch:
    """A callable class for `ray.data.Dataset.map_batches`: each actor loads one engine and keeps it.

    `job` is a JobSpec or its dict (as in a job file; `input.path` is not read); only its model, prompt,
    sampling and engine settings are used. A dict is checked in each actor (its refusal raised from each batch):
    job_from_dict in the driver refuses it before any actor starts. Rows are built from the batch's columns
    (`row` names each row when present, and with engine.seed a sampled batch needs it), or, in a `runner: ray`
    job, from RowsSource's blocks.
    """

    def __init__(
        self,
        job: JobSpec | dict[str, Any],
        engine_factory: EngineFactory = default_engine_factory,
        layout: Layout | None = None,
        duplicates: dict[int, int] | None = None,
    ) -> None:
        """`layout` and `duplicates` (later row of a repeated id -> the row that owns it): a `runner: ray` job's,
        whose blocks come from RowsSource; the output rows are then the job's (Layout.to_table)."""
        # Ray reports an actor whose constructor raised only as text (ActorDiedError); raised from each batch
        # instead, the error reaches the driver as itself (RayTaskError.cause), and with it its exit code: a job
        # dict's refusal too (build the JobSpec in the driver, job_from_dict, to have it before any actor starts).
        self.refusal: KvbatchError | None = None
        try:
            self.job = job if isinstance(job, JobSpec) else job_from_dict(job, source="GenerateBatch")
            settings = self.job.engine.settings()
            if job_adapters(self.job):  # the adapters rows may name, served as a local run serves them
                settings["adapters"] = job_adapters(self.job)
            self.engine = engine_factory(self.job.model, settings)
            check_job_on_engine(self.job, self.engine)
        except KvbatchError as exc:
            self.refusal = exc
            return
        self.layout = layout
        if layout is None:  # any dataset: no id check, the batch's own columns pass through
            layout = dataclasses.replace(layout_for(self.job, {}), id_column=None, keep_columns=())
        self._job_layout = layout
        ids = KnownDuplicates(layout.id_column, duplicates or {})
        self.pipeline = RowPipeline(self.job, self.engine.tokenizer, layout, ids)
        self._next_row = 0  # rows named by position when the batch has no `row` column

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        if self.refusal is not None:
            raise self.refusal
        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        if self.layout is not None:
            return self.layout.to_table(self._generate(rows_of_block(table)))
        results = self._generate(self._rows(table), numbered_by_position="row" not in table.column_names)
        results_table = _result_table(results)
        # What the job asks for beyond the fixed columns, typed as its output types them.
        asked = self._job_layout.to_table(results)
        results_table = _join(results_table, asked.select([n for n in _ASKED_COLUMNS if n in asked.column_names]))
        passed = table.drop_columns([c for c in results_table.column_names if c in table.column_names])
        return results_table if passed.num_columns == 0 else _join(passed, results_table)

    def _generate(self, rows: list[Row], numbered_by_position: bool = False) -> list[RowResult]:
        """One output row per row, in the rows' order. `numbered_by_position`: the rows' numbers are their
        positions among this actor's batches, not the dataset's own."""
        by_row: dict[int, RowResult] = {}
        requests = []
        for row in rows:
            request = self.pipeline.request(row)
            if isinstance(request, RowResult):
                by_row[row.index] = request
            else:
                requests.append(request)
        if numbered_by_position and self.job.engine.seed is not None:
            drawn = [r for r in requests if not r.sampling.greedy and r.sampling.seed is None]
            if drawn:
                for request in requests:
                    self.pipeline.discard(request)
                raise _positional_seed_refusal()
        for result in self.engine.generate(requests):
            by_row[result.request_id] = self.pipeline.result(result)
        for row in rows:  # still exactly one row each
            if row.index not in by_row:
                lost = RowError(ErrorKind.ENGINE, f"{row.where}: the engine returned no result")
                by_row[row.index] = self.pipeline.error_row(row, lost)
        return [by_row[row.index] for row in rows]

    def _rows(self, table: pa.Table) -> list[Row]:
        records = table.to_pylist()
        if "row" in table.column_names:
            indexes = [int(r["row"]) for r in records]
        else:
            indexes = list(range(self._next_row, self._next_row + len(records)))
            self._next_row += len(records)
        return [Row(i, r) for i, r in zip(indexes, records)]


def _positional_seed_refusal() -> SpecError:
    """engine.seed draws an unseeded sampled row from the seed and the row's number. Numbered by its position
    among one actor's batches, rows at the same position of two actors drew the same samples, and which actor
    got a batch (so a row's samples) changed from one run to the next: the seed kept neither of its promises."""
    return SpecError(
        "it draws each sampled row from the seed and the row's `row`, and this dataset has no `row` column "
        "(rows numbered by their position in each actor would draw alike across actors, and differently from run "
        "to run): add a `row` column of distinct integers (an id, or the row's index in the input), give each row "
        "its own seed (sampling_columns: [seed]), or leave engine.seed unset",
        field="engine.seed",
        where="GenerateBatch",
    )


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
        "stop_reasons": [[None if s is None else str(s) for s in r.stop_reasons] for r in results],
        "error": [r.error.message if r.error else None for r in results],
        "error_kind": [r.error.kind if r.error else None for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "output_tokens": [r.output_tokens for r in results],
        "logprobs": [r.logprobs for r in results],
        "token_bytes": [r.token_bytes for r in results],
        "reasonings": [r.reasonings for r in results],
    }
    return pa.table(columns, schema=RESULT_SCHEMA)
