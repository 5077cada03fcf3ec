"""A scoring row's token ids: its continuations, split from its prompt the way lm-eval splits them, or the text
a rolling row scores whole.

Raw text (no chat template): the context's trailing whitespace moves into each continuation, then context +
continuation is encoded whole and the continuation is what follows the context's own encoding:

    context "Question: 2+2? Answer: "   continuation "4"
      -> context "Question: 2+2? Answer:"  continuation " 4"   (" 4" is one token, not " " and "4")
      -> ids(context + continuation)[len(ids(context)):]

so a word's leading space stays with the word, as the model saw it in training. An empty context is lm-eval's
unconditional case: the context is the tokenizer's BOS (else its EOS) and each continuation is encoded alone.
With a chat template the prompt ends where the template hands over to the assistant, and each continuation is
encoded alone as the answer text that follows it (a SentencePiece tokenizer puts no space in front of it).

A rolling row (`task: score_rolling`) is read as lm-eval's loglikelihood_rolling reads a text: raw (a chat
template does not apply; messages are joined as without one), encoded with the tokenizer's own special tokens as
lm-eval's hf model encodes it, its first window starting from the tokenizer's BOS, else its EOS.
"""

from __future__ import annotations

from typing import Any

from kvbatch.errors import ErrorKind

from .prompts import Prompt, message_text
from .rows import Row, RowError, list_value


def continuation_texts(row: Row, column: str) -> list[str] | RowError:
    """The row's continuations: a non-empty list of non-empty strings (or JSON text of one)."""
    data = row.data or {}
    value = data.get(column)
    if value is None:
        message = f"{row.value(column)} is missing or null (task: score)"
        lists = [
            name
            for name, v in data.items()
            if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v)
        ]
        if lists and row.names is None:  # a likely home for them: name it (continuations_column picks the column)
            message += f"; lists of strings are in {', '.join(map(repr, lists))}: set continuations_column"
        return RowError(ErrorKind.MISSING_COLUMN, message)
    texts = list_value(list(value) if isinstance(value, tuple) else value)  # a list, or JSON text of one
    if not texts or not all(isinstance(v, str) and v for v in texts):
        return RowError(ErrorKind.WRONG_TYPE, f"{row.value(column)} must be a non-empty list of non-empty strings")
    return texts


def encode_for_scoring(
    tokenizer: Any, prompt: Prompt, prompt_ids: list[int], continuations: list[str]
) -> tuple[list[int], list[list[int]]] | RowError:
    """(context ids, continuation ids). `tokenizer` is the job's PromptTokenizer, `prompt_ids` its encoding."""
    ids = _encode_continuations(tokenizer, prompt, prompt_ids, continuations)
    for text, tokens in zip(continuations, ids[1]):
        if not tokens:  # lm-eval's split leaves it nothing: the context's last token took it in
            return RowError(
                ErrorKind.TOKENIZE,
                f"continuation {text!r} has no tokens of its own: the tokenizer merges it into the prompt's last "
                "token; end the prompt where a token ends (a word's leading space belongs to the continuation)",
            )
    return ids


def _encode_continuations(
    tokenizer: Any, prompt: Prompt, prompt_ids: list[int], continuations: list[str]
) -> tuple[list[int], list[list[int]]]:
    raw = prompt.text if prompt.text is not None else None
    if raw is None and not tokenizer.use_chat_template:
        raw = "\n\n".join(map(message_text, prompt.messages or []))
    if raw is None:  # chat: the continuation is the assistant's answer after the template's hand-over
        return prompt_ids, [tokenizer.encode_continuation(c) for c in continuations]
    num_spaces = len(raw) - len(raw.rstrip())
    context, moved = (raw[:-num_spaces], raw[-num_spaces:]) if num_spaces else (raw, "")
    prefix = _prefix_token(tokenizer.tokenizer)
    if context == "" and prefix is not None:
        # lm-eval's unconditional case: the prefix token is the context, each continuation is encoded without
        # special tokens, and one that starts with the prefix token itself has it as that context.
        split = not tokenizer.allow_special_tokens
        encoded = [
            list(tokenizer.tokenizer.encode(moved + c, add_special_tokens=False, split_special_tokens=split))
            for c in continuations
        ]
        return [prefix], [ids[1:] if ids[:1] == [prefix] else ids for ids in encoded]
    context_ids = _encode_raw(tokenizer, context)
    return context_ids, [_encode_raw(tokenizer, context + moved + c)[len(context_ids) :] for c in continuations]


def encode_for_rolling(tokenizer: Any, prompt: Prompt) -> tuple[list[int], int] | RowError:
    """(text ids, the token the first window starts from). `tokenizer` is the job's PromptTokenizer."""
    hf = tokenizer.tokenizer
    prefix = _prefix_token(hf)
    if prefix is None:
        message = (
            "the tokenizer has neither a BOS nor an EOS token to start the first window from (task: score_rolling)"
        )
        return RowError(ErrorKind.TOKENIZE, message)
    text = prompt.text if prompt.text is not None else "\n\n".join(map(message_text, prompt.messages or []))
    # a Llama tokenizer's BOS is the text's first token, which the first window then scores after the prefix
    return _encode_raw(tokenizer, text), prefix


def _encode_raw(tokenizer: Any, text: str) -> list[int]:
    """`text` as lm-eval's hf model encodes it: with the tokenizer's own special tokens (a BOS, for some models),
    but for a text that spells the BOS itself where that is parsed (prompt.allow_special_tokens)."""
    hf = tokenizer.tokenizer
    split = not tokenizer.allow_special_tokens
    bos_text = hf.bos_token if isinstance(hf.bos_token, str) else None
    add = split or not bos_text or not text.startswith(bos_text)
    return list(hf.encode(text, add_special_tokens=add, split_special_tokens=split))


def _prefix_token(hf: Any) -> int | None:
    """What lm-eval's hf model puts before a text that has no context: the BOS, else the EOS."""
    return hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id
