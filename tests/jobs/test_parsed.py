"""The `parsed` column (jobs/parsed.py): its Arrow type from a JSON schema, each row's value from its text, and the
job settings that allow it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from kvbatch.errors import SpecError
from kvbatch.jobs.job_io import layout_for
from kvbatch.jobs.parsed import ParsedColumn
from kvbatch.jobs.records import Layout, RowResult
from kvbatch.jobs.spec import job_from_dict, spec_hash

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": ["integer", "null"]},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"const": 12345}}},
        "extra": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    },
    "required": ["name"],
}
PERSON_TYPE = pa.struct(
    [
        pa.field("name", pa.string()),
        pa.field("age", pa.int64()),
        pa.field("score", pa.float64()),
        pa.field("member", pa.bool_()),
        pa.field("role", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("address", pa.struct([pa.field("city", pa.string()), pa.field("zip", pa.int64())])),
        pa.field("extra", pa.string()),  # anyOf has no one Arrow type: JSON text
    ]
)


def test_an_object_schema_becomes_a_struct_of_its_properties() -> None:
    column = ParsedColumn.for_schema(json.dumps(PERSON))
    assert column.type == PERSON_TYPE
    text = json.dumps({"name": "Ann", "age": 31, "score": 2, "tags": ["a"], "address": {"city": "X"}, "extra": [1]})
    assert column.value(text, "stop") == {
        "name": "Ann",
        "age": 31,
        "score": 2.0,
        "member": None,
        "role": None,
        "tags": ["a"],
        "address": {"city": "X", "zip": None},
        "extra": "[1]",
    }
    assert pa.array([column.value(text, "stop")], column.type).type == PERSON_TYPE
    assert column.value('{"name": "Bo"}', "stop")["extra"] is None  # missing: null, not the JSON text "null"


@pytest.mark.parametrize(
    ("schema", "arrow_type"),
    [
        ({"type": "array", "items": {"type": "integer"}}, pa.list_(pa.int64())),
        ({"type": "string"}, pa.string()),
        ({"enum": [1.5, 2.5]}, pa.float64()),
        ({"enum": ["a", 1]}, pa.string()),  # mixed: JSON text
        ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}, pa.string()),
        ({"type": "object"}, pa.string()),  # no properties: JSON text (Parquet holds no empty struct)
        ({"$ref": "#/$defs/x", "$defs": {"x": {"type": "string"}}}, pa.string()),
        # Keys beyond the properties may appear: a struct of the properties would drop them.
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {}}, pa.string()),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": {}}, pa.string()),
        ({"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}}, pa.string()),
        # A tuple: its first item is no string, so a list of the rest's type would null every row.
        ({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}}, pa.string()),
        ({"type": "object", "properties": {"a": {"enum": 5}}}, pa.struct([("a", pa.string())])),  # a bad enum
    ],
)
def test_schemas_without_one_arrow_shape_fall_back_to_json_text(schema, arrow_type) -> None:
    assert ParsedColumn.for_schema(json.dumps(schema)).type == arrow_type


def test_json_text_keeps_every_value_as_written() -> None:
    # Extra keys kept; a number keeps its digits (as a float, 1e400 became "Infinity", which is not JSON).
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {}}
    assert ParsedColumn.for_schema(json.dumps(schema)).value('{"a":1,"b":2}', "stop") == '{"a":1,"b":2}'
    text = '{"x":1e400,"y":0.1000000000000000000001,"z":[-0.0,2,"é"]}'
    value = ParsedColumn.for_schema(None).value(text, "stop")
    assert json.loads(value, parse_float=str) == json.loads(text.replace("1e400", "1E+400"), parse_float=str)
    number = ParsedColumn.for_schema(json.dumps({"type": "number"}))
    assert number.value("0.25", "stop") == 0.25 and number.value("3", "stop") == 3.0


def test_rows_that_did_not_stop_or_do_not_fit_get_null() -> None:
    column = ParsedColumn.for_schema(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    assert column.value('{"n": 3}', "stop") == {"n": 3}
    assert column.value('{"n": 3', "length") is None  # cut mid-structure
    assert column.value(None, "error") is None
    assert column.value('{"n": 123456789012345678901234567890}', "stop") is None  # past int64
    assert column.value('{"n": "three"}', "stop") is None  # not what the schema says (a row's own schema)
    assert ParsedColumn.for_schema(None).value('{"b": [1, {}]}', "stop") == '{"b":[1,{}]}'


def test_a_number_past_float64_gets_null_not_infinity() -> None:
    """The grammar engine allows any exponent, and `1e400` is past float64: the column held inf, a value JSON cannot
    write and the row never did, where an integer past int64 gets null. A number that only rounds keeps a value."""
    column = ParsedColumn.for_schema(json.dumps({"type": "object", "properties": {"x": {"type": "number"}}}))
    assert column.value('{"x": 1e400}', "stop") is None
    assert column.value('{"x": -1E+309}', "stop") is None
    assert column.value('{"x": 1.7976931348623157e308}', "stop") == {"x": 1.7976931348623157e308}
    assert column.value('{"x": 1e-400}', "stop") == {"x": 0.0}


def test_a_lone_surrogate_escape_gets_null_and_the_output_is_written() -> None:
    # JSON text may escape a lone UTF-16 surrogate, and the grammar engine's own matcher allows one in any string; no
    # Arrow string holds it, so building the output table raised UnicodeEncodeError.
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    text = '{"a": "\\ud800"}'
    assert _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False), text)
    rows = [
        RowResult(i, texts=[t], finish_reasons=["stop"], json_output=True) for i, t in enumerate([text, '{"a": "ok"}'])
    ]
    for column, paired in (
        (ParsedColumn.for_schema(json.dumps(schema)), {"a": "\U0001f600"}),
        (ParsedColumn.for_schema(None), '{"a":"\U0001f600"}'),
    ):
        table = Layout(parsed=column).to_table(rows)
        assert table.column("text").to_pylist() == [text, '{"a": "ok"}']
        assert table.column("parsed").to_pylist()[0] is None
        assert column.value('{"a": "\\ud83d\\ude00"}', "stop") == paired  # a pair is one character


def test_each_sample_is_parsed_in_a_multi_sample_output() -> None:
    column = ParsedColumn.for_schema(json.dumps({"type": "array", "items": {"type": "boolean"}}))
    layout = Layout(multi=True, parsed=column)
    rows = [
        RowResult(0, texts=["[true]", "[false, tru"], finish_reasons=["stop", "length"], json_output=True),
        RowResult(1),  # an error row
        # A row under a regex (a job of per-row constraints) whose text reads as JSON by chance: not parsed.
        RowResult(2, texts=["[true]"], finish_reasons=["stop"], json_output=False),
    ]
    table = layout.to_table(rows)
    assert table.schema.field("parsed").type == pa.list_(pa.list_(pa.bool_()))
    assert table.column("parsed").to_pylist() == [[[True], None], None, None]


def _job(tmp_path: Path, **fields) -> object:
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    return job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "output": {"path": "j.arrow", "parsed": True}, **fields},
        base_dir=str(tmp_path),
    )


def test_parsed_needs_json_output_and_changes_the_spec_hash(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="output.parsed needs JSON output"):
        layout_for(_job(tmp_path), {})
    with pytest.raises(SpecError, match="output.parsed needs JSON output"):
        layout_for(_job(tmp_path, sampling={"structured_outputs": {"regex": "[ab]+"}}), {})
    with pytest.raises(SpecError, match="`parsed` column is taken"):
        layout_for(_job(tmp_path, sampling={"structured_outputs": {"json_object": True}}, keep_columns=["parsed"]), {})
    typed = layout_for(_job(tmp_path, sampling={"structured_outputs": {"json": PERSON}}), {})
    assert typed.parsed.type == PERSON_TYPE
    per_row = layout_for(_job(tmp_path, sampling={"structured_outputs": {"json": PERSON}}, constraint_column="c"), {})
    assert per_row.parsed.type == pa.string()  # rows may bring other schemas: JSON text
    sampling = {"structured_outputs": {"json": PERSON}}
    with_column = _job(tmp_path, sampling=sampling)
    without = job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "output": {"path": "j.arrow"}, "sampling": sampling},
        base_dir=str(tmp_path),
    )
    assert spec_hash(with_column) != spec_hash(without)  # an output of one does not resume into the other


@pytest.mark.parametrize("fields", [{"sampling_column": "s"}, {"sampling_columns": ["structured_outputs"]}])
def test_rows_that_may_set_their_own_constraint_get_json_text(tmp_path: Path, fields: dict) -> None:
    # A row's own schema through its sampling values was typed by the job's: {"b": "x"} came out as {"a": null}
    sampling = {"structured_outputs": {"json": PERSON}}
    assert layout_for(_job(tmp_path, sampling=sampling, **fields), {}).parsed.type == pa.string()
    only_seeds = _job(tmp_path, sampling=sampling, sampling_columns=["seed"])
    assert layout_for(only_seeds, {}).parsed.type == PERSON_TYPE  # no row can change the schema
