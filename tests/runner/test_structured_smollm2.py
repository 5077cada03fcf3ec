"""Structured output on the real SmolLM2-135M-Instruct: greedy constrained tokens equal transformers' generate()
with xgrammar's own logits processor, and in a job of over 100 chat rows of five schemas (nested objects, arrays,
enums, number ranges, required fields) plus choices and a regex every row that ends with `stop` is valid: it
validates against its schema (jsonschema), is one of its choices, or full-matches its regex."""

import json
import re
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import AutoModelForCausalLM
from xgrammar.contrib.hf import LogitsProcessor

from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.default_model import default_model_path
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.structured_outputs import StructuredOutputs

SCHEMAS = {
    "contact": {  # a nested object, a string pattern
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "tags": {  # an array with bounds
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
        },
        "required": ["tags"],
    },
    "sentiment": {  # an enum and a bounded number
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["sentiment", "confidence"],
    },
    "film": {  # integer ranges
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["year", "rating"],
    },
    "task": {  # required fields of several types
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "done": {"type": "boolean"},
            "priority": {"enum": [1, 2, 3]},
        },
        "required": ["title", "done", "priority"],
    },
}
QUESTIONS = {
    "contact": "Make up a contact for person {i}: a name and an address (city, zip code), as JSON.",
    "tags": "Give up to three tags for article {i}, about cooking, as JSON.",
    "sentiment": "Classify the sentiment of review {i}: 'I loved it, would buy again'. Answer in JSON.",
    "film": "Invent film {i}: its release year and a rating from 1 to 5, as JSON.",
    "task": "Write todo item {i} as JSON: a title, whether it is done, and a priority from 1 to 3.",
}
CHOICE = StructuredOutputs(choice=("yes", "no"))
DATE = StructuredOutputs(regex=r"\d{4}-\d{2}-\d{2}")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="default", max_num_batched_tokens=2048))


def chat_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def _rows() -> list[dict]:
    rows = []
    names = list(SCHEMAS)
    for i in range(100):
        name = names[i % len(names)]
        rows.append({"id": f"{name}-{i}", "prompt": QUESTIONS[name].format(i=i), "constraint": SCHEMAS[name]})
    for i in range(100, 110):
        rows.append(
            {
                "id": f"choice-{i}",
                "prompt": f"Is {i} an even number? Answer yes or no.",
                "constraint": CHOICE.to_value(),
            }
        )
    for i in range(110, 120):
        rows.append(
            {
                "id": f"date-{i}",
                "prompt": f"Give a date in the year {1900 + i}, as YYYY-MM-DD.",
                "constraint": DATE.to_value(),
            }
        )
    bad = [{"type": "strin"}, {"type": "array", "items": {"type": "string"}, "uniqueItems": True}, {"regex": "(ab"}]
    rows += [{"id": f"bad-{i}", "prompt": "Say hi.", "constraint": c} for i, c in enumerate(bad)]
    return rows


