"""A whole job over the fake engine: one output row per input row, in input order, in every format, with metadata
and a summary JSON beside the output. The fake engine answers out of order and reports the prompt's token count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_fakes import FakeEngine, FakeTokenizer, fake_factory
from openai.types.chat import ChatCompletion
from openai_lines import refused

from kvbatch import __version__
from kvbatch.errors import SpecError
from kvbatch.jobs import job_io as job_io_module  # where a job opens its reader
from kvbatch.jobs import run as run_module
from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.run import EngineCache, model_name, run_job
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import input_path, job_from_dict, load_jobs_file, output_path, spec_dict, spec_hash

TOKENIZER = FakeTokenizer()
COLUMNS = [
    "row",
    "id",
    "topic",
    "text",
    "finish_reason",
    "stop_reason",
    "error",
    "error_kind",
    "prompt_tokens",
    "output_tokens",
]


def chat_tokens(*messages: tuple[str, str]) -> int:
    text = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages) + "<|im_start|>assistant\n"
    return len(TOKENIZER.encode(text))


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def run(tmp_path: Path, **fields: Any):
    factory = fake_factory(max_model_len=fields.pop("max_model_len", 200))
    job = job_from_dict({"name": "j", "output_dir": "out", **fields}, base_dir=str(tmp_path))
    summary = run_job(job, EngineCache(factory))
    return summary, factory.engines[0] if factory.engines else None


LINES = [
    {"id": "a", "topic": "t1", "prompt": "a much longer question than the others"},
    {"id": "b", "topic": "t2", "prompt": "short"},
    '{"id": "c", "prompt": "broken"',
    {"id": "d", "topic": "t1", "prompt": ""},
    {"id": "e", "topic": "t2", "prompt": 17},
    {"id": "f", "topic": "t1", "prompt": "x" * 300},
    {"id": "b", "topic": "t3", "prompt": "duplicate id"},
    {"id": "g", "topic": "t2", "prompt": "medium question"},
]


def test_one_row_per_input_row_in_input_order(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", LINES)
    summary, engine = run(tmp_path, input={"path": "in.jsonl"}, id_column="id", keep_columns=["topic"], sort_window=8)
    table = read_arrow(tmp_path / "out" / "j.arrow")
    assert table.column_names == COLUMNS
    got = table.to_pylist()
    assert [r["row"] for r in got] == list(range(8))
    assert [r["id"] for r in got] == ["a", "b", None, "d", "e", "f", "b", "g"]
    assert [r["finish_reason"] for r in got] == ["stop", "stop", "error", "error", "error", "error", "error", "stop"]
    assert [r["error_kind"] for r in got] == [
        None,
        None,
        "bad_json",
        "empty_prompt",
        "wrong_type",
        "prompt_too_long",
        "duplicate_id",
        None,
    ]
    for r, line in zip(got, LINES):
        if r["finish_reason"] == "stop":
            n = chat_tokens(("user", line["prompt"]))
            assert (r["text"], r["prompt_tokens"], r["output_tokens"], r["error"]) == (f"echo {n}", n, 3, None)
            assert r["topic"] == line["topic"]
    assert got[2]["error"].startswith("row 2 (line 3): invalid JSON")
    assert got[5]["error"].startswith(
        f"row 5 (line 6): the prompt has {chat_tokens(('user', 'x' * 300))} tokens; at most 199 fit"
    )
    assert got[6]["error"] == "row 6 (line 7): duplicate id 'b' (first at row 1)"
    # The engine was asked shortest first within the sort window; the file is still in input order.
    asked = [r.request_id for r in engine.requests]
    assert asked == [1, 7, 0, 5]
    assert (summary.rows, summary.rows_ok, summary.rows_error) == (8, 3, 5)
    assert summary.errors_by_kind == {
        "bad_json": 1,
        "empty_prompt": 1,
        "wrong_type": 1,
        "prompt_too_long": 1,
        "duplicate_id": 1,
    }


def test_a_long_job_keeps_only_its_rows_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run noted every row it admitted to the engine, to find at the end any the engine never answered, and
    kept them all: a set that grew by about 70 bytes a row for the whole job. It keeps the rows in flight."""
    largest = []

    class Watched(run_module._Feed):
        def write(self, row) -> None:
            super().write(row)
            largest.append(len(self.submitted))

    monkeypatch.setattr(run_module, "_Feed", Watched)
    write_lines(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(300)])
    summary, engine = run(tmp_path, input={"path": "in.jsonl"}, sort_window=4)
    assert (summary.rows, summary.rows_ok, len(engine.requests)) == (300, 300, 300)
    assert len(largest) == 300 and max(largest) <= 4, f"{max(largest)} rows kept, 3 answered at a time"
    assert largest[-1] == 0


