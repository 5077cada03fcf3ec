"""OutputWriter: results stream in (any order), are committed in parts, and become one file in input order.

    out/answers.arrow                      the final file (written last, atomically)
    out/.answers.arrow.kvbatch/lock        flock: one run per output
    out/.answers.arrow.kvbatch/manifest.json
    out/.answers.arrow.kvbatch/part-000000.arrow, part-000001.arrow, ...

A part is committed every `part_rows` results or `part_seconds`, whichever comes first, and on any exit,
so a crash loses at most the rows in flight. Modes when the output or its parts already exist:
resume (default: skip finished rows; refuse if the job's results-deciding spec changed), overwrite, error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kvbatch.errors import OutputError, shown_path

from .arrow_io import remove_path
from .assemble import count_by, input_order, read_part, read_parts, write_output
from .atomic import INCOMPLETE, atomic_file, fsync_dir
from .lock import OutputLock, make_work_folder
from .manifest import (
    DTYPE_KEY,
    INPUT_KEY,
    Manifest,
    PartEntry,
    RowSet,
    part_name,
    part_number,
    previous_manifest,
    to_ranges,
)
from .model_identity import ADAPTERS_KEY, MODEL_KEY
from .records import Layout, RowResult
from .spec import describe_changes, fingerprint_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteReport:
    """What the final file holds (all rows, including those finished by earlier runs)."""

    num_rows: int
    num_bytes: int
    finish_reasons: dict[str, int]
    error_kinds: dict[str, int]


def work_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.kvbatch")


def parts_dir(output: Path) -> Path:
    """The folder a Ray run writes: out/answers.parquet -> out/answers.parquet.parts/."""
    return output.with_name(output.name + ".parts")


def make_work_dir(output: Path) -> Path:
    """The output's work folder, created (lock.make_work_folder: a link at its name is refused)."""
    return make_work_folder(work_dir(output))


