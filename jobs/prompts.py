"""A row -> what the model is asked: chat messages, or raw text when the chat template is off.

Every problem with a row's values becomes a RowError that names the row and the column (as the row names them:
a Python API row by its caller's argument); nothing here raises for bad data. Tokenization (and keeping data text
out of control tokens) is runner/tokenize.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass
from typing import Any

from kvbatch.errors import ErrorKind

from .rows import Row, RowError, list_value, mapping_value, record_value, type_name
from .spec import TEMPLATE_CALL_ARGUMENTS, JobSpec, PromptSpec, input_format, template_columns

# The roles every chat template is written for (OpenAI's); a job's template may name more (Llama 3.1's `ipython`),
# which its rows may then use (PromptTokenizer.roles).
ROLES = ("system", "user", "assistant", "tool", "developer")
# The roles of a system prompt: OpenAI's newer API calls it `developer` (kept as such for the chat template).
SYSTEM_ROLES = ("system", "developer")
# A message's other fields go to the template as given, as transformers' apply_chat_template takes them (Qwen3's
# templates read an assistant turn's reasoning_content); these, OpenAI's tool calls and their results, must have
# these types.
MESSAGE_FIELDS = {"name": str, "tool_call_id": str, "tool_calls": list}


@dataclass(frozen=True)
class Prompt:
    """Exactly one of `messages` (for the chat template) and `text` (raw) is set. A message's content is a string,
    or the row's OpenAI text parts [{"type": "text", "text": ...}] (message_text reads either)."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    template_kwargs: dict[str, Any] | None = None  # the row's own chat template values over the job's
    tools: list[dict[str, Any]] | None = None  # tool definitions for the chat template


def prompt_spec(job: JobSpec) -> PromptSpec:
    """The prompt settings with the defaults decided: OpenAI inputs use their messages, else column "prompt"."""
    p = job.prompt
    if input_format(job) == "openai":  # a body's own `tools` and `chat_template_kwargs` (vLLM's extension) apply
        return dataclasses.replace(
            p,
            column=None,
            template=None,
            messages_column="messages",
            tools_column=p.tools_column or "tools",
            chat_template_kwargs_column=p.chat_template_kwargs_column or "chat_template_kwargs",
        )
    if p.column is None and p.messages_column is None and p.template is None:
        return dataclasses.replace(p, column="prompt")
    return p


def prompt_columns(spec: PromptSpec) -> list[str]:
    extra = [c for c in (spec.tools_column, spec.chat_template_kwargs_column) if c is not None]
    if spec.template is not None:
        return template_columns(spec.template) + extra
    return [spec.column or spec.messages_column, *extra]  # type: ignore[list-item]


def build_prompt(
    row: Row, spec: PromptSpec, allow_empty: bool = False, roles: tuple[str, ...] = ROLES
) -> Prompt | RowError:
    """The row's prompt. `allow_empty`: an empty or blank text is a prompt (a scoring row's context may be empty,
    as lm-eval's unconditional loglikelihood has it; a rolling text of whitespace has tokens), not an empty_prompt
    error. `roles`: the roles a message may have (a role outside them is `bad_role`)."""
    data = row.data or {}
    if spec.template is not None:
        text = _render_template(row, data, spec.template, allow_empty)
    elif spec.column is not None:
        text = _text_column(row, data, spec.column, allow_empty)
    else:
        messages = _messages_column(row, data, spec.messages_column, allow_empty, roles)  # type: ignore[arg-type]
        if isinstance(messages, RowError):
            return messages
        return _with_system(messages, spec, row)
    if isinstance(text, RowError):
        return text
    if not spec.chat_template:
        return _dropped_template_values(row, spec) or Prompt(text=f"{spec.system}\n\n{text}" if spec.system else text)
    return _with_system([{"role": "user", "content": text}], spec, row)