def test_schema_metadata_names_job_model_sampling_and_version(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    run(
        tmp_path,
        input={"path": "in.jsonl"},
        model="some-model",
        sampling={"max_new_tokens": 7, "temperature": 0.5, "seed": 3},
    )
    meta = {k.decode(): v.decode() for k, v in read_arrow(tmp_path / "out" / "j.arrow").schema.metadata.items()}
    assert meta["kvbatch.version"] == __version__
    assert meta["kvbatch.model"] == "some-model"
    sampling = json.loads(meta["kvbatch.sampling"])
    assert (sampling["max_new_tokens"], sampling["temperature"], sampling["seed"]) == (7, 0.5, 3)
    job = json.loads(meta["kvbatch.job"])
    assert (job["name"], job["input"]["path"], job["model"]) == ("j", "in.jsonl", "some-model")
    assert json.loads(meta["kvbatch.engine"])["pool"] == "100 blocks of 16 tokens = 1600 tokens"
    # The whole spec loads back as the job that wrote it, from any working folder: job_from_dict refused its
    # base_dir as an unknown field, and relative paths are read from that folder.
    again = job_from_dict(job)
    assert again == job_from_dict({"name": "j", "output_dir": "out", "input": {"path": "in.jsonl"},
                                   "model": "some-model", "sampling": {"max_new_tokens": 7, "temperature": 0.5,
                                   "seed": 3}}, base_dir=str(tmp_path))  # fmt: skip
    assert spec_hash(again) == meta["kvbatch.spec_hash"]


def test_the_spec_of_a_job_built_in_the_working_folder_loads_back_from_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """job_from_dict's default base_dir is ".", the working folder, and the output's spec carried that "." as it
    was: loaded back from another folder, its relative paths named that folder's files. The spec names the folder
    the paths were read from; the job loads back reading the same input, with the same spec hash."""
    (tmp_path / "elsewhere").mkdir()
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    monkeypatch.chdir(tmp_path)
    job = job_from_dict({"name": "j", "output_dir": "out", "input": {"path": "in.jsonl"}, "model": "some-model"})
    run_job(job, EngineCache(fake_factory(max_model_len=200)))
    meta = {k.decode(): v.decode() for k, v in read_arrow(tmp_path / "out" / "j.arrow").schema.metadata.items()}
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = job_from_dict(json.loads(meta["kvbatch.job"]))
    assert (input_path(again), output_path(again)) == (tmp_path / "in.jsonl", tmp_path / "out" / "j.arrow")
    assert spec_hash(again) == meta["kvbatch.spec_hash"]


def test_the_spec_of_every_job_of_a_file_loads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec an output carries (spec_dict) holds every field, those the job left at their default and those its
    file's `defaults:` gave it, which the job passes over: loaded back, they were refused as the job's own, so a
    score_rolling job's spec (chat_template: true) and a scoring job's given a max_new_tokens by `defaults:` did
    not load. Each loads equal to its job, with its spec hash, from another working folder."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_lines(tmp_path / "jobs" / "in.jsonl", [{"prompt": "hi", "c": ["a"]}])
    (tmp_path / "jobs" / "jobs.yaml").write_text(
        """
defaults:
  sampling: {max_new_tokens: 5, stop: ["x"]}
  keep_columns: [c]
jobs:
  - {name: rolling, task: score_rolling, input: {path: in.jsonl}}
  - {name: score, task: score, input: {path: in.jsonl}, continuations_column: c}
  - name: constrained
    input: {path: in.jsonl}
    sampling: {structured_outputs: {regex: "[ab]+"}}
  - {name: plain, input: {path: in.jsonl}}
"""
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    jobs = load_jobs_file("../jobs/jobs.yaml").jobs
    assert [j.sampling.max_new_tokens for j in jobs] == [5, 5, 5, 5]
    for job in jobs:
        again = job_from_dict(json.loads(json.dumps(spec_dict(job))))
        assert again == job, job.name
        assert spec_hash(again) == spec_hash(job), job.name


@pytest.mark.parametrize(
    ("lines", "limit", "shard"),
    [([{"prompt": "hi"}, {"prompt": "there"}], 0, None), ([], None, None), ([{"prompt": "hi"}], None, "2/3")],
)
@pytest.mark.parametrize("fmt", ["arrow", "jsonl"])
def test_no_rows_to_run_write_an_empty_output_without_loading_the_model(
    tmp_path: Path, lines, limit, shard, fmt
) -> None:
    # input.limit 0 (--limit 0), an empty file or a Slurm shard past the last row (an array of 3 tasks over one
    # row): the output and summary are written, no engine is built.
    write_lines(tmp_path / "in.jsonl", lines)
    fields = {"input": {"path": "in.jsonl", "limit": limit}, "output": {"path": f"res.{fmt}"}, "model": "some-model"}
    if shard is not None:
        fields["parallel"] = {"shard": shard}
    summary, engine = run(tmp_path, **fields)
    assert engine is None
    assert (summary.rows, summary.rows_ok, summary.rows_error) == (0, 0, 0)
    path = tmp_path / "out" / f"res.{fmt}"
    if shard is not None:
        path = path.with_name(f"res.shard-0002-of-0003.{fmt}")
    if fmt == "arrow":
        table = read_arrow(path)
        assert table.num_rows == 0 and {"row", "text", "finish_reason", "error_kind"} <= set(table.column_names)
        assert table.schema.metadata[b"kvbatch.model"] == b"some-model"
    else:
        assert path.read_text() == ""
    assert json.loads(path.with_name(path.name + ".summary.json").read_text())["rows"] == 0
    assert run(tmp_path, **fields)[0].status == "already complete"  # a rerun finds it done


@pytest.mark.parametrize("source", ["in.parquet", "stream.arrow", "file.arrow", "in.jsonl", "ds", "dd"])
def test_an_empty_input_of_any_format_writes_an_empty_output_without_loading_the_model(
    tmp_path: Path, source: str
) -> None:
    # A Parquet file of no rows, an Arrow stream or file of no batches, a JSONL file of blank lines: as an empty
    # shard, the output (with the kept columns' types) and summary are written and no engine is built. An Arrow
    # stream has no row count, so its empty input loaded the model before writing nothing. A `datasets` folder
    # of no rows (save_to_disk writes no data file for it, which datasets.load_from_disk then fails on with an
    # IndexError), alone or as a DatasetDict's split, failed the job as a bug.
    import datasets

    empty = pa.table({"id": pa.array([], pa.int64()), "prompt": pa.array([], pa.string())})
    path = tmp_path / source
    if source == "ds":
        datasets.Dataset(empty).save_to_disk(str(path))
    elif source == "dd":
        full = pa.table({"id": [7], "prompt": ["a"]})
        datasets.DatasetDict({"train": datasets.Dataset(full), "test": datasets.Dataset(empty)}).save_to_disk(str(path))
    elif source.endswith(".parquet"):
        pq.write_table(empty, path)
    elif source == "stream.arrow":
        with pa.ipc.new_stream(path, empty.schema):
            pass
    elif source == "file.arrow":
        with pa.ipc.new_file(path, empty.schema):
            pass
    else:
        path.write_text("\n\n")
    split = {"split": "test"} if source == "dd" else {}
    fields = {
        "input": {"path": source, **split},
        "id_column": "id",
        "output": {"path": "res.arrow"},
        "model": "some-model",
    }
    summary, engine = run(tmp_path, **fields)
    assert engine is None
    assert (summary.rows, summary.rows_ok, summary.rows_error) == (0, 0, 0)
    limited = {**fields, "input": {"path": source, "limit": 5, **split}, "output": {"path": "limited.arrow"}}
    assert run(tmp_path, **limited)[1] is None  # input.limit is a bound, not a count of the rows there are
    table = read_arrow(tmp_path / "out" / "res.arrow")
    assert table.num_rows == 0 and {"row", "text", "finish_reason", "error_kind"} <= set(table.column_names)
    if not source.endswith(".jsonl"):
        assert table.schema.field("id").type == pa.int64()  # the input's own type, as rows would have it
    assert run(tmp_path, **fields)[0].status == "already complete"


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_formats_hold_the_same_rows(tmp_path: Path, fmt: str) -> None:
    write_lines(tmp_path / "in.jsonl", [{"k": i, "prompt": f"question {'x' * i}"} for i in range(5)] + ["not json"])
    summary, _ = run(tmp_path, input={"path": "in.jsonl"}, id_column="k", output={"path": f"res.{fmt}"})
    path = tmp_path / "out" / f"res.{fmt}"
    if fmt == "arrow":
        rows, meta = read_arrow(path).to_pylist(), read_arrow(path).schema.metadata
    elif fmt == "parquet":
        table = pq.read_table(path)
        rows, meta = table.to_pylist(), table.schema.metadata
    else:
        rows, meta = [json.loads(line) for line in path.read_text().splitlines()], None
    assert [r["row"] for r in rows] == list(range(6)) and [r["k"] for r in rows] == [0, 1, 2, 3, 4, None]
    assert [r["text"] for r in rows[:5]] == [
        f"echo {chat_tokens(('user', f'question {chr(120) * i}'))}" for i in range(5)
    ]
    assert rows[5]["error_kind"] == "bad_json"
    assert meta is None or b"kvbatch.job" in meta
    side = json.loads((tmp_path / "out" / f"res.{fmt}.summary.json").read_text())
    assert side == summary.to_dict()
    assert (side["rows"], side["rows_ok"], side["rows_error"], side["finish_reasons"]) == (
        6,
        5,
        1,
        {"stop": 5, "error": 1},
    )
    assert side["output_tokens"] == 15 and side["status"] == "done" and side["output_bytes"] == path.stat().st_size


def _strict_json(line: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_jsonl_output_writes_non_finite_floats_as_null(tmp_path: Path) -> None:
    # Bare NaN / Infinity (what Python's json writes) break jq, JavaScript and Spark readers.
    table = pa.table(
        {
            "score": [1.5, float("nan"), float("inf")],
            "nested": [[0.5], [float("-inf")], None],
            "prompt": ["a", "b", "c"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    for fmt in ("jsonl", "arrow"):
        run(tmp_path, input={"path": "in.parquet"}, keep_columns=["score", "nested"], output={"path": f"res.{fmt}"})
    lines = (tmp_path / "out" / "res.jsonl").read_text().splitlines()
    rows = [_strict_json(line) for line in lines]
    assert [r["score"] for r in rows] == [1.5, None, None] and [r["nested"] for r in rows] == [[0.5], [None], None]
    assert all(r["error"] is None for r in rows)
    kept = read_arrow(tmp_path / "out" / "res.arrow").column("score").to_pylist()  # Arrow keeps the floats
    assert kept[0] == 1.5 and kept[1] != kept[1] and kept[2] == float("inf")


def test_jsonl_output_writes_float32_values_as_their_shortest_decimal(tmp_path: Path) -> None:
    """A float32 (a kept column's, or a logprob's: the output's logprob columns are float32) was written with a
    float64's digits, 0.1 as 0.10000000149011612: noise past the ninth digit. Each is now the shortest decimal that
    reads back as the same float32, in a column or nested in a list or struct."""
    values = np.random.default_rng(0).standard_normal(200).astype(np.float32)
    table = pa.table(
        {
            "score": pa.array([0.1, *values.tolist(), None], pa.float32()),
            "nested": pa.array([[{"p": 0.1}]] * 202, pa.list_(pa.struct([("p", pa.float32())]))),
            "prompt": ["a"] * 202,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    run(tmp_path, input={"path": "in.parquet"}, keep_columns=["score", "nested"], output={"path": "res.jsonl"})
    lines = (tmp_path / "out" / "res.jsonl").read_text().splitlines()
    assert '"score": 0.1,' in lines[0] and '"nested": [{"p": 0.1}]' in lines[0]
    scores = [json.loads(line)["score"] for line in lines]
    assert scores[-1] is None and np.array_equal(np.array(scores[1:-1], np.float32), values)
    assert all(len(repr(s)) <= len(repr(float(v))) for s, v in zip(scores[1:-1], values))


def test_kept_values_no_format_holds_become_json_text(tmp_path: Path) -> None:
    # Parquet has no struct without fields ({}), and Arrow IPC refuses nesting of 64 levels or more.
    deep = json.loads("[" * 70 + "1" + "]" * 70)
    write_lines(tmp_path / "in.jsonl", [{"prompt": "a", "meta": {}, "k": None}, {"prompt": "b", "meta": {}, "k": deep}])
    for fmt in ("parquet", "arrow"):
        summary, _ = run(
            tmp_path, input={"path": "in.jsonl"}, keep_columns=["meta", "k"], output={"path": f"res.{fmt}"}
        )
        assert summary.rows_ok == 2
    rows = pq.read_table(tmp_path / "out" / "res.parquet").to_pylist()
    assert [r["meta"] for r in rows] == ["{}", "{}"] and rows[0]["k"] is None and json.loads(rows[1]["k"]) == deep
    arrow_rows = read_arrow(tmp_path / "out" / "res.arrow").to_pylist()
    assert [r["meta"] for r in arrow_rows] == ["{}", "{}"] and [r["k"] for r in arrow_rows] == [r["k"] for r in rows]


def test_kept_mappings_and_lists_of_jsonl_rows_keep_their_keys_as_json_text(tmp_path: Path) -> None:
    # A struct inferred from {"n": 2} and {"bogus": 1} gave each row the other's key as null; parts written apart
    # (a Ray run's blocks) inferred structs that no one schema joins, so the parts folder did not read.
    meta = [{"n": 2}, {"bogus": 1}, [1, "x"], None, "plain"]
    write_lines(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "meta": m} for i, m in enumerate(meta)])
    run(tmp_path, input={"path": "in.jsonl"}, keep_columns=["meta"], output={"path": "res.parquet"})
    kept = [r["meta"] for r in pq.read_table(tmp_path / "out" / "res.parquet").to_pylist()]
    assert kept == ['{"n": 2}', '{"bogus": 1}', '[1, "x"]', None, "plain"]


@pytest.mark.parametrize("part_rows", [1024, 1])
def test_a_kept_boolean_after_a_number_is_json_text_however_rows_fall_into_parts(
    tmp_path: Path, part_rows: int
) -> None:
    # Arrow infers [0.5, true] as doubles, so one part held true as 1.0, while rows in two parts (a resume, a
    # smaller part_rows) were joined as JSON text: the same input gave other values, and lost the boolean.
    write_lines(tmp_path / "in.jsonl", [{"prompt": "a", "v": 0.5}, {"prompt": "b", "v": True}, {"prompt": "c"}])
    summary, _ = run(tmp_path, input={"path": "in.jsonl"}, keep_columns=["v"], output={"part_rows": part_rows})
    assert read_arrow(Path(summary.output)).column("v").to_pylist() == ["0.5", "true", None]


@pytest.mark.parametrize("part_rows", [1, 2, 1024])
def test_a_kept_column_of_numbers_and_text_is_the_same_text_however_rows_fall_into_parts(
    tmp_path: Path, part_rows: int
) -> None:
    # A part holding 2.5 and 1 typed both as doubles, so with text in another part 1 was written "1.0", but "1"
    # when it fell into a part of its own or in with the text: the output hung on the part size (or a resume).
    values = ["a", 2.5, 1, 1.0, 3]
    write_lines(tmp_path / "in.jsonl", [{"prompt": "p", "v": v} for v in values])
    summary, _ = run(tmp_path, input={"path": "in.jsonl"}, keep_columns=["v"], output={"part_rows": part_rows})
    assert read_arrow(Path(summary.output)).column("v").to_pylist() == ["a", "2.5", "1", "1", "3"]


def test_parquet_input_keeps_column_types(tmp_path: Path) -> None:
    table = pa.table(
        {
            "rid": pa.array([10, 11], pa.int64()),
            "stars": pa.array([5, 2], pa.int8()),
            "product": ["kettle", "lamp"],
            "review": ["good", "bad"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    run(
        tmp_path,
        input={"path": "in.parquet"},
        prompt={"template": "{product}: {review}"},
        id_column="rid",
        keep_columns=["stars"],
    )
    out = read_arrow(tmp_path / "out" / "j.arrow")
    assert out.schema.field("rid").type == pa.int64() and out.schema.field("stars").type == pa.int8()
    assert out.column("text").to_pylist() == [
        f"echo {chat_tokens(('user', 'kettle: good'))}",
        f"echo {chat_tokens(('user', 'lamp: bad'))}",
    ]


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "hf"])
def test_kept_columns_of_view_map_and_extension_types_are_written_as_types_datasets_reads(
    tmp_path: Path, fmt: str
) -> None:
    # string_view and run-end encoded columns could not be reordered into the output (array_take has no kernel:
    # the job failed after every row had run, and again on each rerun); map, list_view and extension types were
    # written as they were, and datasets could not open the output (output.format hf failed writing it). Nor could
    # it open an interval, which failed a Parquet output's final write after every row had run.
    datasets = pytest.importorskip("datasets")
    table = pa.table(
        {
            "rid": pa.array(["a", "b", "c"], pa.string_view()),
            "prompt": ["p0", "p1", "p2"],
            "blob": pa.array([b"\x00", None, b"\xff"], pa.binary_view()),
            "tags": pa.array([[("k", 1)], None, []], pa.map_(pa.string(), pa.int64())),
            "nums": pa.array([[1], None, [2, 3]], pa.list_view(pa.int64())),
            "lang": pa.compute.run_end_encode(pa.array(["en", "en", "fr"])),
            "doc": pa.array(['{"a": 1}', None, "[]"], pa.json_()),
            "span": pa.array([pa.MonthDayNano([1, 2, 3]), None, None], pa.month_day_nano_interval()),
        }
    )
    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    summary, _ = run(
        tmp_path,
        input={"path": "in.arrow"},
        id_column="rid",
        keep_columns=["blob", "tags", "nums", "lang", "doc", "span"],
        output={"format": fmt, "part_rows": 2},
    )
    assert (summary.rows, summary.rows_ok) == (3, 3)
    out = Path(summary.output)
    loaded = _read_with_datasets(datasets, out, fmt, tmp_path / "c")
    rows = loaded.to_list()
    assert [r["rid"] for r in rows] == ["a", "b", "c"]
    assert [r["blob"] for r in rows] == [b"\x00", None, b"\xff"]
    assert [r["tags"] for r in rows] == [[{"key": "k", "value": 1}], None, []]  # a map: its entries, as datasets has it
    assert [r["nums"] for r in rows] == [[1], None, [2, 3]]
    assert [r["lang"] for r in rows] == ["en", "en", "fr"]
    assert [r["doc"] for r in rows] == ['{"a": 1}', None, "[]"]
    assert rows[0]["span"] == {"months": 1, "days": 2, "nanoseconds": 3} and rows[1]["span"] is None
    assert loaded.features["rid"] == datasets.Value("string")


def _read_with_datasets(datasets, out: Path, fmt: str, cache_dir: Path):
    """An output as `datasets` opens it: a Parquet file, a save_to_disk folder, or an Arrow stream."""
    if fmt == "parquet":
        return datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(cache_dir))
    if fmt == "hf":
        return datasets.load_from_disk(str(out))
    return datasets.Dataset.from_file(str(out))


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "hf"])
def test_kept_decimal32_and_decimal64_columns_are_written_as_decimals_datasets_reads(tmp_path: Path, fmt: str) -> None:
    # datasets has no type for decimal32 or decimal64: an Arrow or Parquet output kept them as they were and
    # datasets could not open it, and output.format hf failed writing the output after every row had run.
    datasets = pytest.importorskip("datasets")
    import decimal

    values = [decimal.Decimal("1.5"), None, decimal.Decimal("-9999.9")]
    table = pa.table(
        {
            "prompt": ["p0", "p1", "p2"],
            "small": pa.array(values, pa.decimal32(5, 1)),
            "wide": pa.array(values, pa.decimal64(15, 1)),
            "nested": pa.array([[v] for v in values], pa.list_(pa.decimal32(5, 1))),
        }
    )
    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    summary, _ = run(
        tmp_path, input={"path": "in.arrow"}, keep_columns=["small", "wide", "nested"], output={"format": fmt}
    )
    assert (summary.rows, summary.rows_ok) == (3, 3)
    out = Path(summary.output)
    loaded = _read_with_datasets(datasets, out, fmt, tmp_path / "c")
    assert loaded.features["small"] == datasets.Value("decimal128(5, 1)")
    assert loaded.features["wide"] == datasets.Value("decimal128(15, 1)")
    assert loaded["small"] == values and loaded["wide"] == values and loaded["nested"] == [[v] for v in values]


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_a_kept_nanosecond_time_keeps_its_nanoseconds(tmp_path: Path, fmt: str) -> None:
    # A time64[ns] value reads in Python as a datetime.time, which holds microseconds: 00:02:03.456789012 was
    # written as 00:02:03.456789000 in every format.
    nanoseconds = [123_456_789_012, 5, None, 86_399_999_999_999]
    at = pa.array(nanoseconds, pa.time64("ns"))
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "at": at}), tmp_path / "in.parquet")
    summary, _ = run(tmp_path, input={"path": "in.parquet"}, keep_columns=["at"], output={"path": f"o.{fmt}"})
    assert summary.rows_ok == 4
    path = tmp_path / "out" / f"o.{fmt}"
    if fmt == "jsonl":
        written = [json.loads(line)["at"] for line in path.read_text().splitlines()]
        assert written == ["00:02:03.456789012", "00:00:00.000000005", None, "23:59:59.999999999"]
    else:
        table = read_arrow(path) if fmt == "arrow" else pq.read_table(path)
        assert table.column("at").combine_chunks().equals(at)


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_nanosecond_times_inside_kept_maps_keep_their_nanoseconds(tmp_path: Path, fmt: str) -> None:
    # A map reads in Python as (key, value) pairs: its times went through datetime.time as structs' did.
    slot = pa.struct([pa.field("at", pa.time64("ns"))])
    kinds = {
        "at": (pa.string(), pa.time64("ns")),
        "slots": (pa.string(), slot),
        "keyed": (pa.time64("ns"), pa.string()),
    }
    values = {
        "at": [[("a", 123_456_789_012), ("b", None)], None, []],
        "slots": [[("x", {"at": 5})], [("y", None)], None],
        "keyed": [[(7, "t")], None, []],
    }
    maps = {name: pa.array(values[name], pa.map_(*kinds[name])) for name in kinds}
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], **maps}), tmp_path / "in.parquet")
    summary, _ = run(tmp_path, input={"path": "in.parquet"}, keep_columns=list(maps), output={"path": f"o.{fmt}"})
    assert summary.rows_ok == 3
    path = tmp_path / "out" / f"o.{fmt}"
    if fmt == "jsonl":
        written = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["at"] for r in written] == [
            [{"key": "a", "value": "00:02:03.456789012"}, {"key": "b", "value": None}],
            None,
            [],
        ]
        assert [r["slots"] for r in written] == [
            [{"key": "x", "value": {"at": "00:00:00.000000005"}}],
            [{"key": "y", "value": None}],
            None,
        ]
        assert [r["keyed"] for r in written] == [[{"key": "00:00:00.000000007", "value": "t"}], None, []]
    else:
        # an output keeps a map as a list of {key, value} structs (records.output_type)
        table = read_arrow(path) if fmt == "arrow" else pq.read_table(path)
        for name, (key, item) in kinds.items():
            entries = pa.list_(pa.struct([pa.field("key", key), pa.field("value", item)]))
            want = pa.array([v and [{"key": k, "value": x} for k, x in v] for v in values[name]], entries)
            assert table.column(name).combine_chunks().cast(entries).equals(want), name


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_nanosecond_times_inside_kept_structs_and_lists_keep_their_nanoseconds(tmp_path: Path, fmt: str) -> None:
    slot = pa.struct([pa.field("at", pa.time64("ns")), pa.field("note", pa.string())])
    slots = pa.array([{"at": 123_456_789_012, "note": "x"}, None, {"at": None, "note": "y"}], slot)
    times = pa.array([[5, None], [], None], pa.list_(pa.time64("ns")))
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "slot": slots, "times": times}), tmp_path / "in.parquet")
    summary, _ = run(
        tmp_path, input={"path": "in.parquet"}, keep_columns=["slot", "times"], output={"path": f"o.{fmt}"}
    )
    assert summary.rows_ok == 3
    path = tmp_path / "out" / f"o.{fmt}"
    if fmt == "jsonl":
        written = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["slot"] for r in written] == [
            {"at": "00:02:03.456789012", "note": "x"},
            None,
            {"at": None, "note": "y"},
        ]
        assert [r["times"] for r in written] == [["00:00:00.000000005", None], [], None]
    else:
        table = read_arrow(path) if fmt == "arrow" else pq.read_table(path)
        assert table.column("slot").combine_chunks().equals(slots)
        assert table.column("times").combine_chunks().equals(times)


