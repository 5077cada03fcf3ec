"""Sampling takes logits in the model's dtype (bf16 on a GPU): greedy steps read them as they are, and whatever
needs arithmetic (log-probabilities, penalties, temperature) works on a float32 copy, so every result equals the
one computed from float32 logits holding the same values."""

import pytest
import torch

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.sampling import SamplingRow, sample_on_device


def _logits(rows: int = 6, vocab: int = 300) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(torch.bfloat16)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie: both take the first maximum
    return logits


def _rows(params: list[SamplingParams]) -> list[SamplingRow]:
    return [SamplingRow(p, seed=100 + i, history=[3, 7, 9, 11], position=2) for i, p in enumerate(params)]


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams()] * 6,  # all greedy: no float32 copy is made
        [SamplingParams(logprobs=True)] * 3 + [SamplingParams()] * 3,
        [
            SamplingParams(temperature=0.8, top_p=0.9),
            SamplingParams(),
            SamplingParams(temperature=1.2, top_k=5),
            SamplingParams(repetition_penalty=1.3),
            SamplingParams(min_p=0.1, temperature=0.7),
            SamplingParams(logprobs=True),
        ],
    ],
    ids=["greedy", "logprobs", "mixed"],
)
def test_bf16_logits_give_the_float32_results(params):
    logits = _logits()
    rows = _rows(params)
    got_tokens, got_logprobs = sample_on_device(logits, rows).to_host()
    as_float = logits.float()
    want_tokens, want_logprobs = sample_on_device(as_float, rows).to_host()
    assert torch.equal(as_float, logits.float())  # the caller's logits (a CUDA graph's output) are never written
    assert got_tokens == want_tokens
    assert got_logprobs == want_logprobs
    if all(p.greedy for p in params):
        assert got_tokens[1] == 7
        assert got_tokens == logits.float().argmax(-1).tolist()


def test_rows_none_is_the_plain_greedy_step():
    """The engine passes rows=None when every row is greedy and wants no log-probability; it must give what the
    rows themselves would have given."""
    logits = _logits()
    assert sample_on_device(logits, None).to_host() == sample_on_device(logits, _rows([SamplingParams()] * 6)).to_host()