def _with_system(messages: list[dict[str, Any]], spec: PromptSpec, row: Row) -> Prompt | RowError:
    # A row's own system message wins over the job's: the job's is a default.
    if spec.system and messages[0]["role"] not in SYSTEM_ROLES:
        messages = [{"role": "system", "content": spec.system}, *messages]
    if not spec.chat_template:
        return _dropped_template_values(row, spec) or Prompt(text="\n\n".join(map(message_text, messages)))
    data = row.data or {}
    kwargs, tools = dict(spec.chat_template_kwargs or {}), None
    column = spec.chat_template_kwargs_column
    if column is not None and data.get(column) is not None:
        values = mapping_value(data[column])
        if values is None:
            return _value_error(row, ErrorKind.WRONG_TYPE, column, f"is {type_name(data[column])}, expected an object")
        values = {k: v for k, v in values.items() if v is not None}  # a null (a struct's unset field): the job's
        steering = sorted(TEMPLATE_CALL_ARGUMENTS & set(values))
        if steering:
            return _value_error(
                row,
                ErrorKind.BAD_REQUEST,
                column,
                f"sets {steering[0]!r}, an argument of the template call, not a template value",
            )
        kwargs.update(values)
    column = spec.tools_column
    if column is not None and data.get(column) is not None:
        tools = list_value(data[column])
        if tools is None or not all(isinstance(t, dict) for t in tools):
            problem = f"is {type_name(data[column])}, expected a list of tools"
            return _value_error(row, ErrorKind.WRONG_TYPE, column, problem)
    return Prompt(messages=messages, template_kwargs=kwargs or None, tools=tools)


def _dropped_template_values(row: Row, spec: PromptSpec) -> RowError | None:
    """A row whose own tools or template values (an OpenAI Batch body's) would be dropped with its raw text; the job
    file's load refuses the job's own, so only a row's reach here."""
    data = row.data or {}
    for column in (spec.tools_column, spec.chat_template_kwargs_column):
        if column is not None and data.get(column) not in (None, {}, []):
            problem = "is given to the chat template, which prompt.chat_template: false turns off"
            return _value_error(row, ErrorKind.BAD_REQUEST, column, problem)
    return None


def _error(row: Row, kind: str, message: str) -> RowError:
    return RowError(kind, f"{row.where}: {message}")


def _value_error(row: Row, kind: str, column: str, problem: str) -> RowError:
    """An error about the row's value of `column`: "row 3: column 'prompt' is null", or for a Python API row,
    whose caller named no column, "prompts[3] is null"."""
    return RowError(kind, f"{row.value(column)} {problem}")


def _text_column(row: Row, data: dict[str, Any], column: str, allow_empty: bool) -> str | RowError:
    if column not in data:
        return _value_error(row, ErrorKind.MISSING_COLUMN, column, "is missing")
    value = data[column]
    if value is None:
        return _value_error(row, ErrorKind.EMPTY_PROMPT, column, "is null")
    if not isinstance(value, str):
        return _value_error(row, ErrorKind.WRONG_TYPE, column, f"is {type_name(value)}, expected a string")
    if not value.strip() and not allow_empty:
        return _value_error(row, ErrorKind.EMPTY_PROMPT, column, "is empty" if not value else "is only whitespace")
    return value


def _render_template(row: Row, data: dict[str, Any], template: str, allow_empty: bool) -> str | RowError:
    values = {}
    for column in template_columns(template):
        if column not in data:
            return _value_error(row, ErrorKind.MISSING_COLUMN, column, "(used by the template) is missing")
        value = data[column]
        if value is None:
            return _value_error(row, ErrorKind.EMPTY_PROMPT, column, "(used by the template) is null")
        # Text is inserted as str() spells it: a nested value, or bytes (a binary column), would reach the model
        # as Python's repr ("b'Ann'"), not as the text it holds.
        if isinstance(value, (dict, list, bytes, bytearray)):
            return _value_error(
                row,
                ErrorKind.WRONG_TYPE,
                column,
                f"(used by the template) is {type_name(value)}, expected text or a number",
            )
        values[column] = str(value)
    # Values are inserted once, by name: a value that itself contains "{x}" is not expanded again. Every field is a
    # column name, "{0}" too (str.format_map would read that one as a positional argument).
    pieces = string.Formatter().parse(template)  # (literal text, field name or None, ...), {{ }} unescaped
    text = "".join(literal + (values[name] if name is not None else "") for literal, name, _, _ in pieces)
    if not text.strip() and not allow_empty:
        return _error(row, ErrorKind.EMPTY_PROMPT, "the template renders to empty text")
    return text


