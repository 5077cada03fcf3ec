"""`kvbatch plan` (lengths, pool, rows at once, rows that will fail) and `kvbatch inspect` (what an output holds)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_fakes import FakeEngine, FakeTokenizer, fake_factory

from kvbatch.errors import InputError, SpecError
from kvbatch.jobs.inspect import inspect_output
from kvbatch.jobs.plan import plan_job
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict, load_jobs_file

TOKENIZER = FakeTokenizer()


def chat_tokens(text: str) -> int:
    return len(TOKENIZER.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"))


def write_input(tmp_path: Path) -> list[str]:
    prompts = ["a" * 10, "b" * 20, "c" * 30, "d" * 40]
    lines = [json.dumps({"prompt": p}) for p in prompts] + [
        '{"prompt": ',
        json.dumps({"prompt": "e" * 400}),
        json.dumps({"other": 1}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return prompts


def job(tmp_path: Path, **fields):
    return job_from_dict({"name": "p", "input": {"path": "in.jsonl"}, **fields}, base_dir=str(tmp_path))


def test_plan_reports_lengths_pool_capacity_and_failures(tmp_path: Path) -> None:
    prompts = write_input(tmp_path)
    plan = plan_job(job(tmp_path, sampling={"max_new_tokens": 40}), EngineCache(fake_factory(max_model_len=200)))
    lengths = [chat_tokens(p) for p in prompts]
    assert plan.num_rows == 7
    assert (plan.prompt_tokens["min"], plan.prompt_tokens["max"], plan.prompt_tokens["mean"]) == (
        min(lengths),
        max(lengths),
        sum(lengths) / 4,
    )
    assert (plan.num_blocks, plan.block_size, plan.pool_tokens, plan.max_model_len) == (100, 16, 1600, 200)
    p50 = int(plan.prompt_tokens["p50"])
    assert plan.rows_at_once == 100 // -(-(p50 + 40) // 16)  # blocks per typical row, rounded up
    assert dict(plan.failures) == {"bad_json": 1, "prompt_too_long": 1, "missing_column": 1}
    assert (
        plan.failure_examples[1] == f"row 5 (line 6): the prompt has {chat_tokens('e' * 400)} tokens; "
        "at most 199 fit, leaving room for one new token (the context is 200 tokens)"
    )
    assert plan.truncated == sum(n + 40 > 200 for n in lengths)
    text = plan.format()
    assert text.splitlines()[0] == "job p: 7 rows"
    assert f"min {min(lengths)}," in text and "up to 40 new tokens each" in text
    assert "KV pool         100 blocks of 16 tokens = 1600 tokens; context 200 tokens" in text
    assert "will fail       3 rows: bad_json 1, missing_column 1, prompt_too_long 1" in text
    assert "row 6 (line 7): column 'prompt' is missing" in text


def test_plan_of_rolling_scores_takes_texts_longer_than_the_context(tmp_path: Path) -> None:
    # score_rolling scores a text in windows of the context: the 400-character row fits, and nothing is cut.
    write_input(tmp_path)
    plan = plan_job(job(tmp_path, task="score_rolling"), EngineCache(fake_factory(max_model_len=200)))
    assert dict(plan.failures) == {"bad_json": 1, "missing_column": 1}
    assert plan.prompt_tokens["max"] == 400 and plan.truncated == 0
    assert "scored, nothing generated" in plan.format() and "new tokens each" not in plan.format()


def test_plan_of_scores_fails_the_rows_the_engine_refuses(tmp_path: Path) -> None:
    # A scoring row runs prompt + continuation less its last token: 16 + 1 and 10 + 7 fill a 16-token context and
    # run; 5 + 14 and 10 + 8 are one and two tokens over, as the engine refuses them (one id a character here).
    rows = [("a" * 16, ["b"]), ("a" * 5, ["b" * 14]), ("a" * 10, ["b" * 7, "c"]), ("a" * 10, ["b" * 8])]
    lines = [json.dumps({"prompt": p, "continuations": c}) for p, c in rows]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    spec = job(tmp_path, task="score", prompt={"column": "prompt", "chat_template": False})
    plan = plan_job(spec, EngineCache(fake_factory(max_model_len=16)))
    assert dict(plan.failures) == {"prompt_too_long": 2}
    assert [m.split(":")[0] for m in plan.failure_examples] == ["row 1 (line 2)", "row 3 (line 4)"]


def test_plan_of_rolling_scores_fails_rows_when_the_pool_is_under_the_context(tmp_path: Path) -> None:
    # The windows are the context's (2,000 tokens), never the pool's (1,600): each text row would fail, as in a run.
    write_input(tmp_path)
    plan = plan_job(job(tmp_path, task="score_rolling"), EngineCache(fake_factory(max_model_len=2000)))
    assert dict(plan.failures) == {"bad_json": 1, "missing_column": 1, "prompt_too_long": 5}
    assert any("windows of the context (2000 tokens)" in m for m in plan.failure_examples)


def test_plan_sizes_rows_by_what_each_asks(tmp_path: Path) -> None:
    # A row's own max_new_tokens (a sampling column, an OpenAI body's max_tokens) is what it may generate: the
    # plan read the job's alone, and sized the pool and the truncation check by it.
    rows = [{"prompt": "a" * 10, "s": {"max_new_tokens": n}} for n in (20, 60, 60, 180)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = job(tmp_path, sampling={"max_new_tokens": 8}, sampling_column="s")
    plan = plan_job(spec, EngineCache(fake_factory(max_model_len=200)))
    p50 = int(plan.prompt_tokens["p50"])
    assert plan.max_new_tokens == 200 - p50  # the row of 180, capped where its prompt fills the context
    assert f"up to {200 - p50} new tokens each (max_new_tokens 180, capped by the context)" in plan.format()
    assert plan.rows_at_once == 100 // -(-(p50 + 60) // 16)  # the median row's 60, not the job's 8
    assert plan.truncated == 1  # the row of 180


def test_plan_shows_max_new_tokens_as_the_engine_caps_it(tmp_path: Path) -> None:
    # The engine stops a sample where prompt + output fill the context: a max_new_tokens of 10**9 was printed as
    # "up to 1000000000 new tokens each", which no row can generate.
    prompts = write_input(tmp_path)
    plan = plan_job(job(tmp_path, sampling={"max_new_tokens": 10**9}), EngineCache(fake_factory(max_model_len=200)))
    shortest = min(chat_tokens(p) for p in prompts)
    assert plan.max_new_tokens == 200 - shortest
    assert f"up to {200 - shortest} new tokens each (max_new_tokens 1000000000, capped by the context)" in (
        plan.format()
    )
    assert plan.truncated == 4  # each row that runs asks for more than fits
    asked = plan_job(job(tmp_path, sampling={"max_new_tokens": 40}), EngineCache(fake_factory(max_model_len=200)))
    assert asked.max_new_tokens == 40 and "capped" not in asked.format()  # what every row can generate


def test_plan_predicts_duplicate_ids_and_missing_kept_columns_as_run_does(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i % 2, "prompt": "hello"}) + "\n" for i in range(3)))
    plan = plan_job(job(tmp_path, id_column="id"), EngineCache(fake_factory()))
    assert dict(plan.failures) == {"duplicate_id": 1} and plan.failure_examples == [
        "row 2 (line 3): duplicate id 0 (first at row 0)"
    ]
    pq.write_table(pa.table({"prompt": ["a"], "id": [1]}), tmp_path / "in.parquet")
    with pytest.raises(SpecError, match="column 'nope' not in in.parquet"):  # as `run` refuses it
        plan_job(job(tmp_path, input={"path": "in.parquet"}, keep_columns=["nope"]), EngineCache(fake_factory()))


def test_plan_stops_on_a_prompt_column_no_first_row_has_as_run_does(tmp_path: Path) -> None:
    """A JSONL prompt column that none of the first rows has stops a run before the model loads (a typo); the
    plan listed every row as a missing_column failure and exited 0 instead."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"promt": "hi"}) + "\n" for _ in range(3)))
    spec = job(tmp_path, output_dir="out")
    [outcome] = run_jobs([spec], engine_factory=fake_factory())
    factory = fake_factory()
    with pytest.raises(SpecError) as planned:
        plan_job(spec, EngineCache(factory))
    assert str(planned.value) == str(outcome.error)
    assert "prompt.column: none of the first 3 rows has the column 'prompt'" in str(planned.value)
    assert factory.engines == []  # no model was loaded


