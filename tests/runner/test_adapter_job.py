"""LoRA adapters in a job: the job's `adapters` map, a row's `adapter_column`, the job's `adapter`, an OpenAI Batch
body's `model`; texts equal PEFT's generate with each row's adapter; bad adapters are named error rows and the job
(and the run) ends well; the summary and the output's metadata name the adapters."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from lora_fixtures import ADAPTER_CONFIGS, peft_greedy, save_adapters
from tiny_models import EOS_ID, hf_reference, tiny_loaded, word_tokenizer

from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.merge import merge_shards
from kvbatch.jobs.plan import plan_job
from kvbatch.jobs.run import EngineCache
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict, load_jobs_file
from kvbatch.runner.engine import Engine, EngineConfig

MAX_NEW = 8
CONFIGS = {name: ADAPTER_CONFIGS[name] for name in ("r2-qv", "r16-all")}


def factory(model: str, settings: dict) -> Engine:
    adapters = settings.pop("adapters", None)
    return Engine(EngineConfig(model=model, **settings), tiny_loaded("llama"), adapters=adapters)


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory) -> dict[str, str]:
    return save_adapters(lambda: hf_reference("llama"), tmp_path_factory.mktemp("job-adapters"), CONFIGS)


def make_job(tmp_path: Path, name: str, input_path: str, **fields):
    return job_from_dict(
        {
            "name": name,
            "model": "tiny",
            "input": {"path": input_path},
            "prompt": {"chat_template": False},
            "sampling": {"max_new_tokens": MAX_NEW},
            "engine": {"device": "cpu", "block_size": 4, "num_blocks_override": 128},
            **fields,
        },
        base_dir=str(tmp_path),
    )


def peft_text(paths: dict[str, str], prompt_words: str, adapter: str | None) -> str:
    tok = word_tokenizer()
    ids = tok.encode(prompt_words, add_special_tokens=True, split_special_tokens=True)  # as the job tokenizes
    (tokens,) = peft_greedy(hf_reference("llama"), paths, [(ids, adapter)], MAX_NEW, EOS_ID, 0)
    return tok.decode(tokens, skip_special_tokens=True)


def test_a_job_mixes_adapters_per_row_and_fails_bad_ones_alone(adapter_paths, tmp_path: Path) -> None:
    rng = random.Random(3)
    prompts = [" ".join(f"w{rng.randrange(2, 500)}" for _ in range(rng.randint(3, 12))) for _ in range(6)]
    # adapter_column: a name from `adapters`; null: the job's `adapter` (here a folder); a missing or unknown name
    names = ["r2-qv", None, "r16-all", "broken", "r2-qv", "nope"]
    rows = [{"id": i, "prompt": p, "lora": n} for i, (p, n) in enumerate(zip(prompts, names))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = make_job(
        tmp_path,
        "mixed",
        "in.jsonl",
        id_column="id",
        adapters={"r2-qv": adapter_paths["r2-qv"], "r16-all": adapter_paths["r16-all"], "broken": "no/such"},
        adapter=adapter_paths["r16-all"],
        adapter_column="lora",
    )
    (outcome,) = run_jobs([job], engine_factory=factory)
    assert outcome.error is None  # bad adapters fail rows, not the job: the CLI exits 0
    table = read_arrow(tmp_path / "out" / "mixed.arrow")
    out = {r["id"]: r for r in table.to_pylist()}
    for i in (0, 1, 2, 4):
        adapter = names[i] if names[i] else "r16-all"
        assert out[i]["error"] is None, out[i]["error"]
        assert out[i]["text"] == peft_text(adapter_paths, prompts[i], adapter), f"row {i} ({adapter})"
    for i, name in ((3, "broken"), (5, "nope")):
        assert out[i]["error_kind"] == "bad_adapter" and f"'{name}'" in out[i]["error"], out[i]
    summary = outcome.summary
    assert summary.errors_by_kind == {"bad_adapter": 2}
    assert summary.adapters == {"r2-qv": 2, "r16-all": 1, adapter_paths["r16-all"]: 1, "broken": 1, "nope": 1}
    assert "adapters    " in summary.format()
    metadata = json.loads(table.schema.metadata[b"kvbatch.adapters"])
    assert metadata["r2-qv"] == adapter_paths["r2-qv"] and metadata["broken"].endswith("no/such")


def test_an_openai_batch_body_names_its_adapter_in_model(adapter_paths, tmp_path: Path) -> None:
    lines = [
        {"custom_id": f"c{i}", "body": {"model": model, "messages": [{"role": "user", "content": "w7 w8 w9 w10"}]}}
        for i, model in enumerate(["r2-qv", "gpt-4o-mini", "r16-all"])
    ]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    job = make_job(
        tmp_path, "batch", "batch.jsonl", input={"path": "batch.jsonl", "format": "openai"}, adapters=adapter_paths
    )
    (outcome,) = run_jobs([job], engine_factory=factory)
    assert outcome.error is None and outcome.summary.adapters == {"r16-all": 1, "r2-qv": 1}
    out = [json.loads(line) for line in (tmp_path / "out" / "batch.jsonl").read_text().splitlines()]
    texts = {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in out}
    assert texts["c0"] == peft_text(adapter_paths, "w7 w8 w9 w10", "r2-qv")
    assert texts["c1"] == peft_text(adapter_paths, "w7 w8 w9 w10", None)  # not an adapter's name: the base model
    assert texts["c2"] == peft_text(adapter_paths, "w7 w8 w9 w10", "r16-all")


def test_two_jobs_may_give_one_name_to_two_folders(adapter_paths, tmp_path: Path) -> None:
    # The engine the two jobs share is built for the first; its slots must hold the second's folder too (rank 16
    # on every projection, where the first's is rank 2 on q and v), though both call theirs "tone".
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "w5 w6 w7 w8"}) + "\n")
    jobs = [
        make_job(tmp_path, name, "in.jsonl", adapters={"tone": adapter_paths[folder]}, adapter="tone")
        for name, folder in (("first", "r2-qv"), ("second", "r16-all"))
    ]
    run_jobs(jobs, engine_factory=factory)
    for job, folder in zip(jobs, ("r2-qv", "r16-all")):
        (row,) = read_arrow(tmp_path / "out" / f"{job.name}.arrow").to_pylist()
        assert row["error"] is None, row["error"]
        assert row["text"] == peft_text({"tone": adapter_paths[folder]}, "w5 w6 w7 w8", "tone")


def test_a_row_naming_another_jobs_adapter_is_a_bad_adapter(adapter_paths, tmp_path: Path) -> None:
    # Two jobs on one model share an engine, which registers both jobs' adapters (its slots are sized for all of
    # them when it is built). A row naming the other job's adapter ran on it, though it names none of its own job.
    names = ["mine", "theirs"]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": "w5 w6 w7 w8", "lora": n}) + "\n" for i, n in enumerate(names))
    )
    jobs = [
        make_job(
            tmp_path, name, "in.jsonl", id_column="id", adapters={own: adapter_paths[folder]}, adapter_column="lora"
        )
        for name, own, folder in (("first", "mine", "r2-qv"), ("second", "theirs", "r16-all"))
    ]
    outcomes = run_jobs(jobs, engine_factory=factory)
    for job, outcome, own, folder in zip(jobs, outcomes, names, ("r2-qv", "r16-all")):
        out = {r["id"]: r for r in read_arrow(tmp_path / "out" / f"{job.name}.arrow").to_pylist()}
        mine, other = (0, 1) if own == "mine" else (1, 0)
        assert out[mine]["error"] is None, out[mine]["error"]
        assert out[mine]["text"] == peft_text({own: adapter_paths[folder]}, "w5 w6 w7 w8", own)
        assert out[other]["error_kind"] == "bad_adapter" and f"'{names[other]}'" in out[other]["error"], out[other]
        assert outcome.summary.errors_by_kind == {"bad_adapter": 1}


def test_plan_lists_the_adapters_and_the_rows_they_fail(adapter_paths, tmp_path: Path) -> None:
    rows = [{"prompt": "w5 w6 w7", "lora": name} for name in ("r2-qv", "broken", "nope", None)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = {"r2-qv": adapter_paths["r2-qv"], "broken": "no/such"}
    job = make_job(tmp_path, "plan", "in.jsonl", adapters=adapters, adapter_column="lora")
    plan = plan_job(job, EngineCache(factory))
    assert plan.adapters["r2-qv"] is None and "neither a folder" in plan.adapters["broken"]
    assert dict(plan.failures) == {"bad_adapter": 2}
    assert "adapters        2: r2-qv, broken (1 unusable)" in plan.format()
    assert any("'nope' is not registered" in m for m in plan.failure_examples)


def test_shards_merged_count_the_rows_on_each_adapter_as_one_process(adapter_paths, tmp_path: Path) -> None:
    """The rows on each adapter were kept apart from the run's other counts: `kvbatch merge` and --data-parallel,
    which add up their shards' counts, wrote a summary naming no adapter, and a rerun of a finished output kept the
    earlier run's adapter counts as its own."""
    names = ["r2-qv", None, "r16-all", "r2-qv", "nope"]
    rows = [{"id": i, "prompt": f"w{5 + i} w{9 + i}", "lora": n} for i, n in enumerate(names)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = dict(id_column="id", adapters=adapter_paths, adapter_column="lora")
    (whole,) = run_jobs([make_job(tmp_path, "whole", "in.jsonl", **fields)], engine_factory=factory)
    assert whole.summary.adapters == {"nope": 1, "r16-all": 1, "r2-qv": 2}
    for i in range(2):
        (shard,) = run_jobs(
            [make_job(tmp_path, "sharded", "in.jsonl", parallel={"shard": f"{i}/2"}, **fields)], engine_factory=factory
        )
        assert shard.error is None, shard.error
    merge_shards(tmp_path / "out" / "sharded.arrow")
    merged = json.loads((tmp_path / "out" / "sharded.arrow.summary.json").read_text())
    assert merged["adapters"] == {"nope": 1, "r16-all": 1, "r2-qv": 2}
    (again,) = run_jobs([make_job(tmp_path, "whole", "in.jsonl", **fields)], engine_factory=factory)
    assert again.summary.status == "already complete" and again.summary.adapters == {}


def test_the_summary_shows_a_rows_adapter_name_escaped() -> None:
    """The summary's adapters line names what the rows' adapter column said, unknown names too: an escape sequence
    there (`\x1b[2J` clears the screen) reached the terminal as a command. A name that is not printable is shown
    escaped, as Python writes it."""
    from kvbatch.jobs.summary import Summary

    shown = Summary("j", "out/j.arrow", adapters={"tone": 2, "\x1b[2Jevil": 1}).format()
    assert "\x1b" not in shown
    assert shown.endswith("  adapters    tone 2, '\\x1b[2Jevil' 1")


def test_a_jobs_own_adapter_that_cannot_run_stops_the_job(adapter_paths, tmp_path: Path) -> None:
    """The job's `adapter` is every row's that names none of its own: one that is no name in `adapters`, no folder
    and no cached hub name (a typo), or a folder that is no adapter, made every row a bad_adapter error row and the
    job exited 0. It stops the job once the model is loaded, before any row, naming `adapter`, and its plan too; a
    row's own adapter that cannot run stays that row's error (above)."""
    from kvbatch.errors import SpecError

    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "w5 w6 w7 w8"}) + "\n")
    (tmp_path / "empty").mkdir()
    for adapter, words in (
        ("zzz", "adapter 'zzz': zzz is neither a folder nor a name in the local Hugging Face cache"),
        ("empty", f"adapter '{tmp_path / 'empty'}': {tmp_path / 'empty'} has no adapter_config.json"),
        ("broken", "adapter 'broken': no/such is neither a folder nor a name in the local Hugging Face cache"),
    ):
        adapters = {"broken": "no/such"} if adapter == "broken" else {}  # no row could name another one
        job = make_job(tmp_path, "own", "in.jsonl", adapters=adapters, adapter=adapter)
        (outcome,) = run_jobs([job], engine_factory=factory)
        assert isinstance(outcome.error, SpecError) and outcome.error.field == "adapter", outcome.error
        assert outcome.error.message.startswith(words), outcome.error.message
        assert outcome.error.message.endswith("; no row without an adapter of its own could run")
        assert not (tmp_path / "out" / "own.arrow").exists()
        with pytest.raises(SpecError) as planned:
            plan_job(job, EngineCache(factory))
        assert planned.value.message == outcome.error.message
        assert outcome.error.where is None and planned.value.where is None  # no file to name

    # From a job file, the refusal names where the adapter was written (it named the field alone): the job's line,
    # the line in `defaults:`, the command line for --set; in the run and in its plan.
    lines = [
        "defaults:",
        "  adapter: zzz",
        "  model: tiny",
        "  prompt: {chat_template: false}",
        "  engine: {device: cpu, block_size: 4, num_blocks_override: 128}",
        "jobs:",
        "  - {name: own, input: {path: in.jsonl}, adapter: empty}",
        "  - {name: dflt, input: {path: in.jsonl}}",
    ]
    (tmp_path / "jobs.yaml").write_text("\n".join(lines) + "\n")
    own, dflt = load_jobs_file(tmp_path / "jobs.yaml").jobs
    (given,) = load_jobs_file(tmp_path / "jobs.yaml", {"adapter": "zzz"}, ["own"]).select(["own"])
    for job, where in ((own, f"{tmp_path / 'jobs.yaml'}:7"), (dflt, f"{tmp_path / 'jobs.yaml'}:2"),
                       (given, "command line")):  # fmt: skip
        (outcome,) = run_jobs([job], engine_factory=factory)
        assert isinstance(outcome.error, SpecError), outcome.error
        assert (outcome.error.where, outcome.error.field) == (where, "adapter")
        assert outcome.error.message.endswith("; no row without an adapter of its own could run")
        with pytest.raises(SpecError) as planned:
            plan_job(job, EngineCache(factory))
        assert (planned.value.where, planned.value.message) == (where, outcome.error.message)


