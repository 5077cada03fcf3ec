"""A row's own sampling values: OpenAI Batch bodies' penalties, logit_bias, stop and seed; sampling columns in
the job file; and the spec hash of jobs that leave the new fields unset (earlier outputs keep resuming)."""

from __future__ import annotations

import dataclasses
import json
import typing
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import BatchError
from test_openai_logprobs import request, run_openai

from kvbatch.errors import ErrorKind, SpecError
from kvbatch.jobs.readers import open_reader
from kvbatch.jobs.row_sampling import row_sampling
from kvbatch.jobs.rows import Row
from kvbatch.jobs.spec import (
    _PROMPT_FIELDS_V1,
    _SAMPLING_FIELDS_V1,
    job_from_dict,
    load_jobs_file,
    result_fingerprint,
)
from kvbatch.runner.config import SamplingParams


def test_openai_bodies_penalties_bias_stop_and_seed_are_served(tmp_path) -> None:
    body = dict(presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={"50": -100, "7": 3}, stop="x", seed=9)
    lines, engine = run_openai(tmp_path, [request("a", **body), request("b")])
    asked = {r.request_id: r.sampling for r in engine.requests}
    assert (asked[0].presence_penalty, asked[0].frequency_penalty) == (0.5, -0.25)
    assert asked[0].logit_bias == ((7, 3.0), (50, -100.0)) and asked[0].stop == ("x",) and asked[0].seed == 9
    assert (asked[1].presence_penalty, asked[1].logit_bias, asked[1].seed) == (0.0, (), None)
    assert all(line["error"] is None for line in lines)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be <= 2, got 2.5"),
        ({"logit_bias": {"5": 101}}, "logit_bias 5: 101.0 needs a token id >= 0 and a bias in [-100, 100]"),
        ({"logit_bias": {"five": 1}}, "logit_bias must be a token id -> bias mapping, or [id, bias] pairs"),
        ({"logit_bias": {"\u0665": 1}}, "logit_bias must be a token id -> bias mapping"),  # an Arabic-Indic 5
        ({"logit_bias": [1, 2]}, "logit_bias must be a token id -> bias mapping"),
        # any seed torch's manual_seed takes, OpenAI's int64 and a uint64 among them, and no other
        ({"seed": -(2**63) - 1}, f"seed must be >= {-(2**63)}, got {-(2**63) - 1}"),
        ({"seed": 2**64}, f"seed must be <= {2**64 - 1}, got {2**64}"),
        # smaller, a seen token's logit overflowed to inf and a sampled row drew token 0 at every step
        ({"repetition_penalty": 1e-40, "temperature": 1}, "repetition_penalty must be >= 1e-06, got 1e-40"),
        # JSON reads a long integer as a Python int, which no float holds: it failed the whole job
        ({"presence_penalty": 10**400}, "presence_penalty must be a finite number, got 1000"),
        ({"logit_bias": {"5": 10**400}}, "logit_bias must be a token id -> bias mapping"),
    ],
)
def test_a_bad_body_value_fails_its_line_only(tmp_path, body, words) -> None:
    lines, engine = run_openai(tmp_path, [request("ok"), request("bad", **body)])
    error = BatchError.model_validate(lines[1]["error"])
    assert error.code == "bad_request" and words in error.message
    assert [r.request_id for r in engine.requests] == [0]


def test_a_rows_single_stop_string_is_a_list_of_one_as_in_the_job_file() -> None:
    base = job(sampling={"stop": "###", "bad_words": "spam"}).sampling
    row = dataclasses.replace(SamplingParams(), stop="###", bad_words="spam")  # a row's {"stop": "###", ...}
    assert (row.stop, row.bad_words) == (base.stop, base.bad_words) == (("###",), ("spam",))


def test_a_rows_sampling_values_read_the_field_types_once_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row's sampling values (an OpenAI Batch line's max_tokens) are checked against SamplingParams' field
    types, which typing.get_type_hints compiled from their text again for every row: 23 compiles a row, two thirds
    of the host's time for such a row, which capped a job near 2,000 rows/s before any engine work."""
    calls = []
    real = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda *a, **k: calls.append(a) or real(*a, **k))
    rows = [dataclasses.replace(SamplingParams(), max_new_tokens=n, temperature=0.5) for n in range(1, 101)]
    assert [r.max_new_tokens for r in rows] == list(range(1, 101))
    assert len(calls) <= 1, f"the field types were read {len(calls)} times for 100 rows"
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        dataclasses.replace(SamplingParams(), max_new_tokens=0)


