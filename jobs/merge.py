"""`kvbatch merge`: finished shard outputs -> one output in input order, or a refusal that lists what is wrong.

    out/answers.shard-0000-of-0004.arrow ┐
    out/answers.shard-0001-of-0004.arrow ├──> out/answers.arrow   (rows 0..N-1, each once)
    out/answers.shard-0002-of-0004.arrow │
    out/answers.shard-0003-of-0004.arrow ┘

Each shard must be complete (its manifest says so) and written by the same job spec (same spec hash), with the
weights in the same dtype (engine.dtype auto resolves by device), and must hold exactly its own rows (row % N ==
I). Anything else (a shard file missing, unfinished, from another spec, a row missing or present twice) stops the
merge with the list, before anything is written.
The merged output gets a manifest marked complete, so rerunning the unsharded job finds it done.
A merge can also target one shard (data parallel inside a Slurm shard): its sources are that shard's splits.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kvbatch.errors import MergeError, MergeTargetError

from . import json_text
from .arrow_io import read_arrow
from .assemble import count_by, unify, write_output
from .atomic import atomic_file
from .lock import OutputLock
from .manifest import DTYPE_KEY, INPUT_KEY, Manifest
from .model_identity import ADAPTERS_KEY, MODEL_KEY
from .shard import Shard, split_shard_name
from .spec import describe_changes
from .summary import RunCounts, Summary, build_summary, summary_path
from .writer import model_change, work_dir

log = logging.getLogger(__name__)
WHOLE = Shard(0, 1)


_SUFFIX = {"arrow": ".arrow", "parquet": ".parquet", "jsonl": ".jsonl", "openai": ".jsonl", "hf": ".hf"}


@dataclass(frozen=True)
class MergeReport:
    output: Path
    num_rows: int  # rows in the merged output
    num_bytes: int
    num_shards: int
    finish_reasons: dict[str, int]
    error_kinds: dict[str, int]
    already_merged: bool = False  # the output was complete and its shards gone: nothing was written


@dataclass
class _Source:
    path: Path
    shard: Shard
    manifest: Manifest


def find_shards(output: Path) -> list[Path]:
    """Shard outputs beside `output` (out/answers.arrow -> out/answers.shard-*-of-*.arrow), finished or not, sorted."""
    pattern = f"{glob.escape(output.stem)}.shard-*-of-*{glob.escape(output.suffix)}"
    finished = set(output.parent.glob(pattern))
    started = {
        d.with_name(d.name[1 : -len(".kvbatch")]) for d in output.parent.glob(f".{pattern}.kvbatch")
    }  # see work_dir
    found = [p for p in finished | started if split_shard_name(p)]
    return sorted(found, key=lambda p: split_shard_name(p)[1])  # type: ignore[index]


def merge_shards(
    output: Path,
    shards: list[Path] | None = None,
    *,
    target: Shard = WHOLE,
    overwrite: bool = False,
    locked: bool = False,
    spec_hash: str | None = None,
) -> MergeReport:
    """Merge shard outputs into `output` (the rows of `target`: the whole input by default). `locked`: the caller
    holds the output's lock already (a data-parallel run, from before its shards ran). With no shard found, an
    output already complete (of `spec_hash`, when given) is reported as merged before, as a run reports it."""
    paths = sorted(shards) if shards else find_shards(output)
    named = split_shard_name(output)
    if not paths and named is not None:  # no run writes shards of a shard: the merged output was meant
        raise MergeTargetError(
            f"{output} is a shard output (shard {named[1]}), not a merged output; merge its shards into the output "
            f"they make up: kvbatch merge {named[0]}"
        )
    if not paths:
        return _already_merged(output, spec_hash)
    sources, problems = _open_sources(paths, target)
    if problems:
        raise MergeError(f"cannot merge into {output}:\n  " + "\n  ".join(problems))
    first = sources[0].manifest
    suffix = _SUFFIX[first.format]
    if output.suffix != suffix:  # merge copies the shards' format; a .parquet name on Arrow bytes would mislead
        raise MergeError(
            f"cannot merge into {output}: the shards are {first.format} files, so the target must end in {suffix}"
        )
    num_input_rows = first.num_rows or 0
    folder = _prepare(output, first, overwrite)
    lock: contextlib.AbstractContextManager[Any] = (
        contextlib.nullcontext() if locked else OutputLock(folder / "lock", advice="merge again once it has finished")
    )
    with lock:
        merged = Manifest(
            first.job,
            first.spec_hash,
            first.fingerprint,
            output.name,
            first.format,
            [],
            False,
            num_input_rows,
            first.version,
        )  # a spec hash of the version the shards ran
        # Named before the output is written: a merge killed after that write finds its own output when rerun.
        merged.save(work_dir(output) / "manifest.json")
        if first.format in ("jsonl", "openai"):
            num_bytes, counts = _merge_lines(sources, output, target, num_input_rows)
        else:
            num_bytes, counts = _merge_tables(sources, output, target, num_input_rows)
        merged.complete = True
        merged.save(work_dir(output) / "manifest.json")
        report = MergeReport(output, target.num_rows(num_input_rows), num_bytes, len(sources), *counts)
        _merged_summary(report, first, sources).write(summary_path(output))
    log.info("merged %d shards into %s (%d rows)", len(sources), output, report.num_rows)
    return report


def _already_merged(output: Path, spec_hash: str | None) -> MergeReport:
    """The report on `output` when no shard of it is left: a merge run again after the shards were cleaned up (a
    cron or Slurm step) finds it complete. Without a complete output of this spec, the missing shards are refused."""
    missing = f"no shard outputs found beside {output} (expected {output.stem}.shard-IIII-of-NNNN{output.suffix})"
    try:
        manifest = Manifest.load(work_dir(output) / "manifest.json")
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        raise MergeError(missing) from None
    if not (manifest.complete and manifest.num_rows is not None and output.exists()):
        raise MergeError(missing)
    if spec_hash is not None and manifest.spec_hash != spec_hash:
        raise MergeError(f"{missing}; {output} is complete but was written by another job spec")
    return MergeReport(output, manifest.num_rows, 0, 0, {}, {}, already_merged=True)


def _merged_summary(report: MergeReport, first: Manifest, sources: list[_Source]) -> Summary:
    """The output's summary, as a run of the whole job would leave it (a rerun reports it as already complete):
    the rows counted in the merged file, the tokens and preemptions added up from the shards' own summaries."""
    shards = [_shard_summary(summary_path(source.path)) for source in sources]
    counts = sum((RunCounts.of(shard) for shard in shards), RunCounts())
    counts.rows = 0  # a merge generates nothing
    about = {
        "model": next((s["model"] for s in shards if s.get("model")), ""),
        "spec_hash": first.spec_hash,
        "kvbatch_version": next((s["kvbatch_version"] for s in shards if s.get("kvbatch_version")), ""),
    }
    return build_summary(first.job, report.output, report, counts, 0.0, **about)


