"""When a sequence is done, and what its text is.

A sequence stops on an EOS or stop token id (kept in token_ids; in the text only if it is not a special
token, as the text is decoded without special tokens), on a stop string (the text is cut before it; a stop
string that is a special token is matched by its id), or at its token limit. Stop strings are looked for in the
decoded tail only, so the check costs the same at token 10 and token 10,000.
"""

from __future__ import annotations

from .request import FinishReason
from .sequence import Sequence


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._hidden_stop_ids: dict[tuple[str, ...], frozenset[int]] = {}
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))

    def check(self, seq: Sequence) -> FinishReason | None:
        params = seq.request.sampling
        last = seq.output_token_ids[-1]
        if len(seq.output_token_ids) < params.min_tokens:  # nothing but the limit stops a sample this short
            return "length" if len(seq.output_token_ids) >= seq.max_new_tokens else None
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return "stop"
        if params.stop and last in self._stop_strings_as_ids(params.stop):
            return "stop"
        if params.stop and self._stop_string_found(seq):
            return "stop"
        if len(seq.output_token_ids) >= seq.max_new_tokens:
            return "length"
        return None

    def _stop_strings_as_ids(self, stop: tuple[str, ...]) -> frozenset[int]:
        """The ids of stop strings that are special tokens (`<|im_start|>`): the text is decoded without them,
        so the string would never be found in it; such a stop is matched by its token instead."""
        ids = self._hidden_stop_ids.get(stop)
        if ids is None:
            added = self.tokenizer.get_added_vocab() if hasattr(self.tokenizer, "get_added_vocab") else {}
            ids = frozenset(
                added[s] for s in stop if s in added and not self.tokenizer.decode([added[s]], skip_special_tokens=True)
            )
            self._hidden_stop_ids[stop] = ids
        return ids

    def _stop_string_found(self, seq: Sequence) -> bool:
        longest = max(len(s) for s in seq.request.sampling.stop)
        # A token carries at least one byte and a character at most four, so this many tokens cover any stop
        # string that ends in the newest token; special tokens carry none in the text, so they are not counted.
        need = 4 * longest + 4
        # Under min_tokens, only text from the min_tokens-th token on may hold a stop string.
        min_start = max(seq.request.sampling.min_tokens - 1, 0)
        tail = seq.output_token_ids[max(len(seq.output_token_ids) - need, min_start) :]
        if not self._special_ids.isdisjoint(tail):  # rare (ignore_eos runs on past end-of-turn tokens)
            tail = []
            for token in reversed(seq.output_token_ids[min_start:]):
                if token not in self._special_ids:
                    tail.append(token)
                    if len(tail) == need:
                        break
            tail.reverse()
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in seq.request.sampling.stop)

    def stop_reason(self, seq: Sequence) -> str | int | None:
        """What stopped a finished sequence: the stop string (the one the text is cut before), or a stop token id
        of `sampling.stop_token_ids`; None for the model's EOS and for every reason but "stop"."""
        params = seq.request.sampling
        if seq.finish_reason != "stop" or not seq.output_token_ids:
            return None
        last = seq.output_token_ids[-1]
        if last in params.stop_token_ids:
            return last
        if not params.ignore_eos and last in self.eos_token_ids:
            return None
        if params.stop and last in self._stop_strings_as_ids(params.stop):
            added = self.tokenizer.get_added_vocab()  # a stop string that is a special token: matched by its id
            return next(s for s in params.stop if added.get(s) == last)
        cut = self._first_stop(seq, self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True))
        return cut[1] if cut else None

    def text(self, seq: Sequence) -> str:
        params = seq.request.sampling
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if seq.matcher is not None:  # a constrained row never stops on a stop string: its text is whole
            return text
        if not params.stop:
            return text
        cut = self._first_stop(seq, text)
        if cut is None:
            return text
        found, stop = cut
        return text[: found + len(stop) if params.include_stop_str_in_output else found]

    def _first_stop(self, seq: Sequence, text: str) -> tuple[int, str] | None:
        """The earliest stop string in the sequence's `text` and where it starts; None if there is none. Under
        min_tokens, a stop string counts from the min_tokens-th token on, as in `check`: one seen before did not
        stop the sample, so it neither cuts the text nor is its stop reason."""
        params = seq.request.sampling
        start = 0
        if params.min_tokens > 1:
            start = len(self.tokenizer.decode(seq.output_token_ids[: params.min_tokens - 1], skip_special_tokens=True))
        cuts = [(found, s) for found, s in ((text.find(s, start), s) for s in params.stop) if found >= 0]
        return min(cuts) if cuts else None
