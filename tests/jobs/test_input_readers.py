"""Readers: Parquet in record batches, JSONL streamed with bad lines as error rows, datasets folders, OpenAI Batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvbatch.errors import ErrorKind, InputError, SpecError
from kvbatch.jobs.read_jsonl import jsonl_rows
from kvbatch.jobs.readers import open_reader
from kvbatch.jobs.spec import MAX_INT64, job_from_dict, result_fingerprint


def job_for(tmp_path: Path, path: str, **input_fields):
    return job_from_dict({"name": "t", "input": {"path": path, **input_fields}}, base_dir=str(tmp_path))


def write_parquet(path: Path, num_rows: int, row_group_size: int = 4) -> Path:
    table = pa.table(
        {
            "id": list(range(num_rows)),
            "prompt": [f"question {i}" for i in range(num_rows)],
            "unused": ["x" * 10] * num_rows,
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_streams_record_batches_of_the_needed_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_parquet(tmp_path / "in.parquet", 10)
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        for batch in real(self, *args, **kwargs):
            calls.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    reader = open_reader(job_for(tmp_path, "in.parquet", batch_rows=3), ["prompt", "id"])
    assert (reader.num_rows, reader.columns) == (10, ["id", "prompt", "unused"])
    rows = iter(reader)
    first = next(rows)
    assert (first.index, first.data) == (0, {"id": 0, "prompt": "question 0"})  # only the columns the job uses
    assert calls == [{"batch_size": 3, "columns": ["prompt", "id"]}, 3]  # one batch read so far, not the file
    rest = list(rows)
    assert [r.index for r in rest] == list(range(1, 10))
    assert calls[1:] == [3, 3, 3, 1]


def test_a_missing_columns_message_shows_the_files_other_names_escaped(tmp_path: Path) -> None:
    """The message lists the file's columns, whose names are data: a Parquet column named with an escape sequence
    (`\x1b[2J` clears the screen) or a bell reached the terminal as a command. A name that is not printable is shown
    as Python writes it."""
    pq.write_table(pa.table({"id": [1], "\x1b[2Jq\x07": ["x"]}), tmp_path / "in.parquet")
    with pytest.raises(SpecError) as info:
        open_reader(job_for(tmp_path, "in.parquet"), ["prompt"])
    assert str(info.value) == "input: column 'prompt' not in in.parquet (its columns: id, '\\x1b[2Jq\\x07')"


def test_missing_column_fails_before_reading_naming_the_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "in.parquet", 2)
    with pytest.raises(SpecError) as info:
        open_reader(job_for(tmp_path, "in.parquet"), ["question"])
    assert "column 'question' not in in.parquet (its columns: id, prompt, unused)" in str(info.value)
    assert info.value.field == "input"


def test_missing_or_unreadable_files_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input not found"):
        open_reader(job_for(tmp_path, "nope.parquet"), ["prompt"])
    with pytest.raises(InputError, match="input not found"):
        open_reader(job_for(tmp_path, "nope.jsonl"), ["prompt"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read Parquet file"):
        open_reader(job_for(tmp_path, "bad.parquet"), ["prompt"])


def test_jsonl_bad_lines_become_error_rows_naming_the_line(tmp_path: Path) -> None:
    lines = [
        b'\xef\xbb\xbf{"prompt": "first"}',  # a byte-order mark is not data
        b"",  # blank lines are not rows
        b'{"prompt": "unclosed"',
        b"[1, 2]",
        b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"prompt": "' + b"a" * 200 + b'"}',
        b'{"prompt": "last"}',
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))  # no newline after the last line
    reader = open_reader(job_for(tmp_path, "in.jsonl", max_line_bytes=100), ["prompt"])
    assert reader.num_rows == 6 and reader.columns is None
    rows = list(reader)
    assert [(r.index, r.line) for r in rows] == [(0, 1), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7)]
    assert rows[0].data == {"prompt": "first"} and rows[0].error is None
    assert (rows[1].error.kind, rows[1].error.message) == (
        ErrorKind.BAD_JSON,
        "row 1 (line 3): invalid JSON at column 22: Expecting ',' delimiter",
    )
    assert (rows[2].error.kind, rows[2].error.message) == (
        ErrorKind.NOT_AN_OBJECT,
        "row 2 (line 4): expected a JSON object, got list",
    )
    assert rows[3].error.kind == ErrorKind.INVALID_UTF8 and rows[3].error.message.startswith(
        "row 3 (line 5): invalid UTF-8 at byte 15"
    )
    assert (
        rows[4].error.kind == ErrorKind.LINE_TOO_LONG
        and "row 4 (line 6)" in rows[4].error.message
        and "max_line_bytes (100 bytes)" in rows[4].error.message
    )
    assert rows[5].data == {"prompt": "last"} and rows[5].error is None


def test_a_jsonl_key_given_twice_in_one_object_is_its_row_s_error(tmp_path: Path) -> None:
    """json.loads keeps a repeated key's last value without a word: {"prompt": "a", "prompt": "z"} asked "z",
    where pyarrow's and `datasets`' JSON readers refuse the line. A key repeated in any object of a line (a message
    too) makes that line a bad_json row, naming the key; the same key in two objects is fine."""
    lines = [
        '{"prompt": "a", "prompt": "z"}',
        '{"messages": [{"role": "user", "content": "hi", "role": "system"}]}',
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": 1}',
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    rows = list(open_reader(job_for(tmp_path, "in.jsonl"), ["prompt"]))
    assert [(r.error.kind, r.error.message) for r in rows[:2]] == [
        (ErrorKind.BAD_JSON, "row 0 (line 1): invalid JSON: key 'prompt' appears twice in one object"),
        (ErrorKind.BAD_JSON, "row 1 (line 2): invalid JSON: key 'role' appears twice in one object"),
    ]
    assert rows[2].error is None and rows[2].data["id"] == 1


@pytest.mark.parametrize(
    "data",
    [
        b'\xef\xbb\xbf\n{"prompt": "a"}\n',  # a first line of only a byte-order mark
        b'{"prompt": "a"}\n' + b" " * 300 + b'\n{"prompt": "b"}\n',  # a blank line over max_line_bytes
        b"\xef\xbb\xbf" + b"\t" * 300 + b'\n{"prompt": "a"}',
    ],
)
def test_jsonl_rows_are_the_rows_counted(tmp_path: Path, data: bytes) -> None:
    # The count is the progress total, and a Ray run numbers a file's rows from the counts of the files before it:
    # a blank first line with a byte-order mark was counted but no row, a long blank line a row but not counted, so
    # the next file's rows left a gap (a row never done) or took the same numbers (a row lost).
    (tmp_path / "in.jsonl").write_bytes(data)
    reader = open_reader(job_for(tmp_path, "in.jsonl", max_line_bytes=100), ["prompt"])
    rows = list(reader)
    assert reader.num_rows == len(rows) and all(r.error is None for r in rows)
    assert [r.index for r in rows] == list(range(len(rows)))


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_max_line_bytes_counts_a_lines_content_whatever_its_ending(tmp_path: Path, ending: bytes) -> None:
    # A line of exactly max_line_bytes was read with LF but became line_too_long with CRLF: the limit counted the
    # "\r" of the ending. A first line's byte-order mark is not content either.
    fits = b'{"prompt": "' + b"a" * 86 + b'"}'  # 100 bytes
    over = b'{"prompt": "' + b"a" * 87 + b'"}'
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf" + ending.join([fits, over, fits, fits]))  # no last ending
    reader = open_reader(job_for(tmp_path, "in.jsonl", max_line_bytes=100), ["prompt"])
    rows = list(reader)
    assert reader.num_rows == len(rows) == 4
    assert [r.error.kind if r.error else None for r in rows] == [None, ErrorKind.LINE_TOO_LONG, None, None]
    assert [(r.index, r.line) for r in rows] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert rows[0].data == rows[2].data == rows[3].data == {"prompt": "a" * 86}
    with open(tmp_path / "in.jsonl", "rb") as handle:  # the setting's largest value still reads
        assert all(r.error is None for r in jsonl_rows(handle, max_line_bytes=MAX_INT64 - 1))
    # and opens: the check of the first line read past an index size (OverflowError, a traceback)
    largest = open_reader(job_for(tmp_path, "in.jsonl", max_line_bytes=MAX_INT64 - 1), ["prompt"])
    assert [r.error for r in largest] == [None] * 4


def test_jsonl_lone_surrogate_escapes_become_error_rows(tmp_path: Path) -> None:
    """JSON may escape half a surrogate pair ("\\udc80"): json.loads accepts it, no output format can hold it."""
    lines = [
        rb'{"id": "a\udc80", "prompt": "x"}',
        rb'{"prompt": "pair \ud83d\ude00"}',
        rb'{"prompt": "literal \\udc80"}',
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = list(open_reader(job_for(tmp_path, "in.jsonl"), ["prompt"]))
    assert (rows[0].error.kind, rows[0].error.message) == (
        ErrorKind.INVALID_UTF8,
        "row 0 (line 1): a string holds a lone surrogate (\\udc80), which is not text",
    )
    assert rows[1].data == {"prompt": "pair \N{GRINNING FACE}"} and rows[2].data == {"prompt": "literal \\udc80"}


def test_jsonl_integer_over_python_limit_is_an_error_row(tmp_path: Path) -> None:
    """json.loads raises ValueError (not JSONDecodeError) for integers of over 4,300 digits."""
    lines = [b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}", b'{"prompt": "b"}']
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = list(open_reader(job_for(tmp_path, "in.jsonl"), ["prompt"]))
    assert rows[0].error.kind == ErrorKind.BAD_JSON
    assert rows[0].error.message == "row 0 (line 1): invalid JSON: an integer of over 4,300 digits"
    assert rows[1].data == {"prompt": "b"} and rows[1].error is None


def test_a_json_array_file_is_refused_not_read_as_junk_lines(tmp_path: Path, monkeypatch) -> None:
    # A .json file holding one array of rows (what `datasets` and pandas read as rows) was read as JSON lines: one
    # not_an_object row for the whole array, or written across lines, one bad_json row per line; exit 0 either way.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    files = {
        "one.json": json.dumps(rows),
        "pretty.json": "\ufeff" + json.dumps(rows, indent=2) + "\n",
        "braced.json": '[{"prompt": "a"},\n {"prompt": "b"},\n {"prompt": "c"}]',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert datasets.load_dataset("json", data_files=str(tmp_path / name), split="train").to_list() == rows
        with pytest.raises(SpecError, match=rf"{name} holds one JSON array, not JSON lines") as info:
            open_reader(job_for(tmp_path, name), ["prompt"])
        assert info.value.field == "input.path"
    # The command it suggests never writes over the file it reads (a shell empties the target of `>` first)
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows))
    with pytest.raises(SpecError) as info:
        open_reader(job_for(tmp_path, "rows.jsonl"), ["prompt"])
    assert str(info.value).endswith("(jq -c '.[]' rows.jsonl > rows.lines.jsonl)")
    with pytest.raises(SpecError) as info:
        open_reader(job_for(tmp_path, "one.json"), ["prompt"])
    assert str(info.value).endswith("(jq -c '.[]' one.json > one.jsonl)")
    # JSON lines whose lines are arrays stay rows, each a not_an_object error
    (tmp_path / "lines.jsonl").write_text('[1, 2]\n{"prompt": "a"}\n[{"prompt": "b"}]\n')
    got = [(r.index, r.error and r.error.kind) for r in open_reader(job_for(tmp_path, "lines.jsonl"), ["prompt"])]
    assert got == [(0, ErrorKind.NOT_AN_OBJECT), (1, None), (2, ErrorKind.NOT_AN_OBJECT)]


def test_pretty_printed_json_objects_are_refused_not_read_as_junk_lines(tmp_path: Path) -> None:
    # What `jq '.[]'` without -c and json.dumps(indent=2) write: each object over several lines. Read as JSON lines,
    # 2 rows were 8 bad_json rows ("{", "\"prompt\": \"a\"," ...), exit 0 after loading the model.
    rows = [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r, indent=2) + "\n" for r in rows))
    (tmp_path / "batch.json").write_text("\ufeff\n" + json.dumps(rows[0], indent=4))
    for name, fmt, target in (("in.jsonl", "jsonl", "in.lines.jsonl"), ("batch.json", "openai", "batch.jsonl")):
        with pytest.raises(SpecError) as info:
            open_reader(job_for(tmp_path, name, format=fmt), ["prompt"])
        assert str(info.value) == (
            f"input.path: {name} holds JSON objects written over several lines, not JSON lines (one object a "
            f"line), which kvbatch reads: write it as JSON lines first (jq -c . {name} > {target})"
        )
    # A first line that only starts an object, or is a broken row, stays a row: its own bad_json error
    (tmp_path / "in.jsonl").write_text('{"prompt":\n{"prompt": "b"}\n')
    got = [(r.index, r.error and r.error.kind) for r in open_reader(job_for(tmp_path, "in.jsonl"), ["prompt"])]
    assert got == [(0, ErrorKind.BAD_JSON), (1, None)]


def test_a_utf16_or_utf32_file_is_refused_naming_its_encoding(tmp_path: Path) -> None:
    # Windows PowerShell writes text as UTF-16 with a byte-order mark. Read as UTF-8 its 2 rows were 3 junk rows (an
    # invalid_utf8 one, then a bad_json one per line, each line starting inside a character), exit 0 after loading
    # the model, with nothing to say the file was readable after a conversion.
    text = '{"prompt": "a"}\r\n{"prompt": "b"}\r\n'
    files = {  # Python's utf-16 and utf-32 write a little-endian mark; a big-endian one by hand
        "UTF-16": [text.encode("utf-16"), b"\xfe\xff" + text.encode("utf-16-be")],
        "UTF-32": [text.encode("utf-32"), b"\x00\x00\xfe\xff" + text.encode("utf-32-be")],
    }
    for named, data in ((named, data) for named, datas in files.items() for data in datas):
        (tmp_path / "in.jsonl").write_bytes(data)
        for fmt in ("jsonl", "openai"):
            with pytest.raises(SpecError) as info:
                open_reader(job_for(tmp_path, "in.jsonl", format=fmt), ["prompt"])
            assert str(info.value) == (
                f"input.path: in.jsonl is {named} text (its byte-order mark says so); kvbatch reads JSON lines in "
                f"UTF-8: convert it first (iconv -f {named} -t UTF-8 in.jsonl > in.utf8.jsonl)"
            )
    # UTF-8's own mark is read past, as before
    (tmp_path / "in.jsonl").write_bytes(text.encode("utf-8-sig"))
    assert [r.data for r in open_reader(job_for(tmp_path, "in.jsonl"), ["prompt"])] == [
        {"prompt": "a"},
        {"prompt": "b"},
    ]


def test_jsonl_limit(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    reader = open_reader(job_for(tmp_path, "in.jsonl", limit=2), ["prompt"])
    assert reader.num_rows == 2 and [r.data["prompt"] for r in reader] == ["p0", "p1"]


def test_an_arrow_stream_is_counted_and_the_limit_bounds_the_count(tmp_path: Path) -> None:
    # A stream lists no batches: the limit had stood in for its count (a bar of 3/5 rows at the end), and a stream
    # of no batches loaded the model to write nothing. Its batches are counted as it opens, across several.
    table = pa.table({"prompt": ["a", "b", "c"]})
    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(0, 2))
        writer.write_table(table.slice(2))
    reader = open_reader(job_for(tmp_path, "in.arrow"), ["prompt"])
    assert reader.num_rows == 3 and [r.data["prompt"] for r in reader] == ["a", "b", "c"]
    reader = open_reader(job_for(tmp_path, "in.arrow", limit=5), ["prompt"])
    assert reader.num_rows == 3 and [r.data["prompt"] for r in reader] == ["a", "b", "c"]
    reader = open_reader(job_for(tmp_path, "in.arrow", limit=2), ["prompt"])
    assert reader.num_rows == 2 and [r.data["prompt"] for r in reader] == ["a", "b"]
    assert open_reader(job_for(tmp_path, "in.arrow", limit=0), ["prompt"]).num_rows == 0  # no rows: no model loaded


def test_datasets_save_to_disk_folder(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"q": ["a", "b", "c"], "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    reader = open_reader(job_for(tmp_path, "ds", batch_rows=2), ["q"])
    assert reader.num_rows == 3 and reader.columns == ["q", "n"]
    assert [(r.index, r.data) for r in reader] == [(0, {"q": "a"}), (1, {"q": "b"}), (2, {"q": "c"})]
    with pytest.raises(SpecError, match="column 'prompt' not in ds"):
        open_reader(job_for(tmp_path, "ds"), ["prompt"])


def test_a_datasets_folder_has_an_identity_that_an_edit_changes(tmp_path: Path) -> None:
    """So that a resume over an edited dataset folder is refused, as over an edited file."""
    from kvbatch.jobs.manifest import input_identity

    datasets.Dataset.from_dict({"prompt": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    before = input_identity(tmp_path / "ds")
    assert before == input_identity(tmp_path / "ds") and before["input_file"]["files"] == 1
    datasets.load_from_disk(str(tmp_path / "ds")).filter(lambda row: row["prompt"] == "a")  # writes cache-*.arrow there
    assert input_identity(tmp_path / "ds") == before
    shutil.rmtree(tmp_path / "ds")
    datasets.Dataset.from_dict({"prompt": ["a", "c"]}).save_to_disk(str(tmp_path / "ds"))  # same sizes, new fingerprint
    assert input_identity(tmp_path / "ds") != before

    splits = {name: datasets.Dataset.from_dict({"prompt": [name]}) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    train = input_identity(tmp_path / "dd", "train")
    datasets.Dataset.from_dict({"prompt": ["other"]}).save_to_disk(
        str(tmp_path / "dd" / "test")
    )  # only the other split
    assert input_identity(tmp_path / "dd", "train") == train


def test_datasets_dict_folder_needs_a_split(tmp_path: Path) -> None:
    """The message's hint named "--split on the command line", an option `kvbatch run` does not have (only
    `kvbatch generate` has it): it names the --set that both take."""
    splits = {name: datasets.Dataset.from_dict({"prompt": [name]}) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SpecError) as refused:
        open_reader(job_for(tmp_path, "dd"), ["prompt"])
    assert str(refused.value) == (
        "input.split: dd has splits train, test; choose one with input.split (on the command line: --set "
        "input.split=train, or kvbatch generate's --split train)"
    )
    reader = open_reader(job_for(tmp_path, "dd", split="test"), ["prompt"])
    assert [r.data for r in reader] == [{"prompt": "test"}]
    datasets.Dataset.from_dict({"prompt": ["train"]}, split="train").save_to_disk(
        str(tmp_path / "one")
    )  # it knows its split
    with pytest.raises(SpecError, match="is one dataset \\(split 'train'\\), not split 'test'; leave input.split out"):
        open_reader(job_for(tmp_path, "one", split="test"), ["prompt"])
    assert [r.data for r in open_reader(job_for(tmp_path, "one", split="train"), ["prompt"])] == [{"prompt": "train"}]
    # A Dataset that names no split read as the one asked for, whatever input.split said.
    datasets.Dataset.from_dict({"prompt": ["a"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(SpecError, match="plain is one dataset, not a DatasetDict, and names no split"):
        open_reader(job_for(tmp_path, "plain", split="test"), ["prompt"])


def test_a_folder_of_data_files_is_read_as_datasets_reads_a_repository(tmp_path: Path, monkeypatch) -> None:
    # A dataset repository cloned or downloaded as it is on the hub: data/<split>-0000i-of-0000n.parquet. It was
    # refused as "not a dataset saved with save_to_disk, or damaged".
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    for name, prompts in (
        ("train-00000-of-00002", ["a", "b"]),
        ("train-00001-of-00002", ["c"]),
        ("test-00000-of-00001", ["t"]),
    ):
        pq.write_table(pa.table({"prompt": prompts, "n": list(range(len(prompts)))}), data / f"{name}.parquet")
    (tmp_path / "repo" / "README.md").write_text("# a dataset card\n")
    with pytest.raises(SpecError, match="repo has splits train, test; choose one with input.split"):
        open_reader(job_for(tmp_path, "repo"), ["prompt"])
    reader = open_reader(job_for(tmp_path, "repo", split="train", batch_rows=2), ["prompt"])
    assert reader.num_rows == 3 and [r.data for r in reader] == [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    assert [r.data for r in open_reader(job_for(tmp_path, "repo", split="test"), ["prompt"])] == [{"prompt": "t"}]
    # A split the folder lacks was "neither a dataset saved with save_to_disk nor a folder of data files", as if
    # the folder were not a dataset at all.
    with pytest.raises(SpecError, match=r"repo has no split 'validation' \(splits: train, test\)"):
        open_reader(job_for(tmp_path, "repo", split="validation"), ["prompt"])

    from kvbatch.jobs.manifest import input_identity

    before = input_identity(tmp_path / "repo", "train")
    assert before["input_file"]["files"] == 4  # the card too: what datasets reads is the folder's
    pq.write_table(pa.table({"prompt": ["a", "b", "x"], "n": [0, 1, 2]}), data / "train-00000-of-00002.parquet")
    assert input_identity(tmp_path / "repo", "train") != before  # a resume over the edited folder is refused


def test_a_folder_named_like_a_file_is_read_as_a_folder_of_data_files(tmp_path: Path, monkeypatch) -> None:
    # Spark, Dask and pyarrow's dataset writer name their folder of part files `out.parquet/`. Its extension
    # picked the single-file Parquet reader, which failed the job on "path ... is a directory", though the same
    # folder under another name was read.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "out.parquet"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), folder / "part-00000-c0ffee.snappy.parquet")
    pq.write_table(pa.table({"prompt": ["c"]}), folder / "part-00001-c0ffee.snappy.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    reader = open_reader(job_for(tmp_path, "out.parquet"), ["prompt"])
    assert reader.num_rows == 3
    assert [(r.index, r.data) for r in reader] == [(0, {"prompt": "a"}), (1, {"prompt": "b"}), (2, {"prompt": "c"})]


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "jsonl", "openai"])
def test_a_single_file_format_on_a_folder_says_how_a_folder_is_read(tmp_path: Path, fmt: str) -> None:
    # input.format parquet on a folder of part files failed in the reader on "path ... is a directory", without a
    # word on how a folder is read (format auto, as the test above reads it).
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a"]}), folder / "part-00000.parquet")
    with pytest.raises(SpecError) as info:
        open_reader(job_for(tmp_path, "parts", format=fmt), ["prompt"])
    assert info.value.field == "input.format" and info.value.message == (
        f"input.format {fmt} reads one file, and {folder} is a folder; a folder (of part files too) is read as "
        "`datasets` reads a repository: leave input.format out (auto) or set it to hf"
    )


def test_a_data_file_of_another_format_is_refused_saying_how_to_read_it(tmp_path: Path, monkeypatch) -> None:
    # A .csv file was "cannot tell the input format; set input.format", and input.format hf then refused it as a
    # file, "name the file's own format (arrow, parquet, jsonl)": advice in a circle, though a folder holding the
    # file is read, as `datasets` reads a repository.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "data.csv").write_text('id,prompt\n1,a\n2,"b, c"\n')
    how = "a data file of another format that `datasets` reads (.csv, .tsv, .txt) is read from a folder of its own"
    with pytest.raises(SpecError) as info:
        open_reader(job_for(tmp_path, "data.csv"), ["prompt"])
    assert info.value.field == "input.format" and str(info.value) == (
        "input.format: cannot tell the input format of 'data.csv': kvbatch reads .parquet, .jsonl, .json, .ndjson, "
        f".arrow, .feather, .ipc files and folders; {how}. Set input.format for a file of those formats under "
        "another name"
    )
    with pytest.raises(SpecError) as info:
        open_reader(job_for(tmp_path, "data.csv", format="hf"), ["prompt"])
    assert str(info.value).endswith(f"name the file's own format (arrow, parquet, jsonl); {how}")
    (tmp_path / "csv").mkdir()
    shutil.move(tmp_path / "data.csv", tmp_path / "csv" / "data.csv")
    reader = open_reader(job_for(tmp_path, "csv"), ["prompt", "id"])
    assert [r.data for r in reader] == [{"prompt": "a", "id": 1}, {"prompt": "b, c", "id": 2}]


def test_a_folder_of_data_files_edited_in_place_has_another_identity(tmp_path: Path) -> None:
    # Its identity was each file's name and size: a row's text edited to the same length ("yes" to "no!") went
    # unseen, so a rerun called the old output complete (and a resume would pair old results with new rows),
    # where the same edit to the file read alone is refused.
    from kvbatch.jobs.manifest import input_identity

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "train.jsonl").write_text('{"prompt": "yes"}\n')
    before = input_identity(tmp_path / "repo")
    (tmp_path / "repo" / "train.jsonl").write_text('{"prompt": "no!"}\n')
    assert input_identity(tmp_path / "repo") != before
    assert input_identity(tmp_path / "repo")["input_file"]["files"] == 1


def test_a_folder_of_data_files_datasets_cannot_convert_says_why(tmp_path: Path, monkeypatch) -> None:
    # A data file that does not convert was "neither a dataset saved with save_to_disk nor a folder of data files
    # `datasets` reads: DatasetGenerationError: An error occurred while generating the dataset": a folder of data
    # files after all, and the reason (which `datasets` keeps as the error's cause) was left out.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "repo").mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "n": [1]}), tmp_path / "repo" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "n": ["x"]}), tmp_path / "repo" / "train-00001-of-00002.parquet")
    with pytest.raises(InputError) as info:
        open_reader(job_for(tmp_path, "repo"), ["prompt"])
    message = str(info.value)
    assert "repo is a folder of data files, but `datasets` cannot read its split 'train'" in message
    assert "DatasetGenerationError" in message and "neither" not in message


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_a_folder_of_json_lines_files_makes_each_bad_line_its_row_s_error(tmp_path: Path, monkeypatch) -> None:
    """One bad line in a folder of JSON lines shards (not JSON, not an object, a key twice, a type that changes,
    over max_line_bytes) failed the whole job: `datasets` converts the split whole, and refuses it for one line.
    Each bad line is now its row's error, naming its file and line, as a JSONL file's; the other rows are the rows
    `datasets` gives for the same folder without the bad lines, numbered on from file to file."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    good = {
        "data/train-00000-of-00002.jsonl": ['{"prompt": "a", "n": 1}', '{"prompt": "b", "n": 2}'],
        "data/train-00001-of-00002.jsonl": ['{"prompt": "c", "n": 3}', "", '{"prompt": "d", "n": 4}'],
        "data/test-00000-of-00001.jsonl": ['{"prompt": "t", "n": 0}'],
    }
    bad = {  # (file, position among its lines) -> the bad line
        ("data/train-00000-of-00002.jsonl", 1): '{"prompt": bad',
        ("data/train-00001-of-00002.jsonl", 0): "[1, 2]",
        ("data/train-00001-of-00002.jsonl", 2): '{"prompt": "x", "prompt": "y"}',
        ("data/train-00001-of-00002.jsonl", 4): '{"prompt": "e", "n": "' + "z" * 100 + '"}',
    }
    for name, lines in good.items():
        write_lines(tmp_path / "clean" / name, lines)
        with_bad = list(lines)
        for (file, at), line in sorted(bad.items(), key=lambda item: item[0][1]):
            if file == name:
                with_bad.insert(at, line)
        write_lines(tmp_path / "repo" / name, with_bad)
    with pytest.raises(datasets.exceptions.DatasetGenerationError):  # it refuses the whole split
        datasets.load_dataset(str(tmp_path / "repo"), split="train")
    expected = datasets.load_dataset(str(tmp_path / "clean"), split="train").to_list()

    reader = open_reader(job_for(tmp_path, "repo", split="train", max_line_bytes=80), ["prompt", "n"])
    rows = list(reader)
    assert reader.num_rows == len(rows) == 8
    assert [r.index for r in rows] == list(range(8))
    assert [r.data for r in rows if r.error is None] == expected
    errors = [(r.index, r.error.kind, r.error.message) for r in rows if r.error is not None]
    first, second = "data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl"
    raise_it = "raise input.max_line_bytes to read it"
    assert errors == [
        (1, ErrorKind.BAD_JSON, f"row 1 (line 2 of {first}): invalid JSON at column 12: Expecting value"),
        (3, ErrorKind.NOT_AN_OBJECT, f"row 3 (line 1 of {second}): expected a JSON object, got list"),
        (5, ErrorKind.BAD_JSON, f"row 5 (line 3 of {second}): invalid JSON: key 'prompt' appears twice in one object"),
        (6, ErrorKind.LINE_TOO_LONG, f"row 6 (line 5 of {second}): line is over max_line_bytes (80 bytes); {raise_it}"),
    ]
    assert [r.data for r in open_reader(job_for(tmp_path, "repo", split="test"), ["prompt"])] == [
        {"prompt": "t", "n": 0}
    ]
    limited = open_reader(job_for(tmp_path, "repo", split="train", limit=3), ["prompt"])
    assert limited.num_rows == 3 and [r.index for r in limited] == [0, 1, 2]


