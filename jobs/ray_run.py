"""`runner: ray`: a job on a Ray cluster. The cluster reads, generates and writes; the driver holds no rows.

    driver: list the input files and their row counts (ray_input.py); with an id column, find the duplicate ids
            (a Ray groupby over (row, id) keys: only the later rows of repeated ids come back)
    cluster: RowsSource (read tasks, in parallel) ──> GenerateBatch actors (prompt, tokenize, generate; one engine
             each) ──> Ray Data's Parquet writer: out/answers.parquet.parts/part-RRRR-TTTTTT-<write id>.parquet
             (Parquet parts for every output format: `kvbatch merge` writes the job's own format)
    driver: count the folder's rows by finish reason and error kind (a column scan, batch by batch), the summary

Every output row carries the row's input position (`row`) and its id. The parts folder is the output: pyarrow and
`datasets` read it as it is; `kvbatch merge out/answers.parquet` writes the single file in input order that a local
run writes.

Resume and exactly-once are Ray Data's checkpointing (Ray 2.50 on), keyed by `row`: each write task first records
its rows as a pending checkpoint, writes its file, then commits the checkpoint; a rerun skips committed rows right
after the read, and deletes the file of a pending checkpoint (a run killed between the file and the commit), so its
rows are done again, once. The checkpoint lives in the output's work folder (.answers.parquet.kvbatch/), beside the
manifest that refuses a rerun under another spec or over another input, as in a local run. Part files are named
part-RRRR-TTTTTT-<write id>: the folder's run number, the write task, and the write's id (Ray's Parquet writer
appends only under names that hold it); a retried task writes the same name again.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from kvbatch.errors import InputError, InterruptedJob, JobError, KvbatchError, OutputError, SpecError, shown_path

from .assemble import unify
from .atomic import write_json
from .job_io import checked_first_rows, layout_for, with_input_schema
from .layouts import finished, refuse_other_layouts
from .lock import OutputLock
from .manifest import KVBATCH_VERSION, Manifest, previous_manifest
from .model_identity import adapters_identity, model_identity
from .pipeline import input_columns, request_columns
from .ray_data import GenerateBatch
from .ray_input import RayInput, RowsSource, input_found, open_ray_input
from .ray_parts import checkpoint_dir, part_files
from .run import job_metadata, model_name
from .shard import Shard
from .signals import StopFlag
from .spec import RAY_SHARD_REFUSAL, JobSpec, job_adapters, output_format, output_path, result_fingerprint, spec_hash
from .summary import RunCounts, Summary, already_complete, build_summary, summary_path
from .writer import WriteReport, make_work_dir, parts_dir, resume_refusal, work_dir

log = logging.getLogger(__name__)
# How long an interrupted run waits for its write thread once the execution is shut down (it stops within a
# scheduling step: the executor's own shutdown waits 2 s for its loop).
WRITE_STOP_S = 30.0


def provenance_path(output: Path) -> Path:
    """The provenance a local run writes into its output (model, job, spec hash, ...), kept for the merge."""
    return work_dir(output) / "provenance.json"


@dataclass(frozen=True)
class _Joined:
    """The Ray connection connect() made: the address a job asked for, and the cluster (GCS) that joined."""

    address: str | None
    gcs: str | None


_joined: list[_Joined] = []  # the connection connect() made last, if any


def connect(address: str | None, actors: int) -> None:
    """Join the Ray cluster at `address` (auto: the running one), or keep the one this process already joined, or
    start a local one with room for `actors` engine actors beside the tasks that feed them.

    A job that names another address than the job before it asked for (one job file, or two run_jobs calls) is
    run there: the connection this function made for the earlier job, done with it, is closed first. A Ray the
    process joined itself (ray.init before run_jobs) is never closed here: every job runs on it."""
    import ray

    if ray.is_initialized():
        ours = _joined and _joined[-1].gcs == _gcs()
        if address is None or not ours or address == _joined[-1].address:
            return
        log.info("leaving Ray at %s for %s", _joined[-1].address or "a new local instance", address)
        ray.shutdown()
    log.info("connecting to Ray at %s", address or "a new local instance")
    # Each engine actor holds a CPU for the whole run; the read, the write and, on a rerun, Ray Data's checkpoint
    # filter want one each as well. A local instance counts the machine's cores, and on 2 of them a rerun of one
    # actor waited for a CPU for ever, without a word. Its CPUs are a count to schedule by, not cores to pin.
    cpus = max(os.cpu_count() or 1, actors + 3) if _starts_local_ray(address) else None
    ray.init(address=address, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    _joined[:] = [_Joined(address, _gcs())]


def _gcs() -> str | None:
    """The cluster this process is joined to; None when it is joined to none (asking Ray would start one)."""
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


def _starts_local_ray(address: str | None) -> bool:
    """Whether ray.init(address) starts a new local instance rather than joining a running cluster, which refuses a
    num_cpus. "local" always starts one; with no address Ray first joins the cluster RAY_ADDRESS names, or the
    one `ray start` recorded on this machine (found as ray.init finds it)."""
    if address == "local":
        return True
    if address is not None:
        return False
    named = os.environ.get("RAY_ADDRESS")
    if named:
        return named == "local"
    try:  # Ray's own lookup; a Ray without it gets no count, as before there was one
        from ray._private.services import find_bootstrap_address
    except ImportError:
        return False
    return find_bootstrap_address(None) is None


def run_job_ray(job: JobSpec, engines: Any, stop: StopFlag, wait_for_lock: bool = False) -> Summary:
    """run_job's contract (one output row per input row, error rows, resume, a summary), through Ray Data."""
    started = time.monotonic()
    fmt = _check(job)
    out = output_path(job)
    parts = parts_dir(out)
    work = work_dir(out)
    if parts.is_symlink():  # as the work folder: what is written there would land where it points
        raise OutputError(f"{parts} is a symbolic link; kvbatch keeps its parts inside output_dir, remove the link")
    lock = OutputLock(make_work_dir(out) / "lock")
    lock.acquire(wait=wait_for_lock, stop_waiting=lambda: stop.stopped)
    try:
        # Rows a local run of this job committed (its parts, or its shards') would be done again, and left beside.
        if not finished(out, ray=True):
            refuse_other_layouts(out, Shard(0, 1), [parts_dir(out)], job.output.mode, held=out)
        connect(job.parallel.ray_address, job.parallel.ray_actors)
        layout = layout_for(job, {})
        try:
            source = open_ray_input(job, input_columns(job, layout))
        except InputError:
            # A finished output needs no input: cleaned up after the run, it is still done (as in a local run).
            if _complete_without_input(job, out, fmt):
                return already_complete(out, _summary(job, parts, spec_hash(job)))
            raise
        if source.schema is None:  # JSONL: a prompt column no row has is refused here, before any model loads
            first = RowsSource(source, input_columns(job, layout), job.input.batch_rows, job.input.max_line_bytes)
            checked_first_rows(job, first.jsonl_rows())  # checks on the call; the cluster reads the rows again
        else:
            layout = with_input_schema(layout, source.schema)
        fingerprint = {
            **result_fingerprint(job),
            **source.identity,
            **model_identity(job.model),
            **adapters_identity(job_adapters(job)),
        }
        manifest = Manifest(job.name, spec_hash(job), fingerprint, out.name, fmt, num_rows=source.num_rows)
        if _adopt(job, out, manifest):
            return already_complete(out, _summary(job, parts, manifest.spec_hash))
        run = _next_run(parts)
        duplicates = find_duplicates(source, layout.id_column, job) if layout.id_column else {}
        rows = RowsSource(source, input_columns(job, layout), job.input.batch_rows,
                          job.input.max_line_bytes, request_columns(job))  # fmt: skip
        _write(job, engines, rows, layout, duplicates, parts, checkpoint_dir(out), run, stop)
        if source.num_rows == 0:  # Ray writes no file for no rows: the folder is still the output, columns and all
            parts.mkdir(parents=True, exist_ok=True)
            pq.write_table(layout.to_table([]), parts / f"part-{run:04d}-000000-empty.parquet")
        align_parts(parts)
        report = folder_report(parts)
        # What a local run writes into its output, for `kvbatch merge` to write into the single file.
        metadata = {**job_metadata(job, None), **layout.features_metadata()}
        write_json(provenance_path(out), {"model": model_name(job.model), "metadata": metadata})
        if report.num_rows != source.num_rows:
            raise JobError(
                f"{shown_path(parts)} holds {report.num_rows} of {source.num_rows} rows after the Ray run; "
                "rerun to resume",
                job=job.name,
            )
        manifest.complete = True
        manifest.save(work / "manifest.json")
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)  # the manifest says complete now
    finally:
        lock.release()
    counts = run_counts(parts, run, job.task)
    about = {"model": job.model, "spec_hash": manifest.spec_hash, "kvbatch_version": KVBATCH_VERSION}
    # the engines run in the actors: their load, KV use and prefix cache are not measured here
    summary = build_summary(
        job.name, parts, report, counts, time.monotonic() - started, engines_measured=False, **about
    )
    summary.write(summary_path(out))
    return summary


