"""The real SmolLM2-135M-Instruct (the embedded default model): greedy output equals generate() on chat prompts."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.default_model import default_model_path
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "What does a compiler do?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "Why is the sky blue?",
    "Suggest a name for a cat.",
    "What is the boiling point of water in Celsius?",
    "Describe a rainbow to a child.",
    "What is machine learning?",
    "Write one sentence about autumn.",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "Give a tip for staying focused.",
    "What is the opposite of cold?",
    "Summarise the plot of Cinderella in one line.",
    "What language is spoken in Brazil?",
]
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="default", max_num_batched_tokens=512))


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


@pytest.mark.slow
def test_greedy_equals_generate_on_chat_prompts(engine: Engine) -> None:
    prompts = [chat_ids(engine.tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    got = {r.request_id: r for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))}
    reference = AutoModelForCausalLM.from_pretrained(
        default_model_path(), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    eos = list(engine.loaded.eos_token_ids)
    mismatches = []
    for i, prompt in enumerate(prompts):
        out = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
        want = out[0, len(prompt) :].tolist()
        if got[i].completions[0].token_ids != want:
            mismatches.append((i, got[i].completions[0].token_ids, want))
    assert not mismatches, mismatches
    assert "Paris" in got[0].text
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.slow
def test_a_stop_string_that_is_a_special_token_stops(engine: Engine) -> None:
    """The text is decoded without special tokens, so `<|im_end|>` is never in it; as a stop string it is
    matched by its token. With EOS ignored the row then stops where the model ends its turn, as with EOS on."""
    prompt = chat_ids(engine.tokenizer, QUESTIONS[0])
    [with_eos] = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))])
    end_of_turn = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert with_eos.finish_reason == "stop" and with_eos.completions[0].token_ids[-1] == end_of_turn
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, stop=("<|im_end|>",))
    [by_stop] = engine.generate([GenerationRequest(1, prompt, params)])
    assert (by_stop.finish_reason, by_stop.completions[0].token_ids, by_stop.text) == (
        "stop",
        with_eos.completions[0].token_ids,
        with_eos.text,
    )
