"""Where a row's structured-output constraint comes from: the job file (a schema inline or in a file), a column
of the row, an OpenAI Batch body's `response_format`. A malformed one fails its row with `bad_constraint`, and
the other rows run; the job file's own is checked when the file loads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_fakes import fake_factory
from openai.types import BatchError
from openai_lines import refused
from test_openai_logprobs import request, run_openai

from kvbatch.errors import SpecError
from kvbatch.jobs.plan import plan_job
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.spec import job_from_dict, load_jobs_file, spec_hash
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.structured_outputs import StructuredOutputs

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_response_format_becomes_the_rows_constraint(tmp_path: Path) -> None:
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    lines, engine = run_openai(
        tmp_path,
        [
            request("schema", response_format=json_schema),
            request("object", response_format={"type": "json_object"}),
            request("text", response_format={"type": "text"}),
            request("bad", response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            request("odd", response_format={"type": "grammar"}),
        ],
    )
    constraints = {r.request_id: r.sampling.structured_outputs for r in engine.requests}
    assert constraints == {0: StructuredOutputs.from_schema(SCHEMA), 1: StructuredOutputs(json_object=True), 2: None}
    for i, words in ((3, "needs a `json_schema` object with a `schema`"), (4, "type 'grammar' is not supported")):
        error = refused(lines[i])
        assert error.code == "bad_constraint" and words in error.message


def test_a_bodys_vllm_structured_outputs_becomes_the_rows_constraint(tmp_path: Path) -> None:
    # vLLM's server takes `structured_outputs` in a chat body (its guided_* fields' successor): a batch file written
    # for it ran unconstrained here, its field ignored.
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    lines, engine = run_openai(
        tmp_path,
        [
            request("choice", structured_outputs={"choice": ["yes", "no"]}),
            request("schema", structured_outputs={"json": SCHEMA}),
            request("regex", structured_outputs={"regex": "[0-9]+"}, response_format={"type": "text"}),
            request("twice", structured_outputs={"regex": "a"}, response_format=json_schema),
            request("odd", structured_outputs={"choice": []}),
            request("free"),
        ],
    )
    constraints = {r.request_id: r.sampling.structured_outputs for r in engine.requests}
    assert constraints == {
        0: StructuredOutputs(choice=("yes", "no")),
        1: StructuredOutputs.from_schema(SCHEMA),
        2: StructuredOutputs(regex="[0-9]+"),
        5: None,
    }
    for i, words in ((3, "sets a constraint twice"), (4, "choice must be a non-empty list")):
        error = refused(lines[i])
        assert error.code == "bad_constraint" and words in error.message


def test_a_bodys_vllm_guided_fields_become_the_rows_constraint(tmp_path: Path) -> None:
    # vLLM's guided_* fields, which structured_outputs replaced and batch files written for it still carry: they
    # were ignored, and the row ran unconstrained.
    lines, engine = run_openai(
        tmp_path,
        [
            request("choice", guided_choice=["yes", "no"]),
            request("schema", guided_json=SCHEMA),
            request("regex", guided_regex="[0-9]+"),
            request("grammar", guided_grammar='root ::= "a" | "b"'),
            request("twice", guided_regex="a", structured_outputs={"regex": "b"}),
            request("two kinds", guided_regex="a", guided_choice=["b"]),
        ],
    )
    constraints = {r.request_id: r.sampling.structured_outputs for r in engine.requests}
    assert constraints == {
        0: StructuredOutputs(choice=("yes", "no")),
        1: StructuredOutputs.from_schema(SCHEMA),
        2: StructuredOutputs(regex="[0-9]+"),
        3: StructuredOutputs(grammar='root ::= "a" | "b"'),
    }
    for i, words in ((4, "in structured_outputs and in guided_*"), (5, "")):
        error = refused(lines[i])
        assert error.code == "bad_constraint" and words in error.message


def _job(tmp_path: Path, rows: list[dict], **fields) -> dict:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": "j", "input": {"path": "in.jsonl"}, "output": {"path": "j.jsonl"}, **fields}


def test_a_constraint_column_sets_each_rows_constraint(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "c": SCHEMA},  # a schema
        {"prompt": "b", "c": json.dumps(SCHEMA)},  # a schema as JSON text
        {"prompt": "c", "c": {"choice": ["x", "y"]}},  # a constraint mapping
        {"prompt": "d", "c": None},  # the job's own
        {"prompt": "e", "c": {"choice": []}},  # malformed: its row fails
        {"prompt": "f", "c": "{not json"},
    ]
    job = job_from_dict(
        _job(tmp_path, rows, constraint_column="c", sampling={"structured_outputs": {"regex": "[ab]+"}}),
        base_dir=str(tmp_path),
    )
    factory = fake_factory()
    summary = run_job(job, EngineCache(factory))
    got = {r.request_id: r.sampling.structured_outputs for r in factory.engines[0].requests}
    assert got == {
        0: StructuredOutputs.from_schema(SCHEMA),
        1: StructuredOutputs.from_schema(SCHEMA),
        2: StructuredOutputs(choice=("x", "y")),
        3: StructuredOutputs(regex="[ab]+"),
    }
    out = [json.loads(line) for line in (tmp_path / "out" / "j.jsonl").read_text().splitlines()]
    assert [out[i]["error_kind"] for i in (4, 5)] == ["bad_constraint", "bad_constraint"]
    assert "column 'c'" in out[4]["error"] and "non-empty list" in out[4]["error"]
    assert summary.errors_by_kind == {"bad_constraint": 2}


def test_a_constraint_mapping_with_an_unknown_field_fails_its_row(tmp_path: Path) -> None:
    """A column's mapping naming a constraint kind beside another key (vLLM's `disable_any_whitespace`, a regex
    `flags`) was read as a JSON Schema of unknown keywords, which any JSON value meets: the row ran as if
    unconstrained, its regex or schema silently dropped. It is refused as unknown, as in an OpenAI body."""
    rows = [
        {"prompt": "a", "c": {"json": SCHEMA, "disable_any_whitespace": True}},
        {"prompt": "b", "c": json.dumps({"regex": "[0-9]+", "flags": "i"})},
        {"prompt": "c", "c": {"choice": ["x", "y"]}},
    ]
    job = job_from_dict(_job(tmp_path, rows, constraint_column="c"), base_dir=str(tmp_path))
    factory = fake_factory()
    summary = run_job(job, EngineCache(factory))
    got = {r.request_id: r.sampling.structured_outputs for r in factory.engines[0].requests}
    assert got == {2: StructuredOutputs(choice=("x", "y"))}
    out = [json.loads(line) for line in (tmp_path / "out" / "j.jsonl").read_text().splitlines()]
    known = "use one of ('json', 'regex', 'choice', 'grammar', 'json_object')"
    unknown = "bad constraint in column 'c': unknown constraint field(s)"
    assert [(out[i]["error_kind"], out[i]["error"]) for i in (0, 1)] == [
        ("bad_constraint", f"row 0 (line 1): {unknown} disable_any_whitespace; {known}"),
        ("bad_constraint", f"row 1 (line 2): {unknown} flags; {known}"),
    ]
    assert summary.errors_by_kind == {"bad_constraint": 2}


def test_a_map_column_holds_a_rows_constraint(tmp_path: Path) -> None:
    """An Arrow map reads as its (key, value) pairs, as the other per-row mapping columns take it; a constraint
    column of map<string, string> failed every row with "a JSON schema is an object, got list"."""
    maps = pa.array(
        [[("regex", "[0-9]+")], [("json", json.dumps(SCHEMA))], [("grammar", 'root ::= "x"')], None],
        pa.map_(pa.string(), pa.string()),
    )
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "c": maps}), tmp_path / "in.parquet")
    spec = {"name": "j", "input": {"path": "in.parquet"}, "output": {"path": "j.jsonl"}, "constraint_column": "c"}
    factory = fake_factory()
    summary = run_job(job_from_dict(spec, base_dir=str(tmp_path)), EngineCache(factory))
    got = {r.request_id: r.sampling.structured_outputs for r in factory.engines[0].requests}
    assert got == {
        0: StructuredOutputs(regex="[0-9]+"),
        1: StructuredOutputs.from_schema(SCHEMA),
        2: StructuredOutputs(grammar='root ::= "x"'),
        3: None,
    }
    assert summary.errors_by_kind == {}


def test_a_struct_columns_schema_is_the_rows_own(tmp_path: Path) -> None:
    """A Parquet struct holds every field any row has: a row's JSON Schema read the other rows' properties as
    nulls (`"properties": {"a": {...}, "b": null}`), a schema the row never wrote and xgrammar refuses ("Schema
    should be an object or bool, but got null"): every row of such a column was a bad_constraint. A struct's null
    is a field the row does not have; the kept column is written as it was read."""
    other = {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}
    table = pa.Table.from_pylist([{"prompt": "a", "c": SCHEMA}, {"prompt": "b", "c": other}])
    pq.write_table(table, tmp_path / "in.parquet")
    spec = {"name": "j", "input": {"path": "in.parquet"}, "output": {"path": "j.jsonl"}, "constraint_column": "c",
            "keep_columns": ["c"]}  # fmt: skip
    factory = fake_factory()
    summary = run_job(job_from_dict(spec, base_dir=str(tmp_path)), EngineCache(factory))
    got = {r.request_id: r.sampling.structured_outputs for r in factory.engines[0].requests}
    assert got == {0: StructuredOutputs.from_schema(SCHEMA), 1: StructuredOutputs.from_schema(other)}
    assert summary.errors_by_kind == {}
    out = [json.loads(line) for line in (tmp_path / "out" / "j.jsonl").read_text().splitlines()]
    assert out[0]["c"]["properties"] == {"a": {"type": "integer"}, "b": None}


def test_a_constraint_nested_past_pythons_parser_fails_its_row_not_the_job(tmp_path: Path) -> None:
    # JSON text in a cell (or an OpenAI body's schema) is parsed by kvbatch, not by the input reader: json.loads
    # raised RecursionError there, which ended the job ("the engine failed") rather than the row.
    deep = '{"type": "array", "items": ' * 5000 + '{"type": "integer"}' + "}" * 5000
    rows = [{"prompt": "a", "c": deep}, {"prompt": "b", "c": {"json": deep}}, {"prompt": "c", "c": {"choice": ["x"]}}]
    job = job_from_dict(_job(tmp_path, rows, constraint_column="c"), base_dir=str(tmp_path))
    factory = fake_factory()
    summary = run_job(job, EngineCache(factory))
    assert {r.request_id for r in factory.engines[0].requests} == {2}
    out = [json.loads(line) for line in (tmp_path / "out" / "j.jsonl").read_text().splitlines()]
    assert [out[i]["error_kind"] for i in (0, 1)] == ["bad_constraint", "bad_constraint"]
    assert all("nested too deeply" in out[i]["error"] for i in (0, 1))
    assert summary.errors_by_kind == {"bad_constraint": 2}
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": deep}}
    (tmp_path / "openai").mkdir()
    lines, engine = run_openai(tmp_path / "openai", [request("deep", response_format=json_schema), request("ok")])
    assert [r.request_id for r in engine.requests] == [1]
    error = BatchError.model_validate(lines[0]["error"])
    assert error.code == "bad_constraint" and "nested too deeply" in error.message


def test_a_row_that_sets_its_constraint_twice_is_its_error(tmp_path: Path) -> None:
    # In its sampling values and in the constraint column: which one the row meant is not for kvbatch to guess.
    rows = [
        {"prompt": "a", "s": {"structured_outputs": {"regex": "maybe"}}, "c": {"choice": ["x", "y"]}},
        {"prompt": "b", "s": {"structured_outputs": {"regex": "maybe"}}, "c": None},
        {"prompt": "c", "s": {"temperature": 0.5}, "c": {"choice": ["x", "y"]}},
    ]
    job = job_from_dict(_job(tmp_path, rows, constraint_column="c", sampling_column="s"), base_dir=str(tmp_path))
    factory = fake_factory()
    run_job(job, EngineCache(factory))
    got = {r.request_id: r.sampling.structured_outputs for r in factory.engines[0].requests}
    assert got == {1: StructuredOutputs(regex="maybe"), 2: StructuredOutputs(choice=("x", "y"))}
    out = [json.loads(line) for line in (tmp_path / "out" / "j.jsonl").read_text().splitlines()]
    assert out[0]["error_kind"] == "bad_constraint" and "sets a constraint twice" in out[0]["error"]


def test_a_schema_file_is_read_relative_to_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "a.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    jobs = {"jobs": [{"name": "j", "input": {"path": "in.jsonl"}, "output": {"path": "j.jsonl"}}]}
    jobs["jobs"][0]["sampling"] = {"structured_outputs": {"json": "schemas/a.json"}}
    (tmp_path / "jobs.yaml").write_text(json.dumps(jobs))
    [job] = load_jobs_file(tmp_path / "jobs.yaml").jobs
    assert job.sampling.structured_outputs == StructuredOutputs.from_schema(SCHEMA)
    inline = job_from_dict(_job(tmp_path, [], sampling={"structured_outputs": {"json": SCHEMA}}), str(tmp_path))
    assert spec_hash(inline) == spec_hash(job)  # the file's content is what counts
    plain = job_from_dict(_job(tmp_path, []), str(tmp_path))
    assert spec_hash(plain) != spec_hash(job)

    jobs["jobs"][0]["sampling"] = {"structured_outputs": {"json": "schemas/missing.json"}}
    (tmp_path / "jobs.yaml").write_text(json.dumps(jobs))
    with pytest.raises(SpecError, match="cannot read the JSON schema file"):
        load_jobs_file(tmp_path / "jobs.yaml")
    jobs["jobs"][0]["sampling"] = {"structured_outputs": {"regex": "a", "choice": ["b"]}}
    (tmp_path / "jobs.yaml").write_text(json.dumps(jobs))
    with pytest.raises(SpecError, match="set exactly one of") as caught:
        load_jobs_file(tmp_path / "jobs.yaml")
    assert caught.value.field == "jobs[0].sampling.structured_outputs"


def test_a_schema_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors (Notepad, PowerShell 5's Out-File) may begin a UTF-8 file with a byte-order mark, which the
    JSON Lines input skips; a schema file with one failed the job file with "Unexpected UTF-8 BOM"."""
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(SCHEMA).encode())
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    job = {"name": "j", "input": {"path": "in.jsonl"}, "sampling": {"structured_outputs": {"json": "a.json"}}}
    (tmp_path / "jobs.yaml").write_text(json.dumps({"jobs": [job]}))
    [loaded] = load_jobs_file(tmp_path / "jobs.yaml").jobs
    assert loaded.sampling.structured_outputs == StructuredOutputs.from_schema(SCHEMA)


