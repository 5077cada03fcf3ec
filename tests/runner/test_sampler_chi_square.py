"""The sampler's draws follow the distribution transformers' processors and warpers give: a chi-square test.

40,000 seeded draws (seeds 0..39,999, so the test is deterministic) from one fixed 12-token distribution per case
are counted and compared with the probabilities of transformers' repetition penalty, sequence bias and warpers
(temperature, top-k, top-p, min-p), and vLLM's presence and frequency penalties written in numpy. The statistic is
computed here (no scipy) and compared with the chi-square critical value at p = 0.001 for its degrees of freedom.
Each case also checks the test has power: the same draws against the distribution without the case's settings fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sampling_filters import transformers_probs
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.sampling import SamplingRow, sample

NUM_DRAWS = 40_000
VOCAB = 12
# Upper 0.001 quantiles of the chi-square distribution, by degrees of freedom.
CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
                  9: 27.877, 10: 29.588, 11: 31.264}  # fmt: skip
LOGITS = torch.tensor([2.0, 1.6, 1.5, 1.1, 0.9, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5, -2.5])
PROMPT, OUTPUT = [0, 7], [1, 1, 3, 1, 9]  # the row's tokens so far: penalties read them

CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.3, top_k=4),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.15),
    "penalties": dict(temperature=1.0, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3),
    "everything": dict(
        temperature=0.9, top_k=8, top_p=0.9, min_p=0.05, presence_penalty=0.4, frequency_penalty=0.2,
        repetition_penalty=1.2, logit_bias=((11, 2.0), (0, -0.5)),
    ),
}  # fmt: skip


def reference_probs(params: SamplingParams) -> np.ndarray:
    """transformers' processors and warpers (the logit bias before the repetition penalty, as its
    SequenceBiasLogitsProcessor comes first); presence and frequency as vLLM defines them, in numpy."""
    scores = LOGITS[None].clone()
    input_ids = torch.tensor([PROMPT + OUTPUT])
    if params.logit_bias:
        scores = SequenceBiasLogitsProcessor([[[t], b] for t, b in params.logit_bias])(input_ids, scores)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    counts = np.bincount(OUTPUT, minlength=VOCAB)
    scores = scores - torch.from_numpy(
        (params.presence_penalty * (counts > 0) + params.frequency_penalty * counts).astype(np.float32)
    )
    return transformers_probs(scores[0], params).double().numpy()


def chi_square(observed: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    expected = probs * observed.sum()
    kept = expected > 0
    return float((((observed - expected) ** 2)[kept] / expected[kept]).sum()), int(kept.sum()) - 1


@pytest.mark.parametrize("case", list(CASES))
def test_draws_follow_the_transformers_distribution(case: str) -> None:
    params = SamplingParams(**CASES[case])
    rows = [SamplingRow(params, seed=i, history=PROMPT + OUTPUT, position=len(OUTPUT)) for i in range(NUM_DRAWS)]
    tokens, _ = sample(LOGITS[None].expand(NUM_DRAWS, VOCAB).clone(), rows)
    observed = np.bincount(tokens, minlength=VOCAB).astype(np.float64)
    probs = reference_probs(params)
    assert (observed[probs == 0] == 0).all(), f"a filtered-out token was drawn: {observed} vs {probs}"
    statistic, dof = chi_square(observed, probs)
    assert dof >= 1 and statistic < CRITICAL_0_001[dof], f"{case}: chi2 {statistic:.1f} over {dof} dof"
    # The same draws against the distribution without the case's settings (temperature 1 alone) are rejected.
    plain = reference_probs(SamplingParams(temperature=1.0))
    wrong, wrong_dof = chi_square(observed, plain)
    assert wrong > CRITICAL_0_001[wrong_dof], f"{case}: the test cannot tell its distribution from plain sampling"
