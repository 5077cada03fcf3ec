"""Outputs stay where they belong: output paths, job names, links planted in the output folder, and ids from the data
(id_column, OpenAI custom_id) never make kvbatch write outside output_dir, nor write through a link.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from job_fakes import fake_factory
from reliability_helpers import read_output, write_jsonl

from kvbatch.errors import OutputError, SpecError
from kvbatch.jobs.atomic import atomic_file
from kvbatch.jobs.manifest import Manifest, PartEntry, journal_path
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(job folder with in.jsonl and out/, a folder outside it holding a file that must never change)."""
    job, outside = tmp_path / "job", tmp_path / "outside"
    (job / "out").mkdir(parents=True)
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    write_jsonl(job / "in.jsonl", [{"prompt": "hello"}])
    return job, outside


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def run(job_folder: Path, **fields):
    spec = job_from_dict({"name": "safe", "input": {"path": "in.jsonl"}, **fields}, base_dir=str(job_folder))
    return run_jobs([spec], engine_factory=fake_factory())[0]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "../escape.arrow",
            "output.path: output.path '../escape.arrow' must be a relative path inside output_dir (out)",
        ),
        (
            "sub/../../escape.arrow",
            "output.path: output.path 'sub/../../escape.arrow' must be a relative path inside output_dir",
        ),
        ("/tmp/escape.arrow", "output.path: output.path '/tmp/escape.arrow' must be a relative path inside output_dir"),
    ],
)
def test_output_path_cannot_leave_output_dir(folders, path: str, message: str) -> None:
    job, outside = folders
    with pytest.raises(SpecError) as refused:  # when the job is read, before anything runs
        run(job, output={"path": path})
    assert str(refused.value).startswith(f"command line: {message}")
    assert not (job / "escape.arrow").exists() and not Path("/tmp/escape.arrow").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"output_dir": "s3://bucket/out"},
            "output_dir: 's3://bucket/out' is a URI; kvbatch writes its outputs to a folder of this machine (for "
            "runner: ray, one every node mounts): set a local path, and copy the output to object storage after the "
            "run",
        ),
        (
            {"output": {"path": "gs://bucket/answers.arrow"}},
            "output.path: 'gs://bucket/answers.arrow' is a URI; kvbatch writes its outputs to a folder of this "
            "machine (for runner: ray, one every node mounts): set a local path, and copy the output to object "
            "storage after the run",
        ),
    ],
)
def test_an_output_in_object_storage_is_refused(folders, fields: dict, message: str) -> None:
    """An output_dir of s3://bucket/out was written to the local folder s3:/bucket/out, the job reported done and
    nothing reached the bucket (docs/scaling.md: an output in object storage is not supported yet)."""
    job, _ = folders
    with pytest.raises(SpecError) as refused:  # when the job is read, before anything runs
        run(job, **fields)
    assert str(refused.value) == f"command line: {message}"
    assert not (job / "s3:").exists() and not (job / "out" / "gs:").exists()


def test_a_link_out_of_output_dir_is_refused(folders) -> None:
    job, outside = folders
    (job / "out" / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SpecError, match=f"resolves to {outside / 'x.arrow'}, outside output_dir"):
        run(job, output={"path": "link/x.arrow"})
    (job / "out" / "x.arrow").symlink_to(outside / "precious.txt")
    with pytest.raises(SpecError, match="outside output_dir"):
        run(job, output={"path": "x.arrow"})
    assert tree(outside) == {"precious.txt": b"keep me"}


def test_a_linked_work_folder_is_refused(folders) -> None:
    job, outside = folders
    (job / "out" / ".safe.arrow.kvbatch").symlink_to(outside, target_is_directory=True)
    outcome = run(job)
    assert isinstance(outcome.error, OutputError) and "is a symbolic link" in str(outcome.error)
    assert tree(outside) == {"precious.txt": b"keep me"}


def test_a_link_planted_at_the_lock_is_never_opened(folders) -> None:
    job, outside = folders
    (job / "out" / ".safe.arrow.kvbatch").mkdir()
    (job / "out" / ".safe.arrow.kvbatch" / "lock").symlink_to(outside / "precious.txt")
    outcome = run(job)
    assert isinstance(outcome.error, OutputError) and "cannot open the lock file" in str(outcome.error)
    assert tree(outside) == {"precious.txt": b"keep me"}


