"""Ray Data on a local Ray (CPU, 2 actors): `runner: ray` reads a folder of files on the cluster, writes a folder of
parts from the workers, and gives the same rows as one process; a run that dies half way and a rerun give every row
exactly once; GenerateBatch on its own with map_batches. One Ray start for the module: it is the slow part."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from scaling_helpers import (
    FailingEngineFactory,
    SignallingEngineFactory,
    StopAfter,
    committed_rows,
    rows_of,
    tiny_engine,
    tiny_job,
    write_input,
)

from kvbatch.errors import ExitCode, InterruptedJob, OutputError, SpecError, exit_code_of
from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict, output_path

ray = pytest.importorskip("ray")  # the `ray` extra (in `test`); skipped only where Ray is not installed
HELPERS = Path(__file__).parents[1] / "helpers"


@pytest.fixture(scope="module")
def local_ray():
    env = {"PYTHONPATH": str(HELPERS)}  # so actors import scaling_helpers
    # logical CPUs: the 2 engine actors and the checkpoint filter hold one each, read and write tasks need more
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def ray_job(tmp_path: Path, input_path: Path, name: str = "answers", **overrides) -> object:
    base = _job_dict(tmp_path, name)
    base["input"] = {"path": str(input_path), "batch_rows": 3}
    base["output"] = {"path": f"{name}.parquet"}
    base["runner"] = "ray"
    base["parallel"] = {"ray_actors": 2, "ray_batch_rows": 3}
    base.update(overrides)
    return job_from_dict(base)


def _job_dict(tmp_path: Path, name: str) -> dict:
    return {
        "name": name,
        "model": "tiny-llama",
        "input": {"path": str(tmp_path / "in.jsonl")},
        "prompt": {"chat_template": False},
        "id_column": "id",
        "sampling": {"max_new_tokens": 6},
        "output_dir": str(tmp_path / "out"),
        "engine": {"device": "cpu", "num_blocks_override": 64, "max_num_seqs": 3},
        "sort_window": 4,
    }


def folder_rows(parts: Path) -> list[dict]:
    """The parts folder as pyarrow reads it, in input order."""
    return pads.dataset(parts).to_table().sort_by("row").to_pylist()


def test_generate_batch_draws_seeded_rows_by_their_row_column_never_by_actor_position(tmp_path) -> None:
    """Without a `row` column each actor numbered its rows from 0, and an unseeded sampled row draws from
    engine.seed and that number: with 2 actors, rows at the same position drew the same samples (16 identical
    prompts gave 10 distinct texts), and which actor got a batch changed a row's samples from run to run. Such a
    batch is refused now, naming engine.seed; with a `row` column two actors draw apart and a rerun draws alike."""
    from kvbatch.jobs.ray_data import GenerateBatch

    job = _job_dict(tmp_path, "seeded")
    job["sampling"] = {"max_new_tokens": 6, "temperature": 1.0}
    job["engine"] = {**job["engine"], "seed": 1}
    prompts = ["w5 w6 w7"] * 4
    with pytest.raises(SpecError, match=r"^GenerateBatch: engine\.seed: it draws each sampled row .* no `row` column"):
        GenerateBatch(job, engine_factory=tiny_engine)({"prompt": prompts})
    first, second = (GenerateBatch(job, engine_factory=tiny_engine) for _ in range(2))
    a = first({"row": [0, 1, 2, 3], "prompt": prompts}).column("text").to_pylist()
    b = second({"row": [4, 5, 6, 7], "prompt": prompts}).column("text").to_pylist()
    assert len(set(a + b)) == 8
    assert (
        GenerateBatch(job, engine_factory=tiny_engine)({"row": [4, 5, 6, 7], "prompt": prompts})["text"].to_pylist()
        == b
    )
    # No draw follows the numbering without engine.seed (each batch draws a fresh base), with a row's own seed, or
    # greedy: these run without a `row` column as before.
    unseeded = {**job, "engine": {**job["engine"], "seed": None}}
    own_seed = {**job, "sampling": {**job["sampling"], "seed": 3}}
    greedy = {**job, "sampling": {"max_new_tokens": 6}}
    for other in (unseeded, own_seed, greedy):
        table = GenerateBatch(other, engine_factory=tiny_engine)({"prompt": prompts})
        assert table["error"].to_pylist() == [None] * 4 and table["row"].to_pylist() == [0, 1, 2, 3]


def test_ray_run_over_a_parquet_folder_equals_one_process(tmp_path, local_ray):
    source = write_input(tmp_path / "in.jsonl", num_rows=14)
    records = [json.loads(line) for line in source.read_text().splitlines() if not line.endswith(": ")]
    whole = tmp_path / "whole.parquet"  # what one process reads: the folder's files one after the other
    pq.write_table(pa.Table.from_pylist(records), whole)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (start, end) in {"a.parquet": (0, 5), "b.parquet": (5, 6), "c.parquet": (6, len(records))}.items():
        pq.write_table(pa.Table.from_pylist(records[start:end]), folder / name, row_group_size=4)

    local = job_from_dict({**_job_dict(tmp_path, "whole"), "input": {"path": str(whole)}})
    [single] = run_jobs([local], engine_factory=tiny_engine)
    assert single.error is None, single.error
    expected = rows_of(output_path(local))
    assert [r["error_kind"] for r in expected].count("duplicate_id") == 1  # row 8 (in c.parquet) repeats row 2's id

    job = ray_job(tmp_path, folder)
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    parts = output_path(job).with_name("answers.parquet.parts")
    assert len(list(parts.glob("part-0000-*.parquet"))) > 1  # one file per write task, from the workers
    assert folder_rows(parts) == expected
    summary = outcome.summary
    assert (summary.rows, summary.rows_error, summary.rows_this_run) == (13, 1, 13)
    assert (summary.output_tokens, summary.errors_by_kind) == (single.summary.output_tokens, {"duplicate_id": 1})
    # The engines run in the actors: the summary printed "0.0 s loading" and "peak 0% of blocks, 0 preemptions,
    # prefix cache hit 0%", values the driver never measured. They are null ("not measured"), not zeros.
    unmeasured = "load_s peak_kv_usage preemptions cached_prompt_tokens queried_prompt_tokens prefix_cache_hit_rate"
    written = json.loads(output_path(job).with_name("answers.parquet.summary.json").read_text())
    assert [getattr(summary, n) for n in unmeasured.split()] == [written[n] for n in unmeasured.split()] == [None] * 6
    # over the whole run, the actors' loads included (elapsed_s is rounded to the millisecond)
    assert summary.output_tokens_per_s == pytest.approx(summary.output_tokens / summary.elapsed_s, abs=0.01)
    lines = summary.format().splitlines()
    assert lines[2].endswith(f"({summary.output_tokens_per_s:.1f} output tok/s; loading not measured)")
    assert lines[3] == "  KV cache    not measured"

    from kvbatch.jobs.merge_parts import merge_parts

    report = merge_parts(output_path(job))
    assert report.num_rows == 13
    assert pq.read_table(output_path(job)).to_pylist() == expected
    # and the provenance a local run writes: the same model, sampling and version; its own job's name and hash
    local_meta, merged_meta = read_arrow(output_path(local)).schema.metadata, pq.read_schema(output_path(job)).metadata
    for key in (b"kvbatch.model", b"kvbatch.sampling", b"kvbatch.version"):
        assert merged_meta[key] == local_meta[key]
    assert json.loads(merged_meta[b"kvbatch.job"])["name"] == "answers"
    assert merged_meta[b"kvbatch.spec_hash"].decode() == outcome.summary.spec_hash
    [again] = run_jobs([job], engine_factory=tiny_engine)
    assert again.summary.status == "already complete"

    # the callable class on its own, over any dataset with a prompt column
    from kvbatch.jobs.ray_data import GenerateBatch

    texts = {r["row"]: r["text"] for r in expected if r["text"] is not None}
    prompts = [{"row": i, "prompt": r["prompt"]} for i, r in enumerate(records) if i in texts]
    ds = ray.data.from_items(prompts).map_batches(
        GenerateBatch,
        fn_constructor_kwargs={"job": local, "engine_factory": tiny_engine},
        batch_format="pyarrow",
        batch_size=4,
        concurrency=1,
    )
    assert {r["row"]: r["text"] for r in ds.take_all()} == texts


def test_a_ray_run_killed_half_way_and_rerun_writes_every_row_once(tmp_path, local_ray):
    source = write_input(tmp_path / "in.jsonl", num_rows=16)  # row 5 unreadable, row 9 repeats row 2's id
    lines = source.read_text().splitlines()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "part-a.jsonl").write_text("\n".join(lines[:7]) + "\n\n")  # a blank line is not a row
    (folder / "part-b.jsonl").write_text("\n".join(lines[7:]) + "\n")
    [single] = run_jobs([tiny_job(tmp_path, "whole")], engine_factory=tiny_engine)
    expected = rows_of(output_path(tiny_job(tmp_path, "whole")))

    marker = tmp_path / "fail"
    marker.touch()
    job = ray_job(tmp_path, folder, input={"path": str(folder)}, output={"path": "answers.jsonl"})
    [failed] = run_jobs([job], engine_factory=FailingEngineFactory(marker, row=12))
    assert failed.error is not None and "rerun to resume" in str(failed.error)
    parts = output_path(job).with_name("answers.jsonl.parts")  # Parquet parts, whatever the output format
    first = [r["row"] for r in folder_rows(parts)]
    assert 0 < len(first) < 16 and len(set(first)) == len(first) and max(first) < 12

    marker.unlink()
    [outcome] = run_jobs([job], engine_factory=FailingEngineFactory(marker, row=12))
    assert outcome.error is None, outcome.error
    rows = folder_rows(parts)
    assert [r["row"] for r in rows] == list(range(16))  # every row, once
    # as one process over the files one after the other, but messages number lines within each file, naming it
    assert rows[5]["error"].startswith("row 5 (line 6 of part-a.jsonl): invalid JSON")
    assert rows[9]["error"] == "row 9 (line 3 of part-b.jsonl): duplicate id 2 (first at row 2)"
    assert [{**r, "error": None} for r in rows] == [{**r, "error": None} for r in expected]
    assert (outcome.summary.rows, outcome.summary.rows_this_run) == (16, 16 - len(first))
    from kvbatch.jobs.merge_parts import merge_parts

    merge_parts(output_path(job))  # the job's own format: JSON lines, in input order
    lines = [json.loads(line) for line in output_path(job).read_text().splitlines()]
    assert [(r["row"], r["text"]) for r in lines] == [(r["row"], r["text"]) for r in expected]
    assert outcome.summary.errors_by_kind == single.summary.errors_by_kind == {"bad_json": 1, "duplicate_id": 1}


def test_a_signal_to_a_ray_driver_stops_its_write_before_the_job_returns(tmp_path, local_ray):
    """SIGINT to the driver raised InterruptedJob (exit 3) while Ray Data's write went on in its threads: the exit's
    ray.shutdown then pulled Ray from under them, and "Ray is not initialized" tracebacks (or the core worker's
    own exit, status 1) came after kvbatch's message. The write is stopped first; the rerun still writes every row
    once."""
    import os
    import threading

    from kvbatch.errors import InterruptedJob

    source = write_input(tmp_path / "in.jsonl", num_rows=16)
    marker = tmp_path / "signal"
    marker.touch()
    job = ray_job(tmp_path, source, parallel={"ray_actors": 2, "ray_batch_rows": 2})
    running = set(threading.enumerate())
    [stopped] = run_jobs([job], engine_factory=SignallingEngineFactory(os.getpid(), marker, row=8))
    assert isinstance(stopped.error, InterruptedJob) and "stopped by SIGINT" in str(stopped.error)
    assert not marker.exists()
    left = [t.name for t in threading.enumerate() if t not in running and t.is_alive()]
    assert [n for n in left if n == "kvbatch-ray-write" or n.startswith("StreamingExecutor")] == []

    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    assert [r["row"] for r in folder_rows(output_path(job).with_name("answers.parquet.parts"))] == list(range(16))


def test_a_generate_batch_of_a_bad_job_dict_fails_the_map_with_its_refusal(local_ray) -> None:
    """GenerateBatch given a job dict it refuses, on its own with map_batches: its constructor raised, so Ray
    reported an ActorDiedError holding the refusal as text, after trying the actor again. The refusal is raised
    from each batch, as the engine's are, and reaches the driver as itself where Ray Data keeps the original
    exception (as `runner: ray` runs have it)."""
    from ray.data import DataContext

    from kvbatch.jobs.ray_data import GenerateBatch

    job = {"name": "x", "model": "tiny", "input": {"path": "-"}, "sampling": {"max_new_token": 3}}
    context = DataContext.get_current()
    saved = context.raise_original_map_exception
    context.raise_original_map_exception = True
    try:
        with pytest.raises(SpecError) as refused:
            ray.data.from_items([{"prompt": "w5 w6"}]).map_batches(
                GenerateBatch,
                fn_constructor_kwargs={"job": job, "engine_factory": tiny_engine},
                batch_format="pyarrow",
                concurrency=1,
            ).take_all()
    finally:
        context.raise_original_map_exception = saved
    assert "GenerateBatch: sampling.max_new_token: unknown field (did you mean 'max_new_tokens'?)" in str(refused.value)


def test_a_ray_run_over_compressed_json_lines_files_equals_a_local_run(tmp_path, local_ray):
    # A folder's .jsonl.gz files were left out of its listing (no input files found), and a .jsonl.gz file named
    # alone was "cannot tell one input format". pyarrow's streams decompress them by their suffix. A bad line's
    # message names its file ("row 5 (line 6 of a.jsonl.gz)"), as a local run over the folder does: it gave the
    # line alone, which does not say where in a folder of files.
    import gzip

    source = write_input(tmp_path / "in.jsonl", num_rows=12)
    lines = source.read_bytes().splitlines(keepends=True)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:10])))  # its bad line and duplicate id
    (folder / "b.jsonl").write_bytes(b"".join(lines[10:]))
    local = job_from_dict({**_job_dict(tmp_path, "local"), "input": {"path": str(folder)}})
    [single] = run_jobs([local], engine_factory=tiny_engine)
    expected = rows_of(output_path(local))
    assert single.error is None and [r["error"] for r in expected if r["error"]] == [
        "row 5 (line 6 of a.jsonl.gz): invalid JSON at column 21: Expecting value",
        "row 9 (line 10 of a.jsonl.gz): duplicate id 2 (first at row 2)",
    ]
    job = ray_job(tmp_path, folder)
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    assert folder_rows(output_path(job).with_name("answers.parquet.parts")) == expected


def test_a_ray_run_over_jsonl_without_the_prompt_column_fails_before_any_model(tmp_path, local_ray):
    # A typo in the prompt column of a JSONL input (no schema to check up front) fails the job with the columns
    # the first rows have, as in a local run, not with a model load and one missing_column row per input row.
    source = write_input(tmp_path / "in.jsonl", num_rows=6)
    built = []
    job = ray_job(tmp_path, source, prompt={"column": "promt", "chat_template": False})
    [outcome] = run_jobs([job], engine_factory=lambda *args: built.append(args) or tiny_engine(*args))
    assert outcome.error is not None and outcome.error.field == "prompt.column"
    assert "none of the first 5 rows has the column 'promt'; the rows have 'id', 'prompt'" in str(outcome.error)
    assert built == []


@pytest.mark.parametrize(
    "text, words",
    [
        ('[{"id": 0, "prompt": "a"},\n {"id": 1, "prompt": "b"}]\n', "holds one JSON array, not JSON lines"),
        ('{\n  "id": 0,\n  "prompt": "a"\n}\n', "holds JSON objects written over several lines"),
        ('{"id": 0, "prompt": "a"}\n'.encode("utf-16").decode("latin-1"), "is UTF-16 text"),
    ],
    ids=["array", "pretty-printed", "utf-16"],
)
def test_a_ray_run_refuses_a_file_that_is_no_json_lines_as_a_local_run(tmp_path, local_ray, text, words):
    # A local run refuses these before the model loads; a Ray run read each line of them as a junk error row.
    folder = tmp_path / "in"
    folder.mkdir()
    write_input(folder / "a.jsonl", num_rows=6)
    (folder / "b.jsonl").write_bytes(text.encode("latin-1"))
    built = []
    [outcome] = run_jobs([ray_job(tmp_path, folder)], engine_factory=lambda *a: built.append(a) or tiny_engine(*a))
    assert isinstance(outcome.error, SpecError) and outcome.error.field == "input.path"
    assert f"{folder / 'b.jsonl'} {words}" in str(outcome.error), outcome.error
    assert built == []


def test_a_ray_run_refused_by_its_actors_fails_as_a_local_run(tmp_path, local_ray):
    # A setting only the model can check (a stop token past its vocabulary) fails in each actor's constructor:
    # Ray reported that as an ActorDiedError's text, a JobError (exit 1); a local run raises the SpecError (exit 2).
    source = write_input(tmp_path / "in.jsonl", num_rows=6)
    sampling = {"max_new_tokens": 6, "stop_token_ids": [10**6]}
    local = job_from_dict({**_job_dict(tmp_path, "local"), "sampling": sampling})
    [single, outcome] = run_jobs([local, ray_job(tmp_path, source, sampling=sampling)], engine_factory=tiny_engine)
    assert isinstance(single.error, SpecError)
    assert type(outcome.error) is SpecError and exit_code_of(outcome.error) == ExitCode.USAGE
    assert (outcome.error.field, str(outcome.error)) == (single.error.field, str(single.error))


def test_a_ray_scoring_run_gives_a_local_runs_scores(tmp_path, local_ray):
    # task: score on the cluster: the same scores as one process (to float32 summation order: the rows batch
    # differently), error rows where the continuations are bad, and the Ray summary's token counts.
    rows = [
        {"id": i, "prompt": f"w{10 + i} w{20 + i} w{30 + i} ", "continuations": [f"w{40 + i}", f"w{50 + i} w{60 + i}"]}
        for i in range(7)
    ]
    rows[3]["continuations"] = []  # wrong_type: the job goes on
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a scoring job reads no generation settings: its own max_new_tokens is refused
    local = job_from_dict({**_job_dict(tmp_path, "whole"), "task": "score", "sampling": {}})
    [single] = run_jobs([local], engine_factory=tiny_engine)
    assert single.error is None, single.error
    expected = rows_of(output_path(local))

    job = ray_job(tmp_path, source, task="score", sampling={})
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    got = folder_rows(output_path(job).with_name("answers.parquet.parts"))
    assert (
        [r["error_kind"] for r in got]
        == [r["error_kind"] for r in expected]
        == [None] * 3 + ["wrong_type"] + [None] * 3
    )
    for mine, theirs in zip(got, expected, strict=True):
        if theirs["scores"] is None:
            assert mine["scores"] is None
            continue
        assert [s["num_tokens"] for s in mine["scores"]] == [s["num_tokens"] for s in theirs["scores"]]
        assert [s["is_greedy"] for s in mine["scores"]] == [s["is_greedy"] for s in theirs["scores"]]
        assert [s["logprob"] for s in mine["scores"]] == pytest.approx(
            [s["logprob"] for s in theirs["scores"]], abs=1e-5
        )
    summary = outcome.summary
    assert (summary.rows, summary.rows_error, summary.output_tokens) == (7, 1, 0)
    assert summary.prompt_tokens == single.summary.prompt_tokens  # prompts and continuations, as the engine counts


def test_a_ray_run_over_no_rows_writes_a_folder_that_reads_and_is_complete(tmp_path, local_ray):
    # As a local run writes an empty output with its columns and then says "already complete": Ray Data writes
    # no file for no rows, so without one of its own the run left no folder and ran again every time.
    source = tmp_path / "in.jsonl"
    source.write_text("\n")  # a blank line is not a row
    job = ray_job(tmp_path, source)
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    assert (outcome.summary.rows, outcome.summary.rows_this_run) == (0, 0)
    parts = output_path(job).with_name("answers.parquet.parts")
    table = pads.dataset(parts).to_table()
    assert table.num_rows == 0
    assert {"row", "id", "text", "finish_reason", "error", "error_kind"} <= set(table.column_names)
    [again] = run_jobs([job], engine_factory=tiny_engine)
    assert again.error is None and again.summary.status == "already complete"

    from kvbatch.jobs.merge_parts import merge_parts

    assert merge_parts(output_path(job)).num_rows == 0
    assert pq.read_table(output_path(job)).num_rows == 0


def test_a_ray_folder_reads_as_one_dataset_when_kept_json_values_change_type(tmp_path, local_ray):
    # JSON lines have no schema: each write task typed the kept columns from its own rows, so a column absent from
    # the first block's rows was null-typed in one file and text in the next, and pyarrow could not read the folder.
    records = [
        {"id": i, "prompt": f"w{i} w{i + 1}", **({"tag": f"t{i}"} if i >= 3 else {}), "mixed": i if i < 3 else f"s{i}"}
        for i in range(6)
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    local = job_from_dict({**_job_dict(tmp_path, "whole"), "keep_columns": ["tag", "mixed"]})
    [single] = run_jobs([local], engine_factory=tiny_engine)
    assert single.error is None, single.error
    expected = rows_of(output_path(local))
    assert [r["mixed"] for r in expected] == ["0", "1", "2", "s3", "s4", "s5"]  # int and text: JSON text

    job = ray_job(tmp_path, source, keep_columns=["tag", "mixed"], parallel={"ray_actors": 1, "ray_batch_rows": 3})
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    parts = output_path(job).with_name("answers.parquet.parts")
    assert len(list(parts.glob("part-*.parquet"))) > 1
    assert folder_rows(parts) == expected


def test_a_finished_ray_run_whose_input_was_removed_is_already_complete(tmp_path, local_ray):
    # As a local run says: a cron rerun after the inputs were cleaned up failed (exit 1, "input not found") listing
    # the input before it looked at the finished output; an input put back changed is still refused.
    source = write_input(tmp_path / "in.jsonl", num_rows=6)
    job = ray_job(tmp_path, source, parallel={"ray_actors": 1, "ray_batch_rows": 6})
    [outcome] = run_jobs([job], engine_factory=tiny_engine)
    assert outcome.error is None, outcome.error
    source.unlink()
    built = []
    [again] = run_jobs([job], engine_factory=lambda *args: built.append(args) or tiny_engine(*args))
    assert again.error is None and again.summary.status == "already complete"
    assert built == []
    write_input(source, num_rows=7)
    [changed] = run_jobs([job], engine_factory=tiny_engine)
    assert changed.error is not None and "input_file" in str(changed.error)


@pytest.mark.parametrize("folder", [".answers.parquet.kvbatch", "answers.parquet.parts"])
def test_a_ray_run_refuses_a_linked_work_or_parts_folder(tmp_path, folder: str) -> None:
    """As a local run does: its lock, manifest and parts would land wherever the link points."""
    source = write_input(tmp_path / "in.jsonl")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / folder).symlink_to(outside, target_is_directory=True)
    [outcome] = run_jobs([ray_job(tmp_path, source)], engine_factory=tiny_engine)
    assert isinstance(outcome.error, OutputError) and "is a symbolic link" in str(outcome.error)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("text", ['{"version": 3}', "{not json", '{"version": 2}'])
def test_merging_a_ray_folder_names_a_manifest_it_cannot_read(tmp_path, text):
    """A Ray run's manifest that `kvbatch merge` cannot read (a newer kvbatch's, one edited by hand) ended the
    merge with a raw ValueError or KeyError traceback; it is refused by name, writing nothing."""
    from kvbatch.errors import MergeError
    from kvbatch.jobs.merge_parts import merge_parts

    output = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    parts.mkdir()
    pq.write_table(pa.table({"row": pa.array([0], pa.int64()), "text": ["t"]}), parts / "part-0000-000000-a.parquet")
    manifest = tmp_path / ".answers.parquet.kvbatch" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(text)
    with pytest.raises(MergeError, match=r"cannot read .*manifest\.json: .*; .*nothing was merged"):
        merge_parts(output)
    assert not output.exists()


@pytest.mark.parametrize("text", ['{"version": 3}', "{not json"])
def test_a_ray_run_refuses_a_manifest_it_cannot_read_as_a_local_run(tmp_path, text):
    """A Ray run loaded the earlier run's manifest unguarded: one of a newer kvbatch, or edited by hand, failed the
    job as "unexpected ValueError (a bug)" with a traceback; a local run names the file and what to do."""
    from kvbatch.jobs.manifest import Manifest
    from kvbatch.jobs.ray_run import _adopt

    job = ray_job(tmp_path, write_input(tmp_path / "in.jsonl"))
    out = output_path(job)
    manifest = out.parent / f".{out.name}.kvbatch" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(text)
    current = Manifest(job.name, "hash", {}, out.name, "parquet")
    with pytest.raises(OutputError, match=r"cannot read .*manifest\.json: .*; set output\.mode: overwrite"):
        _adopt(job, out, current)
    overwrite = job_from_dict(
        {**_job_dict(tmp_path, "answers"), "runner": "ray", "output": {"path": out.name, "mode": "overwrite"}}
    )
    assert _adopt(overwrite, out, current) is False  # starts again


@pytest.mark.parametrize("text", ["{not json", '{"metadata": ["a"]}', '{"model": 3}'])
def test_merging_a_ray_folder_names_a_provenance_it_cannot_read(tmp_path, text):
    """A damaged provenance file ended `kvbatch merge` with a JSONDecodeError traceback (or an AttributeError);
    it is refused by name, writing nothing."""
    from kvbatch.errors import MergeError
    from kvbatch.jobs.manifest import Manifest
    from kvbatch.jobs.merge_parts import merge_parts

    output = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    parts.mkdir()
    pq.write_table(pa.table({"row": pa.array([0], pa.int64()), "text": ["t"]}), parts / "part-0000-000000-a.parquet")
    work = tmp_path / ".answers.parquet.kvbatch"
    work.mkdir()
    Manifest("answers", "hash", {}, output.name, "parquet", complete=True, num_rows=1).save(work / "manifest.json")
    (work / "provenance.json").write_text(text)
    with pytest.raises(MergeError, match=r"cannot read .*provenance\.json: .*; nothing was merged"):
        merge_parts(output)
    assert not output.exists()
    (work / "provenance.json").unlink()
    assert merge_parts(output).num_rows == 1


def test_a_local_ray_has_a_cpu_for_each_actor_and_the_tasks_around_them(monkeypatch) -> None:
    """Each engine actor holds a CPU for the whole run, and the read, the write and (on a rerun) Ray Data's
    checkpoint filter want one each: a local Ray counted the machine's cores, and on 2 of them the rerun of a
    one-actor job waited for a CPU for ever, without a word. A cluster's CPUs are its own."""
    from kvbatch.jobs import ray_run

    started: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs))
    monkeypatch.setattr(ray_run.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # no running cluster to join
    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda temp_dir: None)
    ray_run.connect(None, 1)
    ray_run.connect("local", 6)  # --ray-address local
    ray_run.connect("auto", 6)
    monkeypatch.setattr(ray_run.os, "cpu_count", lambda: 64)
    ray_run.connect(None, 1)
    assert [(s["address"], s["num_cpus"]) for s in started] == [(None, 4), ("local", 9), ("auto", None), (None, 64)]