def test_plan_lists_the_distinct_constraints_and_the_rows_whose_constraint_is_bad(tmp_path: Path) -> None:
    """Without weights (the default model's tokenizer and config only), as `kvbatch plan` on the CPU."""
    rows = [{"prompt": f"q{i}", "c": SCHEMA if i % 2 else {"choice": ["x", "y"]}} for i in range(6)]
    rows.append({"prompt": "bad", "c": {"regex": "(ab"}})
    job = job_from_dict(_job(tmp_path, rows, model="default", constraint_column="c"), base_dir=str(tmp_path))
    plan = plan_job(job, EngineCache())
    assert [(text.split()[0], n, seconds is not None) for text, n, seconds in plan.constraints] == [
        ("choice", 3, True),
        ("json", 3, True),
        ("regex", 1, False),
    ]
    assert plan.failures == {"bad_constraint": 1}
    assert (
        "row 6 (line 7): bad constraint (regex" in plan.failure_examples[0] and "not closed" in plan.failure_examples[0]
    )
    text = plan.format()
    assert "constraints     3 distinct, 1 that do not compile" in text and "    1 row, bad: regex" in text


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        ({"regex": "(ab"}, "regex does not compile: Regex parsing error at position 4: The parenthesis is not"),
        ({"regex": "a\\Z"}, "escape \\Z at position 1 of the regex is not supported"),
        ({"json": {"type": "object", "not": {}}}, "unsupported JSON Schema keyword 'not' at #"),
        ({"json": {"type": "integer", "minimum": 1.5}}, "json does not compile: Integer constraint must be a whole"),
        ({"grammar": "root ::= x"}, "grammar does not compile: EBNF parser error"),
    ],
)
def test_a_job_constraint_that_can_never_compile_fails_the_job_file(tmp_path: Path, constraint, words) -> None:
    # Every row would fail alike: the job stops as its file loads, before any model (exit 2), naming the field.
    with pytest.raises(SpecError, match="sampling.structured_outputs") as refused:
        job_from_dict({"name": "j", "input": {"path": "in.jsonl"}, "sampling": {"structured_outputs": constraint}})
    assert words in str(refused.value)
    job_from_dict({"name": "j", "input": {"path": "in.jsonl"}, "sampling": {"structured_outputs": {"regex": "a+"}}})


