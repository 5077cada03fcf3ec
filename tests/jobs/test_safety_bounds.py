"""Bounded resources: an over-long JSONL line is skipped in bounded memory and becomes an error row; Parquet is read
in record batches of input.batch_rows; the limits are job options.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvbatch.jobs.read_jsonl import open_jsonl
from kvbatch.jobs.readers import open_reader
from kvbatch.jobs.spec import MIB, job_from_dict


def test_a_huge_line_costs_no_memory_and_becomes_an_error_row(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "before"}\n{"prompt": "')
        for _ in range(32):  # a 32 MiB line
            f.write(b"x" * MIB)
        f.write(b'"}\n{"prompt": "after"}\n')
    tracemalloc.start()
    try:
        rows = list(open_jsonl(path, max_line_bytes=64 * 1024).rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, f"reading peaked at {peak / MIB:.1f} MiB for a 32 MiB line"
    assert [r.data for r in rows] == [{"prompt": "before"}, None, {"prompt": "after"}]
    assert rows[1].error.kind == "line_too_long" and "over max_line_bytes (65536 bytes)" in rows[1].error.message


def test_the_default_line_limit_is_megabytes() -> None:
    job = job_from_dict({"name": "j", "input": {"path": "in.jsonl"}})
    assert job.input.max_line_bytes == 8 * MIB


def test_parquet_is_read_in_record_batches(tmp_path: Path, monkeypatch) -> None:
    pq.write_table(
        pa.table({"prompt": [f"p{i}" for i in range(1000)], "unused": list(range(1000))}), tmp_path / "in.parquet"
    )
    asked: list[dict] = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        asked.append(kwargs)
        for batch in real(self, *args, **kwargs):
            assert batch.num_rows <= 64
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    job = job_from_dict({"name": "j", "input": {"path": "in.parquet", "batch_rows": 64}}, base_dir=str(tmp_path))
    rows = list(open_reader(job, ["prompt"]))
    assert len(rows) == 1000 and rows[999].data == {"prompt": "p999"}, "only the columns the job uses"
    assert asked == [{"batch_size": 64, "columns": ["prompt"]}]
