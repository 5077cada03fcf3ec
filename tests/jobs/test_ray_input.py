"""A Ray run's input positions and its skip of finished rows, without starting Ray: the read tasks' own code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from kvbatch.errors import InputError, SpecError
from kvbatch.jobs.ray_input import RowsSource, open_ray_input
from kvbatch.jobs.ray_run import done_rows
from kvbatch.jobs.spec import job_from_dict


def parquet_folder(tmp_path: Path) -> Path:
    """Files of 5, 0 and 7 rows (row groups of 3), whose `n` column is the row's position over the folder."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    sizes = {"a.parquet": 5, "b.parquet": 0, "sub/c.parquet": 7}
    start = 0
    for name, size in sizes.items():
        table = pa.table({"n": list(range(start, start + size)), "prompt": [f"p{i}" for i in range(size)]})
        pq.write_table(table, folder / name, row_group_size=3)
        start += size
    (folder / "_SUCCESS").touch()  # names starting with _ or . are not data
    return folder


def job(folder: Path, **input_fields) -> object:
    return job_from_dict(
        {"name": "j", "input": {"path": str(folder), **input_fields}, "output_dir": str(folder.parent)}
    )


def read_all(source: RowsSource) -> list[tuple[int, int]]:
    out = []
    for unit in source.units():
        for block in source.read(unit):
            for row, data in zip(block.column("row").to_pylist(), block.column("data").to_pylist()):
                out.append((row, pickle.loads(data)["n"]))
    return out


def test_rows_are_numbered_over_the_files_in_path_order(tmp_path):
    folder = parquet_folder(tmp_path)
    ray_input = open_ray_input(job(folder), ["prompt", "n"])
    assert [Path(f.path).name for f in ray_input.files] == ["a.parquet", "b.parquet", "c.parquet"]
    assert [(f.first_row, f.num_rows, f.row_groups) for f in ray_input.files] == [
        (0, 5, (3, 2)),
        (5, 0, (0,)),  # an empty file has one empty row group
        (5, 7, (3, 3, 1)),
    ]
    source = RowsSource(ray_input, ["prompt", "n"], batch_rows=2, max_line_bytes=1 << 20)
    assert [(u.first_row, u.num_rows) for u in source.units()] == [(0, 3), (3, 2), (5, 3), (8, 3), (11, 1)]
    assert read_all(source) == [(i, i) for i in range(12)]  # each row's position is its `n`

    limited = open_ray_input(job(folder, limit=7), ["prompt"])
    assert limited.num_rows == 7
    assert read_all(RowsSource(limited, ["prompt", "n"], 2, 1 << 20)) == [(i, i) for i in range(7)]
    changed = folder / "sub" / "c.parquet"
    pq.write_table(pa.table({"n": [5], "prompt": ["p"]}), changed)
    assert open_ray_input(job(folder), ["prompt"]).identity != ray_input.identity  # a resume over it is refused


def test_without_ray_checkpointing_the_folder_s_rows_are_skipped(tmp_path):
    folder = parquet_folder(tmp_path)
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    pq.write_table(pa.table({"row": [0, 1, 2, 9]}), parts / "part-0000-000000-x.parquet")
    (parts / "part-0000-000001-x.parquet").write_bytes(b"PAR1 cut short")  # a write the kill cut short
    done = done_rows(parts)
    assert done.tolist() == [0, 1, 2, 9]
    assert not (parts / "part-0000-000001-x.parquet").exists()  # its rows are done again
    source = RowsSource(open_ray_input(job(folder), ["prompt"]), ["prompt", "n"], 2, 1 << 20)
    source.done_rows = done
    assert [row for row, _ in read_all(source)] == [3, 4, 5, 6, 7, 8, 10, 11]
    assert isinstance(source.done_rows, np.ndarray)


