"""Each generated token's exact UTF-8 bytes, for per-token log-probabilities (OpenAI's `logprobs.content`).

Decoding one token alone loses bytes in two common cases, so the vocabulary piece is read instead when it
spells bytes unambiguously:

    byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): "Ġhello" -> b" hello"; "ðŁ" -> b"\\xf0\\x9f" (half an emoji,
        which decodes alone to "\\ufffd")
    SentencePiece byte fallback: "<0xE2>" -> b"\\xe2";  SentencePiece words: "▁hello" -> b" hello"

A piece is trusted only when it agrees with the tokenizer's own decoding of that token; otherwise the decoded
text's bytes are used. A special token (one `decode(..., skip_special_tokens=True)` drops, like the EOS the
model stopped on) gets None: the output text leaves it out, and so does OpenAI's `logprobs.content`.
"""

from __future__ import annotations

import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """character -> byte of GPT-2's byte-level BPE: printable Latin-1 bytes spell themselves, the other 68
    bytes are spelled chr(256), chr(257), ... in byte order (so every piece is printable text)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = {b: chr(b) for b in printable}
    for k, b in enumerate(b for b in range(256) if b not in char_of):
        char_of[b] = chr(256 + k)
    return {c: b for b, c in char_of.items()}


_BYTE_LEVEL = _byte_level_alphabet()


class TokenBytes:
    """token id -> its bytes (None for a special token), cached per id: a job meets the same ids again and again."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes | None] = {}

    def __call__(self, token_ids: list[int]) -> list[bytes | None]:
        return [self._bytes(t) for t in token_ids]

    def _bytes(self, token_id: int) -> bytes | None:
        if token_id not in self._cache:
            self._cache[token_id] = self._compute(token_id)
        return self._cache[token_id]

    def _compute(self, token_id: int) -> bytes | None:
        text = self.tokenizer.decode([token_id], skip_special_tokens=True)
        if not text and self.tokenizer.decode([token_id], skip_special_tokens=False):
            return None
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        piece = convert(token_id) if convert is not None else None
        if isinstance(piece, str) and piece:
            raw = _piece_bytes(piece, text)
            if raw is not None:
                return raw
        return text.encode("utf-8")


def _piece_bytes(piece: str, text: str) -> bytes | None:
    """The bytes a vocabulary piece spells, when that agrees with the token's decoded text; else None."""
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    if _SENTENCEPIECE_SPACE in piece:
        spaced = piece.replace(_SENTENCEPIECE_SPACE, " ")
        # Llama-style decoders drop a word's leading space when it is decoded alone; the piece keeps it.
        return spaced.encode("utf-8") if spaced.lstrip(" ") == text.lstrip(" ") else None
    if all(c in _BYTE_LEVEL for c in piece):
        raw = bytes(_BYTE_LEVEL[c] for c in piece)
        return raw if raw.decode("utf-8", errors="replace") == text else None
    return None
