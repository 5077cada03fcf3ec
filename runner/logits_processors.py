"""vLLM's per-row logits processors: presence and frequency penalties, logit bias, min_tokens, bad words and
allowed token ids, with the names and meanings of vLLM's SamplingParams.

    presence, frequency   logit -= presence * (count > 0) + frequency * count, counting the sample's OUTPUT tokens
    logit_bias            logit[id] += bias
    min_tokens            EOS and stop token ids (EOS alone for a constrained row) masked while fewer than
                          min_tokens tokens were generated
    bad_words             a word's last token masked when the output ends with the word's other tokens
    allowed_token_ids     every other token masked

The logit bias runs first, before the repetition penalty divides or multiplies the biased logit (as transformers'
SequenceBiasLogitsProcessor comes before its RepetitionPenaltyLogitsProcessor, and vLLM adds the bias before its
penalties); the others after it and before temperature and the filters (transformers' order: processors, then
warpers); the masks commute with everything before them. Rows that read their own output (penalties, bad
words) make async scheduling drain first (SamplingParams.reads_output), so their tokens so far are on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .config import SamplingParams


@dataclass(frozen=True)
class RowLogits:
    """What a request's processors need beyond its SamplingParams, worked out once per request."""

    stop_ids: tuple[int, ...]  # EOS and stop token ids: masked before min_tokens
    bad_words_ids: tuple[tuple[int, ...], ...]  # each bad word as token ids (vLLM: with and without a space)


class Row(Protocol):
    """What of a sampling row (sampling.SamplingRow) the processors read."""

    params: SamplingParams
    history: list[int]  # prompt + output so far, for rows that read their output
    position: int  # output tokens so far
    logits_info: RowLogits | None


def row_logits(
    params: SamplingParams, tokenizer: Any, eos_token_ids: tuple[int, ...], vocab_size: int
) -> RowLogits | None:
    if not (params.min_tokens or params.bad_words):
        return None
    # vLLM masks EOS even with ignore_eos. Stop token ids do not stop a constrained row: min_tokens leaves them be.
    stop_token_ids = set(params.stop_token_ids) if params.structured_outputs is None else set()
    stop_ids = tuple(sorted(set(eos_token_ids) | stop_token_ids))
    # A tokenizer may know more tokens than the model writes: a word spelled with one of those needs no ban.
    words = tuple(w for w in bad_words_token_ids(params.bad_words, tokenizer) if max(w) < vocab_size)
    return RowLogits(stop_ids, words)


def bad_words_token_ids(bad_words: tuple[str, ...], tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    """vLLM's rule: each word as written (leading spaces stripped), and again after a space when that gives
    another first token and as many tokens (a word at the start of the text and after a space)."""
    words: list[tuple[int, ...]] = []
    for word in bad_words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not bare:
            continue
        words.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            words.append(spaced)
    return tuple(words)


def apply_logit_bias(logits: torch.Tensor, rows: list[Row]) -> None:
    """Each row's logit_bias added to its logits, in place; before the repetition penalty (see the module doc)."""
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids = _upload([t for t, _ in row.params.logit_bias], torch.int64, logits.device)
            bias = _upload([b for _, b in row.params.logit_bias], torch.float32, logits.device)
            logits[i, ids] += bias


def apply_row_processors(logits: torch.Tensor, rows: list[Row]) -> None:
    """logits: [num_rows, vocab_size] float32, changed in place for the rows whose params ask for it."""
    device = logits.device
    for i, row in enumerate(rows):
        params = row.params
        if not params.changes_logits:
            continue
        output = row.history[len(row.history) - row.position :] if row.position else []
        if (params.presence_penalty or params.frequency_penalty) and output:
            ids = _upload(output, torch.int64, device)
            counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].float()
            logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
        banned = banned_token_ids(params, row.logits_info, output, row.position)
        if banned:
            logits[i, _upload(banned, torch.int64, device)] = float("-inf")
        if params.allowed_token_ids:
            ids = _upload(list(params.allowed_token_ids), torch.int64, device)
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
            allowed[ids] = True
            logits[i].masked_fill_(~allowed, float("-inf"))


def banned_token_ids(params: SamplingParams, info: RowLogits | None, output: list[int], position: int) -> list[int]:
    """The ids min_tokens and bad words mask for the token at output `position`, after `output` (the tokens so
    far where the row has bad words: only those read their output)."""
    if info is None:
        return []
    banned = list(info.stop_ids) if position < params.min_tokens else []
    for word in info.bad_words_ids:
        prefix = len(word) - 1
        if prefix <= len(output) and (prefix == 0 or list(word[:prefix]) == output[-prefix:]):
            banned.append(word[-1])
    return banned


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """From pinned memory, so the copy is queued behind the device's work rather than waited for."""
    host = torch.tensor(values, dtype=dtype)
    return host if device.type != "cuda" else host.pin_memory().to(device, non_blocking=True)