def test_no_address_joins_a_running_ray_without_a_cpu_count(monkeypatch, tmp_path) -> None:
    """With no address, ray.init joins the cluster RAY_ADDRESS names or the one `ray start` recorded, and refuses a
    num_cpus there ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided"): the CPU
    count meant for a new local instance failed every Ray job run beside a running cluster, which the job's unset
    ray_address promises to join. Only a Ray that starts here gets the count."""
    from ray._private import services

    from kvbatch.jobs import ray_run

    started: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs))
    monkeypatch.setattr(ray_run.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_run.connect(None, 1)
    ray_run.connect("local", 1)  # a new instance whatever RAY_ADDRESS says
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a Ray Client address
    ray_run.connect(None, 1)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "127.0.0.1:6380")  # `ray start`
    ray_run.connect(None, 1)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    ray_run.connect(None, 1)
    want = [(None, None), ("local", 4), (None, None), (None, None), (None, 4)]
    assert [(s["address"], s["num_cpus"]) for s in started] == want


def test_a_job_of_another_ray_address_runs_on_that_cluster(monkeypatch) -> None:
    """Two Ray jobs of different ray_address in one process (one job file, or two run_jobs calls): connect kept
    whatever Ray the first had joined, so the second ran on the first's cluster without a word. The connection
    kvbatch made for the first job is closed and the second's cluster joined; a job that names no address, or the
    same, keeps it; a Ray the process joined itself (ray.init before run_jobs) is never closed."""
    from types import SimpleNamespace

    from kvbatch.jobs import ray_run

    state: dict = {"gcs": None}
    started: list[str | None] = []
    closed: list[str] = []

    def init(address, **kwargs) -> None:
        started.append(address)
        state["gcs"] = f"gcs of {address}"

    def shutdown() -> None:
        closed.append(state["gcs"])
        state["gcs"] = None

    monkeypatch.setattr(ray, "is_initialized", lambda: state["gcs"] is not None)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address=state["gcs"]))
    monkeypatch.setattr(ray_run, "_joined", [], raising=False)  # no connection of its own yet
    for address in ("ray://a:10001", "ray://a:10001", None, "ray://b:10001", None):
        ray_run.connect(address, 1)
    assert (started, closed) == (["ray://a:10001", "ray://b:10001"], ["gcs of ray://a:10001"])
    state["gcs"] = "the process's own"  # the caller closed kvbatch's Ray and joined one itself
    ray_run.connect("ray://c:10001", 1)
    assert (started, closed, state["gcs"]) == (["ray://a:10001", "ray://b:10001"], closed, "the process's own")