def test_plan_fails_a_rows_own_token_ids_outside_the_vocabulary_as_the_engine_does(tmp_path: Path) -> None:
    """The run makes such a row a bad_request error row; the plan said none would fail."""
    vocab = FakeEngine().vocab_size
    rows = [{"prompt": "hi", "stop_token_ids": [5, vocab]}, {"prompt": "hi", "logit_bias": {str(vocab - 1): 1.0}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_job(job(tmp_path, sampling_columns=["stop_token_ids", "logit_bias"]), EngineCache(fake_factory()))
    assert dict(plan.failures) == {"bad_request": 1}
    assert plan.failure_examples == [
        f"row 0 (line 1): stop_token_ids holds token ids outside the vocabulary of {vocab}: [{vocab}]"
    ]


def test_plan_fails_each_row_the_engine_refuses_with_the_runs_own_error(tmp_path: Path) -> None:
    """The plan kept its own copy of the engine's admission rule, short of three refusals: a prompt token the model
    has no row for (a token added to the tokenizer), and allowed_token_ids that bad_words or min_tokens ban whole.
    A run failed those rows as bad_request; the plan said none would fail."""
    from reliability_helpers import save_tiny_model
    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["added"])  # id 512, past the model's 512 embeddings
    tokenizer.save_pretrained(folder)
    rows = [
        {"prompt": "w3 w4"},
        {"prompt": "w3 added"},
        {"prompt": "w3", "allowed_token_ids": [5], "bad_words": ["w5"]},
        {"prompt": "w3", "allowed_token_ids": [1], "min_tokens": 2},  # 1 is EOS, which min_tokens bans
        {"prompt": ""},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = job(
        tmp_path,
        model=str(folder),
        engine={"device": "cpu", "kv_cache_gib": 0.001, "block_size": 8},
        prompt={"chat_template": False},
        sampling={"max_new_tokens": 4},
        sampling_columns=["allowed_token_ids", "bad_words", "min_tokens"],
        output={"path": "out.jsonl"},
    )
    plan = plan_job(spec, EngineCache())
    run_job(spec, EngineCache())
    written = [json.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_text().splitlines()]
    assert plan.failure_examples == [r["error"] for r in written if r["error"]]
    assert dict(plan.failures) == Counter(r["error_kind"] for r in written if r["error_kind"])
    assert dict(plan.failures) == {"bad_request": 3, "empty_prompt": 1}


def test_plan_fails_a_constraint_no_token_may_begin_as_the_run_does(tmp_path: Path) -> None:
    """A word-level vocabulary holds no token for "{": a run fails a json_object row at its first token as
    bad_constraint; the plan compiled the constraint and said the row would run."""
    from reliability_helpers import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    rows = [{"prompt": "w3", "c": {"choice": ["w5"]}}, {"prompt": "w3", "c": {"json_object": True}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = job(
        tmp_path,
        model=str(folder),
        engine={"device": "cpu", "kv_cache_gib": 0.001, "block_size": 8},
        sampling={"max_new_tokens": 4},
        constraint_column="c",
        output={"path": "out.jsonl"},
    )
    plan = plan_job(spec, EngineCache())
    run_job(spec, EngineCache())
    written = [json.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_text().splitlines()]
    expected = "row 1 (line 2): bad constraint (json_object): after 0 tokens ('') it allows no token"
    assert (
        plan.failure_examples
        == [r["error"] for r in written if r["error"]]
        == [f"{expected}: no text completes it from there"]
    )
    assert dict(plan.failures) == {"bad_constraint": 1} and written[1]["error_kind"] == "bad_constraint"


def test_a_jobs_own_constraint_no_token_may_begin_stops_the_job_once(tmp_path: Path) -> None:
    """A job-level json_object over a word-level vocabulary (no token for "{") loads (any tokenizer might begin
    it), then failed every row alike as bad_constraint; the run and its plan now stop once, before any row."""
    from reliability_helpers import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"w{i}"}) + "\n" for i in range(3)))
    spec = job(
        tmp_path,
        model=str(folder),
        engine={"device": "cpu", "kv_cache_gib": 0.001, "block_size": 8},
        sampling={"max_new_tokens": 4, "structured_outputs": {"json_object": True}},
        output={"path": "out.jsonl"},
    )
    message = (
        "sampling.structured_outputs: bad constraint (json_object): after 0 tokens ('') it allows no token: no text "
        "completes it from there; no row under it could run"
    )
    for attempt in (plan_job, run_job):
        with pytest.raises(SpecError) as raised:
            attempt(spec, EngineCache())
        assert str(raised.value) == message and raised.value.exit_code == 2
    assert not (tmp_path / "out" / "out.jsonl").exists()
    # From a job file the refusal names where the constraint was written, as the load's do (it named the field
    # alone): the job's line, the line in `defaults:`, the command line for --set.
    lines = [
        "defaults:",
        f"  model: {json.dumps(str(folder))}",
        "  engine: {device: cpu, kv_cache_gib: 0.001, block_size: 8}",
        "  sampling: {max_new_tokens: 4, structured_outputs: {json_object: true}}",
        "jobs:",
        "  - name: own",
        "    input: {path: in.jsonl}",
        "    sampling: {structured_outputs: {json_object: true}}",
        "  - {name: dflt, input: {path: in.jsonl}}",
        "  - {name: given, input: {path: in.jsonl}, sampling: {structured_outputs: null}}",
    ]
    (tmp_path / "jobs.yaml").write_text("\n".join(lines) + "\n")
    loaded = load_jobs_file(tmp_path / "jobs.yaml", {"sampling.structured_outputs": {"json_object": True}}, ["given"])
    path = tmp_path / "jobs.yaml"
    for spec, where in zip(loaded.jobs, (f"{path}:8", f"{path}:4", "command line")):
        for attempt in (plan_job, run_job):
            with pytest.raises(SpecError) as raised:
                attempt(spec, EngineCache())
            assert str(raised.value) == f"{where}: {message}", spec.name