def _messages_column(
    row: Row, data: dict[str, Any], column: str, allow_empty: bool, roles: tuple[str, ...]
) -> list[dict[str, Any]] | RowError:
    if column not in data:
        return _value_error(row, ErrorKind.MISSING_COLUMN, column, "is missing")
    if data[column] is None:
        return _value_error(row, ErrorKind.EMPTY_PROMPT, column, "is null")
    value = list_value(positions_of(data[column]))
    if value is None:
        problem = f"is {type_name(data[column])}, expected a list of {{role, content}} messages"
        return _value_error(row, ErrorKind.WRONG_TYPE, column, problem)
    if not value:
        return _value_error(row, ErrorKind.EMPTY_PROMPT, column, "is an empty list")
    messages = []
    for i, message in enumerate(value):
        at = row.value(column, i)  # "row 3: prompt[0]", or a Python API row's "prompts[3][0]"
        # A message may be an Arrow map of its fields (Spark writes a Python dict as one): its pairs are the fields.
        message = record_value(message) or message
        if not isinstance(message, dict):
            return RowError(ErrorKind.WRONG_TYPE, f"{at} is {type_name(message)}, expected a {{role, content}} object")
        role = message.get("role")
        if role is None:
            return RowError(ErrorKind.WRONG_TYPE, f"{at} has no role, expected one of {', '.join(roles)}")
        if role not in roles:
            kind = ErrorKind.BAD_ROLE if isinstance(role, str) else ErrorKind.WRONG_TYPE
            return RowError(kind, f"{at}.role is {role!r}, expected one of {', '.join(roles)}")
        extra = {k: v for k, v in message.items() if k not in ("role", "content") and v is not None}
        wrong = next((k for k, v in extra.items() if not isinstance(v, MESSAGE_FIELDS.get(k, object))), None)
        if wrong is not None:
            wanted = "a list" if MESSAGE_FIELDS[wrong] is list else "a string"
            return RowError(ErrorKind.WRONG_TYPE, f"{at}.{wrong} is {type_name(extra[wrong])}, expected {wanted}")
        if "tool_calls" in extra:
            calls = _with_parsed_arguments(extra["tool_calls"])
            if isinstance(calls, str):
                return RowError(ErrorKind.WRONG_TYPE, f"{at}.tool_calls{calls}")
            extra["tool_calls"] = calls
        # An assistant message that only calls tools has no content (OpenAI's null).
        content = "" if message.get("content") is None and "tool_calls" in extra else message.get("content")
        read = _content(content)
        if read is None:
            return RowError(ErrorKind.WRONG_TYPE, f"{at}.content {_content_problem(content)}")
        messages.append({"role": role, "content": read, **extra})
    # Blank messages are an empty prompt as a blank text is: a scoring row's (allow_empty) is lm-eval's
    # unconditional case in raw text, and the template's hand-over with a chat template.
    if not allow_empty and not any(message_text(m).strip() for m in messages if m["role"] not in SYSTEM_ROLES):
        return _value_error(row, ErrorKind.EMPTY_PROMPT, column, "has no non-empty message besides the system prompt")
    return messages


def positions_of(value: Any) -> Any:
    """datasets' older `Sequence({"role": ..., "content": ...})` holds a row's messages as a struct of lists of one
    length, {"role": [...], "content": [...]}: one message a position (a null field is one no message has). Any
    other value as it is."""
    fields = {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else {}
    if not fields or not all(isinstance(v, list) for v in fields.values()):
        return value
    if len({len(v) for v in fields.values()}) != 1:
        return value
    return [dict(zip(fields, at)) for at in zip(*fields.values())]


def _with_parsed_arguments(calls: list[Any]) -> list[Any] | str:
    """The tool calls with each function's `arguments` as a mapping, or what is wrong ("[0].function.arguments is
    not JSON text"). OpenAI sends JSON text; templates read a mapping (`arguments | tojson`), as transformers
    documents and vLLM's server parses it (empty: {})."""
    parsed = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and not isinstance(function.get("arguments"), (dict, list)):
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                try:
                    arguments = json.loads(arguments)
                except ValueError as exc:
                    return f"[{i}].function.arguments is not JSON text ({exc})"
                except RecursionError:  # json.loads recurses once per nesting level
                    return f"[{i}].function.arguments is not JSON text (nested too deeply)"
            elif not arguments:
                arguments = {}
            call = {**call, "function": {**function, "arguments": arguments}}
        parsed.append(call)
    return parsed


def _content(content: Any) -> str | list[dict[str, str]] | None:
    """A message's content: a string, or OpenAI-style parts [{"type": "text", "text": ...}] (kept as parts: a
    template that loops over them reads them itself); None if neither."""
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
    ):
        return [{"type": "text", "text": p["text"]} for p in content]
    return None


def message_text(message: dict[str, Any]) -> str:
    """A message's content as one text: its text parts joined by newlines, as vLLM's server joins them for a
    template that reads content as a string."""
    content = message["content"]
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def _content_problem(content: Any) -> str:
    if content is None:
        return "is missing (null), expected text, or tool_calls beside it"
    if isinstance(content, list) and content:
        kinds = sorted({str(p.get("type")) for p in content if isinstance(p, dict) and p.get("type") != "text"})
        if kinds:
            return f"holds parts of type {', '.join(kinds)}; only text parts are read"
    return f"is {type_name(content)}, expected a string or a list of text parts"
