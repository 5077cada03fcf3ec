"""The CLI: each command builds the exact spec expected and hands it on; outcomes become exit codes in one place.

run_jobs is patched (no model), except in the last tests where the fake engine stands in for the real one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import pytest
from job_fakes import fake_factory  # noqa: E402
from typer.testing import CliRunner

from kvbatch import __version__, cli
from kvbatch.errors import InterruptedJob, JobError, OutputLockedError
from kvbatch.jobs.lock import OutputLock
from kvbatch.jobs.run import EngineCache
from kvbatch.jobs.runners import JobOutcome
from kvbatch.jobs.runners import run_jobs as real_run_jobs
from kvbatch.jobs.spec import JobSpec, job_from_dict, load_jobs_file, spec_hash
from kvbatch.jobs.summary import Summary
from kvbatch.jobs.writer import work_dir

RUNNER = CliRunner()
JOBS = """\
defaults:
  sampling: {max_new_tokens: 16}
jobs:
  - name: first
    input: {path: in.jsonl}
  - name: second
    input: {path: in.jsonl}
    sampling: {temperature: 0.5}
"""


class Recorder:
    """Stands in for run_jobs: records what it was given and returns the outcomes it was told to."""

    def __init__(self, outcomes: list[JobOutcome] | None = None) -> None:
        self.calls: list[tuple[list, bool]] = []
        self.outcomes = outcomes

    def __call__(self, specs, wait_for_lock=False, on_outcome=None):
        self.calls.append((list(specs), wait_for_lock))
        outcomes = (
            self.outcomes
            if self.outcomes is not None
            else [JobOutcome(s.name, Summary(s.name, f"out/{s.name}.arrow", rows=1, rows_ok=1)) for s in specs]
        )
        for outcome in outcomes:
            on_outcome(outcome)
        return outcomes


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)  # a Slurm array would turn into a shard override
    rec = Recorder()
    monkeypatch.setattr(cli, "run_jobs", rec)
    return rec


def jobs_file(tmp_path: Path, text: str = JOBS) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    return path


def invoke(*args: str):
    return RUNNER.invoke(cli.app, [str(a) for a in args])


def test_version_and_help() -> None:
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"kvbatch {__version__}\n")
    for command in ([], ["run"], ["generate"], ["plan"], ["inspect"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage: kvbatch" in result.stdout


def test_run_passes_the_loaded_specs_with_command_line_overrides(tmp_path: Path, recorder: Recorder) -> None:
    path = jobs_file(tmp_path)
    result = invoke(
        "run",
        path,
        "--job",
        "second",
        "--set",
        "sampling.top_k=5",
        "--set",
        "sampling.stop=[END]",
        "--model",
        "/m",
        "--device",
        "cpu",
        "--limit",
        "3",
        "--mode",
        "overwrite",
        "--wait",
    )
    assert result.exit_code == 0, result.output
    overrides = {
        "sampling.top_k": 5,
        "sampling.stop": ["END"],
        "model": "/m",
        "engine.device": "cpu",
        "input.limit": 3,
        "output.mode": "overwrite",
    }
    assert recorder.calls == [(load_jobs_file(path, overrides).select(["second"]), True)]
    spec = recorder.calls[0][0][0]
    assert (spec.sampling.temperature, spec.sampling.max_new_tokens, spec.sampling.top_k, spec.sampling.stop) == (
        0.5,
        16,
        5,
        ("END",),
    )
    assert "job second: done -> out/second.arrow" in result.stdout


def test_one_output_path_set_for_the_selected_job_is_no_clash_with_the_others(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--set output.path=x.arrow` reaches every job of the file, and the check that no two jobs write one output ran
    over them all before --job chose: `run -j second` and `plan -j second` were refused (exit 2) for a clash with a
    job that was not to run. Two selected jobs writing one output are still refused."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    path = jobs_file(tmp_path)
    result = invoke("run", path, "-j", "second", "--set", "output.path=x.arrow")
    assert result.exit_code == 0, result.output
    assert [job.name for job in recorder.calls[0][0]] == ["second"]
    monkeypatch.setattr(cli, "EngineCache", lambda: EngineCache(fake_factory()))
    result = invoke("plan", path, "-j", "second", "--set", "output.path=x.arrow")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("job second: 1 row\n")
    for command in ("run", "plan"):
        both = invoke(command, path, "-j", "second", "-j", "first", "--set", "output.path=x.arrow")
        assert both.exit_code == 2
        assert both.stderr == (
            f"kvbatch: error: {path}:6: jobs[1]: jobs 'first' and 'second' both write {tmp_path / 'out' / 'x.arrow'}\n"
        )
    assert len(recorder.calls) == 1


def run_one(recorder: Recorder, path: Path, job: str, setting: str) -> JobSpec:
    """`run PATH -j JOB --set SETTING` as the first call: the one spec it ran."""
    result = invoke("run", path, "-j", job, "--set", setting)
    assert result.exit_code == 0, result.output
    [[spec]] = [specs for specs, *_ in recorder.calls]
    return spec


def test_set_reaches_only_the_jobs_that_run(tmp_path: Path, recorder: Recorder) -> None:
    """`--set` went over every job of the file, --job or not: `run -j gen --set sampling.temperature=0.7` on a file
    that also holds a scoring job (which refuses a temperature) exited 2 for the job that was not to run. It now
    reaches the jobs --job names; run alone, the scoring job is still refused the value. --job selects by the
    names the file gives, so --set may not rename the jobs it selects (without --job it may)."""
    text = "jobs:\n  - name: first\n    input: {path: in.jsonl}\n"
    text += "  - name: second\n    task: score\n    input: {path: in.jsonl}\n"
    path = jobs_file(tmp_path, text)
    first = run_one(recorder, path, "first", "sampling.temperature=0.7")
    assert (first.name, first.sampling.temperature) == ("first", 0.7)
    scored = invoke("run", path, "-j", "second", "--set", "sampling.temperature=0.7")
    assert scored.exit_code == 2
    assert scored.stderr.startswith("kvbatch: error: command line: sampling.temperature: task score generates no")
    named = invoke("run", path, "-j", "first", "--set", "name=other")
    assert named.exit_code == 2
    assert named.stderr == "kvbatch: error: command line: name: cannot rename the jobs --job selects by name\n"
    one = jobs_file(tmp_path, "jobs:\n  - name: first\n    input: {path: in.jsonl}\n")
    assert invoke("run", one, "--set", "name=other").exit_code == 0  # without --job a job may be renamed
    assert [job.name for job in recorder.calls[1][0]] == ["other"]
    assert len(recorder.calls) == 2


def test_set_over_jobs_that_run_is_passed_over_by_those_that_do_not_read_it(tmp_path: Path, recorder: Recorder) -> None:
    """`run --set sampling.temperature=0.7` over a file of a generating and a scoring job exited 2: the scoring job
    refused the temperature, though it was meant for the other, as a value from `defaults:` would be. A job that
    would not read a --set value passes it over, and its spec (its resume) is the one the file gives; a value no
    job that runs reads is refused as before, and so is a value a job reads but cannot honour."""
    text = "defaults:\n  input: {path: in.jsonl}\njobs:\n  - name: gen\n  - name: sc\n    task: score\n"
    path = jobs_file(tmp_path, text)
    assert invoke("run", path, "--set", "sampling.temperature=0.7", "--set", "sampling.seed=3").exit_code == 0
    gen, scored = recorder.calls[0][0]
    assert (gen.sampling.temperature, gen.sampling.seed) == (0.7, 3)
    assert scored == load_jobs_file(path).jobs[1] and spec_hash(scored) == spec_hash(load_jobs_file(path).jobs[1])
    alone = invoke("run", path, "-j", "sc", "--set", "sampling.temperature=0.7")
    assert alone.exit_code == 2
    assert alone.stderr.startswith("kvbatch: error: command line: sampling.temperature: task score generates no")
    honour = invoke("run", path, "--set", "sampling.top_logprobs=2")  # the output settings: refused for the task
    assert honour.exit_code == 2 and "sampling.top_logprobs: task score generates no tokens" in honour.stderr
    assert len(recorder.calls) == 1


def test_set_that_completes_every_job_still_loads_the_jobs_left_out(tmp_path: Path, recorder: Recorder) -> None:
    """A file whose jobs take their input from the command line (`--set input.path=...`) ran one of them with -j;
    once --set reached only the selected jobs, the others were checked without it and the file was refused for
    their missing input (exit 2). A job left out is checked as the file writes it or, where that fails, as --set
    completes it; it fails the file only where neither loads."""
    text = "jobs:\n  - name: gen\n    sampling: {max_new_tokens: 2}\n"
    text += "  - name: scores\n    task: score\n"
    gen = run_one(recorder, jobs_file(tmp_path, text), "gen", "input.path=in.jsonl")
    assert (gen.name, gen.input.path) == ("gen", "in.jsonl")
    typo = jobs_file(tmp_path, text + "    sampling: {max_new_token: 2}\n")
    refused = invoke("run", typo, "-j", "gen", "--set", "input.path=in.jsonl")
    assert refused.exit_code == 2
    assert refused.stderr == (
        f"kvbatch: error: {typo}:6: jobs[1].sampling.max_new_token: unknown field (did you mean 'max_new_tokens'?)\n"
    )
    assert len(recorder.calls) == 1


def test_run_without_options_runs_every_job_as_written(tmp_path: Path, recorder: Recorder) -> None:
    path = jobs_file(tmp_path)
    assert invoke("run", path).exit_code == 0
    assert recorder.calls == [(list(load_jobs_file(path).jobs), False)]


def test_generate_builds_one_job(tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "generate",
        "data/in.parquet",
        "-o",
        "results/my answers.parquet",
        "--model",
        "/m",
        "--template",
        "Q: {q}",
        "--system",
        "S",
        "--no-chat-template",
        "--id-column",
        "id",
        "--keep-column",
        "a",
        "--keep-column",
        "b",
        "--max-new-tokens",
        "9",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--seed",
        "4",
        "--limit",
        "2",
        "--input-format",
        "parquet",
        "--device",
        "cpu",
        "--mode",
        "error",
    )
    assert result.exit_code == 0, result.output
    expected = job_from_dict(
        {
            "name": "my_answers",
            "model": "/m",
            "input": {"path": str(tmp_path / "data" / "in.parquet"), "format": "parquet", "limit": 2},
            "prompt": {"template": "Q: {q}", "system": "S", "chat_template": False},
            "id_column": "id",
            "keep_columns": ["a", "b"],
            "sampling": {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9},
            "output": {"path": "my answers.parquet", "mode": "error"},
            "output_dir": "results",
            # engine.seed: sampling.seed gave every row one stream, so prompts alike drew the same samples
            "engine": {"device": "cpu", "seed": 4},
        },
        base_dir=str(tmp_path),
    )
    assert recorder.calls == [([expected], False)]


def test_generate_defaults(tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert invoke("generate", "in.jsonl", "-o", "out.arrow").exit_code == 0
    expected = job_from_dict(
        {
            "name": "out",
            "input": {"path": str(tmp_path / "in.jsonl")},
            "output": {"path": "out.arrow"},
            "output_dir": ".",
        },
        base_dir=str(tmp_path),
    )
    assert recorder.calls == [([expected], False)]
    # The job is named after the output file, as far as a job name may spell it.
    assert invoke("generate", "in.jsonl", "-o", "-a b.jsonl").exit_code == 0
    assert recorder.calls[-1][0][0].name == "a_b"


def test_generate_names_a_local_input_alike_from_any_folder(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun from another working folder is the same job, so it resumes instead of being refused."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.jsonl").write_text('{"prompt": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    assert invoke("generate", "data/in.jsonl", "-o", "out/a.arrow").exit_code == 0
    monkeypatch.chdir(tmp_path / "data")
    assert invoke("generate", "in.jsonl", "-o", "../out/a.arrow").exit_code == 0
    first, second = (call[0][0] for call in recorder.calls)
    assert first.input.path == second.input.path == str(tmp_path / "data" / "in.jsonl")
    assert spec_hash(first) == spec_hash(second)


def test_generate_names_a_removed_input_as_it_did_before(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun after the input was cleaned up is the same job, so it finds its finished output complete."""
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    assert invoke("generate", "in.jsonl", "-o", "out/a.arrow").exit_code == 0
    (tmp_path / "in.jsonl").unlink()
    assert invoke("generate", "in.jsonl", "-o", "out/a.arrow").exit_code == 0
    assert invoke("generate", "gone", "--input-format", "jsonl", "-o", "out/b.arrow").exit_code == 0
    assert invoke("generate", "user/dataset-2.5", "--input-format", "hf", "-o", "out/c.arrow").exit_code == 0
    first, second, by_format, dataset = (call[0][0] for call in recorder.calls)
    assert first.input.path == second.input.path == str(tmp_path / "in.jsonl")
    assert spec_hash(first) == spec_hash(second)
    assert by_format.input.path == str(tmp_path / "gone")
    assert dataset.input.path == "user/dataset-2.5"  # a dataset name in the local HF cache stays as written


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            JOBS.replace("temperature: 0.5", "temprature: 0.5"),
            "jobs.yaml:8: jobs[1].sampling.temprature: unknown field (did you mean 'temperature'?)",
        ),
        (
            JOBS.replace("{max_new_tokens: 16}", "{max_new_tokens: many}"),
            "jobs.yaml:2: defaults.sampling.max_new_tokens: expected an integer, got str 'many'",
        ),
        (JOBS.replace("input: {path: in.jsonl}\n  - name", "input: {path: in.jsonl\n  - name"), "YAML syntax error"),
    ],
)
def test_bad_configuration_exits_2_naming_field_and_line(
    tmp_path: Path, recorder: Recorder, text: str, message: str
) -> None:
    result = invoke("run", jobs_file(tmp_path, text))
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.startswith("kvbatch: error: ")
    assert recorder.calls == []


