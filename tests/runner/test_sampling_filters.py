"""Sampling's filters keep the tokens transformers' warpers keep, with the same probabilities.

transformers applies temperature, then top-k, then top-p on what top-k left (renormalised), then min-p; top-k
keeps tokens tied with the k-th. kvbatch's `_filter` must give the distribution those warpers give, since the
draw (an exponential race) samples exactly from it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.sampling import SamplingRow, _filter, sample


def transformers_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = logits[None].clone()
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(torch.zeros(1, 1, dtype=torch.long), scores)
    return torch.softmax(scores, dim=-1)[0]


def kvbatch_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    probs = _filter(logits[None].clone(), [SamplingRow(params, seed=0, history=[], position=0)])[0]
    return probs / probs.sum()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.8]),
    top_k=st.sampled_from([0, 1, 2, 3, 5, 12, 40]),  # 40: more than the vocabulary, which keeps it all
    top_p=st.sampled_from([1.0, 0.95, 0.7, 0.5, 0.2, 0.01, 0.0]),  # 0: the API's, the top token alone
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    ties=st.booleans(),
)
def test_filters_equal_transformers_warpers(seed, temperature, top_k, top_p, min_p, ties) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(16, generator=gen)
    if ties:  # several tokens at the same value, some of them around the k-th: top-k keeps all of them
        logits = (logits * 2).round() / 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    want, got = transformers_probs(logits, params), kvbatch_probs(logits, params)
    if ties:  # which of two equal tokens top-p cuts at its boundary is the sort's choice: compare the values kept
        want, got = want.sort().values, got.sort().values
    assert torch.equal(got > 0, want > 0), (got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_top_p_measures_the_mass_top_k_left() -> None:
    """Probabilities 0.40, 0.31, 0.29 with top_k 2 and top_p 0.55: top-k leaves 0.56 / 0.44 after renormalising,
    so top-p keeps the first token only (measured on the full distribution it would keep two)."""
    logits = torch.tensor([0.40, 0.31, 0.29]).log()
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.55)
    assert (kvbatch_probs(logits, params) > 0).tolist() == [True, False, False]


def test_top_k_alone_keeps_the_tail_of_its_k_tokens() -> None:
    """Found by the property above (seed 36): with top_p 1 and a peaked distribution, the float32 cumulative mass
    reached 1.0 before the last three of the 12 tokens (probabilities 5e-9 to 2e-8), and top-p cut them."""
    logits = 2 * torch.randn(16, generator=torch.Generator().manual_seed(36))
    params = SamplingParams(temperature=0.3, top_k=12)
    assert int((kvbatch_probs(logits, params) > 0).sum()) == int((transformers_probs(logits, params) > 0).sum()) == 12


def test_top_p_cuts_a_full_vocabulary_where_transformers_does() -> None:
    """At a 49k vocabulary and top_p 0.99 the kept set differed from TopPLogitsWarper's by one token in 3 of these
    10 rows (seeds 0, 5 and 7): the mass before each token, summed in float32 from the most likely down, reached
    0.99 with a rounding error larger than the boundary token. transformers (and vLLM) sum from the tail."""
    params = SamplingParams(temperature=0.8, top_p=0.99)
    for seed in range(10):
        logits = 2 * torch.randn(49_152, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(kvbatch_probs(logits, params) > 0, transformers_probs(logits, params) > 0), seed


def test_top_p_0_keeps_the_most_likely_token_alone() -> None:
    """OpenAI's API and transformers' TopPLogitsWarper take top_p 0 (a common way to ask for deterministic output),
    which keeps only the most likely token: at a 49k vocabulary the float32 mass summed from the tail must not pass
    1 before it, which would keep a second token."""
    params = SamplingParams(temperature=1.0, top_p=0.0)
    for seed in range(10):
        logits = 2 * torch.randn(49_152, generator=torch.Generator().manual_seed(seed))
        kept = kvbatch_probs(logits, params) > 0
        assert torch.equal(kept, transformers_probs(logits, params) > 0), seed
        assert kept.nonzero().flatten().tolist() == [int(logits.argmax())], seed


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-45])
def test_a_vanishing_temperature_is_greedy(temperature) -> None:
    """logits / 1e-45 overflows float32 (softmax of an all-inf row is NaN, whose argmax is token 0)."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.5]])
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    tokens, _ = sample(logits, [SamplingRow(params, seed=3, history=[], position=0)])
    assert tokens == [1]


def test_the_race_never_picks_a_removed_token_at_full_vocabulary_size() -> None:
    """top_k 1 must give the argmax in every draw. The noise once reached 1.0 for one value in 2**24, whose
    -log is 0, and a removed token (probability 0) then won as 0 / 0 = NaN: 0.3% of draws at a 49k vocabulary."""
    logits = torch.randn(49_152, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_k=1)
    for start in range(0, 2_000, 250):
        rows = [SamplingRow(params, seed=seed, history=[], position=seed % 7) for seed in range(start, start + 250)]
        tokens, _ = sample(logits.expand(len(rows), -1), rows)
        assert set(tokens) == {int(logits.argmax())}


def test_top_k_over_the_vocabulary_keeps_it_all() -> None:
    logits = torch.randn(16, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_k=100)
    torch.testing.assert_close(kvbatch_probs(logits, params), transformers_probs(logits, params))
