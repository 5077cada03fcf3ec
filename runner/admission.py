"""The engine's admission rule: the requests it refuses before they run, each with its error kind and message.

The engine applies it to every request it takes in; `kvbatch plan` applies the same function to the same requests,
so the rows a plan says will fail are the rows a run fails, for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbatch.errors import ErrorKind
from kvbatch.runner.config import SamplingParams

from .logits_processors import row_logits
from .request import GenerationRequest
from .sequence import capacity_tokens


@dataclass(frozen=True)
class AdmissionLimits:
    """What the rule needs of an engine: its context, pool, vocabulary, tokenizer (bad words) and EOS ids."""

    max_model_len: int
    pool_tokens: int
    vocab_size: int
    tokenizer: Any
    eos_token_ids: tuple[int, ...]

    @property
    def capacity_tokens(self) -> int:
        return capacity_tokens(self.max_model_len, self.pool_tokens)


def never_fits(request: GenerationRequest, limits: AdmissionLimits) -> tuple[ErrorKind, str] | None:
    """Why the engine refuses `request` whatever else runs, or None. A LoRA adapter and a structured-output
    constraint are checked apart (the engine's adapters, its grammar compiler)."""
    num_prompt = len(request.prompt_token_ids)
    if num_prompt == 0:
        return ErrorKind.EMPTY_PROMPT, "the prompt is empty (0 tokens)"
    if request.is_scoring and request.sampling.truncate_prompt_tokens is not None:
        # A score is of the text as given: cut, it would be another text's score under the same row.
        return ErrorKind.BAD_REQUEST, "truncate_prompt_tokens applies to generation; a scored text is not cut"
    if request.continuations is not None:
        return _never_scores(request, limits)
    if request.rolling_prefix is not None:  # scored in windows of the context: any length fits
        if limits.pool_tokens < limits.max_model_len:
            # Windows of the pool would make the scores depend on the machine's memory (a resumed or sharded
            # job could mix them), so the windows are the context's, and a pool that cannot hold one refuses.
            return ErrorKind.PROMPT_TOO_LONG, (
                f"a rolling text is scored in windows of the context ({limits.max_model_len} tokens), and the "
                f"KV pool holds {limits.pool_tokens}: set engine.max_model_len to at most "
                f"{limits.pool_tokens}, or give the pool more memory"
            )
        return _outside_vocab(limits.vocab_size, request.prompt_token_ids, [request.rolling_prefix])
    capacity = limits.capacity_tokens
    if num_prompt >= capacity:
        if limits.max_model_len <= limits.pool_tokens:
            limit = f"the context is {limits.max_model_len} tokens"
        else:
            limit = f"the KV pool holds {limits.pool_tokens} tokens, less than the context's {limits.max_model_len}"
        return ErrorKind.PROMPT_TOO_LONG, (
            f"the prompt has {num_prompt} tokens; at most {capacity - 1} fit, leaving room for one new token ({limit})"
        )
    problem = _outside_vocab(limits.vocab_size, request.prompt_token_ids)
    if problem is not None:
        return problem
    outside = request.sampling.token_ids_outside(limits.vocab_size)
    if outside is not None:
        name, ids = outside
        return ErrorKind.BAD_REQUEST, f"{name} holds token ids outside the vocabulary of {limits.vocab_size}: {ids}"
    return _no_token_allowed(request.sampling, limits)


def _no_token_allowed(params: SamplingParams, limits: AdmissionLimits) -> tuple[ErrorKind, str] | None:
    """A row whose allowed_token_ids are all banned (single-token bad words always; EOS and stop token ids
    under min_tokens) would have every logit at -inf: the argmax and the race then pick token 0, which it
    does not allow. Its own settings contradict each other: that row's error, not a silent token."""
    if not params.allowed_token_ids or params.structured_outputs is not None:  # a constraint drops the bans
        return None
    info = row_logits(params, limits.tokenizer, limits.eos_token_ids, limits.vocab_size)
    if info is None:
        return None
    banned = {word[0] for word in info.bad_words_ids if len(word) == 1}
    if set(params.allowed_token_ids) <= banned:
        return ErrorKind.BAD_REQUEST, "bad_words ban every token of allowed_token_ids: no token may be generated"
    if params.min_tokens and set(params.allowed_token_ids) <= banned | set(info.stop_ids):
        return ErrorKind.BAD_REQUEST, (
            f"allowed_token_ids holds only EOS, stop token ids or bad words, which min_tokens "
            f"({params.min_tokens}) bans: no token may be generated before it"
        )
    return None


def _outside_vocab(vocab: int, *parts: list[int]) -> tuple[ErrorKind, str] | None:
    """A request's token ids (non-empty lists) outside the vocabulary, as its error; None if there are none."""
    if min(min(ids) for ids in parts) < 0 or max(max(ids) for ids in parts) >= vocab:  # C passes; the list
        outside = [t for ids in parts for t in ids if not 0 <= t < vocab][:5]  # only for a request with such ids
        return ErrorKind.BAD_REQUEST, f"the prompt holds token ids outside the vocabulary of {vocab}: {outside}"
    return None


def _never_scores(request: GenerationRequest, limits: AdmissionLimits) -> tuple[ErrorKind, str] | None:
    """Why a scoring request cannot run, or None. Its sequences are prompt + continuation less the last
    token (never input), so each may fill the whole context."""
    if not request.continuations or not all(request.continuations):
        return (
            ErrorKind.BAD_REQUEST,
            "a scoring request needs at least one continuation, and no continuation may be empty",
        )
    longest = request.longest_scored_sequence
    capacity = limits.capacity_tokens
    if longest > capacity:
        return ErrorKind.PROMPT_TOO_LONG, (
            f"the prompt has {len(request.prompt_token_ids)} tokens and its longest continuation "
            f"{longest + 1 - len(request.prompt_token_ids)}; at most {capacity + 1} tokens fit "
            f"together (context {limits.max_model_len}, KV pool {limits.pool_tokens})"
        )
    return _outside_vocab(limits.vocab_size, request.prompt_token_ids, *request.continuations)