def test_bad_command_line_values_exit_2(tmp_path: Path, recorder: Recorder) -> None:
    path = jobs_file(tmp_path)
    for args, message in (
        (["--set", "nonsense"], "--set: expected KEY=VALUE, got 'nonsense'"),
        (["--set", "sampling.temperature=hot"], "command line: sampling.temperature: expected a finite number"),
        (["--job", "third"], "no job named 'third'"),
        (["--mode", "sometimes"], "output.mode: must be one of"),
        (["--device", "gpu"], "command line: engine.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--set", "engine.dtype=float8"], "engine.dtype: must be one of 'auto', 'float32'"),
        (["--set", "sampling={top_k: 1, top_k: 2}"], "--set sampling:1: top_k: duplicate field"),
        (["--set", "sampling=!!python/object:os.system {}"], "unsupported YAML tag"),
        (["--set", "sampling.no_such_field="], "--set: 'sampling.no_such_field=' gives no value"),
        (["--set", "sampling.stop=null"], "command line: sampling.stop: expected a list, got null"),
        (
            ["--set", "sampling=1", "--set", "sampling.n=2"],
            "command line: sampling: is set to 1 and cannot also take n",
        ),
    ):
        result = invoke("run", path, *args)
        assert (result.exit_code, message in result.stderr) == (2, True), (args, result.stderr)
    assert invoke("run", tmp_path / "missing.yaml").exit_code == 2
    assert invoke("generate", "in.jsonl").exit_code == 2  # click's own usage error: no --output
    assert recorder.calls == []


