"""A prompt column that none of the first rows has fails the job before the model loads (exit 2), naming the
columns the rows do have; the rows read ahead to check are run as usual when the column is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from job_fakes import fake_factory
from typer.testing import CliRunner

from kvbatch import cli
from kvbatch.errors import ExitCode, SpecError
from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.first_rows import FIRST_ROWS
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(tmp_path: Path, **prompt):
    return job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "prompt": prompt, "output_dir": "out"}, base_dir=str(tmp_path)
    )


@pytest.mark.parametrize(
    ("prompt", "field", "missing"),
    [
        ({"column": "promt"}, "prompt.column", "'promt'"),
        ({}, "prompt.column", "'prompt'"),  # the default column
        ({"messages_column": "msgs"}, "prompt.messages_column", "'msgs'"),
        ({"template": "{question} {contxt}"}, "prompt.template", "'contxt'"),
    ],
)
def test_no_row_with_the_column_fails_before_the_model_loads(tmp_path: Path, prompt, field, missing) -> None:
    write(tmp_path / "in.jsonl", [{"id": i, "question": "q", "context": "c"} for i in range(FIRST_ROWS + 20)])
    factory = fake_factory()
    [outcome] = run_jobs([job(tmp_path, **prompt)], engine_factory=factory)
    assert isinstance(outcome.error, SpecError)
    assert outcome.error.field == field
    assert f"none of the first {FIRST_ROWS} rows has the column {missing}" in str(outcome.error)
    assert "the rows have 'id', 'question', 'context'" in str(outcome.error)
    assert factory.engines == []  # no model was loaded


def test_the_rows_read_ahead_are_not_lost(tmp_path: Path) -> None:
    # Three rows without the column, one unreadable, then rows with it: the column exists, every row is written.
    rows = [{"q": "a"}, {"q": "b"}, {"q": "c"}]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + "{broken\n" + '{"prompt": "x"}\n{"prompt": "yy"}\n'
    )
    [outcome] = run_jobs([job(tmp_path)], engine_factory=fake_factory())
    assert outcome.error is None, outcome.error
    out = read_arrow(tmp_path / "out" / "j.arrow").to_pylist()
    assert [r["row"] for r in out] == [0, 1, 2, 3, 4, 5]
    assert [r["error_kind"] for r in out] == ["missing_column"] * 3 + ["bad_json", None, None]


def test_fewer_rows_than_the_window_all_lacking_fail_too(tmp_path: Path) -> None:
    write(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    [outcome] = run_jobs([job(tmp_path)], engine_factory=fake_factory())
    assert isinstance(outcome.error, SpecError)
    assert "none of the first 2 rows has the column 'prompt'; the rows have 'text'" in str(outcome.error)


def test_an_openai_batch_file_read_as_rows_names_the_input_format(tmp_path: Path) -> None:
    # `kvbatch generate batch.jsonl` said only that the rows have 'custom_id', 'method', 'url', 'body'
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body}
    write(tmp_path / "in.jsonl", [line, {**line, "custom_id": "r2"}])
    [outcome] = run_jobs([job(tmp_path)], engine_factory=fake_factory())
    assert isinstance(outcome.error, SpecError)
    assert str(outcome.error).endswith(
        "the rows have 'custom_id', 'method', 'url', 'body'; they are OpenAI Batch requests: set input.format: openai "
        "(--input-format openai)"
    )
    write(tmp_path / "in.jsonl", [{"custom_id": "r1", "text": "hi"}])  # no body: no such hint
    [outcome] = run_jobs([job(tmp_path)], engine_factory=fake_factory())
    assert str(outcome.error).endswith("the rows have 'custom_id', 'text'")


def test_the_cli_exits_2_on_a_misspelled_prompt_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    result = CliRunner().invoke(cli.app, ["generate", "in.jsonl", "-o", "out.arrow", "--prompt-column", "promt"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "prompt.column: none of the first 2 rows has the column 'promt'; the rows have 'prompt'" in result.output
    assert not (tmp_path / "out.arrow").exists()


def test_each_column_needs_one_row_not_one_row_all_of_them(tmp_path: Path) -> None:
    """A row's tools and template values are its own, null or absent in most rows: the job runs when each column
    is in some first row. It stopped when no single row had them all, saying no row had columns the rows had."""
    turn = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "add"}}]
    write(tmp_path / "in.jsonl", [{"m": turn}, {"m": turn, "tools": tools}, {"m": turn, "kw": {"x": 1}}])
    spec = job(tmp_path, messages_column="m", tools_column="tools", chat_template_kwargs_column="kw")
    [outcome] = run_jobs([spec], engine_factory=fake_factory())
    assert outcome.error is None, outcome.error
    assert [r["row"] for r in read_arrow(tmp_path / "out" / "j.arrow").to_pylist()] == [0, 1, 2]
    # A column that none of them has is still taken for a typo, named by its own field.
    write(tmp_path / "in.jsonl", [{"m": turn, "tools": tools}, {"m": turn}])
    [outcome] = run_jobs([spec], engine_factory=fake_factory())
    assert isinstance(outcome.error, SpecError) and outcome.error.field == "prompt.chat_template_kwargs_column"
    assert "none of the first 2 rows has the column 'kw'; the rows have 'm', 'tools'" in str(outcome.error)


def test_adapter_column_reads_a_missing_key_as_null_and_stops_on_a_typo(tmp_path: Path) -> None:
    """A row without the adapter column runs on the job's `adapter`, as a null cell does (and as rows without their
    tools or sampling column do); it was a `missing_column` error row. A column no first row has is a typo."""
    fields = {"adapters": {"tone": "org/tone", "x": "org/x"}, "adapter": "tone", "adapter_column": "lora"}
    spec = job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "output_dir": "out", **fields}, base_dir=str(tmp_path)
    )
    write(tmp_path / "in.jsonl", [{"prompt": "a", "lora": None}, {"prompt": "b"}, {"prompt": "c", "lora": "x"}])
    factory = fake_factory()
    [outcome] = run_jobs([spec], engine_factory=factory)
    assert outcome.error is None, outcome.error
    assert [r["error"] for r in read_arrow(tmp_path / "out" / "j.arrow").to_pylist()] == [None] * 3
    assert sorted(r.adapter for r in factory.engines[0].requests) == ["tone", "tone", "x"]
    write(tmp_path / "in.jsonl", [{"prompt": "a", "lora_name": "x"}, {"prompt": "b"}])
    factory = fake_factory()
    [outcome] = run_jobs([spec], engine_factory=factory)
    assert isinstance(outcome.error, SpecError) and outcome.error.field == "adapter_column"
    assert "none of the first 2 rows has the column 'lora'; the rows have 'prompt', 'lora_name'" in str(outcome.error)
    assert factory.engines == []


@pytest.mark.parametrize(
    ("fields", "field", "column"),
    [
        ({"sampling_column": "setings"}, "sampling_column", "'setings'"),
        ({"sampling_columns": ["temperature", "top_k"]}, "sampling_columns", "'top_k'"),
        ({"constraint_column": "shema"}, "constraint_column", "'shema'"),
    ],
)
def test_a_rows_sampling_or_constraint_column_no_first_row_has_is_a_typo(tmp_path, fields, field, column) -> None:
    """As for the adapter column: every row ran on the job's own sampling or constraint, without a word."""
    spec = job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "output_dir": "out", **fields}, base_dir=str(tmp_path)
    )
    write(tmp_path / "in.jsonl", [{"prompt": "a", "temperature": 0.5, "settings": {}, "schema": {}}, {"prompt": "b"}])
    factory = fake_factory()
    [outcome] = run_jobs([spec], engine_factory=factory)
    assert isinstance(outcome.error, SpecError) and outcome.error.field == field
    assert f"none of the first 2 rows has the column {column}" in str(outcome.error)
    assert factory.engines == []


