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


def test_a_row_group_far_larger_than_batch_rows_is_not_held_whole(tmp_path: Path) -> None:
    """pyarrow pre-buffers a row group's column chunks whole by default: a file written as one row group (pyarrow
    writes a million rows to one) was held in memory whole, however small input.batch_rows was. The chunks are now
    read through a buffer, a batch's pages at a time."""
    num_rows = 100_000
    prompts = [f"{i:0200d}" for i in range(num_rows)]  # 20 MB of text in one row group
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet", row_group_size=num_rows, compression="none")
    job = job_from_dict({"name": "j", "input": {"path": "in.parquet", "batch_rows": 64}}, base_dir=str(tmp_path))
    rows = iter(open_reader(job, ["prompt"]))
    before = pa.total_allocated_bytes()
    first = next(rows)
    held = pa.total_allocated_bytes() - before
    assert first.data == {"prompt": prompts[0]}
    assert held < 4 * MIB, f"{held} bytes held for a batch of 64 rows"
    assert sum(1 for _ in rows) == num_rows - 1