@pytest.mark.parametrize(
    ("name", "value"),
    [("stop", ["END"]), ("stop_token_ids", [2]), ("ignore_eos", True), ("include_stop_str_in_output", True)],
)
def test_a_jobs_stop_settings_beside_its_own_constraint_are_refused(tmp_path: Path, name: str, value) -> None:
    """A constrained row ends where its grammar ends: stop strings, stop token ids and ignore_eos do not apply to it.
    A job's own constraint constrains every row (a null in a constraint column keeps it, above), so the job's stop
    settings beside it loaded and were dropped on every row. A constraint column alone leaves its null rows free,
    where they apply; from `defaults:` they are passed over."""
    constraint = {"structured_outputs": {"choice": ["yes", "no"]}}
    for columns in ({}, {"constraint_column": "c"}):
        with pytest.raises(SpecError) as refused:
            job_from_dict(
                {"name": "j", "input": {"path": "in.jsonl"}, **columns, "sampling": {**constraint, name: value}}
            )
        assert (refused.value.field, refused.value.message) == (
            f"sampling.{name}",
            "does not apply to a constrained row, which ends where its grammar ends, and the job's "
            "sampling.structured_outputs constrains every row (docs/structured-output.md)",
        )
    free = job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "constraint_column": "c", "sampling": {name: value}}
    )
    assert getattr(free.sampling, name) == getattr(SamplingParams(**{name: value}), name)
    text = (
        f"defaults:\n  sampling: {{{name}: {json.dumps(value)}}}\njobs:\n  - name: j\n    input: {{path: in.jsonl}}\n"
    )
    text += "    sampling: {structured_outputs: {choice: ['yes', 'no']}}\n"
    (tmp_path / "jobs.yaml").write_text(text)
    (job,) = load_jobs_file(tmp_path / "jobs.yaml").jobs
    assert job.sampling.structured_outputs == StructuredOutputs(choice=("yes", "no"))


