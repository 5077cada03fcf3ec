"""The manifest's journal: a commit appends one line instead of rewriting every earlier part's rows (which made
jobs of millions of rows quadratic); a line cut short by a crash names no part; a full save folds the journal in."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from kvbatch.jobs.manifest import Manifest, PartEntry, RowSet, journal_path, part_name, part_number


def test_commits_append_without_rewriting_and_a_cut_line_is_no_part(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    manifest = Manifest("job", "h1", {"model": "m"}, "out.arrow", "arrow")
    manifest.save(path)
    header = path.read_bytes()
    manifest.append_part(path, PartEntry("part-000000.arrow", 2, [[0, 2]]))
    manifest.append_part(path, PartEntry("part-000001.arrow", 1, [[5, 6]]))
    assert path.read_bytes() == header
    with open(journal_path(path), "ab") as f:
        f.write(b'{"file":"part-000002.arrow","num_rows":3,"ro')  # the machine died mid-append
    loaded = Manifest.load(path)
    assert [p.file for p in loaded.parts] == ["part-000000.arrow", "part-000001.arrow"]
    assert loaded.done_rows() == {0, 1, 5}

    loaded.save(path)  # what the next run does first: one file again
    assert not journal_path(path).exists()
    assert Manifest.load(path).parts == loaded.parts


def test_a_part_in_both_files_counts_once(tmp_path: Path) -> None:
    """A crash after a save that folded the journal in, but before the journal was removed."""
    path = tmp_path / "manifest.json"
    manifest = Manifest("job", "h1", {}, "out.arrow", "arrow")
    manifest.save(path)
    manifest.append_part(path, PartEntry("part-000000.arrow", 2, [[0, 2]]))
    journal = journal_path(path).read_bytes()
    manifest.save(path)
    journal_path(path).write_bytes(journal)
    assert [p.file for p in Manifest.load(path).parts] == ["part-000000.arrow"]


def test_part_numbers_go_on_past_six_digits() -> None:
    # The writer read a part's number as the name's characters 5-10: after part-1000000.arrow it took 100000 and
    # named the next part part-100001.arrow, a part already committed, which the new one replaced.
    assert [part_name(n) for n in (0, 12, 999_999, 1_000_000)] == [
        "part-000000.arrow",
        "part-000012.arrow",
        "part-999999.arrow",
        "part-1000000.arrow",
    ]
    assert [part_number(part_name(n)) for n in (0, 12, 999_999, 1_000_000, 12_345_678)] == [
        0,
        12,
        999_999,
        1_000_000,
        12_345_678,
    ]


def test_json_nested_past_the_parser_is_no_part_and_no_manifest(tmp_path: Path) -> None:
    """A journal line (or a manifest) nested past json.loads' recursion limit raised RecursionError, which no caller
    expects: the run failed with a traceback. Such a line names no part, as a cut line does; such a manifest is
    one that cannot be read (ValueError), which a run refuses, or starts again from under output.mode overwrite."""
    path = tmp_path / "manifest.json"
    manifest = Manifest("job", "h1", {}, "out.arrow", "arrow")
    manifest.save(path)
    manifest.append_part(path, PartEntry("part-000000.arrow", 2, [[0, 2]]))
    with open(journal_path(path), "ab") as f:
        f.write(b'{"file": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    assert [p.file for p in Manifest.load(path).parts] == ["part-000000.arrow"]
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match="manifest.json is nested too deeply to be a manifest"):
        Manifest.load(path)


def test_the_rows_of_a_million_committed_rows_take_a_byte_each(tmp_path: Path) -> None:
    """A resume built the committed rows as a set of ints, about 110 bytes a row: 1.1 GB (and ten seconds) for a job
    of ten million rows before its first new row. They are one byte each now, also while the parts are read in."""
    path = tmp_path / "manifest.json"
    parts = [
        PartEntry(part_name(n), 999, [[n * 1000, n * 1000 + 500], [n * 1000 + 501, n * 1000 + 1000]])
        for n in range(1000)
    ]
    Manifest("job", "h1", {}, "out.arrow", "arrow", parts).save(path)
    manifest = Manifest.load(path)
    tracemalloc.start()
    try:
        done = manifest.done_rows()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(done) == 999_000
    assert (0 in done, 499 in done, 500 in done, 501 in done, 999_999 in done, 1_000_000 in done, -1 in done) == (
        True,
        True,
        False,
        True,
        True,
        False,
        False,
    )
    assert held <= 1_100_000, f"{held} bytes held for 1,000,000 rows"
    assert peak <= 8_000_000, f"{peak} bytes at the peak for 1,000,000 rows"


def test_rows_added_one_at_a_time_take_a_byte_each() -> None:
    """A run adds its finished rows one at a time, to the end of a job: its set of ints grew by about 110 bytes a
    row the whole way (the writer's rows done), where a byte each holds them."""
    tracemalloc.start()
    try:
        done = RowSet()
        for row in range(200_000):
            done.add(row)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(done) == 200_000 and 199_999 in done and 200_000 not in done
    assert held <= 600_000, f"{held} bytes held for 200,000 rows"
    done.add(5)
    assert len(done) == 200_000, "a row added twice counts once"
    assert set(RowSet([[3, 5], [4, 8], [10, 10]])) == {3, 4, 5, 6, 7}
    # A reversed range (a manifest edited by hand) holds no row, as range(5, 3) does, and takes none from others.
    assert set(RowSet([[0, 10], [5, 3]])) == set(range(10))
    assert set(range(10)) - RowSet([[3, 8]]) == {0, 1, 2, 8, 9}, "a plain set of rows, as from a set of ints"
