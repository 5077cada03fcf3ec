"""LoRA adapters on the real SmolLM2-135M-Instruct (the embedded default model): four random adapters of different
ranks and base-model rows in one batch give PEFT's greedy tokens, with the prefix cache on and under preemption."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lora_fixtures import ALL_PROJECTIONS, peft_greedy, save_adapters
from transformers import AutoModelForCausalLM

from kvbatch.errors import ErrorKind
from kvbatch.jobs.plan import plan_job
from kvbatch.jobs.run import EngineCache
from kvbatch.jobs.spec import job_from_dict
from kvbatch.runner.default_model import default_model_path
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "What does a compiler do?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
]
CONFIGS = {
    "r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8-rslora": dict(r=8, lora_alpha=8, target_modules=ALL_PROJECTIONS, use_rslora=True),
    "r16-mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r32": dict(r=32, lora_alpha=32, target_modules=ALL_PROJECTIONS),
}
ADAPTERS = [None, *CONFIGS]
MAX_NEW = 12


def smollm2():
    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = save_adapters(smollm2, tmp_path_factory.mktemp("smollm2-adapters"), CONFIGS)
    engine_a = Engine(EngineConfig(model="default", max_num_batched_tokens=512, kv_cache_gib=0.5), adapters=paths)
    tok = engine_a.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS
    ]
    rows = [(p, ADAPTERS[i % len(ADAPTERS)]) for i, p in enumerate(prompts)]
    reference = peft_greedy(
        smollm2().eval(), paths, rows, MAX_NEW, list(engine_a.loaded.eos_token_ids), tok.pad_token_id
    )
    return paths, engine_a, rows, reference


def generate(engine: Engine, rows) -> dict:
    params = SamplingParams(max_new_tokens=MAX_NEW)
    requests = [GenerationRequest(i, prompt, params, adapter=name) for i, (prompt, name) in enumerate(rows)]
    return {r.request_id: r for r in engine.generate(requests)}


@pytest.mark.slow
def test_mixed_adapters_equal_peft_on_smollm2(setup) -> None:
    paths, engine, rows, reference = setup
    results = generate(engine, rows)
    mismatches = [i for i in range(len(rows)) if results[i].completions[0].token_ids != reference[i]]
    assert not mismatches, [(i, rows[i][1]) for i in mismatches]
    # The system prompt of the chat template is cached per adapter. Preempted: blocks of 4 tokens, 24 of them; two
    # rows of ~37 prompt tokens are admitted, and their 12 new tokens each do not fit beside each other.
    assert engine.stats.num_cached_prompt_tokens > 0
    small = Engine(
        EngineConfig(model="default", max_num_batched_tokens=512, block_size=4, num_blocks_override=24),
        engine.loaded,
        adapters=paths,
    )
    results = generate(small, rows)
    assert small.stats.num_preemptions > 0
    mismatches = [i for i in range(len(rows)) if results[i].completions[0].token_ids != reference[i]]
    assert not mismatches, [(i, rows[i][1]) for i in mismatches]


@pytest.mark.slow
def test_adapter_of_another_base_model_is_a_bad_adapter(setup, tmp_path) -> None:
    paths, engine, rows, _ = setup
    folder = tmp_path / "llama-adapter"
    shutil.copytree(paths["r4"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    )
    engine.add_adapter("llama", str(folder))
    (result,) = engine.generate([GenerationRequest(0, rows[0][0], SamplingParams(max_new_tokens=4), adapter="llama")])
    assert result.error_kind == ErrorKind.BAD_ADAPTER and "Llama-3.2-1B" in result.error


@pytest.mark.slow
def test_plan_checks_adapters_against_the_model_without_its_weights(setup, tmp_path) -> None:
    paths, _, _, _ = setup
    folder = tmp_path / "llama-adapter"
    shutil.copytree(paths["r4"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    )
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"prompt": "Hi", "lora": name}) + "\n" for name in ("r4", "llama", "r32"))
    )
    job = job_from_dict(
        {
            "name": "plan",
            "input": {"path": "in.jsonl"},
            "adapters": {"r4": paths["r4"], "r32": paths["r32"], "llama": str(folder)},
            "adapter_column": "lora",
            "engine": {"device": "cpu"},
        },
        base_dir=str(tmp_path),
    )
    plan = plan_job(job, EngineCache())
    assert plan.adapters["r4"] is None and plan.adapters["r32"] is None
    assert "Llama-3.2-1B" in plan.adapters["llama"] and dict(plan.failures) == {"bad_adapter": 1}