def _check(job: JobSpec) -> str:
    fmt = output_format(job)
    if job.parallel.shard is not None:
        raise SpecError(RAY_SHARD_REFUSAL, field="parallel.shard")
    return fmt


def _summary(job: JobSpec, parts: Path, job_hash: str) -> Summary:
    return Summary(job.name, str(parts), model=job.model, spec_hash=job_hash, kvbatch_version=KVBATCH_VERSION)


def _complete_without_input(job: JobSpec, out: Path, fmt: str) -> bool:
    """Whether the input cannot be found and an earlier run finished this same job (resume): its rows are those of
    the input on record, which an input put back must still match (the manifest keeps its identity)."""
    if job.output.mode != "resume" or input_found(job):
        return False
    path = work_dir(out) / "manifest.json"
    try:
        previous = Manifest.load(path) if path.exists() else None
    except (OSError, ValueError, KeyError, TypeError):
        return False  # the input's error says what to fix first
    if previous is None or not previous.complete or not (parts_dir(out).exists() or out.exists()):
        return False
    current = Manifest(job.name, spec_hash(job), result_fingerprint(job), out.name, fmt)
    refusal = resume_refusal(parts_dir(out), previous, current)
    if refusal:  # as a local run refuses it: the spec changed since
        raise OutputError(refusal)
    log.info("job %s: %s is complete already (same spec; its input is gone); nothing to do", job.name, out)
    return True


