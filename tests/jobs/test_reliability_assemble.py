"""Assembling the final file from parts: input order, each row once, and a clear error when rows are missing or
belong to rows the input no longer has. Parts and outputs are written in memory-sized temp files."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvbatch.errors import JobError
from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.assemble import input_order, read_parts, unify, write_output
from kvbatch.jobs.manifest import to_ranges


def table(rows: list[int]) -> pa.Table:
    return pa.table({"row": pa.array(rows, pa.int64()), "text": [f"t{r}" for r in rows]})


def test_parts_in_any_order_become_input_order(tmp_path: Path) -> None:
    paths = []
    for i, rows in enumerate([[4, 0], [2], [1, 3, 5]]):
        paths.append(tmp_path / f"part-{i}.arrow")
        with pa.ipc.new_file(paths[-1], table(rows).schema) as w:
            w.write_table(table(rows))
    joined = read_parts(paths)
    order = input_order(joined, 6)
    size = write_output(joined, order, tmp_path / "out.arrow", "arrow", {b"k": b"v"})
    out = read_arrow(Path(tmp_path / "out.arrow"))
    assert out.column("row").to_pylist() == list(range(6)) and out.column("text").to_pylist() == [
        f"t{r}" for r in range(6)
    ]
    assert out.schema.metadata == {b"k": b"v"} and size == (tmp_path / "out.arrow").stat().st_size


def open_files() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


def test_assembled_parts_keep_no_file_open(tmp_path: Path) -> None:
    """Each memory-mapped part kept a file descriptor open until the output was written: a job of more parts than
    the open-file limit (a million rows at part_rows 1024, against a common soft limit of 1024) failed at the end
    with "Too many open files", and so did every rerun. The maps stay, the files do not."""
    paths = []
    for i in range(300):
        paths.append(tmp_path / f"part-{i:06d}.arrow")
        with pa.ipc.new_file(paths[-1], table([2 * i + 1, 2 * i]).schema) as w:
            w.write_table(table([2 * i + 1, 2 * i]))
    before = open_files()
    joined = read_parts(paths)
    assert open_files() == before, f"{open_files() - before} files left open by 300 parts"
    order = input_order(joined, 600)
    write_output(joined, order, tmp_path / "out.arrow", "arrow", {})
    out = read_arrow(Path(tmp_path / "out.arrow"))
    assert out.column("row").to_pylist() == list(range(600))
    assert out.column("text").to_pylist() == [f"t{r}" for r in range(600)]


def test_a_row_committed_twice_is_kept_once() -> None:
    assert table([0, 1, 1, 2]).take(pa.array(input_order(table([0, 1, 1, 2]), 3))).column("row").to_pylist() == [
        0,
        1,
        2,
    ]


def test_missing_rows_are_named() -> None:
    with pytest.raises(
        JobError, match=r"2 input rows have no result \(first: \[1, 3\]\); rerun the job to finish them"
    ):
        input_order(table([0, 2]), 4)


def test_rows_beyond_the_input_are_named() -> None:
    with pytest.raises(JobError, match=r"1 results are for rows beyond the input's 2 rows \(first: \[5\]\)"):
        input_order(table([0, 1, 5]), 2)


def test_ranges() -> None:
    assert to_ranges([5, 0, 1, 2, 6, 9]) == [[0, 3], [5, 7], [9, 10]] and to_ranges([]) == []


def test_only_truly_conflicting_columns_become_json_text() -> None:
    """`a` (int in one part, float in the other) keeps a number type, as one part holding both rows would; `b`
    (a number, then text) becomes JSON text in both cases. Types never depend on where parts were cut."""
    parts = [pa.table({"row": [0], "a": [1], "b": [1]}), pa.table({"row": [1], "a": [2.5], "b": ["x"]})]
    joined = unify(parts)
    assert joined.schema.field("a").type == pa.float64() and joined.column("a").to_pylist() == [1.0, 2.5]
    assert joined.schema.field("b").type == pa.string() and joined.column("b").to_pylist() == ["1", "x"]


def test_a_conflicting_column_keeps_nanosecond_times_as_json_text() -> None:
    """A column of times in one part and text in another: JSON text, each time as the JSONL output writes it, to
    the nanosecond (it was read as a datetime.time, which JSON has no type for and which holds microseconds)."""
    at = pa.array([123_456_789_012], pa.int64()).cast(pa.time64("ns"))
    slot = pa.StructArray.from_arrays([at], ["at"])
    parts = [
        pa.table({"row": [0], "t": at, "s": slot}),
        pa.table({"row": [1], "t": ["x"], "s": ["y"]}),
    ]
    joined = unify(parts)
    assert joined.column("t").to_pylist() == ["00:02:03.456789012", "x"]
    assert joined.column("s").to_pylist() == ['{"at": "00:02:03.456789012"}', "y"]


def test_a_struct_parquet_cannot_hold_keeps_nanosecond_times(tmp_path: Path) -> None:
    at = pa.array([123_456_789_012], pa.int64()).cast(pa.time64("ns"))
    kept = pa.StructArray.from_arrays([at, pa.array([{}], pa.struct([]))], ["at", "empty"])
    parts = pa.table({"row": [0], "kept": kept})
    write_output(parts, input_order(parts, 1), tmp_path / "out.parquet", "parquet", {})
    assert pq.read_table(tmp_path / "out.parquet").column("kept").to_pylist() == [
        '{"at": "00:02:03.456789012", "empty": {}}'
    ]
