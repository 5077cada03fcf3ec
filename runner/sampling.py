"""Choosing the next token of each sampling row, batched.

Order, as in transformers: repetition penalty, then (sampling rows only) temperature, top-k,
top-p, min-p, then a draw. Greedy rows take the argmax of the penalised logits.

The draw is batch-invariant: instead of a stateful generator, each row's noise is a hash of
(seed, output position, token id), so a seeded request samples the same tokens whatever else is
in the batch and however often it was preempted. With uniform noise u, argmax(p / -log u) is an
exact sample from p (the exponential race).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import SamplingParams

_MASK_63 = (1 << 63) - 1


@dataclass
class SamplingRow:
    params: SamplingParams
    seed: int  # per sequence: request seed mixed with the sample index
    history: list[int]  # prompt + output so far, for the repetition penalty
    position: int  # index of the token being drawn within the output


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style finaliser on int64 tensors (multiplication wraps; shifts are masked to be logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] float32 strictly inside (0, 1), a pure function of (seed, position, token id)."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    key = _mix(_mix(seeds * 2654435761 + positions)[:, None] + token[None, :])
    bits = (key >> 40) & ((1 << 24) - 1)  # 24 random bits
    return (bits.float() + 0.5) / float(1 << 24)


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0 or not row.history:
            continue
        ids = torch.tensor(sorted(set(row.history)), device=logits.device)
        values = logits[i, ids]
        logits[i, ids] = torch.where(values > 0, values / penalty, values * penalty)


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on sampling rows; returns probabilities [rows, vocab]."""
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    needs_sort = any(r.params.top_k or r.params.top_p < 1.0 for r in rows)
    if needs_sort:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=device)[None, :]
        top_k = torch.tensor([r.params.top_k or probs.shape[-1] for r in rows], device=device)[:, None]
        top_p = torch.tensor([r.params.top_p for r in rows], device=device)[:, None]
        # Keep a token while the mass before it is under top_p: the most likely token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = (rank < top_k) & (mass_before < top_p)
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs = probs * keep
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)[:, None]
    if bool((min_p > 0).any()):
        probs = torch.where(probs >= min_p * probs.max(dim=-1, keepdim=True).values, probs, 0.0)
    return probs


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[float] | None]:
    """logits: [num_rows, vocab_size] float32. Returns the chosen token ids and, if any row asked,
    their log-probabilities under the unmodified model distribution."""
    logprobs_wanted = any(r.params.logprobs for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if logprobs_wanted else None
    logits = logits.clone()
    _apply_repetition_penalty(logits, rows)
    tokens = logits.argmax(dim=-1)
    sampling = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampling:
        sub_rows = [rows[i] for i in sampling]
        index = torch.tensor(sampling, device=logits.device)
        probs = _filter(logits[index], sub_rows)
        seeds = torch.tensor([r.seed & _MASK_63 for r in sub_rows], device=logits.device)
        positions = torch.tensor([r.position for r in sub_rows], device=logits.device)
        race = probs / -torch.log(uniform_noise(seeds, positions, probs.shape[-1]))
        tokens[index] = race.argmax(dim=-1)
    chosen = tokens.tolist()
    if raw_logprobs is None:
        return chosen, None
    return chosen, raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