class OutputWriter:
    def __init__(
        self,
        output: Path,
        fmt: str,
        layout: Layout,
        manifest: Manifest,
        *,
        mode: str = "resume",
        part_rows: int = 1024,
        part_seconds: float = 60.0,
        metadata: dict[str, str] | None = None,
        model: str = "",
        wait_for_lock: bool = False,
    ) -> None:
        self.output = output
        self.fmt = fmt
        self.layout = layout
        self.mode = mode
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.metadata = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
        self.model = model
        self.wait_for_lock = wait_for_lock
        self.stop_waiting: Callable[[], bool] | None = None  # set by the run: a signal ends a wait for the lock
        self.dir = work_dir(output)
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = manifest
        self.already_complete = False
        self._buffer: list[RowResult] = []
        self._last_commit = time.monotonic()
        self._lock = OutputLock(self.dir / "lock")
        self._done = RowSet()

    # -- opening: lock, then decide what existing files mean ---------------------------------------------
    def open(self) -> OutputWriter:
        make_work_dir(self.output)
        if self.mode == "resume" and not os.access(self.dir, os.W_OK) and self._finished_read_only():
            return self
        self._lock.acquire(wait=self.wait_for_lock, stop_waiting=self.stop_waiting)
        try:
            self._adopt_existing()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _adopt_existing(self) -> None:
        previous = self._load_manifest()
        # A run that committed nothing (its model failed to load, say) left nothing to protect: any spec may start.
        nothing_committed = previous is not None and not previous.parts and not previous.complete
        if self.mode == "error" and self.output.exists():
            raise OutputError(
                f"{shown_path(self.output)} already exists and output.mode is 'error'; remove it or choose mode "
                "resume/overwrite"
            )
        if self.mode == "error" and previous and previous.parts:
            what = "finished once (the output file was removed since)" if previous.complete else "has unfinished parts"
            raise OutputError(
                f"{shown_path(self.output)} {what}, recorded in {shown_path(self.dir)}, and output.mode is 'error'; "
                "remove that folder or choose mode resume/overwrite"
            )
        if self.mode == "overwrite" or previous is None or nothing_committed:
            if previous is None and self.output.exists() and self.mode == "resume":
                raise OutputError(
                    f"{shown_path(self.output)} exists but has no kvbatch manifest, so it may belong to something "
                    "else; set output.mode: overwrite to replace it"
                )
            self._clear_parts()
        else:
            refusal = resume_refusal(self.output, previous, self.manifest)
            if refusal:
                raise OutputError(refusal)
            for key in (INPUT_KEY, MODEL_KEY, ADAPTERS_KEY, DTYPE_KEY):
                if self.manifest.fingerprint.get(key) is None and previous.fingerprint.get(key) is not None:
                    # The input (or model) is gone, or the dtype was not resolved for a finished output: the rows
                    # stay those of the one on record, which a new one must still match.
                    self.manifest.fingerprint[key] = previous.fingerprint[key]
            if previous.complete and self.output.exists():
                self.already_complete = True
                self.manifest.parts, self.manifest.complete = previous.parts, True
                self._remove_parts()  # left by a run stopped between finishing the output and removing them
            elif previous.complete:
                log.info("%s was removed after it was finished; running the job again", self.output)
                self._clear_parts()
            else:
                self.manifest.parts = [p for p in previous.parts if self._part_ok(p)]
            self.manifest.num_rows = previous.num_rows
        self._remove_strays()
        self._done = self.manifest.done_rows()
        try:
            self.manifest.save(self.manifest_path)
        except OSError as exc:
            raise OutputError(f"cannot write {self.manifest_path}: {exc.strerror or exc}") from exc

    def _finished_read_only(self) -> bool:
        """Whether the output, in a folder this process cannot write (a read-only mount), is complete under this
        spec: it is then reported as such without the lock, whose file cannot be opened there. Nothing is written,
        and no run of ours can be writing it from here."""
        previous = self._load_manifest()
        if previous is None or not previous.complete or not self.output.exists():
            return False
        if resume_refusal(self.output, previous, self.manifest):
            return False  # the lock's error says why nothing can run here
        self.already_complete = True
        self.manifest.parts, self.manifest.complete, self.manifest.num_rows = previous.parts, True, previous.num_rows
        self._done = self.manifest.done_rows()
        return True

    def _load_manifest(self) -> Manifest | None:
        return previous_manifest(self.manifest_path, self.mode)

    def _part_ok(self, part: PartEntry) -> bool:
        path = self.dir / part.file
        if path.is_symlink():  # its rows would come from wherever it points, outside output_dir
            log.warning("part %s is a symbolic link, not a part this job wrote; its rows will be done again", path)
            return False
        try:
            num_rows = read_part(path).num_rows
        except (OSError, pa.ArrowException):
            num_rows = -1
        if num_rows != part.num_rows:
            log.warning("part %s is missing or damaged; its %d rows will be done again", path, part.num_rows)
            return False
        return True

    def _clear_parts(self) -> None:
        for path in self.dir.glob("part-*"):
            path.unlink()
        self.manifest.parts = []

    def _remove_strays(self) -> None:
        named = {p.file for p in self.manifest.parts}
        for path in self.dir.iterdir():
            if path.name.endswith(INCOMPLETE) or (path.name.startswith("part-") and path.name not in named):
                path.unlink()
        for stray in (self.output.with_name(self.output.name + s) for s in (INCOMPLETE, ".old" + INCOMPLETE)):
            remove_path(stray)  # a file, or (output.format hf) a folder

    # -- streaming --------------------------------------------------------------------------------------
    @property
    def done_rows(self) -> RowSet:
        """Input rows already committed by an earlier run (skip them)."""
        return self._done

    def add(self, result: RowResult) -> None:
        if result.row in self._done:
            raise ValueError(f"row {result.row} was already written")  # a bug in the caller, never data
        self._done.add(result.row)
        self._buffer.append(result)
        if len(self._buffer) >= self.part_rows or time.monotonic() - self._last_commit >= self.part_seconds:
            self.commit_part()

    def _next_part_number(self) -> int:
        # The manifest's parts are in commit order, so the last one has the highest number.
        return part_number(self.manifest.parts[-1].file) + 1 if self.manifest.parts else 0

    def tick(self) -> None:
        """Commit buffered rows once part_seconds have passed, also while no new row finishes."""
        if self._buffer and time.monotonic() - self._last_commit >= self.part_seconds:
            self.commit_part()

    def commit_part(self) -> None:
        """Write buffered results as one part, durably, then name it in the manifest."""
        self._last_commit = time.monotonic()
        if not self._buffer:
            return
        results = sorted(self._buffer, key=lambda r: r.row)
        number = self._next_part_number()
        name = part_name(number)
        table = self.layout.to_table(results)
        self._buffer = []
        entry = PartEntry(name, len(results), to_ranges(r.row for r in results))
        try:
            with atomic_file(self.dir / name) as f:
                with pa.ipc.new_file(f, table.schema) as ipc:
                    ipc.write_table(table)
            self.manifest.append_part(self.manifest_path, entry)
        except OSError as exc:  # disk full, quota, a folder gone: the rows of this part are done again next run
            if entry in self.manifest.parts:
                self.manifest.parts.remove(entry)
            raise OutputError(
                f"cannot commit finished rows to {self.dir}: {exc.strerror or exc}; rows committed before are kept, "
                "fix this (free space?) and rerun to resume"
            ) from exc

    # -- closing ----------------------------------------------------------------------------------------
    def finalize(self, num_rows: int) -> WriteReport:
        """Commit what is left, write the final file in input order, drop the parts. `num_rows` counts the whole
        input (a shard's writer writes its own rows of it)."""
        self.commit_part()
        self.manifest.num_rows = num_rows
        try:
            table = (
                read_parts([self.dir / p.file for p in self.manifest.parts])
                if self.manifest.parts
                else self.layout.to_table([])
            )
        except OSError as exc:  # a part removed, or swapped for a link, since it was committed
            raise OutputError(
                f"cannot read the committed parts in {shown_path(self.dir)}: {exc.strerror or exc}; rerun to do "
                "their rows again"
            ) from exc
        order = self.output_order(table, num_rows)
        metadata = {**self.metadata, **{k.encode(): v.encode() for k, v in self.layout.features_metadata().items()}}
        try:
            num_bytes = write_output(
                table, order, self.output, self.fmt, metadata, model=self.model, id_column=self.layout.id_column
            )
            self.manifest.complete = True
            self.manifest.save(self.manifest_path)
        except OSError as exc:
            self.manifest.complete = False
            raise OutputError(
                f"cannot write {shown_path(self.output)}: {exc.strerror or exc}; every row is committed in parts, "
                "fix this (free space?) and rerun to write it"
            ) from exc
        self._remove_parts()
        return WriteReport(len(order), num_bytes, count_by(table, "finish_reason"), count_by(table, "error_kind"))

    def _remove_parts(self) -> None:
        """Remove the parts of a finished output: the final file holds their rows, so they are only needed until
        it is written."""
        for part in self.manifest.parts:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / part.file).unlink()
        fsync_dir(self.dir)

    def output_order(self, table: pa.Table, num_rows: int) -> np.ndarray:
        """The part rows' positions in output order: every input row once."""
        return input_order(table, num_rows)

    def close(self, failing: BaseException | None = None) -> None:
        """Commit any finished rows still buffered (also after an error) and release the lock.

        `failing`: the error that is already ending the run; a failed commit is then logged, not raised over it.
        """
        try:
            if not self.manifest.complete:
                self.commit_part()
        except OutputError as exc:
            if failing is None:
                raise
            log.error("%s (while stopping because of: %s)", exc, failing)
        finally:
            self._lock.release()

    def __enter__(self) -> OutputWriter:
        return self.open()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(exc)


