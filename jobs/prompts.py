"""A row -> what the model is asked: chat messages, or raw text when the chat template is off.

Every problem with a row's values becomes a RowError that names the row and the column; nothing here raises
for bad data. Tokenization (and keeping data text out of control tokens) is runner/tokenize.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbatch.errors import ErrorKind

from .rows import Row, RowError
from .spec import JobSpec, PromptSpec, input_format, template_columns

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Prompt:
    """Exactly one of `messages` (for the chat template) and `text` (raw) is set."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None


def prompt_spec(job: JobSpec) -> PromptSpec:
    """The prompt settings with the defaults decided: OpenAI inputs use their messages, else column "prompt"."""
    p = job.prompt
    if input_format(job) == "openai":
        return PromptSpec(
            messages_column="messages",
            system=p.system,
            chat_template=p.chat_template,
            allow_special_tokens=p.allow_special_tokens,
        )
    if p.column is None and p.messages_column is None and p.template is None:
        return PromptSpec(
            column="prompt", system=p.system, chat_template=p.chat_template, allow_special_tokens=p.allow_special_tokens
        )
    return p


def prompt_columns(spec: PromptSpec) -> list[str]:
    if spec.template is not None:
        return template_columns(spec.template)
    return [spec.column or spec.messages_column]  # type: ignore[list-item]


def build_prompt(row: Row, spec: PromptSpec) -> Prompt | RowError:
    data = row.data or {}
    if spec.template is not None:
        text = _render_template(row, data, spec.template)
    elif spec.column is not None:
        text = _text_column(row, data, spec.column)
    else:
        messages = _messages_column(row, data, spec.messages_column)  # type: ignore[arg-type]
        if isinstance(messages, RowError):
            return messages
        return _with_system(messages, spec)
    if isinstance(text, RowError):
        return text
    if not spec.chat_template:
        return Prompt(text=f"{spec.system}\n\n{text}" if spec.system else text)
    return _with_system([{"role": "user", "content": text}], spec)


def _with_system(messages: list[dict[str, str]], spec: PromptSpec) -> Prompt:
    # A row's own system message wins over the job's: the job's is a default.
    if spec.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": spec.system}, *messages]
    if not spec.chat_template:
        return Prompt(text="\n\n".join(m["content"] for m in messages))
    return Prompt(messages=messages)


def _error(row: Row, kind: str, message: str) -> RowError:
    return RowError(kind, f"{row.where}: {message}")


def _text_column(row: Row, data: dict[str, Any], column: str) -> str | RowError:
    if column not in data:
        return _error(row, ErrorKind.MISSING_COLUMN, f"column {column!r} is missing")
    value = data[column]
    if value is None:
        return _error(row, ErrorKind.EMPTY_PROMPT, f"column {column!r} is null")
    if not isinstance(value, str):
        return _error(row, ErrorKind.WRONG_TYPE, f"column {column!r} is {_type_name(value)}, expected a string")
    if not value.strip():
        return _error(
            row,
            ErrorKind.EMPTY_PROMPT,
            f"column {column!r} is empty" if not value else f"column {column!r} is only whitespace",
        )
    return value


def _render_template(row: Row, data: dict[str, Any], template: str) -> str | RowError:
    values = {}
    for column in template_columns(template):
        if column not in data:
            return _error(row, ErrorKind.MISSING_COLUMN, f"column {column!r} (used by the template) is missing")
        value = data[column]
        if value is None:
            return _error(row, ErrorKind.EMPTY_PROMPT, f"column {column!r} (used by the template) is null")
        if isinstance(value, (dict, list)):
            return _error(
                row,
                ErrorKind.WRONG_TYPE,
                f"column {column!r} (used by the template) is {_type_name(value)}, expected text or a number",
            )
        values[column] = str(value)
    # Values are inserted once, by name: a value that itself contains "{x}" is not expanded again.
    text = template.format_map(values)
    if not text.strip():
        return _error(row, ErrorKind.EMPTY_PROMPT, "the template renders to empty text")
    return text


def _messages_column(row: Row, data: dict[str, Any], column: str) -> list[dict[str, str]] | RowError:
    if column not in data:
        return _error(row, ErrorKind.MISSING_COLUMN, f"column {column!r} is missing")
    value = data[column]
    if value is None:
        return _error(row, ErrorKind.EMPTY_PROMPT, f"column {column!r} is null")
    if not isinstance(value, list):
        return _error(
            row,
            ErrorKind.WRONG_TYPE,
            f"column {column!r} is {_type_name(value)}, expected a list of {{role, content}} messages",
        )
    if not value:
        return _error(row, ErrorKind.EMPTY_PROMPT, f"column {column!r} is an empty list")
    messages = []
    for i, message in enumerate(value):
        at = f"{column}[{i}]"
        if not isinstance(message, dict):
            return _error(
                row, ErrorKind.WRONG_TYPE, f"{at} is {_type_name(message)}, expected a {{role, content}} object"
            )
        role = message.get("role")
        if role not in ROLES:
            kind = ErrorKind.BAD_ROLE if isinstance(role, str) else ErrorKind.WRONG_TYPE
            return _error(row, kind, f"{at}.role is {role!r}, expected one of {', '.join(ROLES)}")
        content = _content_text(message.get("content"))
        if content is None:
            return _error(
                row,
                ErrorKind.WRONG_TYPE,
                f"{at}.content is {_type_name(message.get('content'))}, expected a string or a list of text parts",
            )
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages if m["role"] != "system"):
        return _error(
            row, ErrorKind.EMPTY_PROMPT, f"column {column!r} has no non-empty message besides the system prompt"
        )
    return messages


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI-style parts [{"type": "text", "text": ...}] joined; None if neither."""
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
    ):
        return "".join(p["text"] for p in content)
    return None


def _type_name(value: Any) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "an object",
    }
    return names.get(type(value), type(value).__name__) if value is not None else "null"
