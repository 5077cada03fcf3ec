"""Choosing the next token of each sampling row, batched.

Order, as in transformers: logit bias, repetition penalty, vLLM's other processors (logits_processors.py), then
(sampling rows only) temperature, top-k (ties with the k-th kept), top-p (on what top-k left), min-p, then a draw.
Greedy rows (temperature 0, or below 1e-5) take the argmax of the penalised logits.

The draw is batch-invariant: instead of a stateful generator, each row's noise is a hash of
(seed, output position, token id), so a seeded request samples the same tokens whatever else is
in the batch and however often it was preempted. With uniform noise u, argmax(p / -log u) is an
exact sample from p (the exponential race).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import SamplingParams
from .logits_processors import RowLogits, apply_logit_bias, apply_row_processors

_MASK_63 = (1 << 63) - 1


@dataclass
class SamplingRow:
    params: SamplingParams
    seed: int  # per sequence: sequence_seed(request seed, sample index), a signed int64
    history: list[int]  # prompt + output so far, for the repetition penalty
    position: int  # index of the token being drawn within the output
    logits_info: RowLogits | None = None  # bad words' token ids, the ids min_tokens masks


def sequence_seed(request_seed: int, sample_index: int) -> int:
    """The noise seed of a request's sample, a signed int64, from any seed of -2**63..2**64 - 1 (taken modulo
    2**64, as torch takes it: -1 is 2**64 - 1). Its low 63 bits are (seed * 1_000_003 + index) mod 2**63 and its
    sign bit the seed's bit 63: a seed under 2**63 draws what it drew when only those were accepted, and a wider
    one draws apart from it (the multiplier is odd, so no two seeds share a sample's noise)."""
    seed = request_seed % (1 << 64)
    low = (seed * 1_000_003 + sample_index) & _MASK_63
    return low - ((seed >> 63) << 63)


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
    # 23 bits: (bits + 0.5) then needs 24 significant bits, exact in float32. With 24, the top value rounded
    # to 1.0, whose -log is 0, and a filtered-out token (probability 0) won the race as 0 / 0 = NaN.
    bits = (key >> 41) & ((1 << 23) - 1)
    return (bits.float() + 0.5) / float(1 << 23)


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-row parameter tensor, uploaded without waiting for the device: from pageable memory a
    copy would wait for every queued kernel, undoing the overlap of async scheduling."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0 or not row.history:
            continue
        ids = _on_device(sorted(set(row.history)), torch.int64, logits.device)
        values = logits[i, ids]
        logits[i, ids] = torch.where(values > 0, values / penalty, values * penalty)


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on sampling rows; returns probabilities [rows, vocab]."""
    device = logits.device
    temperature = _on_device([r.params.temperature for r in rows], torch.float32, device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    needs_sort = any(r.params.top_k or r.params.top_p < 1.0 for r in rows)
    if needs_sort:
        sorted_probs, order = probs.sort(dim=-1)  # least likely first, as transformers and vLLM sort
        vocab = probs.shape[-1]  # a top_k over the vocabulary keeps it all, as in transformers
        top_k = _on_device([min(r.params.top_k or vocab, vocab) for r in rows], torch.int64, device)[:, None]
        # 1 - top_p taken in float64, then rounded, as transformers compares with it (top_p 1: every token whose
        # probability is not 0 stays, as a sum from the tail is over 0 at once).
        tail_mass = _on_device([1.0 - r.params.top_p for r in rows], torch.float32, device)[:, None]
        # Top-k keeps every token as likely as the k-th (ties with it too, as transformers does); top-p then
        # measures its mass on what top-k left, renormalised, and drops the least likely tokens while their mass
        # summed from the tail stays within 1 - top_p. Summed from the most likely down instead, the float32
        # rounding of a mass near 0.99 moved the cut by a token in 1 of 20 rows of a 49k vocabulary at top_p 0.99.
        keep_sorted = sorted_probs >= sorted_probs.gather(1, vocab - top_k)
        left = sorted_probs * keep_sorted
        left = left / left.sum(dim=-1, keepdim=True)
        keep_sorted &= left.cumsum(dim=-1) > tail_mass
        keep_sorted[:, -1] = True  # the most likely token always stays
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs = probs * keep
    if any(r.params.min_p > 0 for r in rows):
        min_p = _on_device([r.params.min_p for r in rows], torch.float32, device)[:, None]
        probs = torch.where(probs >= min_p * probs.max(dim=-1, keepdim=True).values, probs, 0.0)
    return probs


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # torch's host cache reuses these
    return host.copy_(tensor, non_blocking=True)


@dataclass
class SampledTokens:
    """A step's chosen tokens, on the device, and their way to the host.

    `start_download` queues the copy to pinned host memory behind the step's kernels and returns at once;
    `to_host` waits for it. Between the two the host is free to plan and launch the next step.
    """

    tokens: torch.Tensor  # [num_rows] int64
    logprobs: torch.Tensor | None  # [num_rows] float32, when a row asked for them
    # The most likely tokens of each row, most likely first, when a row asked for top_logprobs:
    # ([num_rows, k] int64 ids, [num_rows, k] float32 log-probabilities), k the most any row asked for.
    top: tuple[torch.Tensor, torch.Tensor] | None = None
    _host: tuple[torch.Tensor, torch.Tensor | None] | None = None
    _ready: torch.cuda.Event | None = None

    def start_download(self) -> SampledTokens:
        if self.tokens.device.type == "cuda":
            # Into pinned memory the copy is queued behind the step; into pageable memory it would be waited for.
            logprobs = _pinned_copy(self.logprobs) if self.logprobs is not None else None
            self._host = (_pinned_copy(self.tokens), logprobs)
            if self.top is not None:
                self.top = (_pinned_copy(self.top[0]), _pinned_copy(self.top[1]))
            self._ready = torch.cuda.Event()
            self._ready.record()
        return self

    def to_host(self) -> tuple[list[int], list[float] | None]:
        tokens, logprobs = self.tokens, self.logprobs
        if self._ready is not None and self._host is not None:
            self._ready.synchronize()
            tokens, logprobs = self._host
        return tokens.tolist(), logprobs.tolist() if logprobs is not None else None

    def top_to_host(self) -> tuple[list[list[int]], list[list[float]]] | None:
        """The top tokens per row (after `to_host`, which waited for the step)."""
        if self.top is None:
            return None
        return self.top[0].tolist(), self.top[1].tolist()


def _bans_tokens(row: SamplingRow) -> bool:
    """Whether a row's settings may set logits to -inf (and so leave no token its constraint allows)."""
    params, info = row.params, row.logits_info
    return bool(params.min_tokens or params.allowed_token_ids or (info is not None and info.bad_words_ids))


def sample_on_device(
    logits: torch.Tensor, rows: list[SamplingRow] | None, mask: Callable[[torch.Tensor], None] | None = None
) -> SampledTokens:
    """logits: [num_rows, vocab_size] in the model's dtype. The chosen token ids and, if any row asked, their
    log-probabilities (and the top_logprobs most likely tokens) under the unmodified model distribution; nothing
    waits for the device. rows=None: every row is greedy and wants no log-probability (the caller knew without
    building the rows). `mask` (structured output) sets disallowed logits of a float32 copy to -inf, after the
    log-probabilities are taken.

    An all-greedy step takes the argmax of the logits as they come (a float32 copy would hold the same values,
    so the same tokens): at 512 rows of a 128k vocabulary the copy alone cost 0.2 ms of a 5.6 ms decode step.
    Log-probabilities, penalties and sampling work in float32."""
    if rows is None and mask is None:
        return SampledTokens(logits.argmax(dim=-1), None)
    logprobs_wanted = rows is not None and any(r.params.wants_logprobs for r in rows)
    num_top = max(r.params.top_logprobs for r in rows) if rows is not None else 0
    penalised = rows is not None and any(r.params.changes_logits for r in rows)
    sampling = [i for i, r in enumerate(rows) if not r.params.greedy] if rows is not None else []
    if penalised or mask is not None:  # one float32 copy, written into below: the caller's logits stay as they are
        logits = logits.to(torch.float32, copy=True)
    elif logprobs_wanted or sampling:
        logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if logprobs_wanted else None
    before_bans = None
    if penalised:
        apply_logit_bias(logits, rows)
        _apply_repetition_penalty(logits, rows)
        if mask is not None and any(_bans_tokens(r) for r in rows):
            before_bans = logits.clone()
        apply_row_processors(logits, rows)
    if mask is not None:
        mask(logits)
        if before_bans is not None:
            # A row's bans (min_tokens, allowed_token_ids, bad words) may leave none of the tokens its constraint
            # allows: a complete structure allows only EOS, which min_tokens bans. The row then drops its bans for
            # this token and the constraint decides, as it does over stop strings and ignore_eos.
            mask(before_bans)
            logits = torch.where(torch.isneginf(logits).all(dim=-1, keepdim=True), before_bans, logits)
    tokens = logits.argmax(dim=-1)
    if sampling:
        sub_rows = [rows[i] for i in sampling]
        index = _on_device(sampling, torch.int64, logits.device)
        probs = _filter(logits[index], sub_rows)
        seeds = _on_device([r.seed for r in sub_rows], torch.int64, logits.device)
        positions = _on_device([r.position for r in sub_rows], torch.int64, logits.device)
        race = probs / -torch.log(uniform_noise(seeds, positions, probs.shape[-1]))
        race = torch.where(probs > 0, race, -1.0)  # a removed token never wins, whatever the noise
        tokens[index] = race.argmax(dim=-1)
    chosen_logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0] if raw_logprobs is not None else None
    top = None
    if num_top:
        top = top_tokens(raw_logprobs, min(num_top, raw_logprobs.shape[-1]))
    return SampledTokens(tokens, chosen_logprobs, top)


def top_tokens(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs: [num_rows, vocab_size] float32 -> ([num_rows, k] int64 ids, [num_rows, k] float32 values): each
    row's k most likely tokens, most likely first, and of equal ones the lower id first, as argmax picks (a greedy
    token leads its row). torch.topk leaves ties in any order, at the k-th place too; no host sync here."""
    kth = logprobs.topk(k, dim=-1).values[:, -1:]  # [num_rows, 1]
    vocab_size = logprobs.shape[-1]
    descending_ids = torch.arange(vocab_size, 0, -1, dtype=torch.int32, device=logprobs.device)
    # every token above the k-th value (fewer than k of them), then the lowest ids of those at it
    key = torch.where(logprobs == kth, descending_ids, 0)  # [num_rows, vocab_size] int32
    key.masked_fill_(logprobs > kth, vocab_size + 1)
    ids = key.topk(k, dim=-1).indices.sort(dim=-1).values
    values = logprobs.gather(1, ids)
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return ids.gather(1, order), values.gather(1, order)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[float] | None]:
    """`sample_on_device`, then wait for the tokens on the host."""
    return sample_on_device(logits, rows).to_host()
