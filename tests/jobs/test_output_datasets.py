"""Outputs that Hugging Face `datasets` opens with its own readers: an `.arrow` output is an IPC stream
(`Dataset.from_file`), `output.format: hf` a `save_to_disk` folder (`load_from_disk`). Older outputs, IPC files,
are still read by inspect and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from job_fakes import fake_factory

from kvbatch.jobs.arrow_io import is_ipc_file, read_arrow
from kvbatch.jobs.inspect import inspect_output
from kvbatch.jobs.merge import merge_shards
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.spec import job_from_dict

LINES = [{"id": f"r{i}", "prompt": "q" * (i + 1)} for i in range(5)] + [{"id": "r5", "prompt": ""}]


def run(tmp_path: Path, **output) -> Path:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))
    job = job_from_dict(
        {"name": "j", "input": {"path": "in.jsonl"}, "id_column": "id", "output_dir": "out", "output": output},
        base_dir=str(tmp_path),
    )
    summary = run_job(job, EngineCache(fake_factory()))
    assert summary.rows == len(LINES)
    return Path(summary.output)


def test_an_arrow_output_opens_with_datasets_from_file_and_pyarrow_stream(tmp_path: Path) -> None:
    out = run(tmp_path)
    assert not is_ipc_file(out)
    dataset = datasets.Dataset.from_file(str(out))
    assert dataset["id"] == [f"r{i}" for i in range(6)]
    assert dataset["finish_reason"] == ["stop"] * 5 + ["error"]
    table = pa.ipc.open_stream(pa.memory_map(str(out))).read_all()
    assert table.to_pylist() == dataset.to_list()
    assert json.loads(table.schema.metadata[b"kvbatch.job"])["name"] == "j"
    assert read_arrow(str(out)).equals(table)  # outputs.md's reader, given a path as text
    report = inspect_output(out, 1)
    assert (report.format, report.num_rows, report.finish_reasons["error"]) == ("arrow", 6, 1)


def test_format_hf_writes_a_folder_that_load_from_disk_opens_with_its_features(tmp_path: Path) -> None:
    out = run(tmp_path, format="hf")
    assert out.name == "j.hf" and out.is_dir()
    dataset = datasets.load_from_disk(str(out))
    assert dataset.num_rows == 6
    assert dataset["text"][:2] == ["echo 20", "echo 21"]  # the fake engine echoes the chat prompt's length
    assert dataset.features["prompt_tokens"] == datasets.Value("int64")
    assert dataset.features["error_kind"] == datasets.Value("string")
    assert json.loads((out / "dataset_info.json").read_text())["features"]["row"] == {
        "dtype": "int64",
        "_type": "Value",
    }
    assert read_arrow(out).schema.metadata[b"kvbatch.spec_hash"]  # provenance stays in the data file
    assert inspect_output(out, 0).format == "hf"
    # A rerun finds it complete; overwrite replaces the folder whole.
    assert run(tmp_path, format="hf") == out
    run(tmp_path, format="hf", mode="overwrite")
    assert datasets.load_from_disk(str(out)).num_rows == 6
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("j.hf")) == ["j.hf", "j.hf.summary.json"]


def test_format_hf_makes_each_file_durable_before_the_folder_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data file went through the atomic writer, but state.json and dataset_info.json were plain writes: after a
    # power cut the folder could be in place with either empty, and load_from_disk would fail on a finished job.
    import os

    from kvbatch.jobs import arrow_io

    synced: set[str] = set()
    real_fsync, real_replace = os.fsync, arrow_io._replace_folder
    in_place: list[set[str]] = []

    def fsync(fd: int) -> None:
        synced.add(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).removesuffix(".incomplete"))
        real_fsync(fd)

    def replace(new: Path, target: Path) -> None:
        in_place.append({p.name for p in new.iterdir()} - synced)  # the files written but not yet synced
        real_replace(new, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(arrow_io, "_replace_folder", replace)
    out = run(tmp_path, format="hf")
    assert in_place == [set()]
    assert {"state.json", "dataset_info.json", arrow_io.HF_DATA_FILE, "j.hf"} <= synced  # j.hf: its folder
    assert datasets.load_from_disk(str(out)).num_rows == 6


def test_an_older_output_written_as_an_ipc_file_is_still_read_and_resumed(tmp_path: Path) -> None:
    out = run(tmp_path)
    table = read_arrow(out)
    older = out.with_name("older.arrow")
    with pa.OSFile(str(older), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:  # as kvbatch wrote it before
        writer.write_table(table)
    older.replace(out)
    assert is_ipc_file(out)
    assert read_arrow(out).equals(table)
    assert inspect_output(out, 0).num_rows == 6
    assert run(tmp_path) == out  # complete under the same spec: nothing to do, the file is kept as it is
    assert is_ipc_file(out)


def test_shards_of_format_hf_merge_into_one_folder(tmp_path: Path) -> None:
    shards = []
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))
    for index in range(2):
        job = job_from_dict(
            {
                "name": "j",
                "input": {"path": "in.jsonl"},
                "id_column": "id",
                "output_dir": "out",
                "output": {"format": "hf"},
                "parallel": {"shard": f"{index}/2"},
            },
            base_dir=str(tmp_path),
        )
        shards.append(Path(run_job(job, EngineCache(fake_factory())).output))
    assert [p.name for p in shards] == ["j.shard-0000-of-0002.hf", "j.shard-0001-of-0002.hf"]
    report = merge_shards(tmp_path / "out" / "j.hf")
    assert report.num_rows == 6
    assert datasets.load_from_disk(str(tmp_path / "out" / "j.hf"))["id"] == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "hf"])
def test_a_kept_class_label_keeps_its_names(tmp_path: Path, fmt: str) -> None:
    # A ClassLabel is an int64 column whose names live only in the schema's `huggingface` metadata: a kept one
    # came back as a bare Value("int64"), though the output keeps the input's `datasets` types.
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
            "tokens": datasets.Sequence(datasets.Value("int32")),
        }
    )
    rows = {"prompt": ["a b", "", "c d e"], "label": [1, 0, 1], "tokens": [[1], [], [2, 3]]}
    source = datasets.Dataset.from_dict(rows, features=features)
    source.save_to_disk(str(tmp_path / "in"))
    job = job_from_dict(
        {
            "name": "j",
            "input": {"path": "in", "limit": 2},
            "keep_columns": ["label", "tokens"],
            "output_dir": "out",
            "output": {"format": fmt},
        },
        base_dir=str(tmp_path),
    )
    out = Path(run_job(job, EngineCache(fake_factory())).output)
    if fmt == "arrow":
        back = datasets.Dataset.from_file(str(out))
    elif fmt == "parquet":
        back = datasets.Dataset.from_parquet(str(out), cache_dir=str(tmp_path / "cache"))
    else:
        back = datasets.load_from_disk(str(out))
    assert back.features["label"] == features["label"]
    assert back.features["tokens"] == datasets.List(datasets.Value("int32"))
    assert (back["label"], back["tokens"]) == ([1, 0], [[1], []])
    assert back["error_kind"] == [None, "empty_prompt"]