def test_a_folder_of_compressed_json_lines_files_makes_each_bad_line_its_row_s_error(
    tmp_path: Path, monkeypatch
) -> None:
    """A folder of .jsonl.gz shards (as dataset repositories ship them): `datasets` reads it, and refuses the whole
    split for one bad line; it was then "cannot read its split". Read line by line as the plain shards are, each
    bad line is its row's error, and the other rows are the ones `datasets` gives without it."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    shards = {
        "train-00000-of-00002.jsonl": ['{"prompt": "a", "n": 1}', '{"prompt": "b", "n": 2}'],
        "train-00001-of-00002.jsonl": ['{"prompt": "c", "n": 3}', '{"prompt": bad', '{"prompt": "d", "n": 4}'],
    }
    for name, lines in shards.items():
        text = "".join(line + "\n" for line in lines).encode()
        (tmp_path / "repo" / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / "data" / f"{name}.gz").write_bytes(_compress(text, "gzip"))
        clean = "".join(line + "\n" for line in lines if "bad" not in line).encode()
        (tmp_path / "clean" / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / "clean" / "data" / f"{name}.gz").write_bytes(_compress(clean, "gzip"))
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        datasets.load_dataset(str(tmp_path / "repo"), split="train")
    expected = datasets.load_dataset(str(tmp_path / "clean"), split="train").to_list()
    rows = list(open_reader(job_for(tmp_path, "repo", split="train"), ["prompt", "n"]))
    assert [r.data for r in rows if r.error is None] == expected and len(expected) == 4
    (bad,) = [r for r in rows if r.error is not None]
    assert (bad.index, bad.error.kind) == (3, ErrorKind.BAD_JSON)
    assert bad.error.message.startswith("row 3 (line 2 of data/train-00001-of-00002.jsonl.gz): invalid JSON")


def test_a_folder_of_json_lines_files_whose_names_say_no_split_makes_a_bad_line_its_row_s_error(
    tmp_path: Path, monkeypatch
) -> None:
    """A folder of a.jsonl and b.jsonl (no split in their names): `datasets.get_dataset_split_names` infers the
    features from the first file, and one bad line there failed the job ("is neither a dataset saved with
    save_to_disk nor a folder of data files `datasets` reads: SplitsNotFoundError"). The split is now named from
    the files' names alone, and the line is its row's error."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    lines = [{"prompt": f"p{i}"} for i in range(6)]
    write_lines(
        tmp_path / "repo" / "a.jsonl",
        [json.dumps(x) for x in lines[:2]] + ['{"prompt": '] + [json.dumps(x) for x in lines[2:4]],
    )
    write_lines(tmp_path / "repo" / "b.jsonl", [json.dumps(x) for x in lines[4:]])
    write_lines(tmp_path / "clean" / "a.jsonl", [json.dumps(x) for x in lines[:4]])
    write_lines(tmp_path / "clean" / "b.jsonl", [json.dumps(x) for x in lines[4:]])
    assert datasets.load_dataset(str(tmp_path / "clean"), split="train").to_list() == lines
    rows = list(open_reader(job_for(tmp_path, "repo"), ["prompt"]))
    assert [r.data for r in rows if r.error is None] == lines
    assert [(r.index, r.error.message) for r in rows if r.error is not None] == [
        (2, "row 2 (line 3 of a.jsonl): invalid JSON at column 12: Expecting value")
    ]


def test_a_folder_of_json_lines_files_is_read_in_the_files_and_order_datasets_reads(
    tmp_path: Path, monkeypatch
) -> None:
    """Read line by line, a split's files are the ones `datasets` resolves, in its order: a README configuration's
    data_files, part files at any depth. A folder `datasets` reads otherwise (features its README declares, a JSON
    array) is not: its bad line still fails the job."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    files = (
        ("beta/b/part-1.jsonl", ["b3"]),
        ("beta/a/part-10.jsonl", ["b2"]),
        ("beta/a/part-2.jsonl", ["b1"]),
        ("alpha/x.jsonl", ["a1"]),
    )
    for folder, bad in ((tmp_path / "clean", []), (tmp_path / "in", ["not json"])):
        for name, prompts in files:
            write_lines(folder / name, [json.dumps({"prompt": p, "k": name}) for p in prompts] + bad)
        (folder / "README.md").write_text(
            "---\nconfigs:\n- config_name: alpha\n  data_files: alpha/*.jsonl\n"
            "- config_name: beta\n  data_files: beta/**/*.jsonl\n---\n"
        )
    for config, num_files in (("alpha", 1), ("beta", 3)):
        reader = open_reader(job_for(tmp_path, "in", config=config), ["prompt", "k"])
        rows = list(reader)
        assert reader.columns is None  # read as JSON lines, not converted
        good = [r.data for r in rows if r.error is None]
        assert good == datasets.load_dataset(str(tmp_path / "clean"), config, split="train").to_list()
        assert [r.error.kind for r in rows if r.error is not None] == [ErrorKind.BAD_JSON] * num_files
        # a good folder is converted by `datasets`, as before
        assert open_reader(job_for(tmp_path, "clean", config=config), ["prompt"]).columns == ["prompt", "k"]

    # Features its README declares (a ClassLabel's names) are the ones `datasets` converts the files to.
    write_lines(tmp_path / "labelled" / "train.jsonl", ['{"prompt": "a", "label": 1}', "not json"])
    (tmp_path / "labelled" / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: prompt\n    dtype: string\n  - name: label\n    dtype:\n"
        "      class_label:\n        names:\n          '0': neg\n          '1': pos\n---\n"
    )
    (tmp_path / "mixed").mkdir()
    write_lines(tmp_path / "mixed" / "train-0.jsonl", ['{"prompt": "a"}', "not json"])
    (tmp_path / "mixed" / "train-1.json").write_text('[{"prompt": "b"}, {"prompt": "c"}]')
    for folder in ("labelled", "mixed"):
        with pytest.raises(InputError, match="cannot read its split 'train'"):
            open_reader(job_for(tmp_path, folder), ["prompt"])


def test_a_job_over_a_folder_of_json_lines_files_writes_each_bad_line_as_an_error_row(
    tmp_path: Path, monkeypatch
) -> None:
    from job_fakes import fake_factory

    from kvbatch.jobs.run import EngineCache, run_job

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    write_lines(tmp_path / "repo" / "part-0.jsonl", ['{"id": "a", "prompt": "hi", "n": 1}', "not json"])
    write_lines(tmp_path / "repo" / "part-1.jsonl", ['{"id": "c", "prompt": "yo", "n": 3}'])
    job = job_from_dict(
        {
            "name": "j",
            "input": {"path": "repo"},
            "id_column": "id",
            "keep_columns": ["n"],
            "output_dir": "out",
            "output": {"format": "jsonl"},
        },
        base_dir=str(tmp_path),
    )
    out = Path(run_job(job, EngineCache(fake_factory())).output)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["row"], r["id"], r["n"], r["error_kind"]) for r in written] == [
        (0, "a", 1, None),
        (1, None, None, "bad_json"),
        (2, "c", 3, None),
    ]
    assert written[1]["error"] == "row 1 (line 2 of part-0.jsonl): invalid JSON at column 1: Expecting value"


def test_json_values_of_a_datasets_input_reach_the_prompt_as_datasets_reads_them(tmp_path: Path, monkeypatch) -> None:
    # datasets types a message content that is text in one row and a list of parts in another as `Json`, stored as
    # JSON text: the prompt got the text `"hi"`, quotes included. Kept columns stay as stored.
    from job_fakes import fake_factory

    from kvbatch.jobs.run import EngineCache, run_job

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    lines = [
        {"messages": [{"role": "user", "content": "hi"}], "meta": {"a": 1}},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}], "meta": [1]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = datasets.load_dataset("json", data_files=str(tmp_path / "in.jsonl"), split="train")
    assert source.features["meta"] == datasets.Json()  # the content is one too, inside the messages' structs
    source.save_to_disk(str(tmp_path / "ds"))
    job = job_from_dict(
        {
            "name": "j",
            "input": {"path": "ds"},
            "prompt": {"messages_column": "messages"},
            "keep_columns": ["meta"],
            "output_dir": "out",
            "output": {"format": "jsonl"},
        },
        base_dir=str(tmp_path),
    )
    factory = fake_factory()
    out = Path(run_job(job, EngineCache(factory)).output)
    (engine,) = factory.engines
    prompts = {r.request_id: engine.tokenizer.decode(r.prompt_token_ids) for r in engine.requests}
    assert prompts == {
        i: f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" for i, t in enumerate(["hi", "yo"])
    }
    assert [json.loads(line)["meta"] for line in out.read_text().splitlines()] == ['{"a":1}', "[1]"]


def test_a_json_value_nested_too_deeply_is_its_row_s_error(tmp_path: Path) -> None:
    """An Arrow JSON value (datasets' `Json`) in a request column nested past json.loads' recursion limit stopped
    the whole job ("the engine failed (RecursionError ...)"); a JSONL line nested so is a bad_json row. It is now
    that row's bad_json error, its id kept, and the other rows are read."""
    from kvbatch.jobs.read_parquet import with_request_values

    deep = "[" * 100_000 + "]" * 100_000
    prompts = pa.array(['"hi"', deep, '"yo"'], pa.json_())
    pq.write_table(pa.table({"id": [0, 1, 2], "prompt": prompts}), tmp_path / "in.parquet")
    reader = open_reader(job_for(tmp_path, "in.parquet"), ["id", "prompt"])
    rows = list(with_request_values(reader.rows, reader.schema, ["prompt"]))
    assert [(r.data["prompt"], r.error) for r in (rows[0], rows[2])] == [("hi", None), ("yo", None)]
    assert rows[1].data["id"] == 1
    assert rows[1].error is not None and rows[1].error.kind == ErrorKind.BAD_JSON
    assert rows[1].error.message == "row 1: column 'prompt' holds JSON nested too deeply"


def _compress(data: bytes, codec: str) -> bytes:
    """`data` as a file of `codec` writes it: Python's own gzip, bz2 and lzma, pyarrow's zstd and lz4 frames."""
    import bz2
    import gzip
    import lzma

    if codec in ("zstd", "lz4"):
        sink = pa.BufferOutputStream()
        with pa.output_stream(sink, compression=codec) as out:
            out.write(data)
        return sink.getvalue().to_pybytes()
    return {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec](data)


def _read(tmp_path: Path, name: str, **fields) -> list[tuple[int, Any, Any, int | None]]:
    reader = open_reader(job_for(tmp_path, name, **fields), ["prompt"])
    rows = list(reader.rows)
    assert reader.num_rows == len(rows)
    return [(r.index, r.data, r.error and (r.error.kind, r.error.message), r.line) for r in rows]


@pytest.mark.parametrize("suffix, codec", [(".gz", "gzip"), (".bz2", "bz2"), (".zst", "zstd"), (".lz4", "lz4")])
def test_a_compressed_json_lines_file_is_read_as_the_plain_file(tmp_path: Path, suffix: str, codec: str) -> None:
    """A .jsonl.gz was refused ("decompress it first"), where `datasets`, pandas and Spark read it as it is. It is
    read line by line as the plain file is: the same rows, a bad line its row's error naming its line; a gzip file
    under a plain name (a download saved as in.jsonl) is found by its first bytes."""
    lines = b"".join(b'{"prompt": "p%d"}\n' % i for i in range(2000)) + b'{"prompt": \n\n{"prompt": "last"}\n'
    (tmp_path / "plain.jsonl").write_bytes(lines)
    for name in (f"in.jsonl{suffix}", f"in.jsonl{suffix.upper()}", "in.jsonl"):
        (tmp_path / name).write_bytes(_compress(lines, codec))
    want = _read(tmp_path, "plain.jsonl")
    assert len(want) == 2002 and want[2000][2][0] == ErrorKind.BAD_JSON and want[2000][3] == 2001
    assert _read(tmp_path, f"in.jsonl{suffix}") == want
    assert _read(tmp_path, f"in.jsonl{suffix.upper()}", format="jsonl") == want
    assert _read(tmp_path, "in.jsonl") == want


def test_a_compressed_openai_batch_file_is_read_as_the_plain_file(tmp_path: Path) -> None:
    import gzip

    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
    data = (json.dumps(line) + "\n").encode()
    (tmp_path / "plain.batch").write_bytes(data)
    (tmp_path / "in.batch").write_bytes(gzip.compress(data))
    assert _read(tmp_path, "in.batch", format="openai") == _read(tmp_path, "plain.batch", format="openai")


def test_a_corrupt_compressed_file_stops_the_job_naming_it(tmp_path: Path) -> None:
    data = _compress(b"".join(b'{"prompt": "p%d"}\n' % i for i in range(5000)), "gzip")
    (tmp_path / "in.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot read .*in.jsonl.gz: .*runcated"):
        open_reader(job_for(tmp_path, "in.jsonl.gz"), ["prompt"])


def test_archives_and_compressed_parquet_files_and_globs_are_refused_saying_what_to_do(tmp_path: Path) -> None:
    # Compressed Parquet and Arrow files, .xz and archives (.zip, .7z: files, not a stream) are not read: their
    # bytes were one junk invalid_utf8 row. A glob was "input not found".
    import zipfile

    write_parquet(tmp_path / "a.parquet", 2)
    (tmp_path / "a.parquet.gz").write_bytes(_compress((tmp_path / "a.parquet").read_bytes(), "gzip"))
    (tmp_path / "in.jsonl.xz").write_bytes(_compress(b'{"prompt": "a"}\n', "xz"))
    with zipfile.ZipFile(tmp_path / "in.jsonl.zip", "w") as archive:
        archive.writestr("in.jsonl", '{"prompt": "a"}\n')
    (tmp_path / "in.zip.jsonl").write_bytes((tmp_path / "in.jsonl.zip").read_bytes())
    refused = {"a.parquet.gz": "gzip", "in.jsonl.xz": "xz", "in.jsonl.zip": "zip", "in.zip.jsonl": "zip"}
    for name, codec in refused.items():
        with pytest.raises(SpecError, match=rf"{name} is compressed \({codec}\).*decompress it first"):
            open_reader(job_for(tmp_path, name), ["prompt"])
    with pytest.raises(SpecError, match=r"input not found: \*.parquet \(a local run does not expand globs"):
        open_reader(job_for(tmp_path, "*.parquet"), ["prompt"])


def test_a_name_outside_the_local_cache_is_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="kvbatch never downloads inputs"):
        open_reader(job_for(tmp_path, "no-such-user/no-such-dataset"), ["prompt"])


@pytest.mark.parametrize("name", ["me/toy", "me/toy-2.5"])
def test_a_dataset_name_in_the_local_cache_is_read_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # What an earlier online load_dataset("me/toy") leaves in the cache: a prepared Arrow dataset under
    # <cache>/me___toy/<config>/<version>/<hash>. Made here from a local Parquet file, then renamed into place.
    # A name with a dot (teknium/OpenHermes-2.5) was refused as a file of an unknown extension, "cannot tell the
    # input format of 'toy-2.5'", though no such file exists.
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "n": [1, 2, 3]}), tmp_path / "toy.parquet")
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "toy.parquet")}, cache_dir=str(cache))
    (prepared,) = [p.parent for p in (cache / "parquet").glob("*/*/*/dataset_info.json")]
    target = cache / name.replace("/", "___") / "default" / "0.0.0" / prepared.name
    target.parent.mkdir(parents=True)
    prepared.rename(target)
    for f in target.glob("parquet-*.arrow"):
        f.rename(target / f.name.replace("parquet-", name.split("/")[1] + "-"))
    offline = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    reader = open_reader(job_for(tmp_path, name), ["prompt"])
    assert reader.num_rows == 3 and [r.data for r in reader] == [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    assert open_reader(job_for(tmp_path, name, split="train"), ["prompt"]).num_rows == 3
    # A split it lacks was "neither a local file or folder nor a dataset in the local Hugging Face cache".
    with pytest.raises(SpecError, match=rf"{name} has no split 'test' \(splits: train\)"):
        open_reader(job_for(tmp_path, name, split="test"), ["prompt"])
    assert (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
    ) == offline  # offline for that call only


def test_a_configuration_of_a_cached_dataset_is_chosen_with_input_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset cached with several configurations (MMLU's subjects) could not be read at all: load_dataset(name)
    refuses to choose one, and no field named it. input.config is load_dataset's second argument; it is refused
    where it would be ignored (a file, a save_to_disk folder)."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    # What earlier online loads of load_dataset("me/toy", "alpha") and ("me/toy", "beta") leave in the cache.
    for config, prompts in (("alpha", ["a1", "a2"]), ("beta", ["b1", "b2", "b3"])):
        pq.write_table(pa.table({"prompt": prompts}), tmp_path / f"{config}.parquet")
        datasets.load_dataset(
            "parquet", data_files={"train": str(tmp_path / f"{config}.parquet")}, cache_dir=str(cache)
        )
        (prepared,) = [p.parent for p in (cache / "parquet").glob("*/*/*/dataset_info.json")]
        target = cache / "me___toy" / config / "0.0.0" / prepared.name
        target.parent.mkdir(parents=True)
        prepared.rename(target)
        for f in target.glob("parquet-*.arrow"):
            f.rename(target / f.name.replace("parquet-", "toy-"))
        info = json.loads((target / "dataset_info.json").read_text())
        (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": config, "dataset_name": "toy"}))
        shutil.rmtree(cache / "parquet")
    reader = open_reader(job_for(tmp_path, "me/toy", config="beta"), ["prompt"])
    assert [r.data for r in reader] == [{"prompt": "b1"}, {"prompt": "b2"}, {"prompt": "b3"}]
    with pytest.raises(InputError, match="input.config chooses one of a dataset's configurations.*alpha"):
        open_reader(job_for(tmp_path, "me/toy"), ["prompt"])
    write_parquet(tmp_path / "in.parquet", 2)
    with pytest.raises(SpecError, match="input.config: a configuration is for a datasets input, not a parquet one"):
        job_for(tmp_path, "in.parquet", config="beta")
    datasets.Dataset.from_dict({"prompt": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SpecError, match="save_to_disk, which holds one configuration; leave input.config out"):
        open_reader(job_for(tmp_path, "saved", config="beta"), ["prompt"])
    from kvbatch.jobs.ray_input import input_found

    with pytest.raises(SpecError, match="runner: ray reads files, .* leave input.config out"):
        input_found(job_for(tmp_path, "me/toy", config="beta"))
    # left out, it leaves every earlier output's spec hash as it was
    assert "config" not in result_fingerprint(job_for(tmp_path, "me/toy"))["input"]
    assert result_fingerprint(job_for(tmp_path, "me/toy", config="beta"))["input"]["config"] == "beta"


def test_a_repository_folders_configuration_is_chosen_with_input_config(tmp_path: Path) -> None:
    """A folder laid out as a dataset repository whose README lists several configurations was refused, without
    input.config, as "neither a dataset saved with save_to_disk nor a folder of data files", in datasets' words
    (`load_dataset('in', 'alpha')`), and a configuration it lacks the same way: each now names input.config and
    the folder's configurations, as a split does."""
    folder = tmp_path / "in"
    for config, prompt in (("alpha", "a1"), ("beta", "b1")):
        (folder / config).mkdir(parents=True)
        (folder / config / "train.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: alpha\n  data_files: alpha/*.jsonl\n"
        "- config_name: beta\n  data_files: beta/*.jsonl\n---\n"
    )
    with pytest.raises(SpecError) as unchosen:
        open_reader(job_for(tmp_path, "in", format="hf"), ["prompt"])
    assert str(unchosen.value) == (
        "input.config: in has configurations alpha, beta; choose one with input.config (on the command line: "
        "--set input.config=alpha, or kvbatch generate's --config alpha)"
    )
    with pytest.raises(SpecError) as unknown:
        open_reader(job_for(tmp_path, "in", format="hf", config="gamma"), ["prompt"])
    assert str(unknown.value) == "input.config: in has no configuration 'gamma' (configurations: alpha, beta)"
    reader = open_reader(job_for(tmp_path, "in", format="hf", config="beta"), ["prompt"])
    assert [r.data for r in reader] == [{"prompt": "b1"}]


def test_openai_batch_input(tmp_path: Path) -> None:
    requests = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5,
                "temperature": 0.2,
                "stop": "END",
                "seed": 1,
            },
        },
        {"custom_id": "b", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"url": "/v1/chat/completions", "body": {"messages": []}},
        {"custom_id": "d", "body": "not an object"},
        {"custom_id": "e", "body": {"model": "m"}},
        {"custom_id": "f", "method": "GET", "url": "/v1/chat/completions", "body": {"messages": []}},
        {"custom_id": 7, "body": {"messages": []}},
    ]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    rows = list(open_reader(job_for(tmp_path, "batch.jsonl", format="openai"), ["messages", "custom_id"]))
    assert rows[0].data == {"custom_id": "a", "messages": [{"role": "user", "content": "hi"}], "model": "m"}
    assert rows[0].sampling == {"max_new_tokens": 5, "temperature": 0.2, "stop": "END", "seed": 1}
    assert (
        rows[1].error.kind == ErrorKind.BAD_REQUEST and "url '/v1/embeddings' is not supported" in rows[1].error.message
    )
    assert rows[1].data["custom_id"] == "b"  # kept, so the error line still names the request
    assert rows[2].error.message == "row 2 (line 3): an OpenAI Batch request needs a non-empty string `custom_id`"
    assert "needs a `body` object" in rows[3].error.message
    assert rows[4].error.message == "row 4 (line 5): an OpenAI Batch request's body needs `messages`"
    assert "method 'GET' is not supported (a Batch request is a POST)" in rows[5].error.message
    assert rows[6].error.kind == ErrorKind.BAD_REQUEST and rows[6].data["custom_id"] == "7"  # the line can be matched
    assert all(row.error.kind == ErrorKind.BAD_REQUEST for row in rows[1:])


def test_arrow_streams_and_ipc_files_are_read_in_batches_of_the_needed_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kvbatch's own `.arrow` output is an IPC stream, as `datasets` keeps its data; Feather v2 is an IPC file.
    Either feeds a later job (a judge over generated texts), a batch of at most input.batch_rows rows at a time."""
    table = pa.table({"id": list(range(10)), "text": [f"answer {i}" for i in range(9)] + [None], "unused": [b"x"] * 10})
    with pa.OSFile(str(tmp_path / "out.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    with pa.OSFile(str(tmp_path / "out.feather"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    from kvbatch.jobs import read_arrow

    sizes: list[tuple[int, int]] = []  # (rows, columns) of each batch read
    real = read_arrow.rows_of_batches
    spy = lambda batches, *a: real(((sizes.append(b.shape), b)[1] for b in batches), *a)  # noqa: E731
    monkeypatch.setattr(read_arrow, "rows_of_batches", spy)
    for name, num_rows in (("out.arrow", 10), ("out.feather", 10)):
        sizes.clear()
        reader = open_reader(job_for(tmp_path, name, batch_rows=3), ["id", "text"])
        assert (reader.num_rows, reader.columns) == (num_rows, ["id", "text", "unused"])
        rows = list(reader.rows)
        assert [r.index for r in rows] == list(range(10))
        assert [r.data for r in rows[:2]] == [{"id": 0, "text": "answer 0"}, {"id": 1, "text": "answer 1"}]
        assert rows[9].data == {"id": 9, "text": None}
        assert sizes == [(3, 2), (3, 2), (1, 2), (3, 2)]  # the writer's batches of 7 and 3, cut to batch_rows
    with pytest.raises(SpecError, match=r"column 'prompt' not in out.arrow \(its columns: id, text, unused\)"):
        open_reader(job_for(tmp_path, "out.arrow"), ["prompt"])
    with pytest.raises(SpecError, match=r"input.format hf reads a datasets folder .* is a file; .* \(arrow, parquet"):
        open_reader(job_for(tmp_path, "out.arrow", format="hf"), ["text"])
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(InputError, match="cannot read Arrow file"):
        open_reader(job_for(tmp_path, "bad.arrow"), ["prompt"])


def test_float32_request_values_are_read_as_the_rows_text_writes_them(tmp_path: Path) -> None:
    """Python's float holds a float32 value's bits exactly: a float32 column (pandas' float32, datasets'
    Value('float32')) put 19.989999771118164 into a template's prompt where the same row as JSON lines says 19.99,
    and a row's temperature 0.7 was 0.699999988079071. A request's float32 and float16 values are read as the
    shortest decimal of their width, nested ones too; a kept column is written back with its own bits."""
    from job_fakes import fake_factory

    from kvbatch.jobs.run import EngineCache, run_job

    price = pa.array([19.99, 0.1], pa.float32())
    table = pa.table(
        {
            "price": price,
            "half": pa.array(np.array([0.1, 2.5], np.float16)),
            "logit_bias": pa.array([[(5, 0.7)], []], pa.map_(pa.int64(), pa.float32())),
            "temperature": pa.array([0.7, 1.3], pa.float32()),
            "kept": price,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    job = job_from_dict(
        {
            "name": "j",
            "input": {"path": "in.parquet"},
            "prompt": {"template": "{price} {half}", "chat_template": False},
            "sampling_columns": ["temperature", "logit_bias"],
            "keep_columns": ["kept"],
            "output_dir": "out",
            "output": {"format": "parquet"},
        },
        base_dir=str(tmp_path),
    )
    factory = fake_factory()
    out = Path(run_job(job, EngineCache(factory)).output)
    (engine,) = factory.engines
    requests = sorted(engine.requests, key=lambda r: r.request_id)
    assert [engine.tokenizer.decode(r.prompt_token_ids) for r in requests] == ["19.99 0.1", "0.1 2.5"]
    assert [(r.sampling.temperature, r.sampling.logit_bias) for r in requests] == [(0.7, ((5, 0.7),)), (1.3, ())]
    assert pq.read_table(out).column("kept").combine_chunks().equals(price)  # the stored bits, not the decimal


def test_a_feather_version_1_file_is_refused_saying_how_to_convert_it(tmp_path: Path) -> None:
    """Feather version 1 (pandas' to_feather before Arrow IPC) failed as "cannot read Arrow file ...: Expected to read
    826361158 metadata bytes, but only read 244", which says nothing of the format."""
    import warnings

    import pyarrow.feather as feather

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pyarrow deprecates writing version 1
        feather.write_feather(pa.table({"prompt": ["a", "b"]}), tmp_path / "in.feather", version=1)
    with pytest.raises(InputError, match=r"in.feather is a Feather version 1 file, .* write it as Feather version 2"):
        open_reader(job_for(tmp_path, "in.feather"), ["prompt"])
