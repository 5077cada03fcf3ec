"""The manifest's journal: a commit appends one line instead of rewriting every earlier part's rows (which made
jobs of millions of rows quadratic); a line cut short by a crash names no part; a full save folds the journal in."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbatch.jobs.manifest import Manifest, PartEntry, journal_path, part_name, part_number


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