def test_a_rerun_under_the_other_runner_is_refused_not_done_again(tmp_path, monkeypatch) -> None:
    """A local run stopped part way and rerun with runner: ray did its committed rows again and left its parts in
    the work folder (the Ray run's manifest named none of them); a Ray run's folder of parts rerun locally was
    done again and left beside the output. Either rerun is refused, naming the earlier rows and the runner that
    resumes them (no Ray is started for it); output.mode overwrite removes them and starts again."""
    from kvbatch.jobs import ray_run as ray_run_module
    from kvbatch.jobs.job_io import job_manifest
    from kvbatch.jobs.manifest import Manifest
    from kvbatch.jobs.run import EngineCache, run_job
    from kvbatch.jobs.writer import parts_dir, work_dir

    write_input(tmp_path / "in.jsonl")
    local = job_from_dict({**_job_dict(tmp_path, "answers"), "output": {"path": "answers.parquet", "part_rows": 2}})
    out = output_path(local)
    with pytest.raises(InterruptedJob):
        run_job(local, EngineCache(tiny_engine), StopAfter(10))
    committed = committed_rows(out)
    assert 0 < committed < 13
    ray_run = job_from_dict({**_job_dict(tmp_path, "answers"), "output": {"path": "answers.parquet"}, "runner": "ray"})
    connected: list[str | None] = []  # Ray itself may be up already, from another test of this process
    monkeypatch.setattr(ray_run_module, "connect", lambda address, actors: connected.append(address))
    [refused] = run_jobs([ray_run], engine_factory=tiny_engine)
    assert isinstance(refused.error, OutputError), refused.error
    assert str(refused.error) == (
        f"{out}: rows of this job are committed by an earlier run of another layout (answers.parquet "
        f"({committed} rows)); rerun it as one process (parallel.data: 1) and runner: local to resume them, or set "
        "output.mode: overwrite to start again"
    )
    assert connected == [] and committed_rows(out) == committed
    monkeypatch.undo()

    # A Ray run's state, stopped part way: its manifest names no parts, its folder holds three rows.
    other = job_from_dict({**_job_dict(tmp_path, "other"), "output": {"path": "other.parquet"}})
    other_out = output_path(other)
    work_dir(other_out).mkdir(parents=True)
    job_manifest(other, other_out, "parquet").save(work_dir(other_out) / "manifest.json")
    (work_dir(other_out) / "ray-checkpoint").mkdir()
    parts_dir(other_out).mkdir()
    whole = job_from_dict({**_job_dict(tmp_path, "whole"), "output": {"path": "whole.parquet"}})
    [done] = run_jobs([whole], engine_factory=tiny_engine)
    whole_rows = pq.read_table(output_path(whole))
    pq.write_table(whole_rows.slice(0, 3), parts_dir(other_out) / "part-0000-000000-a.parquet")
    [refused] = run_jobs([other], engine_factory=tiny_engine)
    assert isinstance(refused.error, OutputError), refused.error
    assert "(other.parquet.parts (3 rows)); rerun it with runner: ray to resume them" in str(refused.error)
    assert not other_out.exists() and parts_dir(other_out).is_dir()
    # Finished, as a Ray run leaves it (no output file until `kvbatch merge`): refused alike, and still finished.
    manifest = Manifest.load(work_dir(other_out) / "manifest.json")
    manifest.complete, manifest.num_rows = True, 3
    manifest.save(work_dir(other_out) / "manifest.json")
    [refused] = run_jobs([other], engine_factory=tiny_engine)
    assert "(other.parquet.parts (3 rows)); rerun it with runner: ray" in str(refused.error)
    assert Manifest.load(work_dir(other_out) / "manifest.json").complete and not other_out.exists()

    overwrite = job_from_dict(
        {**_job_dict(tmp_path, "other"), "output": {"path": "other.parquet", "mode": "overwrite"}}
    )
    [again] = run_jobs([overwrite], engine_factory=tiny_engine)
    assert again.error is None and again.summary.rows_this_run == 13
    assert pq.read_table(other_out).to_pylist() == whole_rows.to_pylist()
    assert not parts_dir(other_out).exists() and not (work_dir(other_out) / "ray-checkpoint").exists()