def _adopt(job: JobSpec, out: Path, manifest: Manifest) -> bool:
    """Decide what an earlier run's files mean (output.mode); True when that run finished this same job."""
    parts, path = parts_dir(out), work_dir(out) / "manifest.json"
    previous = previous_manifest(path, job.output.mode)  # one that cannot be read is refused, as in a local run
    started = parts.exists() or checkpoint_dir(out).exists()
    if job.output.mode == "error" and (started or out.exists()):
        raise OutputError(f"{shown_path(parts)} already exists and output.mode is 'error'; remove it or choose resume")
    if job.output.mode == "overwrite" or previous is None:
        if previous is None and started and job.output.mode == "resume":
            raise OutputError(
                f"{shown_path(parts)} exists but has no kvbatch manifest, so it may belong to something else; "
                "set output.mode: overwrite to replace it"
            )
        shutil.rmtree(parts, ignore_errors=True)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    else:
        refusal = resume_refusal(parts, previous, manifest)
        if refusal:
            raise OutputError(refusal)
        if previous.complete and (parts.exists() or out.exists()):
            log.info("job %s: %s is complete already (same spec); nothing to do", job.name, parts)
            return True
    manifest.save(path)
    return False


def _next_run(parts: Path) -> int:
    """Part files are named part-RRRR-...: run RRRR (this is the folder's next)."""
    runs = [int(p.name[5:9]) for p in parts.glob("part-*") if p.name[5:9].isdigit()] if parts.exists() else []
    return max(runs, default=-1) + 1