def test_a_set_without_a_value_names_the_option_once(tmp_path: Path, recorder: Recorder) -> None:
    """`--set a=` printed "--set: --set 'a=' gives no value": the option named by the error's field and again by
    its message. It is named once, as every other --set refusal names it."""
    path = jobs_file(tmp_path)
    for item in ("sampling.seed=", "sampling.seed=  "):
        result = invoke("run", path, "--set", item)
        assert (result.exit_code, result.stderr) == (
            2,
            f"kvbatch: error: --set: {item!r} gives no value; leave the field out to keep its default\n",
        )
    assert recorder.calls == []


def test_set_null_sets_the_field_to_null_as_the_job_file_would(tmp_path: Path, recorder: Recorder) -> None:
    """`--set FIELD=null` was refused ("gives no value"), so a seed, system prompt or constraint a job file sets
    could not be taken away from the command line. It is now the value null, as `FIELD: null` in the job is."""
    constrained = "max_new_tokens: 16, seed: 3, structured_outputs: {json: {type: object}}"
    path = jobs_file(tmp_path, JOBS.replace("max_new_tokens: 16", constrained) + "    prompt: {system: Be brief.}\n")
    sets = ["sampling.seed=null", "prompt.system=~", "sampling.structured_outputs=null"]
    result = invoke("run", path, "--job", "second", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    (spec,) = recorder.calls[0][0]
    assert (spec.sampling.seed, spec.prompt.system, spec.sampling.structured_outputs) == (None, None, None)
    (written,) = load_jobs_file(path).select(["second"])
    assert (written.sampling.seed, written.prompt.system) == (3, "Be brief.") and written.sampling.structured_outputs


def test_integers_past_what_the_readers_take_exit_2(tmp_path: Path, recorder: Recorder) -> None:
    path, big = jobs_file(tmp_path), str(10**30)
    for args, message in (
        (["--limit", big], "command line: input.limit: must be <= 9223372036854775807"),
        (["--set", f"input.max_line_bytes={big}"], "command line: input.max_line_bytes: must be <= "),
        (["--set", f"input.batch_rows={big}"], "command line: input.batch_rows: must be <= 9223372036854775807"),
    ):
        result = invoke("run", path, *args)
        assert (result.exit_code, message in result.stderr) == (2, True), (args, result.stderr)
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (JobError("the engine failed", job="a"), 1, "the engine failed"),
        (InterruptedJob("stopped by SIGTERM", job="a"), 3, "stopped by SIGTERM"),
        (OutputLockedError("out/a.arrow is locked by pid 12"), 4, "out/a.arrow is locked by pid 12"),
    ],
)
def test_job_outcomes_become_exit_codes(
    tmp_path: Path, recorder: Recorder, error: Exception, code: int, message: str
) -> None:
    recorder.outcomes = [JobOutcome("ok", Summary("ok", "out/ok.arrow")), JobOutcome("a", error=error)]
    result = invoke("run", jobs_file(tmp_path))
    assert result.exit_code == code
    # The job is named once: an error raised about it leads with "job a: " elsewhere (logs, the Python API).
    ended = "interrupted" if isinstance(error, InterruptedJob) else "failed"  # a stop is no failure: rerun
    assert f"kvbatch: job a {ended}: {message}\n" in result.stderr and "job ok: done" in result.stdout
    assert str(error) == (message if isinstance(error, OutputLockedError) else f"job a: {message}")