def test_plan_refuses_an_output_path_the_run_refuses(tmp_path: Path) -> None:
    # The run stopped on it with exit 2 before reading a row; its plan said nothing would fail
    write_input(tmp_path)
    (tmp_path / "out" / "p.arrow").mkdir(parents=True)
    with pytest.raises(SpecError, match=r"output.path 'p.arrow' is a directory") as info:
        plan_job(job(tmp_path, output_dir="out"), EngineCache(fake_factory()))
    assert info.value.field == "output.path"


def test_plan_of_a_clean_input_says_none_will_fail(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    text = plan_job(job(tmp_path), EngineCache(fake_factory())).format()
    assert text.endswith("will fail       none")


def test_plan_on_the_cpu_reads_no_weights_and_matches_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reliability_helpers import save_tiny_model, word_prompts
    from transformers import AutoModelForCausalLM

    from kvbatch.runner import engine as engine_module
    from kvbatch.runner import model_loader
    from kvbatch.runner.engine import Engine, EngineConfig

    folder = save_tiny_model(tmp_path / "model")
    prompts = word_prompts(6) + [" ".join(["w7"] * 600)]  # the last one is longer than the 512-token context
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    settings = {"device": "cpu", "kv_cache_gib": 0.001, "block_size": 8, "max_num_seqs": 5}
    spec = job(tmp_path, model=str(folder), engine=settings, sampling={"max_new_tokens": 30})

    def refuse(*args, **kwargs):
        raise AssertionError("plan loaded the weights")

    with monkeypatch.context() as patched:
        for module in (model_loader, engine_module):
            patched.setattr(module, "load_model", refuse)
        patched.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
        weightless = plan_job(spec, EngineCache())

    engine = Engine(EngineConfig(model=str(folder), **settings))  # what a run builds: its numbers must be the plan's
    with_engine = plan_job(spec, EngineCache(lambda model, settings: engine))
    assert (weightless.num_blocks, weightless.block_size, weightless.max_model_len) == (
        engine.pool_size.num_blocks,
        8,
        512,
    )
    assert weightless == with_engine
    assert (weightless.failures, weightless.max_num_seqs, weightless.prefix_cache) == ({"prompt_too_long": 1}, 5, True)


@pytest.mark.parametrize("backend", ["triton", "flash-attn"])
def test_plan_on_the_cpu_refuses_a_gpu_backend_as_the_run_does(tmp_path: Path, backend: str) -> None:
    # The engine raises BackendUnavailableError; the weightless plan let select_backend's ValueError out, a traceback
    from reliability_helpers import save_tiny_model

    from kvbatch.errors import BackendUnavailableError

    folder = save_tiny_model(tmp_path / "model")
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    spec = job(tmp_path, model=str(folder), engine={"device": "cpu", "attention_backend": backend})
    with pytest.raises(
        BackendUnavailableError, match=f"the {backend} backend needs a CUDA device, the model runs on cpu"
    ):
        plan_job(spec, EngineCache())


def test_inspect_counts_reasons_and_kinds_and_shows_samples(tmp_path: Path) -> None:
    write_input(tmp_path)
    run_job(job(tmp_path), EngineCache(fake_factory(max_model_len=200)))
    report = inspect_output(tmp_path / "out" / "p.arrow", num_samples=2)
    assert (report.format, report.num_rows) == ("arrow", 7)
    assert dict(report.finish_reasons) == {"stop": 4, "error": 3}
    assert dict(report.error_kinds) == {"bad_json": 1, "prompt_too_long": 1, "missing_column": 1}
    assert [s["row"] for s in report.samples] == [0, 1]
    text = report.format_text()
    lines = text.splitlines()
    assert lines[0] == f"{tmp_path / 'out' / 'p.arrow'}: arrow, 7 rows"
    assert "  text: string" in lines and "  finish_reason: string" in lines
    assert "kvbatch.model: default" in lines
    assert "finish reasons: stop 4, error 3" in lines
    assert lines[lines.index("sample rows:") + 1].startswith('  {"row": 0, "text": "echo')


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "JSONL"])  # an extension in any case, as a job takes it
def test_inspect_parquet_and_jsonl(tmp_path: Path, fmt: str) -> None:
    write_input(tmp_path)
    run_job(job(tmp_path, output={"path": f"p.{fmt}"}), EngineCache(fake_factory(max_model_len=200)))
    report = inspect_output(tmp_path / "out" / f"p.{fmt}", num_samples=1)
    fmt = fmt.lower()
    assert (report.format, report.num_rows, report.finish_reasons["error"], len(report.samples)) == (fmt, 7, 3, 1)
    assert report.samples[0]["row"] == 0 and report.samples[0]["text"].startswith("echo")
    assert dict(report.error_kinds) == {"bad_json": 1, "prompt_too_long": 1, "missing_column": 1}
    if fmt == "parquet":
        assert "  finish_reason: string" in report.format_text() and report.metadata["kvbatch.model"] == "default"


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_inspect_shows_nanosecond_values_to_the_nanosecond(tmp_path: Path, fmt: str) -> None:
    # Samples were read with to_pylist: a time64[ns] value lost its nanoseconds (00:02:03.456789), a duration[ns]
    # showed in pandas' form, and without pandas a timestamp[ns] stopped inspect with a traceback.
    table = pa.table(
        {
            "row": pa.array([0], pa.int64()),
            "at": pa.array([123_456_789_012], pa.time64("ns")),
            "when": pa.array([1_700_000_000_123_456_789], pa.timestamp("ns", tz="UTC")),
            "took": pa.array([5], pa.duration("ns")),
            "finish_reason": ["stop"],
        }
    )
    path = tmp_path / f"o.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)
    lines = inspect_output(path, num_samples=1).format_text().splitlines()
    assert lines[lines.index("sample rows:") + 1] == (
        '  {"row": 0, "at": "00:02:03.456789012", "when": "2023-11-14 22:13:20.123456789+00:00", '
        '"took": "0:00:00.000000005", "finish_reason": "stop"}'
    )