def test_kvbatch_merge_writes_a_ray_folder_as_one_file_in_input_order(tmp_path):
    from typer.testing import CliRunner

    from kvbatch import cli
    from kvbatch.jobs.manifest import Manifest
    from kvbatch.jobs.writer import work_dir

    out = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    parts.mkdir()
    part = {"row": [2, 3], "text": ["c", "d"], "finish_reason": ["stop", "length"], "error_kind": [None, None]}
    pq.write_table(pa.table(part), parts / "part-0000-000000-x.parquet")
    part = {"row": [0, 1], "text": ["a", None], "finish_reason": ["stop", "error"], "error_kind": [None, "bad_json"]}
    pq.write_table(pa.table(part), parts / "part-0001-000000-y.parquet")
    manifest = Manifest("answers", "hash", {}, out.name, "parquet", num_rows=4)
    work_dir(out).mkdir()
    manifest.save(work_dir(out) / "manifest.json")

    result = CliRunner().invoke(cli.app, ["merge", str(out)])
    assert result.exit_code == 1 and "unfinished" in result.output  # not before the run is complete
    manifest.complete = True
    manifest.save(work_dir(out) / "manifest.json")
    result = CliRunner().invoke(cli.app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert "merged 2 parts" in result.output
    merged = pq.read_table(out)
    assert merged.column("row").to_pylist() == [0, 1, 2, 3]
    assert merged.column("text").to_pylist() == ["a", None, "c", "d"]

    (parts / "part-0001-000000-y.parquet").unlink()  # a row missing: refused, nothing written
    result = CliRunner().invoke(cli.app, ["merge", str(out)])
    assert result.exit_code == 1 and "2 rows missing: [0, 1]" in result.output


def test_arrow_ipc_files_are_read_as_the_local_reader_reads_them(tmp_path):
    # Feather v2 / IPC files (what `input.format: arrow` reads locally) counted from their footers, batches of
    # any size numbered over the files; an IPC file too damaged to open is an input error naming it.
    folder = tmp_path / "in"
    folder.mkdir()
    start = 0
    for name, sizes in {"a.feather": [2, 3], "b.arrow": [4]}.items():
        batches = []
        for size in sizes:
            batches.append(pa.record_batch({"n": list(range(start, start + size)), "prompt": ["p"] * size}))
            start += size
        with pa.ipc.new_file(folder / name, batches[0].schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
    ray_input = open_ray_input(job(folder), ["prompt", "n"])
    assert [(Path(f.path).name, f.kind, f.first_row, f.num_rows) for f in ray_input.files] == [
        ("a.feather", "arrow", 0, 5),
        ("b.arrow", "arrow", 5, 4),
    ]
    assert read_all(RowsSource(ray_input, ["prompt", "n"], 2, 1 << 20)) == [(i, i) for i in range(9)]
    (folder / "b.arrow").write_bytes(b"ARROW1 cut short")
    with pytest.raises(InputError, match="cannot read Arrow file .*b.arrow"):
        open_ray_input(job(folder), ["prompt"])


def test_a_feather_version_1_file_is_refused_before_any_ray_task(tmp_path):
    # Feather version 1 is no Arrow IPC file: its rows were counted by a Ray task, which failed on the cluster as
    # "cannot read Arrow file ...: Expected to read ... metadata bytes", where the local reader names the format.
    import warnings

    import pyarrow.feather as feather

    folder = tmp_path / "in"
    folder.mkdir()
    with pa.ipc.new_file(folder / "a.feather", pa.schema({"prompt": pa.string()})) as writer:
        writer.write_batch(pa.record_batch({"prompt": ["a"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pyarrow deprecates writing version 1
        feather.write_feather(pa.table({"prompt": ["b"]}), folder / "b.feather", version=1)
    with pytest.raises(InputError) as refused:
        open_ray_input(job(folder), ["prompt"])
    assert str(refused.value) == (
        f"{folder / 'b.feather'} is a Feather version 1 file, the format before Arrow IPC (pyarrow deprecates it), "
        "which kvbatch does not read: write it as Feather version 2 first (pyarrow.feather.write_feather("
        f"pyarrow.feather.read_table({str(folder / 'b.feather')!r}), 'in.arrow'))"
    )


def test_a_folder_of_several_configurations_is_refused_as_one_input(tmp_path):
    # A local run reads one configuration of a repository folder whose README lists several (input.config); this
    # run read every configuration's files as one input without a word.
    folder = tmp_path / "repo"
    for config in ("alpha", "beta"):
        (folder / config).mkdir(parents=True)
        (folder / config / "train.jsonl").write_text('{"prompt": "p"}\n')
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: alpha\n  data_files: alpha/*.jsonl\n"
        "- config_name: beta\n  data_files: beta/*.jsonl\n---\n"
    )
    with pytest.raises(SpecError) as refused:
        open_ray_input(job(folder), ["prompt"])
    assert refused.value.field == "input.path"
    assert str(refused.value) == (
        f"input.path: {folder} has configurations alpha, beta (as its README lists them), and runner: ray reads a "
        "folder's files as one input; name one configuration's files in input.path (a glob: the data_files its "
        "README gives)"
    )


def test_input_split_is_refused_where_a_ray_run_would_ignore_it(tmp_path):
    # A split was ignored unless the folder was a DatasetDict: a repository folder's splits were all read as one
    # input, and a saved Dataset was read whatever split it was.
    import datasets

    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    for name in ("train", "test"):
        pq.write_table(pa.table({"prompt": [name]}), data / f"{name}-00000-of-00001.parquet")
    with pytest.raises(SpecError, match="takes input.split for a save_to_disk folder only"):
        open_ray_input(job(tmp_path / "repo", split="test"), ["prompt"])
    datasets.Dataset.from_dict({"prompt": ["a"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(SpecError, match="plain is one dataset that names no split, not split 'test'"):
        open_ray_input(job(tmp_path / "plain", split="test"), ["prompt"])
    datasets.Dataset.from_dict({"prompt": ["a"]}, split="train").save_to_disk(str(tmp_path / "own"))
    with pytest.raises(SpecError, match="own is one dataset that is split 'train', not split 'test'"):
        open_ray_input(job(tmp_path / "own", split="test"), ["prompt"])


def test_a_folder_of_several_splits_is_refused_as_a_local_run_refuses_it(tmp_path):
    """A repository folder of train and test files, with no input.split, was read whole: a Ray run generated for
    every split's rows as one input, where a local run over the same folder refuses it ("has splits train, test").
    A folder of one split's files, or of files that name no split, is still read as it is."""
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    for name in ("train", "test"):
        pq.write_table(pa.table({"prompt": [name]}), data / f"{name}-00000-of-00001.parquet")
    with pytest.raises(SpecError) as refused:
        open_ray_input(job(tmp_path / "repo"), ["prompt"])
    assert refused.value.field == "input.path"
    assert refused.value.message == (
        f"{tmp_path / 'repo'} has splits train, test (as `datasets` reads its files), and runner: ray reads a "
        "folder's files as one input; name one split's files in input.path (a glob: data/train-*.parquet)"
    )
    (data / "test-00000-of-00001.parquet").unlink()
    assert open_ray_input(job(tmp_path / "repo"), ["prompt"]).num_rows == 1
    assert open_ray_input(job(parquet_folder(tmp_path)), ["prompt"]).num_rows == 12


def test_json_values_of_the_request_s_columns_are_read_as_datasets_reads_them(tmp_path):
    # As a local run reads them (test_input_readers): a `Json` message content stored as "\"hi\"" is the text hi.
    import datasets

    from kvbatch.jobs.ray_input import InputFile, RayInput

    features = datasets.Features({"messages": datasets.List({"content": datasets.Json()}), "meta": datasets.Json()})
    rows = {"messages": [[{"content": "hi"}], [{"content": [{"type": "text", "text": "yo"}]}]], "meta": ["a", [1]]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    path = str(tmp_path / "ds" / "data-00000-of-00001.arrow")
    schema = pa.ipc.open_stream(pa.memory_map(path)).schema
    source = RayInput(pafs.LocalFileSystem(), (InputFile(path, "arrow", 0, 2),), 2, schema, {})  # no Ray to count
    blocks = RowsSource(source, ["messages", "meta"], 2, 1 << 20, request_columns=["messages"]).read(
        source_unit(source)
    )
    data = [pickle.loads(d) for block in blocks for d in block.column("data").to_pylist()]
    assert [d["messages"][0]["content"] for d in data] == ["hi", [{"type": "text", "text": "yo"}]]
    assert [d["meta"] for d in data] == ['"a"', "[1]"]  # kept as stored


def source_unit(source):
    (unit,) = RowsSource(source, [], 2, 1 << 20).units()
    return unit