def resume_refusal(output: Path, previous: Manifest, current: Manifest) -> str | None:
    """Why rows committed under `previous` cannot be resumed by the job of `current` (None: they can)."""
    model_changes = model_change(previous, current)
    if model_changes:
        model = f"model {current.fingerprint.get('model')}"
        if ADAPTERS_KEY in current.fingerprint:
            model += " or of its adapters"
        return (
            f"{shown_path(output)} was written by another model: the files of {model} changed since "
            f"({'; '.join(model_changes)}); restore them to resume, or set output.mode: overwrite to start again "
            "with this model"
        )
    old_input, new_input = previous.fingerprint.get(INPUT_KEY), current.fingerprint.get(INPUT_KEY)
    input_changed = old_input is not None and new_input is not None and old_input != new_input
    if not input_changed and previous.spec_hash in (current.spec_hash, _hash_before_engine_fields(previous, current)):
        return _dtype_refusal(output, previous, current)
    # Another model's files differ too: its name says it. The dtype is said on its own (and a finished output's
    # manifest may leave it unresolved).
    files = (MODEL_KEY, ADAPTERS_KEY, DTYPE_KEY)
    old = {k: v for k, v in previous.fingerprint.items() if k not in files}
    changes = describe_changes(old, {k: v for k, v in current.fingerprint.items() if k not in files})
    return (
        f"{shown_path(output)} was written by a different job spec or input ({'; '.join(changes) or 'spec changed'}); "
        "set output.mode: overwrite to start again"
    )


