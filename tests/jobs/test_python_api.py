"""The examples of docs/python-api.md run as written, with the tiny random Llama standing in for the default
model (its texts are random words: the examples assert only what holds for any model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from scaling_helpers import tiny_engine

import kvbatch
from kvbatch.jobs import generate as generate_module
from kvbatch.jobs.run import EngineCache

DOC = Path(__file__).parents[2] / "docs" / "python-api.md"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tiny_with_chat_template(model: str, settings: dict):
    engine = tiny_engine(model, {"num_blocks_override": 128, **settings})  # not the 2 GiB pool of a real model
    engine.tokenizer.chat_template = CHAT_TEMPLATE  # the word tokenizer has none; the examples use one
    return engine


@pytest.fixture(autouse=True)
def tiny_engines(monkeypatch: pytest.MonkeyPatch) -> EngineCache:
    engines = EngineCache(tiny_with_chat_template)
    monkeypatch.setattr(generate_module, "_ENGINES", engines)
    return engines


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_the_examples_of_the_doc_run_in_order() -> None:
    namespace: dict = {}  # one namespace, as a reader running them one after the other
    blocks = examples()
    assert len(blocks) == 3
    for index, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} example {index + 1}", "exec"), namespace)
    assert namespace["empty"].error.kind == "empty_prompt"


def test_texts_are_in_prompt_order_and_match_a_job_row(tiny_engines: EngineCache) -> None:
    prompts = ["w5 w6 w7", "w9", "w11 w12 w13 w14 w15"]
    texts = kvbatch.generate(prompts, model="tiny", chat_template=False, max_new_tokens=5)
    [engine] = tiny_engines._engines.values()  # one model load for every call
    assert kvbatch.generate(prompts[1:2], model="tiny", chat_template=False, max_new_tokens=5) == texts[1:2]
    assert len(tiny_engines._engines) == 1
    ids = engine.tokenizer.encode(prompts[2])
    [reference] = engine.generate([kvbatch.GenerationRequest(0, ids, kvbatch.SamplingParams(max_new_tokens=5))])
    assert texts[2] == reference.text