def test_inspect_openai_output(tmp_path: Path) -> None:
    request = {"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}]}}
    (tmp_path / "in.jsonl").write_text(json.dumps(request) + "\n" + json.dumps({**request, "custom_id": ""}) + "\n")
    run_job(job(tmp_path, input={"path": "in.jsonl", "format": "openai"}), EngineCache(fake_factory()))
    report = inspect_output(tmp_path / "out" / "p.jsonl")
    assert (report.format, report.num_rows, dict(report.finish_reasons), dict(report.error_kinds)) == (
        "openai",
        2,
        {"stop": 1, "error": 1},
        {"bad_request": 1},
    )


def test_inspect_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such output"):
        inspect_output(tmp_path / "nope.arrow")
    (tmp_path / ".partial.arrow.kvbatch").mkdir()  # a run not finished: its parts, no output yet
    with pytest.raises(InputError, match=r"no such output yet: .*partial.arrow; a run that has not finished keeps"):
        inspect_output(tmp_path / "partial.arrow")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="cannot tell the format of x.csv"):
        inspect_output(tmp_path / "x.csv")
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(InputError, match="cannot read"):
        inspect_output(tmp_path / "bad.arrow")
    for name, content, words in (
        ("list.jsonl", b"[1, 2]\n", "line 1 is not a kvbatch output row"),
        ("foreign.jsonl", b'{"a": 1}\n', "line 1 is not a kvbatch output row"),
        (
            "openai.jsonl",
            b'{"custom_id": "x", "response": null, "error": null}\n',
            "line 1 is not a kvbatch output row",
        ),
        ("latin1.jsonl", b'{"row": "caf\xe9"}\n', "codec can't decode byte 0xe9"),
        # nesting past Python's parser was a RecursionError traceback; a bad line named line 1 whatever its line
        ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1 is not a kvbatch output row"),
        ("cut.jsonl", b'\n{"row": 0\n', "line 2 is not JSON: Expecting ',' delimiter at column 10"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=words):
            inspect_output(tmp_path / name)


def test_inspect_names_a_ray_runs_folder_of_parts(tmp_path: Path) -> None:
    """A finished Ray run's output is its folder of parts: inspect said "no such output yet ... a run that has not
    finished ... (rerun the job to finish it)", and a rerun only says "already complete"; given the folder, it said
    the folder is no datasets save_to_disk folder. Both now name the folder and the merge that writes the file."""
    out = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    parts.mkdir()
    pq.write_table(pa.table({"row": [0], "text": ["a"]}), parts / "part-0000-000000-x.parquet")
    (tmp_path / ".answers.parquet.kvbatch").mkdir()
    said = (
        f"{out} is a Ray run's output: its rows are the Parquet files of {parts}/ (pyarrow and datasets read the "
        f"folder as it is); `kvbatch merge {out}` writes them into {out} once the run is complete"
    )
    for path in (out, parts):
        with pytest.raises(InputError) as refused:
            inspect_output(path)
        assert str(refused.value) == said


def test_plan_counts_each_row_n_times(tmp_path: Path) -> None:
    """With n samples a row holds n sequences: prompt once (shared by the prefix cache) plus n outputs."""
    prompts = write_input(tmp_path)
    one = plan_job(job(tmp_path, sampling={"max_new_tokens": 40}), EngineCache(fake_factory(max_model_len=200)))
    three = plan_job(
        job(tmp_path, sampling={"max_new_tokens": 40, "n": 3}), EngineCache(fake_factory(max_model_len=200))
    )
    p50 = int(three.prompt_tokens["p50"])
    lengths = sorted(chat_tokens(p) for p in prompts)
    assert p50 == int(one.prompt_tokens["p50"]) == (lengths[1] + lengths[2]) // 2
    assert three.samples_per_row == 3
    assert three.rows_at_once == 100 // -(-(p50 + 3 * 40) // 16) < one.rows_at_once
    assert "(p50 prompt + max_new_tokens, 3 samples each)" in three.format()


def test_plan_of_a_shard_plans_the_rows_that_shard_runs(tmp_path: Path) -> None:
    # A Slurm array task's plan tokenized the whole input: its counts and failures were every shard's, not its own.
    lines = [json.dumps({"id": i % 3, "prompt": "x" * (10 + i)}) for i in range(6)] + ['{"prompt": ']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    plan = plan_job(job(tmp_path, id_column="id", parallel={"shard": "1/2"}), EngineCache(fake_factory()))
    assert plan.num_rows == 3  # rows 1, 3, 5
    # rows 3 and 5 repeat ids of shard 0's rows 0 and 2, as the shard's run fails them; row 6 (bad JSON) is shard 0's
    assert dict(plan.failures) == {"duplicate_id": 2}
    assert plan.failure_examples == [
        "row 3 (line 4): duplicate id 0 (first at row 0)",
        "row 5 (line 6): duplicate id 2 (first at row 2)",
    ]
    assert plan.format().splitlines()[0] == "job p, shard 1/2: 3 rows"


def test_plan_on_the_cpu_takes_the_adapters_host_copies_out_of_the_pool_as_the_engine_does(tmp_path: Path) -> None:
    """A CPU engine serving LoRA adapters takes max_cpu_loras host copies of the largest one out of kv_cache_gib;
    the weightless plan sized the whole budget as KV, so it passed a row the run failed as prompt_too_long (208
    tokens planned, 152 in the run) and overstated the rows that fit at once."""
    from lora_fixtures import ADAPTER_CONFIGS, save_adapters
    from reliability_helpers import save_tiny_model
    from tiny_models import tiny_model

    folder = save_tiny_model(tmp_path / "model")
    configs = {"r2-qv": ADAPTER_CONFIGS["r2-qv"]}
    paths = save_adapters(lambda: tiny_model("llama", 0), tmp_path / "adapters", configs)
    rows = [{"prompt": " ".join(["w7"] * n), "a": "r2-qv"} for n in (20, 180)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = job(
        tmp_path,
        model=str(folder),
        engine={"device": "cpu", "kv_cache_gib": 0.0001, "block_size": 8},
        prompt={"chat_template": False},
        sampling={"max_new_tokens": 4},
        adapters=paths,
        adapter_column="a",
        output={"path": "out.jsonl"},
    )
    plan = plan_job(spec, EngineCache())
    engines = EngineCache()
    run_job(spec, engines)
    [engine] = engines._engines.values()
    tokens = engine.pool_size.num_tokens
    written = [json.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_text().splitlines()]
    assert (plan.num_blocks, plan.pool_tokens) == (engine.pool_size.num_blocks, tokens) == (19, 152)
    assert (
        plan.failure_examples
        == [r["error"] for r in written if r["error"]]
        == [
            f"row 1 (line 2): the prompt has 180 tokens; at most {tokens - 1} fit, leaving room for one new token (the "
            f"KV pool holds {tokens} tokens, less than the context's 512)"
        ]
    )


def test_plan_reads_json_values_of_an_arrow_input_as_the_run_does(tmp_path: Path) -> None:
    """A run reads a Parquet or `datasets` column of JSON values (`datasets`' Json feature, here as a message's
    content) as the values they spell; the plan read them as stored, as JSON text: it passed a message whose content
    is the empty string (`""`, two characters as text) and one nested past reading, which the run fails."""
    stored = [
        json.dumps("hello"),
        json.dumps(""),
        json.dumps([{"type": "text", "text": "hi"}]),
        "[" * 3000 + "]" * 3000,
    ]
    text = pa.array([[{"role": "user", "content": c}] for c in stored])
    messages = text.cast(pa.list_(pa.struct([("role", pa.string()), ("content", pa.json_())])))
    pq.write_table(pa.table({"m": messages}), tmp_path / "in.parquet")
    spec = job(tmp_path, input={"path": "in.parquet"}, prompt={"messages_column": "m"}, output={"path": "out.jsonl"})
    plan = plan_job(spec, EngineCache(fake_factory()))
    [outcome] = run_jobs([spec], engine_factory=fake_factory())
    assert outcome.error is None
    written = [json.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_text().splitlines()]
    assert (
        plan.failure_examples
        == [r["error"] for r in written if r["error"]]
        == [
            "row 1: column 'm' has no non-empty message besides the system prompt",
            "row 3: column 'm' holds JSON nested too deeply",
        ]
    )
    assert dict(plan.failures) == {"empty_prompt": 1, "bad_json": 1}
    # The parts' text is "hi", not the JSON text of the parts
    assert (plan.prompt_tokens["min"], plan.prompt_tokens["max"]) == (chat_tokens("hi"), chat_tokens("hello"))