def model_change(previous: Manifest, current: Manifest) -> list[str]:
    """What differs between the files of one model (and of its adapters) named alike by both manifests; none when
    either has no record of them (an output written before they were kept, a model not in the local cache).
    Another model's or adapter's name is a change of spec, said as such."""
    changes = []
    for key, names in ((MODEL_KEY, ("model",)), (ADAPTERS_KEY, ("adapters", "adapter"))):
        old, new = previous.fingerprint.get(key), current.fingerprint.get(key)
        same_names = all(previous.fingerprint.get(n) == current.fingerprint.get(n) for n in names)
        if old is not None and new is not None and old != new and same_names:
            changes += describe_changes({key: old}, {key: new})
    return changes


def _dtype_refusal(output: Path, previous: Manifest, current: Manifest) -> str | None:
    """Why unfinished rows made with the weights in one dtype cannot be resumed in another. The spec hash holds
    engine.dtype as written, so this is engine.dtype auto on another device (float32 on the cpu, bfloat16 on a
    GPU); a finished output is not run again, and an output of a version that kept no dtype is not compared."""
    old, new = previous.fingerprint.get(DTYPE_KEY), current.fingerprint.get(DTYPE_KEY)
    if previous.complete or old is None or new is None or old == new:
        return None
    return (
        f"{shown_path(output)} has rows made with the weights in {old}, and this run would load them in {new} "
        "(engine.dtype auto is float32 on the cpu, bfloat16 on a CUDA GPU): resume it on the device it ran on "
        "(engine.device), or set output.mode: overwrite to start again"
    )


def _hash_before_engine_fields(previous: Manifest, current: Manifest) -> str | None:
    """The current spec's hash as versions before the engine's result fields (dtype, seed...) gave it, for an
    output such a version wrote (manifest version 1): its results were made under this same job file."""
    if previous.version >= 2 or "engine" not in current.fingerprint:
        return None
    left_out = ("engine", INPUT_KEY, MODEL_KEY, ADAPTERS_KEY, DTYPE_KEY)
    kept = {k: v for k, v in current.fingerprint.items() if k not in left_out}
    return fingerprint_hash(kept)


def remove_output(output: Path) -> None:
    """Delete an output and its work folder (tests, `mode: overwrite` callers that want a clean slate)."""
    remove_path(output)
    shutil.rmtree(work_dir(output), ignore_errors=True)


def metadata_strings(data: dict[str, Any]) -> dict[str, str]:
    import json

    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in data.items()}
