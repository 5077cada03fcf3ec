"""When a sequence is done, and what its text is.

A sequence stops on an EOS or stop token id (kept in token_ids; in the text only if it is not a special
token, as the text is decoded without special tokens), on a stop string (the text is cut before it; a stop
string that is a special token is matched by its id), or at its token limit. Stop strings are looked for in the
decoded tail only, so the check costs the same at token 10 and token 10,000.
"""

from __future__ import annotations

import functools

from .request import FinishReason
from .sequence import Sequence


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        # The added tokens the text is decoded without (`<|im_start|>`): a stop string that is one is never found in
        # the text, so it is matched by its id. Worked out once per tokenizer: a cache keyed by each row's stop
        # strings grew with every distinct list a job's rows gave, for the engine's life.
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
        self._hidden_ids = {
            text: token_id
            for text, token_id in added.items()
            if not tokenizer.decode([token_id], skip_special_tokens=True)
        }

    def check(self, seq: Sequence) -> FinishReason | None:
        params = seq.request.sampling
        last = seq.output_token_ids[-1]
        if len(seq.output_token_ids) < params.min_tokens:  # nothing but the limit stops a sample this short
            return "length" if len(seq.output_token_ids) >= seq.max_new_tokens else None
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return "stop"
        # A stop string must end after the first min_tokens tokens (vLLM's rule), as EOS comes after them at the
        # earliest: one in the min_tokens-th token is too early, even where min_tokens lets EOS stop the sample.
        if params.stop and len(seq.output_token_ids) > params.min_tokens:
            if last in self._stop_strings_as_ids(params.stop) or self._stop_string_found(seq):
                return "stop"
        if len(seq.output_token_ids) >= seq.max_new_tokens:
            return "length"
        return None

    def _stop_strings_as_ids(self, stop: tuple[str, ...]) -> frozenset[int]:
        """The ids of stop strings that are special tokens (`<|im_start|>`): the text is decoded without them,
        so the string would never be found in it; such a stop is matched by its token instead."""
        return frozenset(self._hidden_ids[s] for s in stop if s in self._hidden_ids)

    def _stop_string_found(self, seq: Sequence) -> bool:
        longest = max(len(s) for s in seq.request.sampling.stop)
        # A token carries at least one byte and a character at most four, so this many tokens cover any stop
        # string that ends in the newest token; special tokens carry none in the text, so they are not counted.
        need = 4 * longest + 4
        tokens = seq.output_token_ids
        start = max(len(tokens) - need, 0)
        if not self._special_ids.isdisjoint(tokens[start:]):  # rare (ignore_eos runs on past end-of-turn tokens)
            start, num_text_tokens = len(tokens), 0
            while start > 0 and num_text_tokens < need:
                start -= 1
                num_text_tokens += tokens[start] not in self._special_ids
        text = self.tokenizer.decode(tokens[start:], skip_special_tokens=True)
        min_tokens = seq.request.sampling.min_tokens
        offset = self._settled(tokens[start:min_tokens], text) if min_tokens > start else 0
        # A tail that begins inside a character decodes its last bytes as U+FFFD. A stop string that ends in the
        # newest token begins after the tail's first four tokens (the four spare above): the characters they
        # finish are passed over.
        first = self._settled(tokens[start : start + 4], text) if start and text.startswith("\ufffd") else 0
        done = _finished(text)
        return any(done.find(s, max(offset - len(s) + 1, first)) >= 0 for s in seq.request.sampling.stop)

    def stop_reason(self, seq: Sequence) -> str | int | None:
        """What stopped a finished sequence: the stop string (the one the text is cut before), or a stop token id
        of `sampling.stop_token_ids`; None for the model's EOS and for every reason but "stop". A constrained row
        stopped where its grammar ended: stop strings, stop token ids and ignore_eos do not apply to it."""
        params = seq.request.sampling
        if seq.finish_reason != "stop" or not seq.output_token_ids or seq.matcher is not None:
            return None
        last = seq.output_token_ids[-1]
        if last in params.stop_token_ids:
            return last
        if not params.ignore_eos and last in self.eos_token_ids:
            return None
        if params.stop and last in self._stop_strings_as_ids(params.stop):
            # a stop string that is a special token: matched by its id
            return next(s for s in params.stop if self._hidden_ids.get(s) == last)
        cut = self._first_stop(seq, self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True))
        return cut[1] if cut else None

    def text(self, seq: Sequence) -> str:
        params = seq.request.sampling
        if seq.matcher is not None:  # a constrained row never stops on a stop string: its text is whole
            # Its `stop` is the end-of-sequence token the complete grammar accepted: no text of the structure, even
            # where it is no special token (a generation config's EOS that decodes to text).
            stopped = seq.finish_reason == "stop"
            return self._continued_text(seq.output_token_ids[:-1] if stopped else seq.output_token_ids)
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if not params.stop:
            return text
        cut = self._first_stop(seq, text)
        if cut is None:
            return text
        found, stop = cut
        return text[: found + len(stop) if params.include_stop_str_in_output else found]

    @functools.cached_property
    def _lead(self) -> tuple[int, str] | None:
        # Found when a constrained row's text is first wanted, not at start-up: a benchmark's ids-only tokenizer
        # does not encode.
        return _lead_token(self.tokenizer)

    def _continued_text(self, token_ids: list[int]) -> str:
        """The text of `token_ids` as they follow text before them. SentencePiece decoders (Llama 2's, Mistral's)
        drop the space a decoded text begins with, taking it for the mark of the text's start: a constrained row's
        grammar matched that space (the choice " yes", a regex that begins with one), and its text lost it."""
        if self._lead is None:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        lead, lead_text = self._lead
        return self.tokenizer.decode([lead, *token_ids], skip_special_tokens=True)[len(lead_text) :]

    def _settled(self, first: list[int], text: str) -> int:
        """How many characters of `text` (decoded from `first` and the tokens after) the tokens `first` complete. A
        character they leave unfinished (the first bytes of an emoji) decodes as U+FFFD at their end, and ends in a
        later token: counted, a stop string that is that character was looked for past it and missed."""
        settled = self.tokenizer.decode(first, skip_special_tokens=True)
        end = len(settled)
        while end and settled[end - 1] == "\ufffd" and text[end - 1 : end] != "\ufffd":
            end -= 1
        return end

    def _first_stop(self, seq: Sequence, text: str) -> tuple[int, str] | None:
        """The earliest stop string in the sequence's `text` and where it starts (of two starting there, the first
        the request lists, as vLLM checks them in order); None if there is none. Under
        min_tokens, only one that ends after the first min_tokens tokens' text counts, as in `check`: one before did
        not stop the sample, so it neither cuts the text nor is its stop reason."""
        params = seq.request.sampling
        offset = self._settled(seq.output_token_ids[: params.min_tokens], text) if params.min_tokens else 0
        done = _finished(text)  # as `check` read it: a stop string in an unfinished character did not stop it
        found = ((done.find(s, max(offset - len(s) + 1, 0)), s) for s in params.stop)
        cuts = [(i, s) for i, s in found if i >= 0]
        return min(cuts, key=lambda cut: cut[0]) if cuts else None


def _finished(text: str) -> str:
    """`text` less the U+FFFD it ends with: the bytes of a character whose last bytes may be yet to come decode as
    U+FFFD, so a stop string is not looked for in them (vLLM's detokenizer holds such a text back). Bytes that stay
    broken are read once a later token decodes after them."""
    return text.rstrip("\ufffd")


def _lead_token(tokenizer) -> tuple[int, str] | None:
    """A token to decode a text after (StopChecker._continued_text), and its own text: one whose text does not
    begin or end with a space, and that decodes twice in a row as its text twice, so the tokenizer puts nothing
    between tokens (a word-level one joins them with spaces) and changes neither side. None where none is found."""
    for probe in ("a", "x", "0"):
        ids = tokenizer.encode(probe, add_special_tokens=False)
        if not ids:
            continue
        text = tokenizer.decode(ids[-1:], skip_special_tokens=True)
        if text and text == text.strip() and tokenizer.decode(ids[-1:] * 2, skip_special_tokens=True) == text * 2:
            return ids[-1], text
    return None