@pytest.mark.slow
def test_a_job_of_schemas_choices_and_regexes_gives_valid_rows(engine: Engine, tmp_path: Path) -> None:
    """120 chat rows, each with its own constraint from a column, and three bad constraints (an invalid schema, an
    unsupported keyword, a regex that does not compile): every row that ends with `stop` is valid, the bad ones are
    `bad_constraint` rows naming the problem, and the job succeeds."""
    rows = _rows()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = job_from_dict(
        {
            "name": "structured",
            "input": {"path": "in.jsonl"},
            "id_column": "id",
            "constraint_column": "constraint",
            "sampling": {"max_new_tokens": 40},
            "output": {"path": "out.jsonl"},
        },
        base_dir=str(tmp_path),
    )
    [outcome] = run_jobs([job], engine_factory=lambda model, settings: engine)
    assert outcome.error is None
    out = [json.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(rows)
    reasons = Counter()
    for row, got in zip(rows, out):
        kind = row["id"].split("-")[0]
        reasons[kind, got["finish_reason"]] += 1
        if kind == "bad" or got["finish_reason"] != "stop":
            continue
        constraint = row["constraint"]
        if "choice" in constraint:
            assert got["text"] in constraint["choice"]
        elif "regex" in constraint:
            assert re.fullmatch(constraint["regex"], got["text"]), got["text"]
        else:
            jsonschema.validate(json.loads(got["text"]), constraint)
    assert [got["error_kind"] for got in out[-3:]] == ["bad_constraint"] * 3
    assert 'Unsupported type "strin"' in out[-3]["error"]
    assert "unsupported JSON Schema keyword 'uniqueItems'" in out[-2]["error"]
    assert "parenthesis is not closed" in out[-1]["error"]
    # Short schemas: nearly every row completes its structure within the limit.
    num_json_stops = sum(v for (kind, reason), v in reasons.items() if kind in SCHEMAS and reason == "stop")
    assert num_json_stops >= 90 and reasons["choice", "stop"] == 10 and reasons["date", "stop"] == 10, reasons
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.slow
def test_parsed_column_holds_each_stopped_rows_json_as_arrow_data(engine: Engine, tmp_path: Path) -> None:
    """output.parsed with a nested schema: the .arrow output opens in `datasets` with a struct column, and each row
    that stopped holds its text's JSON there."""
    import datasets

    rows = [{"prompt": QUESTIONS["contact"].format(i=i)} for i in range(8)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = job_from_dict(
        {
            "name": "contacts",
            "input": {"path": "in.jsonl"},
            "sampling": {"max_new_tokens": 60, "structured_outputs": {"json": SCHEMAS["contact"]}},
            "output": {"path": "out.arrow", "parsed": True},
        },
        base_dir=str(tmp_path),
    )
    [outcome] = run_jobs([job], engine_factory=lambda model, settings: engine)
    assert outcome.error is None
    table = datasets.Dataset.from_file(str(tmp_path / "out" / "out.arrow"))
    assert table.features["parsed"] == {
        "name": datasets.Value("string"),
        "address": {"city": datasets.Value("string"), "zip": datasets.Value("string")},
    }
    stopped = [row for row in table if row["finish_reason"] == "stop"]
    assert len(stopped) >= 6
    for row in stopped:
        assert row["parsed"] == json.loads(row["text"])  # every property is required: nothing is filled with null
    assert all(row["parsed"] is None for row in table if row["finish_reason"] != "stop")


@pytest.mark.slow
def test_greedy_constrained_equals_generate_with_xgrammar_processor(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    cases = [(QUESTIONS[name].format(i=7), StructuredOutputs.from_schema(SCHEMAS[name]), 40) for name in SCHEMAS] + [
        ("Is 7 an even number? Answer yes or no.", CHOICE, 4),
        ("Give a date in 2024, as YYYY-MM-DD.", DATE, 12),
    ]
    requests = [
        GenerationRequest(i, chat_ids(tokenizer, q), SamplingParams(m, structured_outputs=c))
        for i, (q, c, m) in enumerate(cases)
    ]
    got = {r.request_id: r for r in engine.generate(requests)}
    reference = AutoModelForCausalLM.from_pretrained(
        default_model_path(), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    eos = list(engine.loaded.eos_token_ids)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=reference.config.vocab_size, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info)
    for request, (_, constraint, max_new) in zip(requests, cases):
        if constraint.json is not None:
            grammar = compiler.compile_json_schema(constraint.json, any_whitespace=False)
        elif constraint.regex is not None:
            grammar = compiler.compile_regex(constraint.regex)
        else:
            grammar = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in constraint.choice))
        prompt = request.prompt_token_ids
        out = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
            logits_processor=[LogitsProcessor(grammar)],
        )
        want = out[0, len(prompt) :].tolist()
        assert got[request.request_id].completions[0].token_ids == want, (constraint.kind, tokenizer.decode(want))