def test_a_link_planted_at_a_temporary_name_is_not_written_through(folders) -> None:
    job, outside = folders
    (job / "out" / "safe.arrow.incomplete").symlink_to(outside / "precious.txt")
    outcome = run(job)
    assert outcome.error is None and len(read_output(job / "out" / "safe.arrow")) == 1
    target = job / "out" / "note.txt"
    target.with_name("note.txt.incomplete").symlink_to(outside / "precious.txt")
    with atomic_file(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and not target.is_symlink()
    assert tree(outside) == {"precious.txt": b"keep me"}


@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_planted_at_the_parts_journal_is_not_written_through(folders, dangling: bool) -> None:
    """The journal is appended to by name at every commit of a long run: a link put in its place meanwhile (or
    one to a file that does not exist yet) must not be followed."""
    job, outside = folders
    path = job / "out" / ".safe.arrow.kvbatch" / "manifest.json"
    path.parent.mkdir()
    manifest = Manifest("safe", "h1", {}, "safe.arrow", "arrow")
    manifest.save(path)
    journal_path(path).symlink_to(outside / ("new.txt" if dangling else "precious.txt"))
    with pytest.raises(OSError):
        manifest.append_part(path, PartEntry("part-000000.arrow", 1, [[0, 1]]))
    assert tree(outside) == {"precious.txt": b"keep me"}


def test_job_names_cannot_carry_paths(folders) -> None:
    job, _ = folders
    with pytest.raises(SpecError, match="job names use letters, digits"):
        job_from_dict({"name": "../evil", "input": {"path": "in.jsonl"}}, base_dir=str(job))


HOSTILE_IDS = ["../../outside/pwned", "/etc/passwd", "a/../../b", "..", "con\\..\\x", "x\x00y"]


def test_ids_never_become_paths(folders) -> None:
    job, outside = folders
    before = tree(job.parent)
    write_jsonl(job / "in.jsonl", [{"id": i, "prompt": "hi"} for i in HOSTILE_IDS])
    outcome = run(job, id_column="id", output={"path": "ids.jsonl"})
    assert outcome.error is None
    assert [r["id"] for r in read_output(job / "out" / "ids.jsonl")] == HOSTILE_IDS
    openai = [{"custom_id": i, "body": {"messages": [{"role": "user", "content": "hi"}]}} for i in HOSTILE_IDS]
    write_jsonl(job / "batch.jsonl", openai)
    spec = job_from_dict({"name": "batch", "input": {"path": "batch.jsonl", "format": "openai"}}, base_dir=str(job))
    assert run_jobs([spec], engine_factory=fake_factory())[0].error is None
    assert [
        json.loads(line)["custom_id"] for line in (job / "out" / "batch.jsonl").read_text().splitlines()
    ] == HOSTILE_IDS
    new_files = set(tree(job.parent)) - set(before)
    assert all(name.startswith("job/out/") or name in ("job/batch.jsonl",) for name in new_files), new_files
    assert tree(outside) == {"precious.txt": b"keep me"}


@pytest.mark.parametrize("journal", [False, True])
def test_part_names_in_a_manifest_never_reach_outside_the_work_folder(folders, journal: bool) -> None:
    """A manifest (or its journal) planted in, or copied into, the work folder names its parts: a name with a
    path in it would have the resumed run read that file into its output and then delete it."""
    job, outside = folders
    assert run(job).error is None
    table = pa.ipc.open_stream(pa.memory_map(str(job / "out" / "safe.arrow"))).read_all()
    with pa.ipc.new_file(str(outside / "victim.arrow"), table.schema) as f:  # a part-like file elsewhere
        f.write_table(table)
    (job / "out" / "safe.arrow").unlink()
    path = job / "out" / ".safe.arrow.kvbatch" / "manifest.json"
    data = json.loads(path.read_text())
    entry = {"file": "../../../outside/victim.arrow", "num_rows": 1, "rows": [[0, 1]]}
    data["complete"], data["parts"] = False, [] if journal else [entry]
    path.write_text(json.dumps(data))
    if journal:
        journal_path(path).write_text(json.dumps(entry) + "\n")
    outcome = run(job)
    assert (outside / "victim.arrow").exists()
    assert isinstance(outcome.error, OutputError) and "is not a part file name" in str(outcome.error)


def test_a_part_replaced_by_a_link_is_not_read(folders) -> None:
    """A committed part swapped for a link between runs: the resumed run does its rows again instead of copying
    what the link points to into its output."""
    job, outside = folders
    write_jsonl(job / "in.jsonl", [{"prompt": f"hello {i}"} for i in range(4)])
    spec = job_from_dict({"name": "safe", "input": {"path": "in.jsonl"}, "output": {"part_rows": 1}}, base_dir=str(job))
    assert run_jobs([spec], engine_factory=fake_factory(fail_after=1))[0].error is not None
    part = job / "out" / ".safe.arrow.kvbatch" / "part-000000.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(part))).read_all()
    secret = table.set_column(table.schema.get_field_index("text"), "text", pa.array(["secret"] * len(table)))
    with pa.ipc.new_file(str(outside / "secret.arrow"), secret.schema) as f:
        f.write_table(secret)
    part.unlink()
    part.symlink_to(outside / "secret.arrow")
    assert run_jobs([spec], engine_factory=fake_factory())[0].error is None
    assert "secret" not in [r["text"] for r in read_output(job / "out" / "safe.arrow")]


def test_a_part_swapped_for_a_link_during_the_run_is_not_read(folders) -> None:
    """The final file is assembled from the parts by name: one made a link meanwhile is refused, not followed."""
    job, outside = folders
    write_jsonl(job / "in.jsonl", [{"prompt": f"hello {i}"} for i in range(4)])
    part = job / "out" / ".safe.arrow.kvbatch" / "part-000000.arrow"
    (outside / "secret.arrow").write_bytes(b"")
    factory = fake_factory()

    def swapping(model: str, settings: dict):
        engine = factory(model, settings)
        generate = engine.generate

        def generate_and_swap(requests, on_step=None):
            for i, result in enumerate(generate(requests, on_step)):
                if i == 2:  # part-000000 is committed by now
                    (outside / "secret.arrow").write_bytes(part.read_bytes())
                    part.unlink()
                    part.symlink_to(outside / "secret.arrow")
                yield result

        engine.generate = generate_and_swap
        return engine

    spec = job_from_dict({"name": "safe", "input": {"path": "in.jsonl"}, "output": {"part_rows": 1}}, base_dir=str(job))
    outcome = run_jobs([spec], engine_factory=swapping)[0]
    assert isinstance(outcome.error, OutputError) and "cannot read the committed parts" in str(outcome.error)
    assert not (job / "out" / "safe.arrow").exists()
    assert run_jobs([spec], engine_factory=fake_factory())[0].error is None  # the rerun does that part's rows again
    assert len(read_output(job / "out" / "safe.arrow")) == 4