def test_a_parquet_map_or_json_text_column_holds_a_rows_sampling_values(tmp_path) -> None:
    # An Arrow map reads as (key, value) pairs; a struct as a dict; both are mappings of sampling fields.
    values = pa.array([[("max_new_tokens", 2)], [], None, [("temprature", 1)]], pa.map_(pa.string(), pa.int64()))
    text = ['{"max_new_tokens": 2}', "{}", None, "temperature=1"]  # JSON text of a mapping, as a string column
    table = pa.table({"prompt": ["a", "b", "c", "d"], "m": values, "t": text})
    pq.write_table(table, tmp_path / "in.parquet")
    spec = job_from_dict({"name": "j", "input": {"path": "in.parquet"}, "sampling_column": "m"}, base_dir=str(tmp_path))
    rows = list(open_reader(spec, ["prompt", "m"]))
    asked = [row_sampling(row, spec) for row in rows]
    assert asked[:3] == [{"max_new_tokens": 2}, {}, {}]
    assert asked[3].kind == ErrorKind.BAD_REQUEST and "sets 'temprature', not a sampling field" in asked[3].message
    spec = dataclasses.replace(spec, sampling_column="t")
    asked = [row_sampling(row, spec) for row in open_reader(spec, ["prompt", "t"])]
    assert asked[:3] == [{"max_new_tokens": 2}, {}, {}]
    assert asked[3].kind == ErrorKind.WRONG_TYPE
    assert "column 't' is a string, expected a mapping of sampling fields (or JSON text of one)" in asked[3].message


def test_whole_floats_of_an_integer_field_are_integers(tmp_path) -> None:
    # pandas keeps an integer column with missing values as floats (64.0, NaN); written to Parquet, NaN is null.
    frame = pd.DataFrame({"prompt": ["a", "b", "c", "d"], "max_new_tokens": [4.0, None, 2.5, 8.0]})
    frame["seed"] = [7.0, 9.0, None, 1.0]
    frame["temperature"] = [1.0, 0.5, None, 2.0]  # a float field keeps its float
    frame.to_parquet(tmp_path / "in.parquet")
    columns = ["max_new_tokens", "seed", "temperature"]
    spec = job_from_dict(
        {"name": "j", "input": {"path": "in.parquet"}, "sampling_columns": columns}, base_dir=str(tmp_path)
    )
    asked = [row_sampling(row, spec) for row in open_reader(spec, ["prompt", *columns])]
    assert asked[0] == {"max_new_tokens": 4, "seed": 7, "temperature": 1.0}
    assert type(asked[0]["max_new_tokens"]) is int and type(asked[0]["seed"]) is int
    assert asked[1] == {"seed": 9, "temperature": 0.5}
    assert asked[2] == {"max_new_tokens": 2.5}  # not whole: refused as the row's SamplingParams is built
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(**asked[2])