def test_a_ray_data_batch_serves_the_adapters_its_rows_name(adapter_paths) -> None:
    """GenerateBatch built its engine from the job's engine settings alone, which serve no adapters: with
    `adapters` and an `adapter_column` every row was a bad_adapter error row. It sizes its engine for the job's
    adapters as a local run does; each row equals PEFT's model, and a row naming no known adapter is its error."""
    from kvbatch.jobs.ray_data import GenerateBatch

    job = {
        "name": "batch",
        "model": "tiny",
        "input": {"path": "-"},
        "prompt": {"chat_template": False},
        "sampling": {"max_new_tokens": MAX_NEW},
        "engine": {"device": "cpu", "block_size": 4, "num_blocks_override": 128},
        "adapters": {"r2-qv": adapter_paths["r2-qv"], "r16-all": adapter_paths["r16-all"]},
        "adapter_column": "lora",
    }
    prompts = ["w5 w6 w7", "w9 w10 w11 w12", "w13 w14", "w20 w21 w22"]
    names = ["r2-qv", "r16-all", None, "nope"]
    out = GenerateBatch(job, engine_factory=factory)({"prompt": prompts, "lora": names}).to_pylist()
    for i in range(3):
        assert out[i]["error"] is None, out[i]["error"]
        assert out[i]["text"] == peft_text(adapter_paths, prompts[i], names[i]), f"row {i} ({names[i]})"
    assert out[3]["error_kind"] == "bad_adapter" and "'nope'" in out[3]["error"], out[3]


def test_a_ray_data_batch_stops_on_its_jobs_adapter_as_a_local_run(tmp_path: Path) -> None:
    """A job's own `adapter` that cannot run raises from each batch (Ray reports an actor's constructor only as
    text), naming `adapter` with a local run's message; without it the batch runs."""
    from kvbatch.errors import SpecError
    from kvbatch.jobs.ray_data import GenerateBatch

    (tmp_path / "empty").mkdir()
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "w5 w6"}) + "\n")
    job = make_job(tmp_path, "own", "in.jsonl", adapter=str(tmp_path / "empty"))
    (outcome,) = run_jobs([job], engine_factory=factory)
    generate = GenerateBatch(job, engine_factory=factory)
    with pytest.raises(SpecError) as refused:
        generate({"prompt": ["w5 w6"]})
    assert isinstance(outcome.error, SpecError)
    assert (refused.value.field, refused.value.message) == ("adapter", outcome.error.message)
    assert refused.value.message.endswith("is not a PEFT adapter; no row without an adapter of its own could run")
    plain = GenerateBatch(dataclasses.replace(job, adapter=None), engine_factory=factory)({"prompt": ["w5 w6"]})
    assert plain.column("error").to_pylist() == [None]
