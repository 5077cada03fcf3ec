"""The bad-input catalogue (docs/bad-input.md): each entry produces its documented message, and where the problem
is one row, that row becomes an error row while every other row completes.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_fakes import fake_factory
from reliability_helpers import read_output
from scaling_helpers import tiny_engine

from kvbatch.errors import InputError, OutputError, SpecError
from kvbatch.jobs import atomic
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict, load_jobs_file


def run(tmp_path: Path, factory=None, **fields):
    data = {"name": "bad", "input": {"path": "in.jsonl"}, "output": {"path": "out.jsonl", "part_rows": 2}, **fields}
    spec = job_from_dict(data, base_dir=str(tmp_path))
    return run_jobs([spec], engine_factory=factory or fake_factory(max_model_len=60))[0]


GOOD = b'{"id": 1, "prompt": "hello"}'
LINES = [
    GOOD,
    b'{"id": 2, "prompt": "unterminated}',  # malformed JSON
    b'{"id": 3, "prompt": "caf\xe9"}',  # Latin-1 byte, not UTF-8
    b'{"id": 4, "text": "renamed column"}',  # missing column
    b'{"id": 5, "prompt": 42}',  # wrong type
    b'{"id": 6, "prompt": ""}',  # empty prompt
    b'{"id": 7, "prompt": "   \\n\\t "}',  # whitespace prompt
    b'{"id": 8, "prompt": "' + b"long " * 20 + b'"}',  # over the (fake) context of 60 tokens
    b'{"id": 1, "prompt": "same id as the first row"}',  # duplicate id
    b'["not", "an", "object"]',
    b'{"id": 11, "prompt": null}',
    b'{"id": 12, "prompt": "fine too"}',
]
EXPECTED = {  # row -> (error_kind, message)
    1: ("bad_json", "row 1 (line 2): invalid JSON at column 21: Unterminated string starting at"),
    2: ("invalid_utf8", "row 2 (line 3): invalid UTF-8 at byte 24: b'\\xe9\"}\\n'"),
    3: ("missing_column", "row 3 (line 4): column 'prompt' is missing"),
    4: ("wrong_type", "row 4 (line 5): column 'prompt' is an integer, expected a string"),
    5: ("empty_prompt", "row 5 (line 6): column 'prompt' is empty"),
    6: ("empty_prompt", "row 6 (line 7): column 'prompt' is only whitespace"),
    7: ("prompt_too_long", "row 7 (line 8): the prompt has 119 tokens; at most 59 fit"),
    8: ("duplicate_id", "row 8 (line 9): duplicate id 1 (first at row 0)"),
    9: ("not_an_object", "row 9 (line 10): expected a JSON object, got list"),
    10: ("empty_prompt", "row 10 (line 11): column 'prompt' is null"),
}


def test_bad_rows_become_error_rows_and_the_rest_completes(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(LINES) + b"\n")
    outcome = run(tmp_path, id_column="id")
    assert outcome.error is None
    rows = read_output(tmp_path / "out" / "out.jsonl")
    assert [r["row"] for r in rows] == list(range(len(LINES)))
    for row in rows:
        if row["row"] in EXPECTED:
            kind, message = EXPECTED[row["row"]]
            assert row["error_kind"] == kind and row["error"].startswith(message), row
            assert row["finish_reason"] == "error" and row["text"] is None
        else:
            assert row["error"] is None and row["text"].startswith("echo"), row
    assert outcome.summary.rows_ok == 2 and outcome.summary.rows_error == len(EXPECTED)
    assert outcome.summary.errors_by_kind["empty_prompt"] == 3


def test_the_catalogue_holds_on_the_real_tiny_engine(tmp_path: Path) -> None:
    """The same rows through the real engine (a tiny random Llama, a word tokenizer, a context of 12 tokens):
    the same rows fail, with the same kinds, and the others complete."""
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(LINES) + b"\n")
    outcome = run(tmp_path, tiny_engine, id_column="id", engine={"max_model_len": 12}, sampling={"max_new_tokens": 3})
    assert outcome.error is None
    rows = read_output(tmp_path / "out" / "out.jsonl")
    assert [r["row"] for r in rows] == list(range(len(LINES)))
    for row in rows:
        if row["row"] in EXPECTED:
            kind, message = EXPECTED[row["row"]]
            if kind == "prompt_too_long":  # the real engine counts words, not characters
                message = "row 7 (line 8): the prompt has 20 tokens; at most 11 fit"
            assert row["error_kind"] == kind and row["error"].startswith(message), row
        else:
            assert row["error"] is None and row["output_tokens"] > 0, row
    assert outcome.summary.rows_ok == 2 and outcome.summary.errors_by_kind["empty_prompt"] == 3


def test_line_over_max_line_bytes_is_an_error_row_without_reading_it_whole(tmp_path: Path) -> None:
    huge = b'{"prompt": "' + b"x" * (4 * 2**20) + b'"}'
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([GOOD, huge, GOOD]) + b"\n")
    outcome = run(tmp_path, input={"path": "in.jsonl", "max_line_bytes": 4096})
    rows = read_output(tmp_path / "out" / "out.jsonl")
    assert outcome.error is None and [r["error_kind"] for r in rows] == [None, "line_too_long", None]
    assert (
        rows[1]["error"]
        == "row 1 (line 2): line is over max_line_bytes (4096 bytes); raise input.max_line_bytes to read it"
    )


def test_renamed_column_in_parquet_fails_before_loading_a_model(tmp_path: Path) -> None:
    pq.write_table(pa.table({"question": ["a", "b"]}), tmp_path / "in.parquet")
    factory = fake_factory()
    outcome = run(tmp_path, factory, input={"path": "in.parquet"})
    assert isinstance(outcome.error, SpecError)
    assert str(outcome.error) == "input: column 'prompt' not in in.parquet (its columns: question)"
    assert factory.engines == []


def test_a_used_column_twice_in_parquet_fails_naming_it(tmp_path: Path) -> None:
    table = pa.Table.from_arrays(
        [pa.array(["a", "b"]), pa.array(["c", "d"]), pa.array([1, 2])], names=["prompt", "prompt", "id"]
    )
    pq.write_table(table, tmp_path / "in.parquet")
    outcome = run(tmp_path, input={"path": "in.parquet"}, id_column="id")
    assert isinstance(outcome.error, SpecError)
    assert str(outcome.error) == "input: column 'prompt' appears more than once in in.parquet"


def test_wrong_type_in_parquet_is_an_error_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "in.parquet")
    outcome = run(tmp_path, input={"path": "in.parquet"})
    rows = read_output(tmp_path / "out" / "out.jsonl")
    assert outcome.error is None
    assert [r["error"] for r in rows] == [
        "row 0: column 'prompt' is an integer, expected a string",
        "row 1: column 'prompt' is an integer, expected a string",
    ]


def test_empty_dataset_gives_an_empty_output(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("\n\n")
    outcome = run(tmp_path)
    assert outcome.error is None and outcome.summary.rows == 0
    assert (tmp_path / "out" / "out.jsonl").read_text() == ""


def test_missing_input(tmp_path: Path) -> None:
    outcome = run(tmp_path)
    assert isinstance(outcome.error, InputError)
    assert str(outcome.error) == f"input not found: {tmp_path / 'in.jsonl'}"


def test_unreadable_input(tmp_path: Path) -> None:
    # A file where a folder should be (permissions do not stop root; a folder named in.jsonl is read as a folder of
    # data files, and says it holds none)
    (tmp_path / "data").write_text("")
    outcome = run(tmp_path, input={"path": "data/in.jsonl"})
    assert isinstance(outcome.error, InputError)
    assert str(outcome.error).startswith(f"cannot open {tmp_path / 'data' / 'in.jsonl'}: [Errno 20] Not a directory")


def test_damaged_parquet(tmp_path: Path) -> None:
    (tmp_path / "in.parquet").write_bytes(b"PAR1 this is not a Parquet file")
    outcome = run(tmp_path, input={"path": "in.parquet"})
    assert isinstance(outcome.error, InputError)
    assert str(outcome.error).startswith(
        f"cannot read Parquet file {tmp_path / 'in.parquet'}: Parquet magic bytes not found in footer"
    )


def test_parquet_values_python_cannot_hold_fail_their_rows_only(tmp_path: Path) -> None:
    # Other writers can store bytes that are not UTF-8 in a string column, or an int64 sentinel in a timestamp
    # (past year 9999: OverflowError); reading the batch whole raises. The row keeps the values it can hold.
    prompts = pa.array([b"good one", b"bad \xe9 value", b"good two", b"good three"], pa.binary()).view(pa.string())
    seen = pa.array([0, 0, 0, 2**63 - 1], pa.int64()).cast(pa.timestamp("us"))
    pq.write_table(pa.table({"id": [10, 11, 12, 13], "prompt": prompts, "seen": seen}), tmp_path / "in.parquet")
    outcome = run(tmp_path, input={"path": "in.parquet"}, id_column="id", keep_columns=["seen"])
    rows = read_output(tmp_path / "out" / "out.jsonl")
    assert outcome.error is None and [r["error_kind"] for r in rows] == [None, "invalid_utf8", None, "wrong_type"]
    assert rows[1]["error"].startswith("row 1: column 'prompt' cannot be read: 'utf-8' codec can't decode byte 0xe9")
    assert rows[3]["error"].startswith("row 3: column 'seen' cannot be read:") and [r["id"] for r in rows] == [
        10,
        11,
        12,
        13,
    ]


def test_parquet_damaged_part_way_keeps_the_rows_before_and_names_the_row(tmp_path: Path) -> None:
    table = pa.table({"prompt": [f"prompt {i} " + "x" * 50 for i in range(40)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=10, use_dictionary=False)
    data = bytearray((tmp_path / "in.parquet").read_bytes())
    start = pq.ParquetFile(tmp_path / "in.parquet").metadata.row_group(3).column(0).data_page_offset
    data[start + 20 : start + 200] = b"\xab" * 180  # the last row group's page
    (tmp_path / "in.parquet").write_bytes(bytes(data))
    for _ in range(2):  # a rerun meets the same page and says the same
        outcome = run(tmp_path, input={"path": "in.parquet", "batch_rows": 10})
        assert isinstance(outcome.error, InputError)
        assert str(outcome.error).startswith("job bad: cannot read in.parquet from row 30 on (OSError: ")
        assert str(outcome.error).endswith(
            "; the 30 rows before it are committed, repair or replace the file to go further"
        )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=10, use_dictionary=False)
    outcome = run(tmp_path, input={"path": "in.parquet"}, output={"path": "out.jsonl", "mode": "overwrite"})
    assert outcome.error is None and len(read_output(tmp_path / "out" / "out.jsonl")) == 40


def test_output_folder_not_writable(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")
    (tmp_path / "out").write_text("a file where the output folder should be")
    outcome = run(tmp_path)
    assert isinstance(outcome.error, OutputError)
    assert str(outcome.error).startswith(
        f"cannot create the output folder {tmp_path / 'out'}: [Errno 20] Not a directory"
    )


def test_a_file_system_without_flock_fails_the_job_with_a_message(tmp_path: Path, monkeypatch) -> None:
    from kvbatch.jobs import lock

    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))  # as Lustre without -o flock answers

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    outcome = run(tmp_path)
    assert isinstance(outcome.error, OutputError)
    assert str(outcome.error).startswith(
        f"cannot lock {tmp_path / 'out' / '.out.jsonl.kvbatch' / 'lock'}: Function not implemented; the output's file "
        "system does not take flock locks"
    )


def test_disk_full_stops_the_job_keeps_committed_rows_and_a_rerun_finishes(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "in.jsonl").write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(12)))
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 5:  # the disk fills up after a few commits
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync_until_full)
    outcome = run(tmp_path)
    assert isinstance(outcome.error, OutputError)
    assert "No space left on device" in str(outcome.error) and "rerun to resume" in str(outcome.error)
    assert not list((tmp_path / "out").glob(".out.jsonl.kvbatch/*.incomplete"))
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    outcome = run(tmp_path)
    assert outcome.error is None and 0 < outcome.summary.rows_this_run < 12
    assert [r["row"] for r in read_output(tmp_path / "out" / "out.jsonl")] == list(range(12))


def test_disk_full_at_the_final_write_keeps_every_part(tmp_path: Path, monkeypatch) -> None:
    from kvbatch.jobs import writer

    (tmp_path / "in.jsonl").write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(6)))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(writer, "write_output", full)
        outcome = run(tmp_path)
    assert isinstance(outcome.error, OutputError)
    assert str(outcome.error).endswith(
        "No space left on device; every row is committed in parts, fix this (free space?) and rerun to write it"
    )
    outcome = run(tmp_path)
    assert outcome.error is None and outcome.summary.rows_this_run == 0, "nothing is generated again"
    assert [r["row"] for r in read_output(tmp_path / "out" / "out.jsonl")] == list(range(6))


def test_disk_full_at_the_summary_is_an_output_error_not_a_bug(tmp_path: Path, monkeypatch) -> None:
    from kvbatch.jobs import summary

    (tmp_path / "in.jsonl").write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(6)))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(summary, "write_json", full)
        outcome = run(tmp_path)
    assert isinstance(outcome.error, OutputError)
    assert "out.jsonl is complete, but its summary" in str(outcome.error)
    assert str(outcome.error).endswith("could not be written: No space left on device")
    assert [r["row"] for r in read_output(tmp_path / "out" / "out.jsonl")] == list(range(6))


def test_model_path_missing(tmp_path: Path) -> None:
    from kvbatch.errors import ModelLoadError
    from kvbatch.jobs.run import default_engine_factory

    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")
    outcome = run(tmp_path, default_engine_factory, model=str(tmp_path / "no-such-model"))
    assert isinstance(outcome.error, ModelLoadError)
    assert str(outcome.error) == f"model folder {tmp_path / 'no-such-model'} does not exist"


def test_model_path_that_is_a_file(tmp_path: Path) -> None:
    """`--model in.jsonl` (a file that exists) was reported as a folder that does not exist."""
    from kvbatch.errors import ModelLoadError
    from kvbatch.jobs.run import default_engine_factory

    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")
    outcome = run(tmp_path, default_engine_factory, model="in.jsonl")  # relative to the job's folder, as a file's
    assert isinstance(outcome.error, ModelLoadError)
    assert str(outcome.error) == f"model {tmp_path / 'in.jsonl'} is a file, not a model folder or a .gguf file"


def test_a_prompt_the_tokenizer_raises_on_fails_that_row_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvbatch.jobs.tokenize import PromptTokenizer

    real = PromptTokenizer.encode

    def encode(self, prompt):
        if "poison" in str(prompt):
            raise TypeError("the tokenizer cannot take this")
        return real(self, prompt)

    monkeypatch.setattr(PromptTokenizer, "encode", encode)
    (tmp_path / "in.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "poison"}\n{"prompt": "also fine"}\n')
    outcome = run(tmp_path)
    assert outcome.error is None and outcome.summary.errors_by_kind == {"tokenize": 1}
    rows = read_output(tmp_path / "out" / "out.jsonl")
    assert [r["error_kind"] for r in rows] == [None, "tokenize", None]
    assert (
        rows[1]["error"]
        == "row 1 (line 2): the prompt could not be built or tokenized (TypeError: the tokenizer cannot take this)"
    )


def test_a_device_this_machine_lacks_fails_the_job_not_the_run(tmp_path: Path) -> None:
    from kvbatch.errors import BackendUnavailableError, KvbatchError, ModelLoadError
    from kvbatch.jobs.run import default_engine_factory

    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")
    outcome = run(tmp_path, default_engine_factory, model="default", engine={"device": "cuda:99"})  # no weights loaded
    assert isinstance(outcome.error, ModelLoadError)
    assert str(outcome.error).startswith("engine.device is 'cuda:99', but ")
    # A kernel backend the machine cannot run is the user's to change too: a failed job, not a traceback.
    assert issubclass(BackendUnavailableError, KvbatchError) and not issubclass(ValueError, KvbatchError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl\n",
            "jobs.yaml:4: YAML syntax error: expected ',' or '}', but got '<stream end>'",
        ),
        (
            "jobs:\n  - name: a\n\tinput: x\n",
            "jobs.yaml:3: YAML syntax error: found character '\\t' that cannot start any token",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling:\n      temprature: 0.5\n",
            "jobs.yaml:5: jobs[0].sampling.temprature: unknown field (did you mean 'temperature'?",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling: {max_new_tokens: many}\n",
            "jobs.yaml:4: jobs[0].sampling.max_new_tokens: expected an integer, got str 'many'",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    output: {mode: replace}\n",
            "jobs.yaml:4: jobs[0].output.mode: must be one of 'resume', 'overwrite', 'error', got str 'replace'",
        ),
        ("jobs:\n  - name: a\n", "jobs.yaml:2: jobs[0]: missing required field 'input'"),
    ],
    ids=["unclosed-flow", "tab", "unknown-field", "wrong-type", "bad-choice", "missing-field"],
)
def test_yaml_errors_name_file_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "jobs.yaml").write_text(text)
    with pytest.raises(SpecError) as caught:
        load_jobs_file(tmp_path / "jobs.yaml")
    assert str(caught.value).replace(str(tmp_path) + "/", "").startswith(message), str(caught.value)


def test_a_nan_id_is_no_id(tmp_path: Path) -> None:
    """polars and numpy keep a float column's missing values as NaN, which no output can write as an id (JSONL has
    null there) and which equals nothing, itself included: such a row ran with no id to match it back by, and a
    second one was its 'duplicate'. A NaN id is a missing one, as a null is."""
    pq.write_table(
        pa.table({"id": [float("nan"), 1.5, float("nan")], "prompt": ["a", "b", "c"]}), tmp_path / "in.parquet"
    )
    assert run(tmp_path, id_column="id", input={"path": "in.parquet"}).error is None
    rows = read_output(tmp_path / "out" / "out.jsonl")
    assert [row["error_kind"] for row in rows] == ["missing_column", None, "missing_column"]
    assert rows[0]["error"] == "row 0: id column 'id' is missing, null or NaN"


def test_ids_an_output_would_write_alike_are_duplicates(tmp_path: Path) -> None:
    # A column of mixed types is written as text, and ints among floats as floats: 1, "1" and 1.0 would be three
    # rows of id "1" (or 1.0) in the output, where ids are unique. The later ones are duplicate_id rows.
    ids = [1, 2, "1", 1.0, "a", 1.5, "1.5", True]
    lines = [b'{"id": %s, "prompt": "p"}' % json.dumps(i).encode() for i in ids]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert run(tmp_path, id_column="id").error is None
    rows = read_output(tmp_path / "out" / "out.jsonl")
    kinds = [row["error_kind"] for row in rows]
    assert kinds == [None, None, "duplicate_id", "duplicate_id", None, None, "duplicate_id", None]
    assert rows[2]["error"] == "row 2 (line 3): duplicate id '1' (first at row 0)"