def test_decimal_values_are_the_numbers_they_spell(tmp_path) -> None:
    """DuckDB and Spark write a literal such as 0.7 as DECIMAL(2,1), read as Python's Decimal; every row of such a
    column failed as bad_request ("temperature must be a finite number, got Decimal('0.7')"). A decimal is its
    number: a whole one of an integer field that integer, and one that is not whole still refused."""
    table = pa.table(
        {
            "prompt": ["a", "b", "c"],
            "temperature": pa.array([Decimal("0.7"), None, Decimal("1.0")], pa.decimal128(2, 1)),
            "max_new_tokens": pa.array([Decimal("16"), Decimal("2.5"), None], pa.decimal128(4, 1)),
            "s": pa.array(
                [{"top_p": Decimal("0.95")}, None, {"top_p": None}], pa.struct([("top_p", pa.decimal128(3, 2))])
            ),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    spec = job_from_dict(
        {
            "name": "j",
            "input": {"path": "in.parquet"},
            "sampling_columns": ["temperature", "max_new_tokens"],
            "sampling_column": "s",
        },
        base_dir=str(tmp_path),
    )
    asked = [row_sampling(row, spec) for row in open_reader(spec, ["prompt", "temperature", "max_new_tokens", "s"])]
    assert asked[0] == {"temperature": 0.7, "max_new_tokens": 16, "top_p": 0.95}
    assert [type(asked[0][k]) for k in ("temperature", "max_new_tokens", "top_p")] == [float, int, float]
    assert asked[1] == {"max_new_tokens": Decimal("2.5")}  # not whole: refused as the row's SamplingParams is built
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        SamplingParams(**asked[1])
    assert asked[2] == {"temperature": 1.0}
    SamplingParams(**asked[0])


def test_a_struct_column_of_logit_biases_leaves_the_tokens_a_row_did_not_set(tmp_path) -> None:
    """pandas writes dicts of different token ids as one struct of every id, null where a row set none: each row
    read {"5": 100.0, "7": None} and failed as a bad logit_bias, in a sampling_column and a sampling_columns alike."""
    biases = [{"5": 100.0}, {"7": -3.0}, None]
    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "logit_bias": biases})
    frame["s"] = [{"logit_bias": b, "temperature": t} for b, t in zip(biases, [None, 0.5, None])]
    frame.to_parquet(tmp_path / "in.parquet")
    assert pq.read_table(tmp_path / "in.parquet")["logit_bias"][0].as_py() == {"5": 100.0, "7": None}
    spec = {"name": "j", "input": {"path": "in.parquet"}}
    for columns in ({"sampling_column": "s"}, {"sampling_columns": ["logit_bias"]}):
        job = job_from_dict({**spec, **columns}, base_dir=str(tmp_path))
        asked = [row_sampling(row, job) for row in open_reader(job, ["prompt", "s", "logit_bias"])]
        params = [dataclasses.replace(job.sampling, **a) for a in asked]
        assert [p.logit_bias for p in params] == [((5, 100.0),), ((7, -3.0),), ()], columns
        assert [p.temperature for p in params] == ([0.0, 0.5, 0.0] if "sampling_column" in columns else [0.0] * 3)


def test_a_struct_column_holds_a_rows_constraint_with_its_other_kinds_null(tmp_path) -> None:
    # An Arrow struct has every field on every row, null where unset: a null json was read as a schema and every
    # row failed with "a JSON schema is an object, got NoneType"
    from kvbatch.jobs.constraints import column_constraint
    from kvbatch.runner.structured_outputs import StructuredOutputs

    kinds = pa.struct([("json", pa.string()), ("regex", pa.string()), ("choice", pa.list_(pa.string()))])
    values = [{"json": None, "regex": "[0-9]+", "choice": None}, {"json": None, "regex": None, "choice": ["a", "b"]}]
    table = pa.table({"prompt": ["a", "b"], "structured_outputs": pa.array(values, kinds)})
    pq.write_table(table, tmp_path / "in.parquet")
    spec = {"name": "j", "input": {"path": "in.parquet"}, "sampling_columns": ["structured_outputs"]}
    spec = job_from_dict(spec, base_dir=str(tmp_path))
    rows = list(open_reader(spec, ["prompt", "structured_outputs"]))
    asked = [dataclasses.replace(spec.sampling, **row_sampling(row, spec)).structured_outputs for row in rows]
    assert asked == [StructuredOutputs(regex="[0-9]+"), StructuredOutputs(choice=("a", "b"))]
    assert [column_constraint(row.data["structured_outputs"]) for row in rows] == asked  # as a constraint_column


