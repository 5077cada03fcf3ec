"""Shards without a model: the partition, Slurm's variables, names, the shard writer, and merge's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from kvbatch.errors import JobError, OutputLockedError, SpecError
from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.lock import OutputLock
from kvbatch.jobs.manifest import DTYPE_KEY, INPUT_KEY, Manifest
from kvbatch.jobs.merge import MergeError, find_shards, merge_shards
from kvbatch.jobs.model_identity import MODEL_KEY
from kvbatch.jobs.records import Layout, RowResult
from kvbatch.jobs.rows import RowError
from kvbatch.jobs.shard import Shard, parse_shard, shard_from_env, split_shard_name
from kvbatch.jobs.shard_output import ShardWriter
from kvbatch.jobs.summary import summary_path
from kvbatch.jobs.writer import OutputWriter, work_dir


def test_every_row_has_exactly_one_shard_and_splits_compose():
    shards = [Shard(i, 4) for i in range(4)]
    for row in range(50):
        assert [s.index for s in shards if s.owns(row)] == [row % 4]
    assert sum(s.num_rows(50) for s in shards) == 50
    assert [s.num_rows(10) for s in shards] == [3, 3, 2, 2]
    # shard 1/4 cut 3 ways: together exactly the rows of shard 1/4
    parts = Shard(1, 4).split(3)
    assert parts == [Shard(1, 12), Shard(5, 12), Shard(9, 12)]
    assert sorted(r for p in parts for r in p.rows(100)) == list(Shard(1, 4).rows(100))


def test_parse_shard():
    assert parse_shard("3/4") == Shard(3, 4)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    assert parse_shard("off") is None
    for bad in ("4/4", "1/0", "a/b", "-1/3", "3"):
        with pytest.raises(SpecError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, Shard(2, 4)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "4",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            Shard(2, 4),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "7",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            Shard(2, 4),
        ),
    ],
)
def test_shard_from_slurm(env, expected):
    assert shard_from_env(env) == expected


def test_uneven_slurm_arrays_ask_for_an_explicit_shard():
    gaps = {
        "SLURM_ARRAY_TASK_ID": "7",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "7",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }
    with pytest.raises(SpecError, match="pass --shard I/N explicitly"):
        shard_from_env(gaps)
    with pytest.raises(
        SpecError, match="SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT .* is not; pass --shard I/N"
    ):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "1"})


def test_names_round_trip():
    out = Path("out/answers.arrow")
    named = Shard(3, 4).output_path(out)
    assert named.name == "answers.shard-0003-of-0004.arrow"
    assert split_shard_name(named) == (out, Shard(3, 4))
    assert split_shard_name(out) is None


# ---- shard outputs written by ShardWriter, then merged ---------------------------------------------------

LAYOUT = Layout(id_column="id")
NUM_ROWS = 10
ERROR_ROW = 7


def _write_shard(
    out: Path,
    shard: Shard,
    num_rows: int = NUM_ROWS,
    fmt: str = "arrow",
    spec_hash: str = "h1",
    skip: int | None = None,
    input_sha: str = "aa",
    model: str = "m",
    model_files: dict[str, str] | None = None,
    weights_dtype: str | None = None,
) -> Path:
    path = shard.output_path(out)
    fingerprint = {"model": model, INPUT_KEY: {"bytes": 10, "head_sha256": input_sha}}
    if model_files is not None:
        fingerprint[MODEL_KEY] = model_files
    if weights_dtype is not None:
        fingerprint[DTYPE_KEY] = weights_dtype
    manifest = Manifest("job", spec_hash, fingerprint, path.name, fmt)
    with ShardWriter(path, fmt, LAYOUT, manifest, shard=shard, part_rows=2) as writer:
        for row in reversed(shard.rows(num_rows)):  # any order in; input order out
            if row == ERROR_ROW:
                writer.add(RowResult(row, id=f"id{row}", error=RowError("bad_json", f"row {row}: invalid JSON")))
            elif row != skip:
                writer.add(
                    RowResult(
                        row,
                        id=f"id{row}",
                        texts=[f"text {row}"],
                        finish_reasons=["stop"],
                        prompt_tokens=row,
                        output_tokens=1,
                    )
                )
        if skip is None:
            writer.finalize(num_rows)
    return path


@pytest.mark.parametrize("fmt", ["arrow", "jsonl", "parquet"])
def test_merge_joins_shards_in_input_order(tmp_path, fmt):
    out = tmp_path / f"answers[v1].{fmt}"  # glob's brackets in the name are plain characters
    for i in (2, 0, 3, 1):
        _write_shard(out, Shard(i, 4), fmt=fmt)
    assert [split_shard_name(p)[1].index for p in find_shards(out)] == [0, 1, 2, 3]
    report = merge_shards(out)
    assert (report.num_rows, report.num_shards) == (NUM_ROWS, 4)
    if fmt == "jsonl":
        records = [json.loads(line) for line in out.read_text().splitlines()]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(out).to_pylist()
    else:
        records = read_arrow(Path(out)).to_pylist()
    assert [r["row"] for r in records] == list(range(NUM_ROWS))
    assert [r["text"] for r in records] == [None if i == ERROR_ROW else f"text {i}" for i in range(NUM_ROWS)]
    # the merged output is a finished output of the same spec: a plain rerun would find it done
    merged = Manifest.load(work_dir(out) / "manifest.json")
    assert (merged.complete, merged.spec_hash, merged.num_rows) == (True, "h1", NUM_ROWS)
    summary = json.loads(summary_path(out).read_text())  # what that rerun prints
    assert (summary["rows"], summary["rows_ok"], summary["rows_error"], summary["spec_hash"]) == (
        NUM_ROWS,
        NUM_ROWS - 1,
        1,
        "h1",
    )
    assert (summary["finish_reasons"], summary["errors_by_kind"]) == (
        {"stop": NUM_ROWS - 1, "error": 1},
        {"bad_json": 1},
    )


def test_merged_summary_names_its_output_by_an_absolute_path_as_a_runs_does(tmp_path, monkeypatch):
    """`kvbatch merge out/answers.arrow` wrote the path as typed into the summary's `output`, relative to the
    merge's working folder, where a run's summary names its output absolutely: a cron step reading the summary
    from another folder found no file there."""
    out = tmp_path / "out" / "answers.arrow"
    for i in range(2):
        _write_shard(out, Shard(i, 2))
    monkeypatch.chdir(tmp_path)
    assert merge_shards(Path("out/answers.arrow")).num_rows == NUM_ROWS
    assert json.loads(summary_path(out).read_text())["output"] == str(out)


def test_shard_writer_refuses_a_shard_with_rows_missing(tmp_path):
    path = Shard(1, 3).output_path(tmp_path / "a.arrow")
    with pytest.raises(JobError, match=r"shard 1/3: 1 of its rows have no result \(first: \[4\]\)"):
        with ShardWriter(
            path, "arrow", LAYOUT, Manifest("job", "h", {}, path.name, "arrow"), shard=Shard(1, 3)
        ) as writer:
            for row in (1, 7):
                writer.add(RowResult(row, id=row, texts=["x"], finish_reasons=["stop"]))
            writer.finalize(9)


def test_merge_refuses_a_linked_work_folder(tmp_path):
    out = tmp_path / "answers.arrow"
    for i in range(2):
        _write_shard(out, Shard(i, 2))
    outside = tmp_path / "outside"
    outside.mkdir()
    work_dir(out).symlink_to(outside, target_is_directory=True)
    with pytest.raises(MergeError, match="is a symbolic link"):
        merge_shards(out)
    assert list(outside.iterdir()) == [] and not out.exists()


def test_merge_lists_missing_unfinished_and_foreign_shards(tmp_path):
    out = tmp_path / "answers.arrow"
    _write_shard(out, Shard(0, 4))
    _write_shard(out, Shard(1, 4), spec_hash="other", model="m2")
    _write_shard(out, Shard(2, 4), skip=6)  # interrupted: never finalized
    with pytest.raises(MergeError) as info:
        merge_shards(out)
    message = str(info.value)
    assert "answers.shard-0001-of-0004.arrow: written by another job spec" in message
    assert "(spec hash other != h1; model: 'm' -> 'm2')" in message  # what changed, as a refused resume says
    assert "answers.shard-0002-of-0004.arrow: unfinished (1 rows committed); rerun shard 2/4" in message
    assert "missing: answers.shard-0003-of-0004.arrow (shard 3/4)" in message
    assert not out.exists()


@pytest.mark.parametrize("ids", [[1, "b", 3, "d"], [1, 2.5, 3, 4.5], [0.5, True, 1.5, False], [1, "b", 2.5, "d"]])
def test_merged_jsonl_shards_hold_the_values_one_run_writes(tmp_path, ids):
    # A schema-less input's column of one type in each shard but not across them: one run joins its parts as
    # assemble.unify does (JSON text, ints among floats as floats), but the merge copied each shard's lines as they
    # were, so the merged file held 1 where one run writes "1" or 1.0.
    layout = Layout(keep_columns=("k",))

    def write(path: Path, rows: range, shard: Shard | None) -> None:
        manifest = Manifest("job", "h1", {"model": "m", INPUT_KEY: {"bytes": 10}}, path.name, "jsonl")
        args = (path, "jsonl", layout, manifest)
        with OutputWriter(*args) if shard is None else ShardWriter(*args, shard=shard) as writer:
            for row in rows:
                writer.add(RowResult(row, kept={"k": ids[row]}, texts=["x"], finish_reasons=["stop"]))
            writer.finalize(len(ids))

    write(tmp_path / "whole.jsonl", range(len(ids)), None)
    out = tmp_path / "answers.jsonl"
    for i in range(2):
        write(Shard(i, 2).output_path(out), Shard(i, 2).rows(len(ids)), Shard(i, 2))
    merge_shards(out)
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_merge_lists_duplicated_and_missing_rows(tmp_path):
    out = tmp_path / "answers.arrow"
    paths = [_write_shard(out, Shard(i, 2)) for i in range(2)]
    table = pa.ipc.open_stream(paths[0]).read_all()  # rows 0 2 4 6 8 -> 0 2 2 6 8: 2 twice, 4 gone
    rows = table.column("row").to_pylist()
    rows[2] = 2
    table = table.set_column(0, "row", pa.array(rows, pa.int64()))
    with pa.ipc.new_file(paths[0], table.schema) as writer:  # an older output: an IPC file, still merged
        writer.write_table(table)
    with pytest.raises(MergeError) as info:
        merge_shards(out)
    assert "answers.shard-0000-of-0002.arrow: 1 rows missing: [4]" in str(info.value)
    assert "answers.shard-0000-of-0002.arrow: 1 rows duplicated: [2]" in str(info.value)
    assert not out.exists()


def test_merge_refuses_mixed_counts_and_someone_elses_output(tmp_path):
    out = tmp_path / "answers.arrow"
    _write_shard(out, Shard(0, 2))
    _write_shard(out, Shard(1, 3))
    with pytest.raises(MergeError, match=r"shards of different counts \(2, 3\), of several runs; .* listing them"):
        merge_shards(out)  # a job file's merge finds them all beside the output: it names the way past
    out2 = tmp_path / "b.arrow"
    for i in range(2):
        _write_shard(out2, Shard(i, 2))
    out2.write_text("not ours")
    with pytest.raises(MergeError, match="was not written by this job's spec"):
        merge_shards(out2)
    merge_shards(out2, overwrite=True)
    assert read_arrow(Path(out2)).num_rows == NUM_ROWS


def test_merge_refuses_to_drop_rows_another_spec_committed_to_the_output(tmp_path):
    # An unfinished run of another spec on the same output has no output file yet, only its committed parts: the
    # merge wrote its own manifest over theirs (dropping the journal that named them), so those rows were lost
    # without --overwrite.
    out = tmp_path / "answers.arrow"
    for i in range(2):
        _write_shard(out, Shard(i, 2))
    manifest = Manifest("job", "h2", {"model": "m"}, out.name, "arrow")
    with OutputWriter(out, "arrow", LAYOUT, manifest, part_rows=2) as writer:
        for row in range(4):
            writer.add(RowResult(row, id=f"id{row}", texts=["t"], finish_reasons=["stop"]))
    with pytest.raises(MergeError, match="rows another job spec committed"):
        merge_shards(out)
    assert Manifest.load(work_dir(out) / "manifest.json").done_rows() == {0, 1, 2, 3}
    assert merge_shards(out, overwrite=True).num_rows == NUM_ROWS


@pytest.mark.parametrize("text", ['{"version": 3}', "{not json", '{"version": 2}'])
def test_merge_names_an_unreadable_manifest_of_the_output(tmp_path, text):
    """An output whose own manifest a merge cannot read (a newer kvbatch's, a damaged or foreign one) ended the
    merge with a raw ValueError traceback, where `kvbatch run` names the file and says what to do."""
    out = tmp_path / "answers.arrow"
    for i in range(2):
        _write_shard(out, Shard(i, 2))
    work_dir(out).mkdir()
    (work_dir(out) / "manifest.json").write_text(text)
    with pytest.raises(MergeError, match=r"cannot read .*manifest\.json: .*; .*merge with --overwrite") as refused:
        merge_shards(out)
    assert not out.exists()
    assert (work_dir(out) / "manifest.json").read_text() == text  # untouched
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    assert merge_shards(out, overwrite=True).num_rows == NUM_ROWS


@pytest.mark.parametrize("text", ['{"rows": ', '["x"]', '{"output_tokens": "many"}'])
def test_merge_leaves_out_a_shard_summary_it_cannot_read(tmp_path, text):
    """A shard's summary edited by hand (cut short, not an object, a count that is not a number) made the merge
    fail with a traceback after the merged output was written, on every rerun too; a run finding such a summary
    beside a finished output only warns. Only that shard's token counts are left out now."""
    out = tmp_path / "answers.arrow"
    paths = [_write_shard(out, Shard(i, 2)) for i in range(2)]
    summary_path(paths[0]).write_text(json.dumps({"output_tokens": 5, "prompt_tokens": 7, "model": "m"}))
    summary_path(paths[1]).write_text(text)
    assert merge_shards(out).num_rows == NUM_ROWS
    assert read_arrow(Path(out)).column("row").to_pylist() == list(range(NUM_ROWS))
    summary = json.loads(summary_path(out).read_text())
    assert (summary["rows"], summary["output_tokens"], summary["prompt_tokens"], summary["model"]) == (
        NUM_ROWS,
        5,
        7,
        "m",
    )


def test_merge_refuses_shards_run_over_different_inputs(tmp_path):
    out = tmp_path / "answers.arrow"
    _write_shard(out, Shard(0, 2))
    _write_shard(out, Shard(1, 2), input_sha="bb")  # the file was edited between the two shards' runs
    with pytest.raises(
        MergeError, match="answers.shard-0001-of-0002.arrow: read another input than answers.shard-0000-of-0002.arrow"
    ):
        merge_shards(out)


def test_merge_refuses_shards_run_with_different_model_files(tmp_path):
    out = tmp_path / "answers.arrow"
    _write_shard(out, Shard(0, 2), model_files={"config.json": "aa"})
    _write_shard(out, Shard(1, 2), model_files={"config.json": "bb"})  # another checkpoint saved into the folder
    with pytest.raises(MergeError, match=r"written by another model than .*model_files.config.json: 'aa' -> 'bb'"):
        merge_shards(out)
    # A shard of a kvbatch that kept no model fingerprint is not taken as another model.
    other = tmp_path / "other.arrow"
    _write_shard(other, Shard(0, 2), model_files={"config.json": "aa"})
    _write_shard(other, Shard(1, 2))
    assert merge_shards(other).num_rows == NUM_ROWS


def test_merge_refuses_shards_whose_dtype_auto_made_other_dtypes(tmp_path):
    """engine.dtype auto is float32 on the cpu and bfloat16 on a GPU, and the spec hash holds it as written: the
    shards of a Slurm array whose tasks ran on both kinds of node merged into one output holding rows of both
    dtypes, which a resume of one output refuses. The merge refuses them too, naming each dtype."""
    out = tmp_path / "answers.arrow"
    _write_shard(out, Shard(0, 2), weights_dtype="float32")
    _write_shard(out, Shard(1, 2), weights_dtype="bfloat16")
    with pytest.raises(MergeError) as refused:
        merge_shards(out)
    assert str(refused.value) == (
        f"cannot merge into {out}:\n  answers.shard-0001-of-0002.arrow: made with the weights in bfloat16, "
        "answers.shard-0000-of-0002.arrow in float32 (engine.dtype auto is float32 on the cpu, bfloat16 on a CUDA "
        "GPU); rerun one of them on the other's kind of device with output.mode: overwrite"
    )
    assert not out.exists()
    # A shard of a kvbatch that kept no dtype is not taken as another one.
    other = tmp_path / "other.arrow"
    _write_shard(other, Shard(0, 2), weights_dtype="bfloat16")
    _write_shard(other, Shard(1, 2))
    assert merge_shards(other).num_rows == NUM_ROWS


def test_merge_names_a_finished_shard_whose_file_is_gone(tmp_path):
    out = tmp_path / "answers.arrow"
    paths = [_write_shard(out, Shard(i, 2)) for i in range(2)]
    paths[1].unlink()
    with pytest.raises(
        MergeError, match=r"answers.shard-0001-of-0002.arrow: finished once, but the file is gone; rerun shard 1/2"
    ):
        merge_shards(out)


def test_merge_refuses_a_target_named_for_another_format(tmp_path):
    """merge copies the shards' format: Arrow bytes in a .parquet file would mislead every reader."""
    out = tmp_path / "answers.arrow"
    shards = [_write_shard(out, Shard(i, 2)) for i in range(2)]
    with pytest.raises(MergeError, match=r"the shards are arrow files, so the target must end in \.arrow"):
        merge_shards(tmp_path / "answers.parquet", shards)
    assert not (tmp_path / "answers.parquet").exists()
    assert merge_shards(out, shards).num_rows == NUM_ROWS


def test_merge_into_a_locked_output_says_what_to_do(tmp_path):
    out = tmp_path / "answers.arrow"
    for i in range(2):
        _write_shard(out, Shard(i, 2))
    work_dir(out).mkdir()
    with OutputLock(work_dir(out) / "lock"), pytest.raises(OutputLockedError) as refused:
        merge_shards(out)
    assert str(refused.value).endswith("merge again once it has finished")  # merge has no --wait to pass


def test_a_merge_killed_after_writing_the_output_merges_when_rerun(tmp_path, monkeypatch):
    out = tmp_path / "answers.arrow"
    for i in range(2):
        _write_shard(out, Shard(i, 2))
    real_save = Manifest.save

    def killed_once_complete(self, path):
        if self.complete:  # the output is in place; the kill lands before the manifest says so
            raise KeyboardInterrupt
        real_save(self, path)

    with monkeypatch.context() as patch:
        patch.setattr(Manifest, "save", killed_once_complete)
        with pytest.raises(KeyboardInterrupt):
            merge_shards(out)
    assert out.exists()
    assert merge_shards(out).num_rows == NUM_ROWS
    assert Manifest.load(work_dir(out) / "manifest.json").complete


@pytest.mark.parametrize(
    "line",
    [b'{"row": 1, broken\n', b'{"row": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", b"[1]\n"],
    ids=["not-json", "nested-too-deeply", "not-an-object"],
)
def test_merge_names_a_shard_line_that_is_no_output_row(tmp_path, line):
    """A JSONL shard edited into a line that is not JSON (or nested past the parser's limit) stopped the merge
    with a traceback from json; a line that is no object, with an AttributeError."""
    out = tmp_path / "answers.jsonl"
    paths = [_write_shard(out, Shard(i, 2), fmt="jsonl") for i in range(2)]
    lines = paths[1].read_bytes().splitlines(keepends=True)
    paths[1].write_bytes(b"".join([*lines[:2], line, *lines[3:]]))
    assert _edited_shard_refused(out) == "answers.shard-0001-of-0002.jsonl: line 3"


@pytest.mark.parametrize(
    "edit",
    [lambda r: r["response"]["body"].pop("choices"), lambda r: r.pop("response"), lambda r: r.update(error="x")],
    ids=["no-choices", "no-response", "error-not-an-object"],
)
def test_merge_names_an_openai_shard_line_without_its_outcome(tmp_path, edit):
    """An OpenAI Batch shard line edited to lose its choices (or its response, or an error that is no object)
    stopped the merge with a KeyError traceback; it is named, as any line that is no output row."""
    out = tmp_path / "answers.jsonl"
    paths = [_write_shard(out, Shard(i, 2), fmt="openai") for i in range(2)]
    lines = paths[1].read_bytes().splitlines(keepends=True)
    record = json.loads(lines[0])
    assert record["response"]["body"]["choices"][0]["finish_reason"] == "stop"  # an ordinary line, before the edit
    edit(record)
    paths[1].write_bytes(b"".join([json.dumps(record).encode() + b"\n", *lines[1:]]))
    assert _edited_shard_refused(out) == "answers.shard-0001-of-0002.jsonl: line 1"


def _edited_shard_refused(out: Path) -> str:
    """The file and line a merge of an edited shard names (it writes no output)."""
    with pytest.raises(MergeError) as refused:
        merge_shards(out)
    assert not out.exists()
    where, _, why = str(refused.value).partition(" is not a kvbatch output row")
    assert why == ": a shard file was edited after it was written", str(refused.value)
    return where


def test_merge_given_a_shard_as_its_target_names_the_merged_target(tmp_path):
    """`kvbatch merge out/a.shard-0000-of-0002.arrow` (a shard where the merged output belongs) looked for the
    shards of that shard and said it expected `a.shard-0000-of-0002.shard-IIII-of-NNNN.arrow`, a name no run
    writes. It says it was given a shard and names the output its shards merge into."""
    out = tmp_path / "a.arrow"
    for i in range(2):
        _write_shard(out, Shard(i, 2))
    given = Shard(0, 2).output_path(out)
    with pytest.raises(MergeError) as info:
        merge_shards(given)
    assert str(info.value) == (
        f"{given} is a shard output (shard 0/2), not a merged output; merge its shards into the output they make "
        f"up: kvbatch merge {out}"
    )
    assert merge_shards(out).num_rows == NUM_ROWS  # the target named merges them
