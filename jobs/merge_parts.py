"""`kvbatch merge` of a Ray run's folder: out/answers.parquet.parts/ -> out/answers.parquet, rows in input order.

    out/answers.parquet.parts/part-0000-000000.parquet ┐
    out/answers.parquet.parts/part-0000-000001.parquet ├──> out/answers.parquet   (rows 0..N-1, each once)
    out/answers.parquet.parts/part-0001-000000.parquet ┘    (the job's output format: arrow, parquet, jsonl, openai)

The run must be finished (its manifest says so). The file is written as a local run writes its output (same
columns, same order, same writer), so it equals a local run's file row for row. This step holds the whole output
in memory, as a local run's last step does; the folder itself needs no merge to be read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kvbatch.errors import MergeError

from .assemble import count_by, unify, write_output
from .manifest import Manifest
from .merge import MergeReport, _row_problems
from .ray_run import part_files, provenance_path
from .writer import parts_dir, work_dir

log = logging.getLogger(__name__)


def merge_parts(output: Path) -> MergeReport:
    """Write (or write again) `output` from its Ray run's parts folder (beside it, `output` + `.parts`): the
    manifest beside them says the file belongs to that job."""
    parts = parts_dir(output)
    path = work_dir(output) / "manifest.json"
    try:
        manifest = Manifest.load(path)
    except FileNotFoundError:
        raise MergeError(f"no kvbatch manifest at {path}: {parts} was not written by a kvbatch Ray run") from None
    except (ValueError, KeyError, TypeError) as exc:  # a newer kvbatch's manifest, or one edited by hand
        raise MergeError(
            f"cannot read {path}: {exc}; without it the rows of {parts} cannot be checked, so nothing was merged"
        ) from None
    if not manifest.complete or manifest.num_rows is None:
        raise MergeError(f"{parts} is unfinished; rerun the job to finish it, then merge")
    files = part_files(parts)
    tables = [_read(Path(f)) for f in files]
    table = unify(tables) if tables else pa.table({"row": pa.array([], pa.int64())})
    order = np.argsort(table.column("row").to_numpy(), kind="stable")
    problems = _row_problems(parts.name, table.column("row").to_numpy()[order], range(manifest.num_rows))
    if problems:
        raise MergeError(f"cannot merge into {output}:\n  " + "\n  ".join(problems))
    id_column = "custom_id" if manifest.format == "openai" else None
    provenance = _provenance(output)
    metadata = {k.encode(): v.encode() for k, v in provenance.get("metadata", {}).items()}
    model = provenance.get("model", "")
    num_bytes = write_output(table, order, output, manifest.format, metadata, model=model, id_column=id_column)
    log.info("merged %d parts into %s (%d rows)", len(files), output, len(order))
    return MergeReport(
        output, len(order), num_bytes, len(files), count_by(table, "finish_reason"), count_by(table, "error_kind")
    )


def _provenance(output: Path) -> dict:
    """The run's provenance (jobs/ray_run.py), {} for a folder of a kvbatch that kept none. One that cannot be read
    is refused: merged without it, the output would lose the job's record without a word."""
    path = provenance_path(output)
    try:
        provenance = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        provenance = exc
    metadata = provenance.get("metadata", {}) if isinstance(provenance, dict) else None
    readable = isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    if not readable or not isinstance(provenance.get("model", ""), str):  # type: ignore[union-attr]
        problem = provenance if isinstance(provenance, Exception) else "not the provenance a kvbatch Ray run writes"
        raise MergeError(
            f"cannot read {path}: {problem}; nothing was merged (remove the file to merge without the run's record)"
        )
    return provenance  # type: ignore[return-value]


def _read(path: Path) -> pa.Table:
    return pq.read_table(path)