def _shard_summary(path: Path) -> dict[str, Any]:
    """A shard's summary as JSON; {} when it has none or it cannot be read (edited by hand): the merged output is
    already written by then and its rows are counted from the file, so only that shard's tokens go uncounted."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        RunCounts.of(data)  # its counts must be numbers, as the sum over the shards takes them
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("cannot read %s (%s); the merged summary leaves out that shard's token counts", path, exc)
        return {}
    return data


def _open_sources(paths: list[Path], target: Shard) -> tuple[list[_Source], list[str]]:
    """Read every shard's manifest; return them with the list of everything that stops the merge."""
    problems: list[str] = []
    sources: list[_Source] = []
    named_shards: list[Shard] = []
    for path in paths:
        named = split_shard_name(path)
        if named is None:
            problems.append(f"{path.name}: not a shard output name (NAME.shard-IIII-of-NNNN.EXT)")
            continue
        named_shards.append(named[1])
        manifest_path = work_dir(path) / "manifest.json"
        try:
            manifest = Manifest.load(manifest_path)
        except FileNotFoundError:
            problems.append(f"{path.name}: no kvbatch manifest at {manifest_path} (was it written by kvbatch?)")
            continue
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name}: unreadable manifest ({exc})")
            continue
        if not manifest.complete:
            problems.append(
                f"{path.name}: unfinished ({len(manifest.done_rows())} rows committed); rerun shard {named[1]} to "
                "finish it"
            )
            continue
        if not path.exists():
            problems.append(
                f"{path.name}: finished once, but the file is gone; rerun shard {named[1]} to write it again"
            )
            continue
        sources.append(_Source(path, named[1], manifest))
    if named_shards:
        problems += _check_cover(named_shards, target, next(p for p in paths if split_shard_name(p)))
    if not sources:
        return sources, problems
    first = sources[0]
    for s in sources[1:]:
        if s.manifest.spec_hash != first.manifest.spec_hash:
            # What changed, as a refused resume says it (the input is compared on its own below).
            files = (INPUT_KEY, MODEL_KEY, ADAPTERS_KEY)
            changes = describe_changes(
                {k: v for k, v in first.manifest.fingerprint.items() if k not in files},
                {k: v for k, v in s.manifest.fingerprint.items() if k not in files},
            )
            problems.append(
                f"{s.path.name}: written by another job spec than {first.path.name} (spec hash "
                f"{s.manifest.spec_hash} != {first.manifest.spec_hash}"
                + (f"; {', '.join(changes)}" if changes else "")
                + ")"
            )
        if s.manifest.fingerprint.get(INPUT_KEY) != first.manifest.fingerprint.get(INPUT_KEY):
            problems.append(
                f"{s.path.name}: read another input than {first.path.name} (the input changed between their runs)"
            )
        model_changes = model_change(first.manifest, s.manifest)
        if model_changes:
            problems.append(
                f"{s.path.name}: written by another model than {first.path.name} (the model at "
                f"{s.manifest.fingerprint.get('model')} changed between their runs; {', '.join(model_changes)})"
            )
        # The spec hash holds engine.dtype as written: auto made float32 on a cpu node and bfloat16 on a GPU one. A
        # shard of a version that kept no dtype is not compared.
        dtypes = (first.manifest.fingerprint.get(DTYPE_KEY), s.manifest.fingerprint.get(DTYPE_KEY))
        if None not in dtypes and dtypes[0] != dtypes[1]:
            problems.append(
                f"{s.path.name}: made with the weights in {dtypes[1]}, {first.path.name} in {dtypes[0]} "
                "(engine.dtype auto is float32 on the cpu, bfloat16 on a CUDA GPU); rerun one of them on the other's "
                "kind of device with output.mode: overwrite"
            )
        if s.manifest.num_rows != first.manifest.num_rows:
            problems.append(
                f"{s.path.name}: saw {s.manifest.num_rows} input rows, {first.path.name} saw "
                f"{first.manifest.num_rows} (did the input change?)"
            )
        if s.manifest.format != first.manifest.format:
            problems.append(f"{s.path.name}: format {s.manifest.format}, {first.path.name}: {first.manifest.format}")
    return sources, problems