def test_a_nanosecond_time_pickles_and_compares_to_the_nanosecond() -> None:
    # A Ray run pickles its rows, and an id column of times is checked for duplicates by value.
    import datetime
    import pickle

    from kvbatch.jobs.nano_time import NanoTime

    one, two = NanoTime(1_000_000_001), NanoTime(1_000_000_002)
    assert pickle.loads(pickle.dumps(one)).nanoseconds == 1_000_000_001 and one != two
    assert NanoTime(1_000_000_000) == datetime.time(0, 0, 1) and hash(NanoTime(1_000)) == hash(
        datetime.time(0, 0, 0, 1)
    )
    assert f"{one}" == "00:00:01.000000001" and str(NanoTime(1_000)) == "00:00:00.000001"


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_kept_nanosecond_timestamps_and_durations_keep_their_nanoseconds(tmp_path: Path, fmt: str) -> None:
    # pyarrow reads a timestamp[ns] or duration[ns] value as a pandas Timestamp or Timedelta, and without pandas
    # (which kvbatch does not need) refuses it: every row of a Parquet file pandas wrote was a wrong_type error row.
    # With pandas, a JSONL output wrote a duration[ns] in pandas' own form ("0 days 00:00:00.000000005"), unlike a
    # duration[us] ("0:00:01").
    at = pa.array([1_700_000_000_123_456_789, None, 5], pa.timestamp("ns"))
    utc = pa.array([1_700_000_000_123_456_789, 0, None], pa.timestamp("ns", tz="Europe/Paris"))
    took = pa.array([5, -5, None], pa.duration("ns"))
    nested = pa.array([{"at": 1}, None, {"at": None}], pa.struct([pa.field("at", pa.timestamp("ns"))]))
    table = pa.table({"prompt": ["a", "b", "c"], "at": at, "utc": utc, "took": took, "nested": nested})
    pq.write_table(table, tmp_path / "in.parquet")
    summary, _ = run(
        tmp_path,
        input={"path": "in.parquet"},
        keep_columns=["at", "utc", "took", "nested"],
        output={"path": f"o.{fmt}", "part_rows": 2},
    )
    assert summary.rows_ok == 3
    path = tmp_path / "out" / f"o.{fmt}"
    if fmt == "jsonl":
        written = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["at"] for r in written] == ["2023-11-14 22:13:20.123456789", None, "1970-01-01 00:00:00.000000005"]
        assert [r["utc"] for r in written] == [
            "2023-11-14 23:13:20.123456789+01:00",
            "1970-01-01 01:00:00+01:00",
            None,
        ]
        assert [r["took"] for r in written] == ["0:00:00.000000005", "-1 day, 23:59:59.999999995", None]
        assert [r["nested"] for r in written] == [{"at": "1970-01-01 00:00:00.000000001"}, None, {"at": None}]
    else:
        out = read_arrow(path) if fmt == "arrow" else pq.read_table(path)
        for name in ("at", "utc", "took", "nested"):
            assert out.column(name).combine_chunks().equals(table.column(name).combine_chunks()), name


