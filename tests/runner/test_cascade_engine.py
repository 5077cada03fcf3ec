"""The cascade decode wired into the engine: which steps get a shared prefix, and the same greedy tokens as the
torch reference when rows share a cached system prompt (Triton kernels, in the interpreter on the CPU)."""

import dataclasses

import numpy as np
import pytest
import torch
from test_exact_vs_generate import random_prompts
from tiny_models import tiny_loaded

from kvbatch.cache import backends
from kvbatch.runner import engine as engine_module
from kvbatch.runner import model_runner
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_runner import shared_prefix_tokens
from kvbatch.runner.request import GenerationRequest


def test_shared_prefix_is_the_common_leading_pages_leaving_each_decode_its_newest_token() -> None:
    tables = np.array([[7, 8, 9, 4], [7, 8, 9, 5], [7, 8, 2, 6]], dtype=np.int32)
    assert shared_prefix_tokens(tables, np.array([16, 15, 13]), 4) == 8  # blocks 7, 8 shared by all
    assert shared_prefix_tokens(tables[:2], np.array([16, 15]), 4) == 12  # 7, 8, 9
    assert shared_prefix_tokens(tables[:2], np.array([16, 12]), 4) == 8  # block 9 would hold the newest token of row 1
    assert shared_prefix_tokens(tables[:1], np.array([16]), 4) == 0  # one decode: nothing to share
    assert shared_prefix_tokens(np.array([[1, 2], [3, 2]], dtype=np.int32), np.array([8, 8]), 4) == 0


@pytest.fixture(scope="module")
def loaded():
    loaded = tiny_loaded("llama", seed=2)
    if torch.cuda.is_available():  # compiled kernels read the GPU's memory; the CPU runs them interpreted
        loaded = dataclasses.replace(loaded, model=loaded.model.to("cuda"), device=torch.device("cuda"))
    return loaded


def _requests() -> list[GenerationRequest]:
    system = random_prompts(1, 24, 24, seed=6)[0]
    questions = random_prompts(6, 2, 9, seed=7)
    return [
        GenerationRequest(i, system + q, SamplingParams(max_new_tokens=5, ignore_eos=True))
        for i, q in enumerate(questions)
    ]


def test_cascade_in_the_engine_gives_the_reference_tokens(loaded, monkeypatch) -> None:
    reference = Engine.from_loaded(
        loaded, EngineConfig(block_size=4, num_blocks_override=64, attention_backend="torch")
    )
    want = {r.request_id: r.completions[0].token_ids for r in reference.generate(_requests())}

    # The Triton backend on the CPU (interpreted), and a threshold the tiny prompts reach.
    monkeypatch.setattr(engine_module, "select_backend", lambda *args: backends._load("triton"))
    monkeypatch.setattr(engine_module, "CASCADE_MIN_TOKENS", 8)
    shared_lens = []
    real_prepare = model_runner.prepare_inputs

    def spy(*args, **kwargs):
        inputs = real_prepare(*args, **kwargs)
        if inputs.meta.shared_prefix_len is not None:
            shared_lens.append(int(inputs.meta.shared_prefix_len))
        return inputs

    monkeypatch.setattr(engine_module, "prepare_inputs", spy)
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=4, num_blocks_override=64, max_num_batched_tokens=64))
    assert engine.backend.name == "triton" and engine.kv_spec.dtype == torch.float32
    got = {r.request_id: r.completions[0].token_ids for r in engine.generate(_requests())}
    assert got == want
    assert shared_lens and max(shared_lens) >= 24  # the decodes read the 24-token system prompt together