def test_interrupt_wins_over_a_failure(tmp_path: Path, recorder: Recorder) -> None:
    recorder.outcomes = [JobOutcome("a", error=JobError("x")), JobOutcome("b", error=InterruptedJob("y"))]
    assert invoke("run", jobs_file(tmp_path)).exit_code == 3


def test_plan_and_inspect_print_their_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    monkeypatch.setattr(cli, "EngineCache", lambda: EngineCache(fake_factory()))
    result = invoke("plan", jobs_file(tmp_path), "--job", "first")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("job first: 2 rows\n") and "will fail       1 row: empty_prompt 1" in result.stdout
    monkeypatch.setattr(
        cli,
        "run_jobs",
        functools.partial(real_run_jobs, engine_factory=fake_factory()),
    )
    assert invoke("run", jobs_file(tmp_path), "--job", "first").exit_code == 0
    output = tmp_path / "out" / "first.arrow"
    result = invoke("inspect", output, "--rows", "1")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"{output}: arrow, 2 rows\n") and "finish reasons: stop 1, error 1" in result.stdout
    every_row = invoke("inspect", output, "--rows", str(10**30))  # more than any output holds: all of them
    assert every_row.exit_code == 0, every_row.output


def test_plan_goes_on_to_the_next_job_after_one_fails_as_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run reports a job that fails and runs the next; the plan stopped at the first and planned none after it
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    monkeypatch.setattr(cli, "EngineCache", lambda: EngineCache(fake_factory()))
    text = JOBS.replace("name: first\n    input: {path: in.jsonl}", "name: first\n    input: {path: gone.jsonl}")
    result = invoke("plan", jobs_file(tmp_path, text))
    assert result.exit_code == 1, result.output
    assert result.stderr == f"kvbatch: error: job first: input not found: {tmp_path / 'gone.jsonl'}\n"
    assert result.stdout.startswith("job second: 1 row\n")


