"""Whole jobs through the real engine: a tiny random Llama on a small pool, then (once) the real default model
on examples/jobs.yaml, the worked example `make example` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from openai.types.chat import ChatCompletion
from tiny_models import tiny_loaded
from typer.testing import CliRunner

from kvbatch import cli
from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.spec import job_from_dict
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
)
MAX_NEW_TOKENS = 12


def tiny_engine_factory(chat_template: str | None):
    engines: list[Engine] = []

    def factory(model: str, settings: dict) -> Engine:
        loaded = tiny_loaded("llama")
        loaded.tokenizer.chat_template = chat_template
        engine = Engine.from_loaded(loaded, EngineConfig(model=model, **settings))
        engines.append(engine)
        return engine

    factory.engines = engines  # type: ignore[attr-defined]
    return factory


def word_prompts() -> list[str]:
    # Lengths vary so the sort window reorders them; the pool of 24 blocks of 4 tokens cannot hold them all at once.
    # Words w30..w199 only: the tiny tokenizer's unk token is "w2", which would also match the start of "w21".
    return [" ".join(f"w{(7 * i + 3 * j) % 170 + 30}" for j in range(3 + (i * 5) % 17)) for i in range(10)]


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE], ids=["raw", "chat"])
def test_job_texts_equal_the_engines_own_greedy_output(tmp_path: Path, chat_template: str | None) -> None:
    prompts = word_prompts()
    lines = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
    lines.insert(4, {"id": "long", "prompt": " ".join(["w9"] * 120)})  # 120 tokens: more than the 96-token pool
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    engine_fields = {"device": "cpu", "block_size": 4, "num_blocks_override": 24, "max_num_batched_tokens": 32}
    job = job_from_dict(
        {
            "name": "e2e",
            "model": "tiny",
            "input": {"path": "in.jsonl"},
            "id_column": "id",
            "sort_window": 4,
            "prompt": {"chat_template": chat_template is not None},
            "sampling": {"max_new_tokens": MAX_NEW_TOKENS},
            "engine": engine_fields,
        },
        base_dir=str(tmp_path),
    )
    factory = tiny_engine_factory(chat_template)
    summary = run_job(job, EngineCache(factory))
    (engine,) = factory.engines
    got = read_arrow(Path(tmp_path / "out" / "e2e.arrow")).to_pylist()

    assert [r["id"] for r in got] == [x["id"] for x in lines]
    long_row = got.pop(4)
    assert (long_row["finish_reason"], long_row["error_kind"]) == ("error", "prompt_too_long")
    assert "the prompt has" in long_row["error"] and "KV pool" in long_row["error"]

    # The reference: the same engine asked directly, one prompt at a time, with the same token ids.
    tokenizer = engine.tokenizer
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    for i, (row, prompt) in enumerate(zip(got, prompts)):
        if chat_template is None:
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        (direct,) = engine.generate([GenerationRequest(i, ids, params)])
        assert (row["text"], row["finish_reason"], row["prompt_tokens"], row["output_tokens"]) == (
            direct.text,
            direct.finish_reason,
            len(ids),
            direct.num_output_tokens,
        ), f"row {row['id']}"
        assert row["error"] is None
    assert summary.rows == 11 and summary.rows_error == 1 and summary.errors_by_kind == {"prompt_too_long": 1}
    assert summary.output_tokens == sum(r["output_tokens"] for r in got)
    assert 0 < summary.peak_kv_usage <= 1


@pytest.mark.slow
def test_the_worked_example_with_the_default_model(tmp_path: Path) -> None:
    """`kvbatch run examples/jobs.yaml` as `make example` runs it, writing to a temporary folder, with shorter answers
    (16 tokens instead of 48 and 32; the OpenAI requests keep their own max_tokens) to keep CI quick."""
    out = tmp_path / "out"
    args = [
        "run",
        str(REPO / "examples" / "jobs.yaml"),
        "--set",
        f"output_dir={out}",
        "--set",
        "sampling.max_new_tokens=16",
    ]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "job questions: done" in result.stdout and "errors      bad_json 1, empty_prompt 1" in result.stdout

    questions = read_arrow(Path(out / "questions.arrow"))
    source = (REPO / "examples" / "data" / "questions.jsonl").read_text().splitlines()
    assert questions.num_rows == len(source) == 24
    assert questions.column_names == [
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
    rows = questions.to_pylist()
    assert [r["row"] for r in rows] == list(range(24))
    assert [r["id"] for r in rows if r["id"]] == [json.loads(line)["id"] for line in source if line.endswith("}")]
    assert rows[12]["error"].startswith("row 12 (line 13): invalid JSON") and rows[14]["error_kind"] == "empty_prompt"
    assert "paris" in rows[0]["text"].lower()  # greedy: "What is the capital of France?"
    assert all(r["text"] and 0 < r["output_tokens"] <= 16 for r in rows if r["finish_reason"] != "error")
    assert json.loads(questions.schema.metadata[b"kvbatch.job"])["name"] == "questions"
    loaded = datasets.load_dataset(
        "arrow", data_files=str(out / "questions.arrow"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.num_rows == 24 and loaded[0]["id"] == "q01"

    reviews = pq.read_table(out / "reviews.parquet")
    assert reviews.num_rows == 12 and reviews.column("review_id").to_pylist() == list(range(101, 113))
    batch = [json.loads(line) for line in (out / "batch_results.jsonl").read_text().splitlines()]
    assert [b["custom_id"] for b in batch] == ["req-capital", "req-poem", "req-math", "req-advice"]
    for line in batch:
        body = ChatCompletion.model_validate(line["response"]["body"])
        assert body.model == "SmolLM2-135M-Instruct" and body.choices[0].message.content
    summary = json.loads((out / "questions.arrow.summary.json").read_text())
    assert (summary["rows"], summary["rows_error"], summary["errors_by_kind"]) == (
        24,
        2,
        {"bad_json": 1, "empty_prompt": 1},
    )