def test_a_ray_folders_row_count_leaves_out_files_not_yet_committed(tmp_path) -> None:
    """Ray Data writes a task's file before it commits the task's checkpoint: a file whose pending checkpoint is
    still there (a write in flight, or one a kill cut short) holds rows a rerun deletes and does again. Its rows
    were counted all the same: by the summary's count of the folder, and by a local rerun's refusal, which named
    rows that were never committed. Only committed files are counted now, as the resume counts them."""
    from kvbatch.jobs.job_io import job_manifest
    from kvbatch.jobs.ray_run import checkpoint_dir, folder_report
    from kvbatch.jobs.writer import parts_dir, work_dir

    write_input(tmp_path / "in.jsonl")
    whole = job_from_dict({**_job_dict(tmp_path, "whole"), "output": {"path": "whole.parquet"}})
    [done] = run_jobs([whole], engine_factory=tiny_engine)
    assert done.error is None, done.error
    rows = pq.read_table(output_path(whole))
    other = job_from_dict({**_job_dict(tmp_path, "other"), "output": {"path": "other.parquet"}})
    out = output_path(other)
    work_dir(out).mkdir(parents=True)
    job_manifest(other, out, "parquet").save(work_dir(out) / "manifest.json")
    parts = parts_dir(out)
    parts.mkdir()
    checkpoint_dir(out).mkdir()
    committed, pending = "part-0000-000000-7f3a", "part-0000-000001-7f3a"  # as Ray names a write task's files
    pq.write_table(rows.slice(0, 3), parts / f"{committed}.parquet")
    pq.write_table(pa.table({"row": rows.column("row").slice(0, 3)}), checkpoint_dir(out) / f"{committed}.parquet")
    pq.write_table(rows.slice(3, 4), parts / f"{pending}.parquet")
    pq.write_table(
        pa.table({"row": rows.column("row").slice(3, 4)}), checkpoint_dir(out) / f"{pending}.pending.parquet"
    )
    assert folder_report(parts).num_rows == 3
    [refused] = run_jobs([other], engine_factory=tiny_engine)
    assert "(other.parquet.parts (3 rows)); rerun it with runner: ray to resume them" in str(refused.error)
    assert (parts / f"{pending}.parquet").exists()  # the rerun with runner: ray deletes it, as Ray's resume does