def test_plan_of_a_slurm_array_task_plans_its_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `run` in an array task runs its own shard's rows; `plan` there planned the whole input, and took no --shard.
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    monkeypatch.setattr(cli, "EngineCache", lambda: EngineCache(fake_factory()))
    result = invoke("plan", jobs_file(tmp_path), "--job", "first", "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("job first, shard 1/2: 2 rows\n")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    result = invoke("plan", jobs_file(tmp_path), "--job", "first")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("job first, shard 0/2: 3 rows\n")


def test_each_jobs_summary_is_printed_as_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Slurm or cron log holds the first job's summary while the second runs, not only once every job ended."""
    from kvbatch.jobs import runners

    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    monkeypatch.setattr(cli, "run_jobs", functools.partial(real_run_jobs, engine_factory=fake_factory()))

    def announced(job, *args):
        print(f"starting {job.name}")
        return real_run_job(job, *args)

    real_run_job = runners.run_job
    monkeypatch.setattr(runners, "run_job", announced)
    result = invoke("run", jobs_file(tmp_path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.index("starting first") < out.index("job first: done") < out.index("starting second"), out


def test_a_second_run_on_a_locked_output_exits_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    monkeypatch.setattr(
        cli,
        "run_jobs",
        functools.partial(real_run_jobs, engine_factory=fake_factory()),
    )
    output = tmp_path / "out" / "first.arrow"
    work_dir(output).mkdir(parents=True)
    # flock locks belong to an open file, so a second open in this process conflicts like another process would.
    with OutputLock(work_dir(output) / "lock"):
        result = invoke("run", jobs_file(tmp_path), "--job", "first")
    assert result.exit_code == 4, result.output
    assert (
        f"another kvbatch run (pid {os.getpid()}) is writing this output" in result.stderr and "--wait" in result.stderr
    )
    assert invoke("run", jobs_file(tmp_path), "--job", "first").exit_code == 0  # free again


def test_a_set_value_yaml_reads_as_a_comment_is_its_text(tmp_path: Path, recorder: Recorder) -> None:
    # "# Rules: be brief" alone is a YAML comment: read as YAML it became an empty mapping.
    result = invoke("run", jobs_file(tmp_path), "--set", "prompt.system=# Rules: be brief")
    assert result.exit_code == 0, result.output
    assert {job.prompt.system for job in recorder.calls[0][0]} == {"# Rules: be brief"}


def test_generate_takes_set_under_its_options(tmp_path: Path, recorder: Recorder, monkeypatch) -> None:
    """--set reaches any job field from generate too; an option given explicitly wins over a --set of its field."""
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "generate",
        "in.jsonl",
        "-o",
        "out.arrow",
        "--set",
        "sampling.presence_penalty=0.5",
        "--set",
        'sampling.logit_bias={"7": -100}',
        "--set",
        "sampling_columns=[temperature, seed]",
        "--set",
        "sampling.temperature=0.3",
        "--temperature",
        "0.9",
    )
    assert result.exit_code == 0, result.output
    expected = job_from_dict(
        {
            "name": "out",
            "input": {"path": str(tmp_path / "in.jsonl")},
            "sampling": {"presence_penalty": 0.5, "logit_bias": {"7": -100}, "temperature": 0.9},
            "sampling_columns": ["temperature", "seed"],
            "output": {"path": "out.arrow"},
            "output_dir": ".",
        },
        base_dir=str(tmp_path),
    )
    assert recorder.calls == [([expected], False)]
    assert expected.sampling.logit_bias == ((7, -100.0),)
    bad = invoke("generate", "in.jsonl", "-o", "out.arrow", "--set", "sampling.frequency_penalty=3")
    assert bad.exit_code == 2 and "sampling.frequency_penalty: must be <= 2, got 3" in bad.stderr


def test_per_row_sampling_columns_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate with sampling columns: each row's request carries its own values; a bad one is its error row."""
    monkeypatch.chdir(tmp_path)
    rows = [
        {"prompt": "a", "temperature": 0.5, "settings": {"presence_penalty": 1.0, "logit_bias": {"3": 2}}},
        {"prompt": "b", "temperature": None, "settings": None},
        {"prompt": "c", "temperature": 0.1, "settings": {"min_tokens": -1}},
        {"prompt": "d", "temperature": 0.1, "settings": {"temprature": 1}},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    factory = fake_factory()
    monkeypatch.setattr(
        cli,
        "run_jobs",
        functools.partial(real_run_jobs, engine_factory=factory),
    )
    result = invoke(
        "generate", "in.jsonl", "-o", "out.jsonl", "--set", "sampling_columns=[temperature]",
        "--set", "sampling_column=settings", "--set", "sampling.frequency_penalty=0.25",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    asked = {r.request_id: r.sampling for r in factory.engines[0].requests}
    assert sorted(asked) == [0, 1]
    assert (asked[0].temperature, asked[0].presence_penalty, asked[0].logit_bias) == (0.5, 1.0, ((3, 2.0),))
    assert asked[0].frequency_penalty == asked[1].frequency_penalty == 0.25
    assert (asked[1].temperature, asked[1].presence_penalty) == (0.0, 0.0)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    errors = {r["row"]: (r["error_kind"], r["error"]) for r in out if r["error"]}
    assert errors[2][0] == "bad_request" and "min_tokens must be >= 0, got -1" in errors[2][1]
    assert errors[3][0] == "bad_request" and "'temprature', not a sampling field" in errors[3][1]


def test_generate_set_reaches_every_field_and_the_options_win(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "generate",
        "in.jsonl",
        "-o",
        "out.arrow",
        "--temperature",
        "0.5",
        "--set",
        'sampling.stop=["\\n\\n", END]',  # two newlines: YAML reads escapes in double quotes
        "--set",
        "sampling.n=2",
        "--set",
        "sampling.top_k=40",
        "--set",
        "sampling.logprobs=true",
        "--set",
        "sampling.temperature=0.9",  # --temperature is given: it wins, as in `run`
        "--set",
        "engine.max_num_seqs=8",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    expected = job_from_dict(
        {
            "name": "out",
            "input": {"path": str(tmp_path / "in.jsonl")},
            "sampling": {"stop": ["\n\n", "END"], "n": 2, "top_k": 40, "logprobs": True, "temperature": 0.5},
            "engine": {"max_num_seqs": 8},
            "output": {"path": "out.arrow"},
            "output_dir": ".",
            "progress": "off",
        },
        base_dir=str(tmp_path),
    )
    assert recorder.calls == [([expected], False)]
    bad = invoke("generate", "in.jsonl", "-o", "out.arrow", "--set", "sampling.temprature=1")
    assert bad.exit_code == 2 and "sampling.temprature: unknown field" in bad.stderr


def test_quiet_turns_progress_off_and_verbose_logs_debug(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    for logger in (logging.root, logging.getLogger("kvbatch")):  # put back after the test
        monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(logging.root, "handlers", [])  # let basicConfig configure this run's logging
    assert invoke("run", jobs_file(tmp_path), "--quiet").exit_code == 0
    assert [spec.progress for spec in recorder.calls[0][0]] == ["off", "off"]
    assert logging.root.level == logging.ERROR
    monkeypatch.setattr(logging.root, "handlers", [])
    assert invoke("run", jobs_file(tmp_path), "-v").exit_code == 0
    assert [spec.progress for spec in recorder.calls[1][0]] == ["auto", "auto"]
    assert logging.getLogger("kvbatch").getEffectiveLevel() == logging.DEBUG
    assert invoke("run", jobs_file(tmp_path), "-v", "--quiet").exit_code == 2


def test_a_torchrun_worker_loads_its_share_without_loading_bars(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks > 0 under torchrun load the checkpoint too; their bars would cut through rank 0's progress."""
    from transformers.utils import logging as hf_logging

    from kvbatch.runner.parallel import tensor_parallel

    bars_while_serving: list[bool] = []
    monkeypatch.setattr(
        tensor_parallel, "serve_from_env", lambda: bars_while_serving.append(hf_logging.is_progress_bar_enabled())
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for logger in (logging.root, logging.getLogger("kvbatch")):  # put back after the test
        monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(logging.root, "handlers", [])
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        result = invoke("run", jobs_file(tmp_path), "--tensor-parallel", "2", "-q")
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    assert result.exit_code == 0, result.output
    assert bars_while_serving == [False] and recorder.calls == []  # served rank 0's engine, ran no job itself


def test_datasets_bars_stay_out_of_the_jobs_own_progress(tmp_path: Path, recorder: Recorder, monkeypatch) -> None:
    """A folder of data files is read through `datasets`, whose "Generating train split" bars cut through the
    job's progress, -q too; as transformers' loading bars, they show with -v only. The environment carries the
    setting to data-parallel children and Ray workers."""
    for verbose, want in ((True, None), (False, "1")):
        monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "")
        monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS")  # put back as it was after the test
        for logger in (logging.root, logging.getLogger("kvbatch")):
            monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logging.root, "handlers", [])
        result = invoke("run", jobs_file(tmp_path), *(["-v"] if verbose else ["-q"]))
        assert result.exit_code == 0, result.output
        assert os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") == want


def test_merge_of_an_output_file_refuses_a_job_selection(tmp_path: Path) -> None:
    # An output file names no jobs: `-j` was ignored without a word, as if it had selected one.
    result = invoke("merge", str(tmp_path / "answers.arrow"), "--job", "first")
    assert result.exit_code == 2 and "--job selects jobs of a job file" in result.stderr, result.output


def test_merge_counts_its_inputs_in_words():
    assert cli._count(1, "shard") == "1 shard" and cli._count(1, "part") == "1 part"
    assert cli._count(4, "shard") == "4 shards" and cli._count(0, "part") == "0 parts"


def test_merge_of_a_job_file_merges_the_jobs_it_can(tmp_path: Path) -> None:
    """`kvbatch merge jobs.yaml` stopped at the first job that could not merge (its shards missing or
    unfinished): the jobs after it, their shards all finished, were left unmerged and unnamed. Each job is
    merged or refused now, as `run` goes on after a failed job, and the exit code is the refusal's."""
    from kvbatch.jobs.manifest import Manifest
    from kvbatch.jobs.records import Layout, RowResult
    from kvbatch.jobs.shard import Shard
    from kvbatch.jobs.shard_output import ShardWriter
    from kvbatch.jobs.spec import output_path

    path = jobs_file(tmp_path)
    second = load_jobs_file(path).jobs[1]
    out = output_path(second)
    for shard in (Shard(0, 2), Shard(1, 2)):
        shard_out = shard.output_path(out)
        manifest = Manifest("second", spec_hash(second), {"model": "m"}, shard_out.name, "arrow")
        with ShardWriter(shard_out, "arrow", Layout(), manifest, shard=shard) as writer:
            for row in shard.rows(4):
                writer.add(RowResult(row, texts=[f"t{row}"], finish_reasons=["stop"]))
            writer.finalize(4)
    result = invoke("merge", path)
    assert result.exit_code == 1, result.output
    assert "no shard outputs found beside" in result.stderr and "first.arrow" in result.stderr
    assert result.stdout == f"merged 2 shards -> {out}: 4 rows, {out.stat().st_size} bytes\n"


def test_merge_of_a_job_file_goes_on_when_its_stdout_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvbatch merge jobs.yaml | tee log` whose tee exited: printing the first merge's line raised BrokenPipeError,
    which click turned into exit 1, and the second job's finished shards were left unmerged."""
    from kvbatch.jobs.manifest import Manifest
    from kvbatch.jobs.records import Layout, RowResult
    from kvbatch.jobs.shard import Shard
    from kvbatch.jobs.shard_output import ShardWriter
    from kvbatch.jobs.spec import output_path

    path = jobs_file(tmp_path)
    outputs = []
    for job in load_jobs_file(path).jobs:
        out = output_path(job)
        outputs.append(out)
        for shard in (Shard(0, 2), Shard(1, 2)):
            shard_out = shard.output_path(out)
            manifest = Manifest(job.name, spec_hash(job), {"model": "m"}, shard_out.name, "arrow")
            with ShardWriter(shard_out, "arrow", Layout(), manifest, shard=shard) as writer:
                for row in shard.rows(4):
                    writer.add(RowResult(row, texts=[f"t{row}"], finish_reasons=["stop"]))
                writer.finalize(4)

    def no_reader(message: str, err: bool = False) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli.typer, "echo", no_reader)
    result = invoke("merge", path)
    assert result.exit_code == 0, result.output
    assert [out.exists() for out in outputs] == [True, True]


def test_generate_set_names_the_job_and_refuses_its_input_and_output(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--set name=` named nothing (the name taken from -o won) and `--set output.path=` wrote nowhere: both were
    passed over without a word. The name from -o is a default that --set replaces; INPUT and -o always name the
    input and output, so a --set of them is refused, naming the option that does."""
    monkeypatch.chdir(tmp_path)
    assert invoke("generate", "in.jsonl", "-o", "out.arrow", "--set", "name=labels", "-q").exit_code == 0
    assert recorder.calls[0][0][0].name == "labels"
    assert recorder.calls[0][0][0].output.path == "out.arrow"
    for field, value, words in (
        ("output.path", "x.arrow", "generate writes the file -o names"),
        ("output_dir", "elsewhere", "generate writes the file -o names"),
        ("input.path", "other.jsonl", "generate reads the INPUT it is given"),
        ("output", "{path: x.arrow, format: arrow}", "generate writes the file -o names"),
    ):
        result = invoke("generate", "in.jsonl", "-o", "out.arrow", "--set", f"{field}={value}")
        shown = field if "." in field or field == "output_dir" else f"{field}.path"
        assert result.exit_code == 2 and f"--set {shown}: {words}" in result.stderr, (field, result.stderr)
    assert len(recorder.calls) == 1
    assert invoke("generate", "in.jsonl", "-o", "out.arrow", "--set", "output={part_rows: 7}", "-q").exit_code == 0
    assert recorder.calls[1][0][0].output.part_rows == 7


def test_generate_set_refuses_an_input_or_output_that_is_no_mapping(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--set input=other.jsonl` or `--set output=x.arrow` (a path where the job reads a mapping) was replaced by the
    mapping INPUT and -o build, and passed over without a word: refused, naming the option that gives the path."""
    monkeypatch.chdir(tmp_path)
    for field, value, words in (
        ("input", "other.jsonl", "--set input.path: generate reads the INPUT it is given"),
        ("output", "x.arrow", "--set output.path: generate writes the file -o names"),
        ("output", "null", "--set output.path: generate writes the file -o names"),
    ):
        result = invoke("generate", "in.jsonl", "-o", "out.arrow", "--set", f"{field}={value}")
        assert (result.exit_code, result.stderr) == (2, f"kvbatch: error: {words}\n"), field
    assert recorder.calls == []


def _write_finished_shards(job: JobSpec, count: int = 2, num_rows: int = 4) -> Path:
    """`job`'s finished shard outputs, as `kvbatch run --shard I/N` leaves them; returns the job's output path."""
    from kvbatch.jobs.manifest import Manifest
    from kvbatch.jobs.records import Layout, RowResult
    from kvbatch.jobs.shard import Shard
    from kvbatch.jobs.shard_output import ShardWriter
    from kvbatch.jobs.spec import output_path

    out = output_path(job)
    for index in range(count):
        shard = Shard(index, count)
        shard_out = shard.output_path(out)
        manifest = Manifest(job.name, spec_hash(job), {"model": "m"}, shard_out.name, "arrow")
        with ShardWriter(shard_out, "arrow", Layout(), manifest, shard=shard) as writer:
            for row in shard.rows(num_rows):
                writer.add(RowResult(row, texts=[f"t{row}"], finish_reasons=["stop"]))
            writer.finalize(num_rows)
    return out


def test_merge_run_again_after_the_shards_are_removed_reports_the_output_already_merged(tmp_path: Path) -> None:
    """A cron or Slurm merge step run again once the merged output was complete and the shard files cleaned up
    exited 1 ("no shard outputs found"), as if the merge had failed. A complete output of the same spec is reported
    as already merged (exit 0), as `kvbatch run` reports a complete output; shards missing without one stay an
    error, and so does a complete output another spec wrote."""
    from kvbatch.jobs.shard import Shard

    path = jobs_file(tmp_path, "jobs:\n  - name: first\n    input: {path: in.jsonl}\n")
    out = _write_finished_shards(load_jobs_file(path).jobs[0])
    assert invoke("merge", path).exit_code == 0
    for index in range(2):
        work_dir(Shard(index, 2).output_path(out)).rename(tmp_path / f"gone-{index}")
        Shard(index, 2).output_path(out).unlink()
    for target in (path, out):
        result = invoke("merge", target)
        assert (result.exit_code, result.stdout, result.stderr) == (0, f"already merged -> {out}: 4 rows\n", "")
    path.write_text("jobs:\n  - name: first\n    input: {path: in.jsonl}\n    sampling: {temperature: 0.5}\n")
    result = invoke("merge", path)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"kvbatch: error: no shard outputs found beside {out} (expected first.shard-IIII-of-NNNN.arrow); "
        f"{out} is complete but was written by another job spec\n"
    )
    out.unlink()  # the merged file removed too: nothing is merged
    result = invoke("merge", out)
    assert result.exit_code == 1 and "no shard outputs found beside" in result.stderr


def test_merge_into_a_shards_own_output_exits_2_naming_the_output_meant(tmp_path: Path) -> None:
    """`kvbatch merge out/first.shard-0000-of-0002.arrow` (a shard's own file typed for the target) exited 1, as a
    merge that failed over its shards' rows, where the command line was wrong: exit 2, as any usage mistake, with
    the target meant; nothing is written and the shards are left as they were."""
    from kvbatch.jobs.shard import Shard

    path = jobs_file(tmp_path, "jobs:\n  - name: first\n    input: {path: in.jsonl}\n")
    out = _write_finished_shards(load_jobs_file(path).jobs[0])
    shard = Shard(0, 2).output_path(out)
    before = shard.read_bytes()
    result = invoke("merge", shard)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"kvbatch: error: {shard} is a shard output (shard 0/2), not a merged output; merge its shards into the "
        f"output they make up: kvbatch merge {out}\n"
    )
    assert shard.read_bytes() == before and not out.exists()


def test_merge_of_a_job_file_takes_the_runs_set_options(tmp_path: Path) -> None:
    """Shards run with `--set output_dir=...` were looked for in the job file's own output_dir by `kvbatch merge
    jobs.yaml`, which took no --set: "no shard outputs found". merge takes the run's --set (as a job file is read
    by run), and refuses it with an output file, which it would not change."""
    path = jobs_file(tmp_path, "jobs:\n  - name: first\n    input: {path: in.jsonl}\n")
    elsewhere = tmp_path / "scratch out"
    out = _write_finished_shards(load_jobs_file(path, {"output_dir": str(elsewhere)}).jobs[0])
    assert out.parent == elsewhere
    result = invoke("merge", path, "--set", f"output_dir={elsewhere}")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"merged 2 shards -> {out}: 4 rows, {out.stat().st_size} bytes\n"
    refused = invoke("merge", out, "--set", "output_dir=x")
    assert refused.exit_code == 2 and "--set: --set overrides the jobs of a job file" in refused.stderr, refused.output


def _submitted_merge(tmp_path: Path, run_options: list[str]) -> list[str]:
    """The `kvbatch merge` command line examples/slurm/submit.sh chains after an array run with `run_options`, as
    Slurm's /bin/sh runs its --wrap (sbatch and kvbatch stand-ins record their arguments); the run must get every
    option as given."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    for tool in ("sbatch", "kvbatch"):  # each call's arguments, NUL-separated, one file per call
        (bin_dir / tool).write_text(
            f'#!/bin/sh\nn=$(ls "{calls}" | wc -l)\nprintf "%s\\0" {tool} "$@" > "{calls}/$n"\necho 10$n\n'
        )
        (bin_dir / tool).chmod(0o755)
    script = Path(__file__).parents[1] / "examples" / "slurm" / "submit.sh"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    submitted = subprocess.run(
        ["bash", str(script), "my jobs.yaml", *run_options], env=env, capture_output=True, text=True, check=False
    )
    assert submitted.returncode == 0, submitted.stderr

    def call(n: int) -> list[str]:
        return (calls / str(n)).read_text().split("\0")[:-1]

    array, merge = call(0), call(1)
    assert array[-len(run_options) - 1 :] == ["my jobs.yaml", *run_options]  # the run gets every option as given
    assert merge[merge.index("--dependency=afterok:100") - 1] == "--parsable"
    wrap = merge[merge.index("--wrap") + 1]
    subprocess.run(["sh", "-c", wrap], env=env, check=True)  # as Slurm runs it: /bin/sh
    return call(2)


def test_slurm_submit_gives_the_merge_the_runs_jobs_and_settings(tmp_path: Path) -> None:
    """examples/slurm/submit.sh chained `kvbatch merge ${jobs_file}`: without the run's --job, jobs that never ran
    as shards failed the merge (exit 1); without its --set output_dir=..., the merge looked in the wrong folder;
    and the job file's path went unquoted into --wrap, so a path with a space named two files. The merge gets the
    job file as one word and the run's --job and --set (--model and --limit as the --set they stand for)."""
    run_options = ["--job", "a b", "-j", "x", "--set", "output_dir=/scratch/it's here", "--set=engine.seed=1"]
    run_options += ["--model", "/models/m 1", "--limit=5", "--shard", "1/2", "-q"]
    assert _submitted_merge(tmp_path, run_options) == [
        "kvbatch",
        "merge",
        "my jobs.yaml",
        "--job",
        "a b",
        "-j",
        "x",
        "--set",
        "output_dir=/scratch/it's here",
        "--set=engine.seed=1",
        "--set",
        "model=/models/m 1",
        "--set",
        "input.limit=5",
    ]


def test_slurm_submit_gives_the_merge_every_form_of_the_runs_job_option(tmp_path: Path) -> None:
    """submit.sh passed on `-j NAME`, `--job NAME` and `--job=NAME`, but not `-jNAME`, nor `-j` written after the
    run's flags in one word (`-qj NAME`, `-qjNAME`), which the run's parser takes all the same: the merge then
    merged every job of the file, and failed (exit 1) on the jobs the array never ran. Each form reaches the merge
    as `-j NAME`, with the name the run read."""
    run_options = ["-jfirst", "-qj", "second one", "-vjthird", "-qjjj", "-v", "--shard", "0/2"]
    assert _submitted_merge(tmp_path, run_options) == [
        "kvbatch",
        "merge",
        "my jobs.yaml",
        "-j",
        "first",
        "-j",
        "second one",
        "-j",
        "third",
        "-j",
        "jj",
    ]


def test_inspect_of_an_output_that_does_not_exist_exits_2_as_run_of_a_missing_job_file_does(tmp_path: Path) -> None:
    """`kvbatch inspect nope.arrow` exited 1 (a job failed) where `kvbatch run nope.yaml` exits 2: a path typed on
    the command line that does not exist is a usage error. An output a run has not finished yet is no typo: it
    stays 1, with its advice to rerun the job."""
    result = invoke("inspect", tmp_path / "nope.arrow")
    assert (result.exit_code, result.stderr) == (2, f"kvbatch: error: no such output: {tmp_path / 'nope.arrow'}\n")
    assert invoke("run", tmp_path / "nope.yaml").exit_code == 2
    work_dir(tmp_path / "partial.arrow").mkdir()
    unfinished = invoke("inspect", tmp_path / "partial.arrow")
    assert unfinished.exit_code == 1 and "no such output yet" in unfinished.stderr


def test_plan_sizes_the_adapter_room_of_an_engine_for_every_job_that_shares_it(tmp_path: Path) -> None:
    """`run` sizes a shared engine's adapter slots, and so a CPU pool's room, for the adapters of every job of the
    file on that engine; `kvbatch plan` sized each job's for its own adapters alone: the first job's pool was
    planned larger than the one its run gets."""
    from lora_fixtures import ADAPTER_CONFIGS, save_adapters
    from reliability_helpers import save_tiny_model
    from tiny_models import tiny_model

    from kvbatch.runner.engine import Engine, EngineConfig

    folder = save_tiny_model(tmp_path / "model")
    configs = {name: ADAPTER_CONFIGS[name] for name in ("r2-qv", "r16-all")}
    paths = save_adapters(lambda: tiny_model("llama", 0), tmp_path / "adapters", configs)
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "w3", "a": "r2-qv"}) + "\n")
    settings = {"device": "cpu", "kv_cache_gib": 0.003, "block_size": 8}
    text = f"""\
defaults:
  model: {json.dumps(str(folder))}
  engine: {json.dumps(settings)}
  adapter_column: a
jobs:
  - {{name: small, input: {{path: in.jsonl}}, adapters: {{r2-qv: {json.dumps(paths["r2-qv"])}}}}}
  - {{name: both, input: {{path: in.jsonl}}, adapters: {json.dumps(paths)}}}
"""
    result = invoke("plan", jobs_file(tmp_path, text))
    assert result.exit_code == 0, result.output
    engine = Engine(EngineConfig(model=str(folder), **settings), adapters=paths)  # the one the run shares
    pool = engine.pool_size
    line = f"  KV pool         {pool.num_blocks} blocks of 8 tokens = {pool.num_tokens} tokens; context 512 tokens"
    assert [s for s in result.stdout.splitlines() if s.startswith("  KV pool")] == [line, line]