def _write(job, engines, rows: RowsSource, layout, duplicates, parts, checkpoint, run, stop: StopFlag) -> None:
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = getattr(context, "checkpoint_config", None)
    # What GenerateBatch raises, as it is (where this Ray has the setting): Ray Data's UserCodeException wrapper
    # loses its __cause__ on the way to the driver, and with it a refusing actor's SpecError.
    saved_raise = getattr(context, "raise_original_map_exception", None)
    if saved_raise is not None:
        context.raise_original_map_exception = True
    try:
        from ray.data.checkpoint import CheckpointConfig
    except ImportError:  # a Ray without Data checkpointing: skip the rows of the folder's readable files
        rows.done_rows = done_rows(parts)
    else:
        context.checkpoint_config = CheckpointConfig(
            id_column="row", checkpoint_path=str(checkpoint), delete_checkpoint_on_success=False
        )
    try:
        dataset = ray.data.read_datasource(rows.datasource()).map_batches(
            GenerateBatch,
            fn_constructor_kwargs={
                "job": job,
                "engine_factory": engines.factory,
                "layout": layout,
                "duplicates": duplicates,
            },
            batch_size=job.parallel.ray_batch_rows,
            batch_format="pyarrow",
            concurrency=job.parallel.ray_actors,
            num_gpus=job.parallel.ray_gpus_per_actor or None,
        )
        failure: list[BaseException] = []
        # Made here, not by Ray's writer: a write that ends with no rows reported back (one stopped by a signal
        # before any result came back) deletes a folder it made itself, with any part a task committed meanwhile.
        parts.mkdir(parents=True, exist_ok=True)

        def execute() -> None:
            try:
                dataset.write_parquet(str(parts), filename_provider=_part_names(run, "parquet"))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread below
                failure.append(exc)

        # The write runs beside the main thread, which watches for a signal: committed blocks are kept either way.
        worker = threading.Thread(target=execute, name="kvbatch-ray-write", daemon=True)
        running = set(threading.enumerate())
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            if stop.stopped:
                interrupted = InterruptedJob(
                    f"stopped by {stop.signal_name}; committed blocks are kept, rerun to resume", job=job.name
                )
                _stop_write(worker, running, interrupted)
                raise interrupted
    finally:
        if saved is not None or hasattr(context, "checkpoint_config"):
            context.checkpoint_config = saved
        if saved_raise is not None:
            context.raise_original_map_exception = saved_raise
    if failure:
        exc = failure[0]
        refusal = kvbatch_cause(exc)
        if refusal is not None:  # a setting or a model the actors refused: as a local run raises it
            raise refusal from exc
        raise JobError(
            f"the Ray run failed ({type(exc).__name__}: {str(exc)[:2000]}); committed blocks are kept, rerun to resume",
            job=job.name,
        ) from exc


def _stop_write(worker: threading.Thread, running: set[threading.Thread], why: Exception) -> None:
    """Shut down the Ray Data execution that the write thread `worker` drives, and wait for the thread. Left
    running, it went on calling Ray after the exit's ray.shutdown: "Ray is not initialized" tracebacks after
    kvbatch's own message, or the core worker ending the process (status 1, not 3). Blocks committed so far stay
    committed; a write task cut short leaves a pending checkpoint, which the rerun undoes."""
    try:  # the executor is a thread of its own; Ray has no public way to cancel a write
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return
    for thread in threading.enumerate():
        if isinstance(thread, StreamingExecutor) and thread not in running:
            try:
                thread.shutdown(force=True, exception=why)
            except Exception as exc:  # noqa: BLE001 - a Ray internal: another version may take other arguments
                log.warning("could not stop the Ray write's execution (%s); leaving it to ray.shutdown", exc)
    worker.join(WRITE_STOP_S)
    if worker.is_alive():
        log.warning("the Ray write did not stop within %.0f s; leaving it to ray.shutdown", WRITE_STOP_S)


def kvbatch_cause(exc: BaseException) -> KvbatchError | None:
    """The kvbatch error behind a failed Ray run, if any: Ray wraps what a task raised in a RayTaskError (its
    `cause`, pickled as it was raised), which Ray Data wraps again (`__cause__`)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, KvbatchError):
            return cause
        pending += [current.__cause__, current.__context__, cause if isinstance(cause, BaseException) else None]
    return None


def _part_names(run: int, extension: str) -> Any:
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            # Ray's Parquet writer appends only to names that hold the write's id
            return f"part-{run:04d}-{task_index:06d}-{write_uuid}.{extension}"

    return PartNames()


# ---- duplicate ids, over the whole input ------------------------------------------------------------------


ROWS_PER_KEY_PARTITION = 100_000


def find_duplicates(source: RayInput, id_column: str, job: JobSpec) -> dict[int, int]:
    """{later row of a repeated id: the first row with it}, found on the cluster: a groupby over (row, id key)
    of every readable row. Only the repeats come back to the driver (memory in the number of duplicates)."""
    import ray

    keys = RowsSource(source, [id_column], job.input.batch_rows, job.input.max_line_bytes)
    dataset = ray.data.read_datasource(keys.datasource(keys_of=id_column))
    if "num_partitions" in inspect.signature(dataset.groupby).parameters:
        # Ray's hash shuffle otherwise makes 200 partitions whatever the size (its default_hash_shuffle_parallelism):
        # 200 reduce tasks took 16 s to find the repeats among 14 rows on 2 cores. A partition holds up to
        # ROWS_PER_KEY_PARTITION rows' keys, a few MB; older Rays partition by their blocks instead.
        grouped = dataset.groupby("key", num_partitions=max(1, min(200, -(-source.num_rows // ROWS_PER_KEY_PARTITION))))
    else:
        grouped = dataset.groupby("key")
    repeats = grouped.map_groups(_repeats, batch_format="pyarrow")
    found: dict[int, int] = {}
    for batch in repeats.iter_batches(batch_format="pyarrow", batch_size=4096):
        found.update(zip(batch.column("row").to_pylist(), batch.column("first").to_pylist()))
    if found:
        log.info("job %s: %d rows repeat an earlier row's id", job.name, len(found))
    return found


def _repeats(group: pa.Table) -> pa.Table:
    rows = sorted(group.column("row").to_pylist())
    return pa.table({"row": pa.array(rows[1:], pa.int64()), "first": pa.array([rows[0]] * (len(rows) - 1), pa.int64())})


# ---- what the folder holds --------------------------------------------------------------------------------


def _scan(files: list[str], columns: list[str]) -> Any:
    """The files' columns, batch by batch (bounded memory)."""
    if not files:
        return iter(())
    return pads.dataset(files, format="parquet").to_batches(columns=columns)