def _check_cover(shards: list[Shard], target: Shard, example: Path) -> list[str]:
    """The shards must be exactly the splits of `target`: all of them, each once."""
    counts = {s.count for s in shards}
    if len(counts) > 1:
        shown = ", ".join(map(str, sorted(counts)))
        return [
            f"shards of different counts ({shown}), of several runs; merge one run's shards at a time, listing them "
            "(kvbatch merge OUTPUT SHARD...), or remove the other run's shard files"
        ]
    count = counts.pop()
    if count % target.count:
        return [f"shards of {count} cannot make up shard {target}"]
    expected = {s.index for s in target.split(count // target.count)}
    have = [s.index for s in shards]
    problems = [f"shard {i}/{count} is given twice" for i in sorted({i for i in have if have.count(i) > 1})]
    problems += [f"shard {i}/{count} does not belong to shard {target}" for i in sorted(set(have) - expected)]
    base = split_shard_name(example)[0]  # type: ignore[index]
    problems += [
        f"missing: {Shard(i, count).output_path(base).name} (shard {i}/{count})" for i in sorted(expected - set(have))
    ]
    return problems


def _prepare(output: Path, first: Manifest, overwrite: bool) -> Path:
    """Refuse to replace an output that another job wrote; return the output's work folder."""
    folder = work_dir(output)
    manifest_path = folder / "manifest.json"
    previous = None
    if manifest_path.exists() and not overwrite:
        try:
            previous = Manifest.load(manifest_path)
        except (ValueError, KeyError, TypeError) as exc:  # a newer kvbatch's manifest, or not one of ours
            raise MergeError(
                f"cannot read {manifest_path}: {exc}; the output's work folder may hold another run's rows, so "
                "nothing was merged: merge with --overwrite to replace it"
            ) from None
    if output.exists() and not overwrite:
        if previous is None or previous.spec_hash != first.spec_hash:
            raise MergeError(
                f"{output} exists and was not written by this job's spec; remove it or merge with --overwrite"
            )
    if previous is not None and previous.parts and not previous.complete and previous.spec_hash != first.spec_hash:
        # An unfinished run of another spec: the merged manifest would drop the parts it names, and their rows.
        raise MergeError(
            f"{folder} holds rows another job spec committed (an unfinished run on {output.name}); finish or remove "
            "that run, or merge with --overwrite"
        )
    if folder.is_symlink():  # the lock and manifest would land wherever it points
        raise MergeError(f"{folder} is a symbolic link; kvbatch keeps its work files beside the output, remove it")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _read_table(path: Path, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path)
    return read_arrow(path)  # a stream, an older IPC file, or a save_to_disk folder


def _row_problems(name: str, rows: np.ndarray, expected: range) -> list[str]:
    want = np.arange(expected.start, expected.stop, expected.step)
    if np.array_equal(rows, want):
        return []
    values, counts = np.unique(rows, return_counts=True)
    missing = np.setdiff1d(want, values)
    duplicated = values[counts > 1]
    foreign = np.setdiff1d(values, want)
    problems = []
    for label, found in (("missing", missing), ("duplicated", duplicated), ("not of this shard", foreign)):
        if len(found):
            problems.append(
                f"{name}: {len(found)} rows {label}: {found[:20].tolist()}{' ...' if len(found) > 20 else ''}"
            )
    return problems or [f"{name}: rows are not in input order"]


def _merge_tables(sources: list[_Source], output: Path, target: Shard, num_input_rows: int) -> tuple[int, tuple]:
    tables, problems = [], []
    for s in sources:
        table = _read_table(s.path, s.manifest.format)
        problems += _row_problems(s.path.name, table.column("row").to_numpy(), s.shard.rows(num_input_rows))
        tables.append(table)
    if problems:
        raise MergeError(f"cannot merge into {output}:\n  " + "\n  ".join(problems))
    table = unify(tables)
    order = np.argsort(table.column("row").to_numpy(), kind="stable")
    metadata = _merged_metadata(tables[0].schema.metadata or {}, target)
    num_bytes = write_output(table, order, output, sources[0].manifest.format, metadata)
    return num_bytes, (count_by(table, "finish_reason"), count_by(table, "error_kind"))


def _merged_metadata(first: dict[bytes, bytes], target: Shard) -> dict[bytes, bytes]:
    """The first shard's provenance, as the merged output's: its job names the target, not the first shard."""
    metadata = dict(first)
    if b"kvbatch.job" in metadata:
        job = json.loads(metadata[b"kvbatch.job"])
        job.setdefault("parallel", {})["shard"] = None if target == WHOLE else str(target)
        metadata[b"kvbatch.job"] = json.dumps(job, sort_keys=True, default=str).encode()
    return metadata


def _merge_lines(sources: list[_Source], output: Path, target: Shard, num_input_rows: int) -> tuple[int, tuple]:
    """JSONL outputs: row r is the next line of the shard that owns r, so the files are interleaved, streaming."""
    problems = []
    fmt = sources[0].manifest.format
    value_kinds: dict[str, set[str]] = {}  # JSONL column -> the kinds of its values in any shard
    for s in sources:
        num_lines = _scan_lines(s.path, value_kinds if fmt == "jsonl" else None)
        if num_lines != s.shard.num_rows(num_input_rows):
            problems.append(
                f"{s.path.name}: {num_lines} lines, expected {s.shard.num_rows(num_input_rows)} (rows of shard "
                f"{s.shard})"
            )
    if problems:
        raise MergeError(f"cannot merge into {output}:\n  " + "\n  ".join(problems))
    retyped = _retyped_columns(value_kinds)
    count = sources[0].shard.count
    files = {s.shard.index: open(s.path, "rb") for s in sources}
    paths = {s.shard.index: s.path for s in sources}
    lines_read = dict.fromkeys(files, 0)
    reasons: dict[str, int] = {}
    kinds: dict[str, int] = {}
    try:
        with atomic_file(output) as out:
            for row in target.rows(num_input_rows):
                index = row % count
                line = files[index].readline()
                lines_read[index] += 1
                where = f"{paths[index].name}: line {lines_read[index]}"
                record = _check_line(_record(line, where), row, fmt, reasons, kinds, where)
                out.write(_retyped_line(record, retyped) if retyped else line)
            num_bytes = out.tell()
    finally:
        for f in files.values():
            f.close()
    return num_bytes, (reasons, kinds)


def _scan_lines(path: Path, value_kinds: dict[str, set[str]] | None) -> int:
    """The file's lines; with `value_kinds`, each JSONL column's kinds of values are added to it."""
    num_lines = 0
    with open(path, "rb") as f:
        for line in f:
            num_lines += 1
            if value_kinds is not None:
                for name, value in _record(line, f"{path.name}: line {num_lines}").items():
                    if value is not None:
                        value_kinds.setdefault(name, set()).add(_kind(value))
    return num_lines


def _record(line: bytes, where: str) -> dict[str, Any]:
    """A shard's line as its record; a line that is no JSON object stops the merge, naming `where` (file: line)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's parser
        record = None
    if not isinstance(record, dict):
        raise _edited(where)
    return record


def _edited(where: str) -> MergeError:
    return MergeError(f"{where} is not a kvbatch output row: a shard file was edited after it was written")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return type(value).__name__
    return "str" if isinstance(value, str) else "nested"


def _retyped_columns(value_kinds: dict[str, set[str]]) -> dict[str, str]:
    """JSONL columns whose values the shards hold as types one run joins (assemble.unify across its parts, Arrow
    within one): -> "text" (of different types: JSON text) or "float" (ints among floats)."""
    retyped = {}
    for name, found in value_kinds.items():
        joined = found - {"int"} if "float" in found else found  # Arrow promotes ints among floats to floats
        if len(joined) > 1:
            retyped[name] = "text"
        elif found == {"int", "float"}:
            retyped[name] = "float"
    return retyped


def _retyped_line(record: dict[str, Any], retyped: dict[str, str]) -> bytes:
    for name, to in retyped.items():
        value = record.get(name)
        if value is None or isinstance(value, str):
            continue
        record[name] = float(value) if to == "float" else json_text.value_text(value)
    return json_text.dumps(record, ensure_ascii=False).encode() + b"\n"


def _check_line(
    record: dict[str, Any], row: int, fmt: str, reasons: dict[str, int], kinds: dict[str, int], where: str
) -> dict[str, Any]:
    """Count a line's finish reason and error kind, as a run's summary counts them from its table; return its
    record. A line without them stops the merge, naming `where`."""
    if fmt == "jsonl":
        if record.get("row") != row:
            raise MergeError(
                f"expected row {row}, found row {record.get('row')}: a shard file was edited after it was written"
            )
        reason, kind = record.get("finish_reason"), record.get("error_kind")
    else:  # OpenAI Batch: {"error": {"code": <error kind>, ...}} or {"response": {"body": {"choices": [...]}}}
        try:
            if record.get("error"):
                reason, kind = "error", record["error"]["code"]
            else:
                reason, kind = record["response"]["body"]["choices"][0]["finish_reason"], None
        except (KeyError, IndexError, TypeError):
            raise _edited(where) from None
    reasons[str(reason)] = reasons.get(str(reason), 0) + 1
    if kind is not None:
        kinds[str(kind)] = kinds.get(str(kind), 0) + 1
    return record