def test_nanosecond_values_read_without_pandas(tmp_path: Path) -> None:
    # Without pandas, pyarrow refuses to read a timestamp[ns] or duration[ns] value that is not whole microseconds
    # into Python: each such row was an error row, its values lost.
    script = r"""
import importlib.abc, sys
class NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "pandas":
            raise ImportError(name)
sys.meta_path.insert(0, NoPandas())
import pyarrow as pa
from kvbatch.jobs.nano_time import python_rows, time_ns_array
kinds = [pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"), pa.duration("ns"), pa.list_(pa.duration("ns"))]
columns = [pa.array([1, None], kinds[0]), pa.array([-1, 2], kinds[1]), pa.array([-5, 7], kinds[2]),
           pa.array([[3], None], kinds[3])]
batch = pa.record_batch(columns, names=["a", "b", "c", "d"])
rows = python_rows(batch)
for name, kind, column in zip(batch.schema.names, kinds, columns):
    assert time_ns_array([r[name] for r in rows], kind).equals(column), name
print(rows[0]["a"], rows[0]["b"], rows[0]["c"], sep="\n")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1970-01-01 00:00:00.000000001",
        "1969-12-31 23:59:59.999999999+00:00",
        "-1 day, 23:59:59.999999995",
    ]


def test_a_kept_column_named_like_a_column_the_job_adds_is_refused(tmp_path: Path) -> None:
    # RESERVED_COLUMNS covers the columns every output has; a kept `top_logprobs` (or `scores`, `prompt_logprobs`)
    # was silently overwritten by the job's own column of that name.
    write_lines(tmp_path / "in.jsonl", [{"prompt": "a", "top_logprobs": "mine", "scores": 1, "continuations": [" x"]}])
    for fields, taken in (
        ({"sampling": {"top_logprobs": 2}, "keep_columns": ["top_logprobs"]}, "top_logprobs"),
        ({"task": "score", "keep_columns": ["scores"]}, "scores"),
        ({"sampling": {"prompt_logprobs": True}, "id_column": "prompt_logprobs"}, "prompt_logprobs"),
        ({"prompt": {"split_reasoning": True}, "keep_columns": ["scores"], "id_column": "reasoning"}, "reasoning"),
    ):
        with pytest.raises(SpecError, match=f"the output's `{taken}` column is taken by an input column"):
            run(tmp_path, input={"path": "in.jsonl"}, **fields)
    summary, _ = run(tmp_path, input={"path": "in.jsonl"}, keep_columns=["top_logprobs"])  # no such output column
    assert read_arrow(Path(summary.output)).column("top_logprobs").to_pylist() == ["mine"]


def test_n_samples_and_logprobs(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}, {"prompt": None}])
    run(tmp_path, input={"path": "in.jsonl"}, sampling={"n": 2, "logprobs": True})
    out = read_arrow(tmp_path / "out" / "j.arrow")
    assert out.schema.field("text").type == pa.list_(pa.string())
    first, second = out.to_pylist()
    n = chat_tokens(("user", "hi"))
    assert first["text"] == [f"echo {n} #0", f"echo {n} #1"] and first["finish_reasons"] == ["stop", "stop"]
    assert first["logprobs"] == [[-0.5] * 3, [-0.5] * 3] and first["output_tokens"] == 6
    assert (second["text"], second["finish_reason"], second["error_kind"]) == (None, "error", "empty_prompt")


def test_openai_batch_in_openai_batch_out(tmp_path: Path) -> None:
    def request(custom_id: str, content: Any, **body: Any) -> dict:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": content}], **body},
        }

    write_lines(
        tmp_path / "batch.jsonl",
        [
            request("r1", "hello", max_tokens=2),
            request("r2", "hi", n=2),
            request("r3", ""),
            request("r4", "bye", temperature=-1),
        ],
    )
    summary, engine = run(tmp_path, input={"path": "batch.jsonl", "format": "openai"}, output={"path": "answers.jsonl"})
    lines = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["r1", "r2", "r3", "r4"]
    first = ChatCompletion.model_validate(lines[0]["response"]["body"])
    n = chat_tokens(("user", "hello"))
    assert (first.choices[0].message.content, first.choices[0].finish_reason) == (f"echo {n}", "length")  # max_tokens 2
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (n, 2)
    assert first.model == "SmolLM2-135M-Instruct"  # the job's model is `default`: outputs name what it is
    second = ChatCompletion.model_validate(lines[1]["response"]["body"])
    assert [c.index for c in second.choices] == [0, 1] and second.choices[1].message.content.endswith("#1")
    for line, code in ((lines[2], "empty_prompt"), (lines[3], "bad_request")):
        error = refused(line)
        assert error.code == code and error.message.startswith(
            f"row {lines.index(line)} (line {lines.index(line) + 1})"
        )
    assert {r.request_id: r.sampling.max_new_tokens for r in engine.requests}[0] == 2
    assert summary.rows == 4 and summary.errors_by_kind == {"empty_prompt": 1, "bad_request": 1}


def test_jobs_share_one_engine_per_model(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    jobs = [
        job_from_dict({"name": n, "input": {"path": "in.jsonl"}, "model": m}, base_dir=str(tmp_path))
        for n, m in (("a", "m1"), ("b", "m1"), ("c", "m2"))
    ]
    factory = fake_factory()
    outcomes = run_jobs(jobs, engine_factory=factory)
    assert [(o.job, o.error, o.summary.rows) for o in outcomes] == [("a", None, 1), ("b", None, 1), ("c", None, 1)]
    assert [e.built_with for e in factory.engines] == [("m1", {}), ("m2", {})]


def logging_factory(events: list[tuple[str, str]]):
    """A fake engine factory that notes each load and close in `events`, as ("load" or "close", model)."""
    inner = fake_factory()

    def factory(model: str, settings: dict) -> FakeEngine:
        engine = inner(model, settings)
        events.append(("load", model))
        engine.close = lambda: events.append(("close", model))
        return engine

    return factory


def test_a_job_that_asks_for_another_engine_releases_the_one_before(tmp_path: Path) -> None:
    """A GPU's KV pool takes the memory its weights leave: a second engine built beside the first found none for its
    pages, and a base-model job then an adapter job (two engines of one model), or two models, failed the second.
    One engine at a time: the held one is closed before another loads, and loads again if a later job asks."""
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    jobs = [
        job_from_dict({"name": n, "input": {"path": "in.jsonl"}, "model": m}, base_dir=str(tmp_path))
        for n, m in (("a", "m1"), ("b", "m1"), ("c", "m2"), ("d", "m1"))
    ]
    events: list[tuple[str, str]] = []
    factory = logging_factory(events)
    outcomes = run_jobs(jobs, engine_factory=factory)
    assert [(o.job, o.error) for o in outcomes] == [("a", None), ("b", None), ("c", None), ("d", None)]
    assert events == [("load", "m1"), ("close", "m1"), ("load", "m2"), ("close", "m2"), ("load", "m1")]


def test_an_engine_another_cache_holds_is_released_before_one_loads(tmp_path: Path, monkeypatch) -> None:
    """One engine at a time held within a cache, but not across them: after kvbatch.generate had loaded a model,
    a job's run (run_jobs makes a cache of its own) built its engine beside that one, which a GPU's pool sizing
    finds no memory for. Building an engine releases what any cache of the process holds."""
    from kvbatch.jobs import generate as generate_module

    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    events: list[tuple[str, str]] = []
    factory = logging_factory(events)
    monkeypatch.setattr(generate_module, "_ENGINES", EngineCache(factory))
    generate_module.generate(["hi"], model="api")
    job = job_from_dict({"name": "a", "input": {"path": "in.jsonl"}, "model": "job"}, base_dir=str(tmp_path))
    jobs_cache = EngineCache(factory)  # as run_jobs makes one, held here to see it released
    assert run_job(job, jobs_cache).rows_ok == 1
    generate_module.generate(["hi"], model="api")
    assert events == [("load", "api"), ("close", "api"), ("load", "job"), ("close", "job"), ("load", "api")]
    assert not jobs_cache.holds(job)


def test_run_jobs_takes_the_jobs_from_any_iterable(tmp_path: Path) -> None:
    """The engines' plan read the jobs before the run did: a generator of jobs was spent by the plan, and run_jobs
    ran nothing and returned [] without a word."""
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    jobs = (job_from_dict({"name": n, "input": {"path": "in.jsonl"}}, base_dir=str(tmp_path)) for n in ("a", "b"))
    outcomes = run_jobs(jobs, engine_factory=fake_factory())
    assert [(o.job, o.error, o.summary.rows) for o in outcomes] == [("a", None, 1), ("b", None, 1)]
    # what the Python API doc names: a loaded job file, and one job, as they come
    (tmp_path / "jobs.yaml").write_text(
        "jobs:\n  - {name: c, input: {path: in.jsonl}}\n  - {name: d, input: {path: in.jsonl}}\n"
    )
    outcomes = run_jobs(load_jobs_file(tmp_path / "jobs.yaml"), engine_factory=fake_factory())
    assert [(o.job, o.error) for o in outcomes] == [("c", None), ("d", None)]
    single = job_from_dict({"name": "e", "input": {"path": "in.jsonl"}}, base_dir=str(tmp_path))
    assert [(o.job, o.error) for o in run_jobs(single, engine_factory=fake_factory())] == [("e", None)]


def test_a_failed_job_is_reported_and_the_next_one_runs(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    jobs = [
        job_from_dict({"name": n, "input": {"path": p}}, base_dir=str(tmp_path))
        for n, p in (("missing", "nope.jsonl"), ("ok", "in.jsonl"))
    ]
    outcomes = run_jobs(jobs, engine_factory=fake_factory())
    assert "input not found" in str(outcomes[0].error) and outcomes[0].summary is None
    assert outcomes[1].error is None and outcomes[1].summary.rows == 1


def test_an_unexpected_error_fails_its_job_with_a_logged_traceback_and_the_next_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    jobs = [
        job_from_dict(
            {"name": n, "input": {"path": "in.jsonl"}, "output": {"path": f"{n}.jsonl"}}, base_dir=str(tmp_path)
        )
        for n in ("a", "b")
    ]
    real = job_io_module.open_reader

    def broken_for_a(job, columns):
        if job.name == "a":
            raise KeyError("a bug")
        return real(job, columns)

    monkeypatch.setattr(job_io_module, "open_reader", broken_for_a)
    outcomes = run_jobs(jobs, engine_factory=fake_factory())
    assert str(outcomes[0].error).startswith("job a: unexpected KeyError: 'a bug' (a bug, traceback logged above)")
    assert outcomes[1].error is None and outcomes[1].summary.rows == 1
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_an_engine_crash_keeps_finished_rows_and_fails_the_job(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(7)])
    job = job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "output": {"part_rows": 1}}, base_dir=str(tmp_path)
    )
    factory = fake_factory(fail_after=3)
    (outcome,) = run_jobs([job], engine_factory=factory)
    assert "the engine failed (RuntimeError: simulated engine crash); finished rows are saved, rerun to resume" in str(
        outcome.error
    )
    (rerun,) = run_jobs([job], engine_factory=fake_factory())
    assert rerun.summary.rows == 7 and rerun.summary.rows_this_run == 4
    assert [r["row"] for r in read_arrow(tmp_path / "out" / "j.arrow").to_pylist()] == list(range(7))


def test_model_names_in_outputs(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    assert model_name("default") == "SmolLM2-135M-Instruct"
    assert model_name(str(tmp_path / "m.gguf")) == "m"
    assert model_name(str(tmp_path / "folder")) == "folder"
    assert model_name("org/name") == "org/name"


def test_rows_stream_through_a_bounded_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are read, tokenized and sorted only one sort window ahead of the engine: memory stays bounded."""
    write_lines(tmp_path / "in.jsonl", [{"prompt": "q" * (i % 7 + 1)} for i in range(100)])
    rows_read = [0]
    real_open = job_io_module.open_reader

    def counting_open(job, needed):
        reader = real_open(job, needed)
        inner = reader.rows

        def rows():
            for row in inner:
                rows_read[0] += 1
                yield row

        reader.rows = rows()
        return reader

    read_when_asked: list[int] = []

    class Probe(FakeEngine):
        def generate(self, requests, on_step=None):
            def probed():
                for request in requests:
                    read_when_asked.append(rows_read[0])
                    yield request

            yield from super().generate(probed(), on_step)

    monkeypatch.setattr(job_io_module, "open_reader", counting_open)
    job = job_from_dict({"name": "j", "input": {"path": "in.jsonl"}, "sort_window": 8}, base_dir=str(tmp_path))
    summary = run_job(job, EngineCache(lambda model, settings: Probe()))
    assert summary.rows == 100 and len(read_when_asked) == 100
    assert max(read - i for i, read in enumerate(read_when_asked)) <= 8  # never more than one window ahead
    assert read_when_asked[0] == 8  # the first window is read, sorted, and handed over before row 9 is read


def test_jsonl_output_writes_token_bytes_as_integers(tmp_path: Path) -> None:
    # A top_logprobs token's bytes were written as Python's repr ("b'The'"), lossy for part of a character.
    import numpy as np

    from kvbatch.jobs.assemble import write_output
    from kvbatch.jobs.records import TOP_LOGPROB

    top = [[{"token_id": 1, "token": "\ufffd", "bytes": b"\xe2\x80", "logprob": -0.5}]]
    table = pa.table({"row": [0], "top_logprobs": pa.array([top], pa.list_(pa.list_(TOP_LOGPROB)))})
    write_output(table, np.array([0]), tmp_path / "o.jsonl", "jsonl", {})
    (line,) = (tmp_path / "o.jsonl").read_text().splitlines()
    assert json.loads(line)["top_logprobs"][0][0]["bytes"] == [0xE2, 0x80]