def done_rows(parts: Path) -> np.ndarray:
    """The rows of the folder's files, sorted (8 bytes a row: only the keys, never the rows); a file that cannot
    be read (a write cut short) is removed, and its rows are done again."""
    arrays = []
    for file in part_files(parts):
        try:
            arrays.append(pads.dataset(file, format="parquet").to_table(columns=["row"]).column("row").to_numpy())
        except (OSError, pa.ArrowException):
            log.warning("%s cannot be read (a write cut short?); its rows will be done again", file)
            Path(file).unlink()
    return np.sort(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)


def align_parts(parts: Path) -> None:
    """Give the folder's files one schema, so that it reads as one dataset. Each write task types a schema-less
    input's kept columns from its own rows (null where none has a value, int in one file and text in another);
    the files that differ are rewritten, one at a time, to the types a local run's output has (assemble.unify)."""
    files = part_files(parts)
    schemas = [pq.read_schema(f) for f in files]
    if all(s.equals(schemas[0]) for s in schemas):
        return
    target = unify([s.empty_table() for s in schemas]).schema
    for file, schema in zip(files, schemas):
        if schema.equals(target):
            continue
        table = unify([target.empty_table(), pq.read_table(file)]).cast(target)
        aligned = Path(file).with_name(f".{Path(file).name}.aligned")  # hidden: never read as a part
        pq.write_table(table, aligned)
        aligned.replace(file)


def folder_report(parts: Path) -> WriteReport:
    """What the parts folder holds, as a local run's WriteReport: rows, bytes, counts by reason and kind."""
    files = part_files(parts)
    reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    num_rows = 0
    for batch in _scan(files, ["finish_reason", "error_kind"]):
        num_rows += batch.num_rows
        reasons.update(r for r in batch.column("finish_reason").to_pylist() if r is not None)
        kinds.update(k for k in batch.column("error_kind").to_pylist() if k is not None)
    num_bytes = sum(Path(f).stat().st_size for f in files)
    return WriteReport(num_rows, num_bytes, dict(reasons), dict(kinds))


def run_counts(parts: Path, run: int, task: str = "generate") -> RunCounts:
    """This run's rows and tokens: the files it wrote (part-RRRR-*). Input tokens of the rows that ran, counted
    as the engine counts them in a local run: a `task: score` row's continuations are input too."""
    counts = RunCounts()
    columns = ["prompt_tokens", "output_tokens", "error_kind", *(["scores"] if task == "score" else [])]
    for batch in _scan(part_files(parts, f"part-{run:04d}-"), columns):
        ok = pc.is_null(batch.column("error_kind"))
        counts.rows += batch.num_rows
        counts.output_tokens += int(pc.sum(batch.column("output_tokens")).as_py() or 0)
        counts.prompt_tokens += int(pc.sum(pc.filter(batch.column("prompt_tokens"), ok)).as_py() or 0)
        if task == "score":
            scored = pc.list_flatten(pc.filter(batch.column("scores"), ok))
            counts.prompt_tokens += int(pc.sum(pc.struct_field(scored, "num_tokens")).as_py() or 0)
    return counts
