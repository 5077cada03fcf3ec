"""Prompts -> token ids, keeping text from rows out of control tokens.

Messages with no text that reads as a special token (`<|im_end|>`, the EOS string...) are rendered by the chat
template and tokenized whole, exactly as transformers' `apply_chat_template(tokenize=True)` does: BPE merges
across the template's text and the data's (a message starting with blank lines or spaces). A row whose text holds
such a token is rendered around placeholders instead, so we know which characters the template wrote and which
came from the data:

    messages ──render with placeholders──> "<|im_start|>user\\n" [P0] "<|im_end|>\\n<|im_start|>assistant\\n"
                                             template piece     data   template piece
    template pieces: tokenized with special-token parsing on  (the template's own <|im_start|> become control ids)
    data pieces:     tokenized with special-token parsing off (a row containing "<|im_end|>" stays plain text)

`allow_special_tokens=True` (job option prompt.allow_special_tokens) tokenizes the rendered prompt whole instead.

The template is the model's or the job's own (prompt.chat_template_file); a prompt's template values
(chat_template_kwargs: `enable_thinking`...) and tools go to it as transformers' apply_chat_template takes them. A
template that raises on a row (raise_exception, a missing value) is that row's `chat_template` error.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kvbatch.errors import ErrorKind
from kvbatch.jobs.prompts import ROLES, Prompt, message_text
from kvbatch.jobs.rows import RowError

log = logging.getLogger(__name__)


class PromptTokenizer:
    def __init__(
        self,
        tokenizer: Any,
        allow_special_tokens: bool = False,
        chat_template: bool = True,
        template: str | None = None,
        continue_final_message: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.allow_special_tokens = allow_special_tokens
        self.template = template  # the job's own Jinja template, instead of the tokenizer's
        self.continue_final_message = continue_final_message
        has_template = template is not None or getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = chat_template and has_template
        if chat_template and not self.use_chat_template:
            log.warning(
                "the model's tokenizer has no chat template: prompts are sent as raw text (messages joined by "
                "blank lines)"
            )
        # A message may have OpenAI's roles, and those the template has a turn for (Llama 3.1's `ipython`): a role
        # no template names is a typo's `bad_role`, not a turn the template writes out as it stands or drops.
        templates = _templates(template, tokenizer) if self.use_chat_template else []
        named = set().union(*map(_named_roles, templates)) - set(ROLES)
        self.roles: tuple[str, ...] = (*ROLES, *sorted(named))
        # A fresh random marker per tokenizer: data cannot guess it to forge a piece boundary.
        self._marker = f"KVBATCH{secrets.token_hex(8)}"
        self._placeholder = re.compile(rf"{self._marker}_(\d+)_")
        self._template_ids = lru_cache(maxsize=4096)(self._encode_template_piece)
        # Only special tokens: data spells an added token that is not special (Qwen3's <think>) whichever way it is
        # tokenized, and templates read such tokens in the text (they split the thinking off on </think>).
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special = {str(t) for t in added.values() if str(t) and getattr(t, "special", True)}
        control = sorted(special | set(getattr(tokenizer, "all_special_tokens", [])))
        # One scan of a message finds any of them (Llama 3 has 256 added tokens).
        self._control_text = re.compile("|".join(map(re.escape, control))) if control else None
        # A piece after the first continues the rendered text: a tokenizer that marks the start of each text it
        # encodes (SentencePiece's "▁", a byte-level "Ġ") must not mark it, or each piece gains a space.
        self._continuing = _continuing_backend(tokenizer)
        # Where a piece's text stops continuing the text before it: at the added tokens its encoding parses (all of
        # them in the template's pieces, those that are not special in the data's).
        parsed = sorted({str(t) for t in added.values() if str(t)}, key=len, reverse=True)
        parsed_in_data = [t for t in parsed if t not in special]
        self._splits_template = re.compile("|".join(map(re.escape, parsed))) if parsed else None
        self._splits_data = re.compile("|".join(map(re.escape, parsed_in_data))) if parsed_in_data else None

    def encode(self, prompt: Prompt) -> list[int] | RowError:
        if prompt.text is not None:
            return self._encode_text(prompt.text)
        assert prompt.messages is not None, "a Prompt has messages or text"
        if not self.use_chat_template:
            # A row's own tools or template values (an OpenAI Batch body's) would be dropped; the job's own stop
            # the job before any row (check_chat_template)
            for name, value in (("tools", prompt.tools), ("chat_template_kwargs", prompt.template_kwargs)):
                if value:
                    return RowError(
                        ErrorKind.BAD_REQUEST,
                        f"{name!r} is given to the chat template, and this model's tokenizer has none (the raw text "
                        "goes to the model)",
                    )
            return self._encode_text(_raw_text(prompt))
        if not self.allow_special_tokens:
            # Template values, tools and a message's tool calls are written by the template itself, so they are
            # tokenized as its own text: one that reads as a control token would become one.
            extras = [{k: v for k, v in m.items() if k not in ("role", "content")} for m in prompt.messages]
            found = self._control_in(prompt.template_kwargs, prompt.tools, extras)
            if found is not None:
                return RowError(
                    ErrorKind.CHAT_TEMPLATE,
                    f"a chat template value, tool or tool call holds {found!r}, the text of a control token; set "
                    "prompt.allow_special_tokens if the data may write control tokens",
                )
        messages = self._as_template_reads(prompt)
        try:
            if self.allow_special_tokens or self._plain(messages):
                rendered = self._render(messages, prompt)
                return list(self.tokenizer.encode(rendered, add_special_tokens=False))
            return self._encode_messages(messages, prompt)
        except _TemplateRefused as exc:
            return RowError(ErrorKind.CHAT_TEMPLATE, f"the chat template refused the row: {exc}")

    def truncated(self, prompt: Prompt, ids: list[int], keep: int) -> list[int]:
        """`ids` (the prompt's encoding) cut to its last `keep` tokens, as vLLM cuts them: a raw text by the
        tokenizer's own left truncation, which keeps the tokens it adds around the text (a BOS); a chat prompt where
        it stands, its template having written its BOS as text."""
        if len(ids) <= keep:
            return ids
        if prompt.text is None and self.use_chat_template:
            return ids[-keep:]
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            cut = self.tokenizer.encode(
                _raw_text(prompt),
                add_special_tokens=True,
                split_special_tokens=not self.allow_special_tokens,
                truncation=True,
                max_length=keep,
            )
        finally:
            self.tokenizer.truncation_side = side
        # Fewer tokens kept than the tokenizer adds: it leaves the text whole; the setting is a bound, kept.
        return list(cut) if len(cut) <= keep else ids[-keep:]

    def _control_in(self, *values: Any) -> str | None:
        """The first control token's text found in any string inside `values` (mappings, lists, scalars)."""
        if self._control_text is None:
            return None
        stack = list(values)
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                match = self._control_text.search(value)
                if match:
                    return match.group()
            elif isinstance(value, dict):
                stack.extend(value.keys())
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        return None

    def _as_template_reads(self, prompt: Prompt) -> list[dict[str, Any]]:
        """The messages with their text parts as the template reads content: as parts for a template that loops
        over a message's content (as vLLM detects it: Gemma 3 trims and joins them, SmolVLM's reads nothing else),
        else joined into one text (a template that writes `message.content` would write the list's repr). A string
        content goes as it is, except to a template that loops over content and never tests it for a string: that
        one iterates the string's characters and writes nothing, so it gets the string as one text part (as vLLM's
        server wraps every string for such templates; a template with a string branch renders as transformers
        does)."""
        assert prompt.messages is not None, "a Prompt has messages or text"
        try:
            template = self.tokenizer.get_chat_template(self.template, prompt.tools)
        except Exception:  # noqa: BLE001 - no template to read: the render reports it on the row
            template = None
        reads = _content_reading(template) if isinstance(template, str) else _ContentReading(False, False)
        if reads.loops and not reads.tests_string:
            return [
                {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
                for m in prompt.messages
            ]
        if reads.loops:
            return prompt.messages
        return [m if isinstance(m["content"], str) else {**m, "content": message_text(m)} for m in prompt.messages]

    def _plain(self, messages: list[dict[str, Any]]) -> bool:
        """No message holds a special token's text, nor do its texts one after the other: a template that writes a
        message's text parts back to back (Gemma 3's) would join "<|im_" and "end|>" into one. A tokenizer that
        lists no special token is never trusted to be plain."""
        if self._control_text is None:
            return False
        texts = [text for m in messages for text in _texts(m)]
        return not any(map(self._control_text.search, texts)) and not self._control_text.search("".join(texts))

    def _encode_text(self, text: str) -> list[int]:
        # add_special_tokens adds what the tokenizer always adds (a BOS, for some models), never parses the data.
        return list(
            self.tokenizer.encode(text, add_special_tokens=True, split_special_tokens=not self.allow_special_tokens)
        )

    def _render(self, messages: list[dict[str, Any]], prompt: Prompt) -> str:
        # Only what is set is passed: a tokenizer's template takes the values it knows by name.
        options: dict[str, Any] = dict(prompt.template_kwargs or {})
        if self.template is not None:
            options["chat_template"] = self.template
        if prompt.tools is not None:
            options["tools"] = prompt.tools
        if self.continue_final_message:
            options["continue_final_message"] = True
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not self.continue_final_message, **options
            )
        except Exception as exc:  # noqa: BLE001 - a template raising on a row's values fails that row only
            raise _TemplateRefused(f"{type(exc).__name__}: {exc}") from exc

    def _encode_messages(self, messages: list[dict[str, Any]], prompt: Prompt) -> list[int] | RowError:
        # One placeholder per text: a message's content, or each of its text parts.
        marked, texts = [], []

        def mark(text: str) -> str:
            # An empty text stays empty: a template tests it (`if message.content`: a tool-calling turn's).
            if not text:
                return text
            texts.append(text)
            return f"{self._marker}_{len(texts) - 1}_"

        for m in messages:
            if isinstance(m["content"], str):
                marked.append({**m, "content": mark(m["content"])})
            else:
                marked.append({**m, "content": [{**part, "text": mark(part["text"])} for part in m["content"]]})
        rendered = self._render(marked, prompt)
        # [template, index, template, index, ..., template]: in the template's order, which may move a message
        # (Mistral writes the system message into the last user turn), repeat or drop it, as the whole render does.
        pieces = self._placeholder.split(rendered)
        written = _as_written(pieces, texts, self._render(messages, prompt))
        if written is None:
            return RowError(
                ErrorKind.CHAT_TEMPLATE,
                "the chat template changes message text in a way kvbatch cannot follow; set "
                "prompt.allow_special_tokens to render it whole",
            )
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids.extend(self._template_ids(piece, i > 0))
            else:
                text = written[i // 2]
                if text:
                    ids.extend(self._encode_data_piece(text))
        return ids

    def _encode_template_piece(self, piece: str, continuing: bool) -> tuple[int, ...]:
        if not piece:
            return ()
        if not continuing or self._continuing is None:  # the start of the text is marked as a whole text's is
            return tuple(self.tokenizer.encode(piece, add_special_tokens=False))
        head, tail = _split_at(piece, self._splits_template)
        return (*self._encode_continuing(head), *self.tokenizer.encode(tail, add_special_tokens=False))

    def encode_continuation(self, text: str) -> list[int]:
        """`text` as it reads right after a prompt the chat template rendered (a scoring row's answer): no space in
        front of it that it does not have; control text in it parsed only under allow_special_tokens."""
        return self._encode_after(text, split_special_tokens=not self.allow_special_tokens)

    def _encode_data_piece(self, text: str) -> list[int]:
        return self._encode_after(text, split_special_tokens=True)

    def _encode_after(self, text: str, split_special_tokens: bool) -> list[int]:
        if self._continuing is None:
            return list(
                self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split_special_tokens)
            )
        head, tail = _split_at(text, self._splits_data if split_special_tokens else self._splits_template)
        return [
            *self._encode_continuing(head),
            *self.tokenizer.encode(tail, add_special_tokens=False, split_special_tokens=split_special_tokens),
        ]

    def _encode_continuing(self, text: str) -> list[int]:
        """`text` (no added token in it) encoded as the middle of a longer text, as a whole-text encoding would."""
        return list(self._continuing.encode(text, add_special_tokens=False).ids) if text else []


def _raw_text(prompt: Prompt) -> str:
    """What a prompt sends as raw text: its text, or its messages' contents joined by blank lines."""
    if prompt.text is not None:
        return prompt.text
    assert prompt.messages is not None, "a Prompt has messages or text"
    return "\n\n".join(map(message_text, prompt.messages))


# How a template may write a message's text: as given, trimmed (`| trim`: Mistral's assistant turns), or inside
# a JSON string (`| tojson`: Llama 3.1's tool results), as transformers' tojson writes it.
_WRITINGS = (lambda s: s, str.strip, lambda s: json.dumps(s, ensure_ascii=False)[1:-1])


def _as_written(pieces: list[str], texts: list[str], real: str) -> list[str] | None:
    """The text each placeholder of `pieces` ([template, index, template, ..., template]) stands for in `real`, the
    render with the row's own texts: each text as given, trimmed or JSON-escaped, chosen placeholder by placeholder
    (a template may trim one role's turns and not another's), so that the pieces rebuild `real`; None where no
    choice does."""
    # For each placeholder: the positions after the template piece that follows it, each with where its text
    # started and as which text (a breadth-first walk; a text may be written several ways that all fit).
    steps: list[dict[int, tuple[int, str]]] = []
    ends = {len(pieces[0])} if real.startswith(pieces[0]) else set()
    for k in range(1, len(pieces), 2):
        text, after = texts[int(pieces[k])], pieces[k + 1]
        step: dict[int, tuple[int, str]] = {}
        for start in sorted(ends):
            for shown in dict.fromkeys(writing(text) for writing in _WRITINGS):
                if real.startswith(shown, start) and real.startswith(after, start + len(shown)):
                    step.setdefault(start + len(shown) + len(after), (start, shown))
        steps.append(step)
        ends = set(step)
    if len(real) not in ends:
        return None
    written, end = [], len(real)
    for step in reversed(steps):
        end, shown = step[end]
        written.append(shown)
    return written[::-1]


def _texts(message: dict[str, Any]) -> list[str]:
    """A message's texts as the template is given them: its content, or each of its text parts."""
    content = message["content"]
    return [content] if isinstance(content, str) else [p["text"] for p in content]


def _templates(template: str | None, tokenizer: Any) -> list[str]:
    """The job's own template, else every template of the tokenizer (transformers keeps named ones, such as
    `tool_use`, in a dict)."""
    if template is not None:
        return [template]
    found = getattr(tokenizer, "chat_template", None)
    if isinstance(found, dict):
        return [t for t in found.values() if isinstance(t, str)]
    return [found] if isinstance(found, str) else []


def _parsed(template: str) -> Any | None:
    """The template's Jinja syntax tree, as transformers compiles it; None where it does not parse (the render says
    why)."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(template).environment.parse(template)
    except jinja2.TemplateError:
        return None


def _field_reader(ast: Any, field: str, filters: tuple[str, ...] = ()) -> Callable[[Any], bool]:
    """Whether a node reads a message's `field` (`message.role`, `message['role']`, through one of `filters`), or is a
    name the template set from such a read (`{% set role = message['role'] %}`)."""
    import jinja2.nodes as nodes

    def reads(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Filter) and node.name in filters:
            return node.node is not None and reads(node.node)
        if isinstance(node, nodes.Getattr):
            return node.attr == field
        return isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == field

    names = {
        assign.target.name
        for assign in ast.find_all(nodes.Assign)
        if isinstance(assign.target, nodes.Name) and reads(assign.node)
    }
    return lambda node: reads(node) or (isinstance(node, nodes.Name) and node.name in names)


@lru_cache(maxsize=16)
def _named_roles(template: str) -> frozenset[str]:
    """The roles a template compares a message's role with (`message.role == "ipython"`, `message['role'] in
    ["tool", "ipython"]`, `message.role | lower`, a name set from a role, `selectattr("role", "equalto",
    "system")`) or looks up in a mapping (`{"user": "Human", ...}[message.role]`): those it has a turn for."""
    import jinja2.nodes

    ast = _parsed(template)
    if ast is None:
        return frozenset()
    is_role = _field_reader(ast, "role", ("lower", "upper", "trim", "string", "title"))

    def strings(node: jinja2.nodes.Node) -> list[str]:
        items = node.items if isinstance(node, (jinja2.nodes.List, jinja2.nodes.Tuple)) else [node]
        return [i.value for i in items if isinstance(i, jinja2.nodes.Const) and isinstance(i.value, str)]

    mappings = {
        node.target.name: node.node
        for node in ast.find_all(jinja2.nodes.Assign)
        if isinstance(node.target, jinja2.nodes.Name) and isinstance(node.node, jinja2.nodes.Dict)
    }
    roles: set[str] = set()
    for lookup in ast.find_all(jinja2.nodes.Getitem):
        if is_role(lookup.arg):
            mapping = mappings.get(lookup.node.name) if isinstance(lookup.node, jinja2.nodes.Name) else lookup.node
            if isinstance(mapping, jinja2.nodes.Dict):
                roles.update(s for pair in mapping.items for s in strings(pair.key))
    for compare in ast.find_all(jinja2.nodes.Compare):
        sides = [compare.expr, *(op.expr for op in compare.ops)]
        if any(map(is_role, sides)):
            roles.update(s for side in sides for s in strings(side))
    for call in ast.find_all(jinja2.nodes.Filter):
        args = call.args
        if call.name in ("selectattr", "rejectattr") and len(args) == 3 and strings(args[0]) == ["role"]:
            roles.update(strings(args[2]))
    return frozenset(roles)


@dataclass(frozen=True)
class _ContentReading:
    loops: bool  # a `for` over a message's content: the template reads OpenAI's content parts
    tests_string: bool  # `content is string` somewhere: it has a branch for a string content too


@lru_cache(maxsize=16)
def _content_reading(template: str) -> _ContentReading:
    """How the template reads a message's content (`message['content']`, `message.content`, or a name set from
    one): whether it loops over it, as vLLM's server detects a template that reads OpenAI's content parts, and
    whether it tests it for a string."""
    import jinja2.nodes

    ast = _parsed(template)
    if ast is None:
        return _ContentReading(False, False)
    reads_content = _field_reader(ast, "content")

    return _ContentReading(
        loops=any(reads_content(loop.iter) for loop in ast.find_all(jinja2.nodes.For)),
        tests_string=any(
            test.name == "string" and reads_content(test.node) for test in ast.find_all(jinja2.nodes.Test)
        ),
    )


def _split_at(text: str, added: re.Pattern[str] | None) -> tuple[str, str]:
    """`text` cut before its first added token: the head continues the text before it; from an added token on, the
    tokenizer's own rules for what follows an added token apply, so the tail is encoded as it is."""
    match = added.search(text) if added is not None else None
    return (text[: match.start()], text[match.start() :]) if match else (text, "")


def _continuing_backend(tokenizer: Any) -> Any | None:
    """A copy of the tokenizer's backend that does not mark the start of the text it encodes, or None if it marks
    none. SentencePiece tokenizers prepend "▁" (a Metaspace prepend_scheme, or legacy Llama's Prepend normalizer)
    and some byte-level ones a space (ByteLevel add_prefix_space): right at the start of a prompt, an extra space
    in front of every piece encoded on its own."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    normalizer, dropped = _without_prefix(spec.get("normalizer"))
    pre_tokenizer, unmarked = _without_prefix(spec.get("pre_tokenizer"))
    if not (dropped or unmarked):
        return None
    spec["normalizer"], spec["pre_tokenizer"] = normalizer, pre_tokenizer
    continuing = type(backend).from_str(json.dumps(spec))
    continuing.encode_special_tokens = True  # the text holds no added token: nothing in it is parsed
    return continuing


def _without_prefix(component: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    """A normalizer or pre-tokenizer spec with what adds a start-of-text marker taken out, and whether any was."""
    if not isinstance(component, dict):
        return component, False
    kind = component.get("type")
    if kind == "Prepend":
        return None, True
    if kind == "Metaspace" and component.get("prepend_scheme", "always") != "never":
        return {**component, "prepend_scheme": "never"}, True
    if kind == "ByteLevel" and component.get("add_prefix_space"):
        return {**component, "add_prefix_space": False}, True
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in component else "pretokenizers"
        parts = [_without_prefix(c) for c in component.get(key) or []]
        if any(changed for _, changed in parts):
            return {**component, key: [c for c, _ in parts if c is not None]}, True
    return component, False


class _TemplateRefused(Exception):
    """The chat template raised on a row: that row's `chat_template` error, not the job's."""