def test_a_constraint_with_a_lone_surrogate_fails_its_row_not_the_job(tmp_path: Path) -> None:
    """JSON text in a cell may spell half a surrogate pair (`"\\ud800"`), which the input reader never sees, as
    the cell's own text is valid. The constraint reached the engine, failed to compile, and its message quoted
    the surrogate: the writer could not encode it, and the whole job ended. It is the row's bad_constraint."""
    rows = [
        {"prompt": "a", "c": json.dumps({"choice": ["x\ud800"]})},
        {"prompt": "b", "c": json.dumps({"type": "string", "enum": ["\udc00"]})},
        {"prompt": "c", "c": json.dumps({"regex": "[a-z]\ud800"})},
        {"prompt": "d", "c": {"choice": ["x"]}},
    ]
    job = job_from_dict(_job(tmp_path, rows, constraint_column="c"), base_dir=str(tmp_path))
    factory = fake_factory()
    summary = run_job(job, EngineCache(factory))
    got = {r.request_id: r.sampling.structured_outputs for r in factory.engines[0].requests}
    assert got == {3: StructuredOutputs(choice=("x",))}
    out = [json.loads(line) for line in (tmp_path / "out" / "j.jsonl").read_text().splitlines()]
    lone = "bad constraint in column 'c': {} holds a lone surrogate (\\u{}), which is not text"
    assert [(out[i]["error_kind"], out[i]["error"]) for i in range(3)] == [
        ("bad_constraint", "row 0 (line 1): " + lone.format("choice", "d800")),
        ("bad_constraint", "row 1 (line 2): " + lone.format("json", "dc00")),
        ("bad_constraint", "row 2 (line 3): " + lone.format("regex", "d800")),
    ]
    assert summary.errors_by_kind == {"bad_constraint": 3}