def test_json_text_or_a_map_in_a_mapping_fields_column_is_its_mapping(tmp_path) -> None:
    # sampling_columns: [structured_outputs, logit_bias] of JSON text (a CSV or pandas export) or Arrow maps failed
    # every row ("a constraint is a mapping"), where a constraint_column and a sampling_column read both
    from kvbatch.runner.structured_outputs import StructuredOutputs

    table = pa.table(
        {
            "prompt": ["a", "b", "c"],
            "structured_outputs": ['{"regex": "[0-9]+"}', '{"choice": ["x", "y"]}', None],
            "logit_bias": ['{"7": -100}', None, '{"3": 2.5}'],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    columns = ["structured_outputs", "logit_bias"]
    spec = job_from_dict(
        {"name": "j", "input": {"path": "in.parquet"}, "sampling_columns": columns}, base_dir=str(tmp_path)
    )
    asked = [
        dataclasses.replace(spec.sampling, **row_sampling(r, spec)) for r in open_reader(spec, ["prompt", *columns])
    ]
    assert [a.structured_outputs for a in asked] == [
        StructuredOutputs(regex="[0-9]+"),
        StructuredOutputs(choice=("x", "y")),
        None,
    ]
    assert [a.logit_bias for a in asked] == [((7, -100.0),), (), ((3, 2.5),)]
    maps = pa.table(
        {"prompt": ["a"], "structured_outputs": pa.array([[("regex", "[a-z]")]], pa.map_(pa.string(), pa.string()))}
    )
    pq.write_table(maps, tmp_path / "in.parquet")
    (row,) = open_reader(spec, ["prompt", "structured_outputs"])
    assert dataclasses.replace(spec.sampling, **row_sampling(row, spec)).structured_outputs == StructuredOutputs(
        regex="[a-z]"
    )


def test_json_text_nested_past_pythons_parser_fails_its_row_only(tmp_path) -> None:
    # json.loads raises RecursionError, not ValueError, on it: the job failed, not the row
    import json

    import pyarrow as pa
    from job_fakes import fake_factory

    from kvbatch.jobs.run import EngineCache, run_job

    rows = [{"id": "deep", "prompt": "hi", "s": "[" * 100_000}, {"id": "ok", "prompt": "hi", "s": '{"n": 1}'}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "j", "input": {"path": "in.jsonl"}, "output_dir": "out", "id_column": "id", "sampling_column": "s"}
    run_job(job_from_dict(spec, base_dir=str(tmp_path)), EngineCache(fake_factory()))
    table = pa.ipc.open_stream(pa.memory_map(str(tmp_path / "out" / "j.arrow"))).read_all()
    out = {row["id"]: row for row in table.to_pylist()}
    assert out["deep"]["error_kind"] == "wrong_type"
    assert "column 's' is a string, expected a mapping of sampling fields (or JSON text of one)" in out["deep"]["error"]
    assert out["ok"]["error"] is None


def job(**fields):
    return job_from_dict({"name": "j", "input": {"path": "in.jsonl"}, **fields})


def test_job_file_values_of_the_new_fields() -> None:
    spec = job(sampling={"logit_bias": {"12": 1.5, 3: -2}, "bad_words": "spam", "min_tokens": 4})
    assert spec.sampling.logit_bias == ((3, -2.0), (12, 1.5)) and spec.sampling.bad_words == ("spam",)
    with pytest.raises(SpecError, match=r"sampling: min_tokens \(300\) must be <= max_new_tokens \(256\)"):
        job(sampling={"min_tokens": 300})
    with pytest.raises(SpecError, match=r"sampling_columns: 'temp' is no sampling field"):
        job(sampling_columns=["temperature", "temp"])
    with pytest.raises(SpecError, match=r"sampling.logit_bias.x: expected an integer"):
        job(sampling={"logit_bias": {"x": 1}})
    for key in ("\u00b2", "\u0665"):  # digits to str.isdigit, not token ids: "²" made int() raise
        with pytest.raises(SpecError, match=rf"sampling.logit_bias.{key}: expected an integer"):
            job(sampling={"logit_bias": {key: 1}})


def test_top_k_minus_one_is_off_in_the_job_file_and_in_a_rows_column(tmp_path) -> None:
    """vLLM reads top_k -1 as off (and 0 too); only an OpenAI body took it, and a job file's `top_k: -1` was
    refused at load, a row's top_k column of -1 a bad_request row. Either is off now, the same job as top_k 0."""
    assert job(sampling={"top_k": -1}).sampling.top_k == 0
    assert result_fingerprint(job(sampling={"top_k": -1})) == result_fingerprint(job(sampling={"top_k": 0}))
    pq.write_table(pa.table({"prompt": ["a", "b"], "top_k": [-1, 5]}), tmp_path / "in.parquet")
    spec = job_from_dict(
        {"name": "j", "input": {"path": "in.parquet"}, "sampling_columns": ["top_k"]}, base_dir=str(tmp_path)
    )
    asked = [row_sampling(row, spec) for row in open_reader(spec, ["prompt", "top_k"])]
    assert [SamplingParams(**values).top_k for values in asked] == [0, 5]
    with pytest.raises(SpecError, match="sampling.top_k: must be >= -1, got -2"):
        job(sampling={"top_k": -2})


def test_unset_new_fields_leave_the_fingerprint_as_it_was() -> None:
    fingerprint = result_fingerprint(job())
    assert set(fingerprint["sampling"]) == set(_SAMPLING_FIELDS_V1)
    assert set(fingerprint["prompt"]) == set(_PROMPT_FIELDS_V1)
    assert "sampling_columns" not in fingerprint and "sampling_column" not in fingerprint
    changed = result_fingerprint(job(sampling={"presence_penalty": 0.5}, sampling_column="s"))
    assert changed["sampling"]["presence_penalty"] == 0.5 and changed["sampling_column"] == "s"


def test_a_job_file_spells_logit_bias_with_integer_keys(tmp_path) -> None:
    (tmp_path / "jobs.yaml").write_text(
        "jobs:\n  - name: a\n    input: {path: in.jsonl}\n    sampling:\n      logit_bias: {50256: -100, '7': 2.5}\n"
        "      bad_words: [foo, bar baz]\n    prompt:\n      chat_template_kwargs: {enable_thinking: false}\n"
    )
    spec = load_jobs_file(tmp_path / "jobs.yaml").jobs[0]
    assert spec.sampling.logit_bias == ((7, 2.5), (50256, -100.0)) and spec.sampling.bad_words == ("foo", "bar baz")
    assert spec.prompt.chat_template_kwargs == {"enable_thinking": False}


def test_what_a_row_asks_beyond_the_jobs_columns_is_its_error_not_lost(tmp_path) -> None:
    # The output's columns are the job's, fixed before a row is read. A row asking n 3 used to get one text of its
    # three, and one asking logprobs none, with no error; a row's n had no bound, so one row could stall the job.
    import json

    import pyarrow as pa
    from job_fakes import fake_factory

    from kvbatch.jobs.run import EngineCache, run_job

    settings = {"ok": {"temperature": 0.5}, "n": {"n": 3}, "lp": {"logprobs": True}, "top": {"top_logprobs": 2},
                "plp": {"prompt_logprobs": True}, "huge": {"n": 100000}}  # fmt: skip
    rows = [{"id": k, "prompt": "hi", "s": v} for k, v in settings.items()]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out: str, **sampling) -> dict:
        spec = {"name": "j", "input": {"path": "in.jsonl"}, "output_dir": out, "id_column": "id"}
        job = job_from_dict({**spec, "sampling_column": "s", "sampling": sampling}, base_dir=str(tmp_path))
        run_job(job, EngineCache(fake_factory()))
        table = pa.ipc.open_stream(pa.memory_map(str(tmp_path / out / "j.arrow"))).read_all()
        return {row["id"]: row for row in table.to_pylist()}

    out = run("plain")
    assert out["ok"]["error"] is None and out["ok"]["text"].startswith("echo ")
    wanted = {"n": "sampling.n above 1", "lp": "sampling.logprobs: true", "top": "sampling.top_logprobs above 0",
              "plp": "sampling.prompt_logprobs: true"}  # fmt: skip
    for key, setting in wanted.items():
        assert out[key]["error_kind"] == "bad_request" and f"set the job's {setting}" in out[key]["error"]
    assert "bad sampling parameters: n must be <= 128, got 100000" in out["huge"]["error"]
    # With the job's columns in place, the rows get what they asked.
    out = run("placed", n=2, logprobs=True)
    assert out["n"]["error"] is None and [t[-2:] for t in out["n"]["text"]] == ["#0", "#1", "#2"]
    assert out["lp"]["error"] is None and out["lp"]["logprobs"] == [[-0.5, -0.5, -0.5]] * 2


@pytest.mark.parametrize(
    ("field", "value", "row_value"),
    [
        ("stop_token_ids", [5, 519], [5, 519]),
        ("allowed_token_ids", [512], [512]),
        ("logit_bias", {519: 2.0}, {"519": 2.0}),
    ],
)
def test_token_ids_outside_the_vocabulary_stop_a_job_of_its_own_and_fail_a_row_of_its_own(
    tmp_path, field, value, row_value
) -> None:
    """The tiny model's vocabulary is 512 ids. A job's own value would fail every row (each was an error row and the
    job exited 0): it stops the job before any row runs, as a bad setting does; a row's own value fails that row.
    The refusal, made once the model is loaded, named the field alone (`sampling.stop_token_ids: ...`): it names
    where the value was written, as the load's refusals do: the job's line, the line in `defaults:`, or the command
    line for --set, in the run and in its plan."""
    import json

    import yaml
    from reliability_helpers import read_output, save_tiny_model, word_prompts
    from typer.testing import CliRunner

    from kvbatch import cli

    model = str(save_tiny_model(tmp_path / "model"))
    prompts = word_prompts(2)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    rows = [{"prompt": prompts[0], field: row_value}, {"prompt": prompts[1]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"""defaults:
  model: {json.dumps(model)}
  prompt: {{chat_template: false}}
  engine: {{device: cpu, kv_cache_gib: 0.001}}
"""
    flow = yaml.safe_dump(value, default_flow_style=True).strip()  # [5, 519], {519: 2.0}
    (tmp_path / "jobs.yaml").write_text(
        common
        + f"""jobs:
  - name: own
    input: {{path: in.jsonl}}
    sampling:
      max_new_tokens: 2
      {field}: {flow}
  - name: rows
    input: {{path: rows.jsonl}}
    sampling: {{max_new_tokens: 2}}
    sampling_columns: [{field}]
"""
    )
    (tmp_path / "defaults.yaml").write_text(
        common
        + f"""  sampling:
    {field}: {flow}
jobs:
  - name: dflt
    input: {{path: in.jsonl}}
    sampling: {{max_new_tokens: 2}}
"""
    )
    bad = [519] if field != "allowed_token_ids" else [512]
    refusal = f"sampling.{field}: token ids {bad} are outside the model's vocabulary of 512 tokens (ids 0 to 511)"
    own = f"{tmp_path / 'jobs.yaml'}:10: {refusal}"

    ran = CliRunner().invoke(cli.app, ["run", str(tmp_path / "jobs.yaml"), "--quiet"])
    assert ran.exit_code == 2, ran.output
    assert f"kvbatch: job own failed: {own}\n" in ran.stderr
    assert not (tmp_path / "out" / "own.arrow").exists()
    got = read_output(tmp_path / "out" / "rows.arrow")
    assert [(r["error_kind"], r["error"]) for r in got] == [
        ("bad_request", f"row 0 (line 1): {field} holds token ids outside the vocabulary of 512: {bad}"),
        (None, None),
    ]

    planned = CliRunner().invoke(cli.app, ["plan", str(tmp_path / "jobs.yaml"), "--job", "own"])
    # The plan named the field alone, not the job whose sampling names them
    assert (planned.exit_code, planned.stderr) == (2, f"kvbatch: error: job own: {own}\n")

    from_defaults = f"{tmp_path / 'defaults.yaml'}:6: {refusal}"
    ran = CliRunner().invoke(cli.app, ["run", str(tmp_path / "defaults.yaml"), "--quiet"])
    assert (ran.exit_code, ran.stderr) == (2, f"kvbatch: job dflt failed: {from_defaults}\n")
    planned = CliRunner().invoke(cli.app, ["plan", str(tmp_path / "defaults.yaml")])
    assert (planned.exit_code, planned.stderr) == (2, f"kvbatch: error: job dflt: {from_defaults}\n")

    given = ["--job", "own", "--set", f"sampling.{field}={flow}"]
    ran = CliRunner().invoke(cli.app, ["run", str(tmp_path / "jobs.yaml"), "--quiet", *given])
    assert (ran.exit_code, ran.stderr) == (2, f"kvbatch: job own failed: command line: {refusal}\n")
    planned = CliRunner().invoke(cli.app, ["plan", str(tmp_path / "jobs.yaml"), *given])
    assert (planned.exit_code, planned.stderr) == (2, f"kvbatch: error: job own: command line: {refusal}\n")


def test_a_rows_sampling_value_its_job_never_reads_is_that_rows_error(tmp_path) -> None:
    """The job's own values and its sampling_columns that no row reads are refused at load; a row's mapping in a
    sampling_column still set them, dropped without a word: a scoring row's temperature or max_new_tokens, a stop
    beside the job's constraint. Each is that row's bad_request; values the row reads pass, and a value equal to
    the default changes nothing."""
    (tmp_path / "in.jsonl").write_text("")
    rows = [
        {"prompt": "a", "s": {"temperature": 0.5}},
        {"prompt": "b", "s": {"max_new_tokens": 9, "top_logprobs": 2}},
        {"prompt": "c", "s": {"top_logprobs": 2, "temperature": 0.0}},
    ]
    scoring = job(task="score", sampling_column="s")
    asked = [row_sampling(Row(i, r), scoring) for i, r in enumerate(rows)]
    assert asked[0].kind == ErrorKind.BAD_REQUEST and asked[0].message == (
        "row 0: column 's' sets temperature, which task score generates no tokens, so sampling.temperature has "
        "nothing to apply to (each row gets `scores`)"
    )
    assert (
        asked[1].kind == ErrorKind.BAD_REQUEST and "sets max_new_tokens, which task score generates" in asked[1].message
    )
    assert asked[2] == {"top_logprobs": 2, "temperature": 0.0}
    constrained = job(sampling_column="s", sampling={"structured_outputs": {"regex": "[ab]"}})
    stop = row_sampling(Row(0, {"prompt": "a", "s": {"stop": ["x"]}}), constrained)
    assert stop.kind == ErrorKind.BAD_REQUEST and "sets stop, which does not apply to a constrained row" in stop.message
    assert row_sampling(Row(0, {"prompt": "a", "s": {"temperature": 0.5}}), constrained) == {"temperature": 0.5}


def test_a_rows_default_value_its_job_never_reads_passes_in_any_spelling(tmp_path) -> None:
    """A row's sampling_column value its job never reads passes when it equals the default, as the job's own
    values are compared once parsed; `stop: []` and `logit_bias: {}` were compared as written against the default's
    `()` and failed the row, though they set nothing."""
    (tmp_path / "in.jsonl").write_text("")
    scoring = job(task="score", sampling_column="s")
    unset = {"stop": [], "logit_bias": {}, "bad_words": [], "allowed_token_ids": [], "stop_token_ids": []}
    assert row_sampling(Row(0, {"prompt": "a", "s": unset}), scoring) == unset
    assert row_sampling(Row(0, {"prompt": "a", "s": json.dumps(unset)}), scoring) == unset
    constrained = job(sampling_column="s", sampling={"structured_outputs": {"regex": "[ab]"}})
    assert row_sampling(Row(0, {"prompt": "a", "s": {"stop": [], "stop_token_ids": []}}), constrained) == {
        "stop": [],
        "stop_token_ids": [],
    }
    stop = row_sampling(Row(0, {"prompt": "a", "s": {"stop": "x"}}), constrained)
    assert stop.kind == ErrorKind.BAD_REQUEST and "sets stop, which does not apply to a constrained row" in stop.message


def test_a_sampling_column_from_defaults_passes_over_values_a_scoring_job_never_reads(tmp_path) -> None:
    """A file whose `defaults:` give every job one sampling_column serves its generating jobs' values to its
    scoring job too: each of its rows setting a temperature was a bad_request, where the file's other values from
    `defaults:` a job does not read are passed over. The job's own sampling_column still fails such a row."""
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "jobs.yaml").write_text(
        "defaults: {input: {path: in.jsonl}, sampling_column: s}\n"
        "jobs:\n"
        "  - {name: gen}\n"
        "  - {name: sc, task: score}\n"
        "  - {name: own, task: score, sampling_column: s}\n"
    )
    gen, scoring, own = load_jobs_file(tmp_path / "jobs.yaml").jobs
    row = Row(0, {"prompt": "a", "s": {"temperature": 0.7, "top_logprobs": 2}})
    assert row_sampling(row, gen) == {"temperature": 0.7, "top_logprobs": 2}
    assert row_sampling(row, scoring) == {"temperature": 0.7, "top_logprobs": 2}  # read: only top_logprobs
    refused = row_sampling(row, own)
    assert refused.kind == ErrorKind.BAD_REQUEST and "sets temperature, which task score generates" in refused.message
