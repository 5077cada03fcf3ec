"""The real SmolLM2-135M-Instruct: choice scores, prompt logprobs and top logprobs equal float32 log_softmax of
transformers' own logits over prompt + continuation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvbatch.runner.default_model import default_model_path
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest, SamplingParams

TOLERANCE = 1e-4
QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " a city in Europe", " Berlin."]),
    ("Water boils at a temperature of", [" 100 degrees Celsius", " 0 degrees", " zero"]),
    ("Question: How many legs does a spider have?\nAnswer:", [" eight", " six", " 8 legs"]),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="default", max_num_batched_tokens=512))


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32, attn_implementation="sdpa")


def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


@pytest.mark.slow
def test_choice_scores_equal_a_transformers_forward(engine: Engine, reference) -> None:
    tokenizer = engine.tokenizer
    requests = [
        GenerationRequest(i, tokenizer.encode(q), continuations=[tokenizer.encode(c) for c in choices])
        for i, (q, choices) in enumerate(QUESTIONS)
    ]
    results = {r.request_id: r for r in engine.generate(requests)}
    for request in requests:
        for continuation, score in zip(request.continuations, results[request.request_id].scores):
            tokens = request.prompt_token_ids + continuation
            rows = reference_logprobs(reference, tokens)[len(request.prompt_token_ids) - 1 : -1]
            want = rows.gather(1, torch.tensor(continuation)[:, None])[:, 0]
            assert score.token_logprobs == pytest.approx(want.tolist(), abs=TOLERANCE)
            assert score.is_greedy == bool((rows.argmax(dim=-1) == torch.tensor(continuation)).all())


@pytest.mark.slow
def test_prompt_and_top_logprobs_equal_a_transformers_forward(engine: Engine, reference) -> None:
    tokenizer = engine.tokenizer
    params = SamplingParams(max_new_tokens=12, logprobs=True, top_logprobs=20, prompt_logprobs=True)
    prompts = [tokenizer.encode(q) for q, _ in QUESTIONS]
    results = {r.request_id: r for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))}
    for i, prompt in enumerate(prompts):
        completion = results[i].completions[0]
        logprobs = reference_logprobs(reference, prompt + completion.token_ids)
        want_prompt = logprobs[: len(prompt) - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert results[i].prompt_logprobs == pytest.approx([None, *want_prompt.tolist()], abs=TOLERANCE)
        rows = logprobs[len(prompt) - 1 : -1]
        assert completion.logprobs == pytest.approx(
            rows.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0].tolist(), abs=TOLERANCE
        )
        values, ids = rows.topk(20, dim=-1)
        for step, top in enumerate(completion.top_logprobs):
            assert top.logprobs == pytest.approx(values[step].tolist(), abs=TOLERANCE)
            # a near-tie in the tail may swap places between two float32 forwards; the leaders agree
            assert top.token_ids[:5] == ids[step, :5].tolist()