@pytest.mark.parametrize(
    ("fields", "field", "column"),
    [
        ({"id_column": "idd"}, "id_column", "'idd'"),
        ({"keep_columns": ["id", "topik"]}, "keep_columns", "'topik'"),
    ],
)
def test_an_id_or_kept_column_no_first_row_has_is_a_typo(tmp_path, fields, field, column) -> None:
    """A JSONL input has no schema to check them against, as a Parquet one has: a misspelt --id-column loaded the
    model and made every row a `missing_column` error, a misspelt --keep-column wrote a column of nulls without a
    word. Both stop the job before the model loads now, naming the columns the rows have, as on Parquet."""
    spec = job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "output_dir": "out", **fields}, base_dir=str(tmp_path)
    )
    write(tmp_path / "in.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2, "topic": "t"}])
    factory = fake_factory()
    [outcome] = run_jobs([spec], engine_factory=factory)
    assert isinstance(outcome.error, SpecError) and outcome.error.field == field
    assert f"none of the first 2 rows has the column {column}; the rows have 'prompt', 'id', 'topic'" in str(
        outcome.error
    )
    assert factory.engines == []
    # A kept column that only some rows have is no typo: the others keep a null, as before.
    write(tmp_path / "in.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2, "topik": "t", "idd": 3}])
    [outcome] = run_jobs([spec], engine_factory=fake_factory())
    assert outcome.error is None, outcome.error
