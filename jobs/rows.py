"""A row on its way through a job, and the error it may carry.

A bad row is not an exception: it carries a `RowError` and still becomes exactly one output row, so the output
always has one row per input row, and the summary can count errors by kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Error kinds; README.md's bad-input catalogue lists each with its message.
BAD_JSON = "bad_json"
INVALID_UTF8 = "invalid_utf8"
LINE_TOO_LONG = "line_too_long"
NOT_AN_OBJECT = "not_an_object"
MISSING_COLUMN = "missing_column"
WRONG_TYPE = "wrong_type"
EMPTY_PROMPT = "empty_prompt"
DUPLICATE_ID = "duplicate_id"
BAD_REQUEST = "bad_request"  # an OpenAI Batch line without what a request needs
PROMPT_TOO_LONG = "prompt_too_long"
TOKENIZE = "tokenize"  # the tokenizer or chat template raised on this row's prompt
ENGINE = "engine"


@dataclass(frozen=True)
class RowError:
    kind: str
    message: str  # names the row (and line or column): "line 7: invalid JSON: Expecting ',' ..."

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Row:
    index: int  # 0-based input row index: the output's `row` column and the engine's request id
    data: dict[str, Any] | None  # column -> value; None when the row could not be read
    error: RowError | None = None
    line: int | None = None  # 1-based line number for line-based inputs
    sampling: dict[str, Any] = field(default_factory=dict)  # per-row sampling overrides (OpenAI Batch bodies)

    @property
    def where(self) -> str:
        """How messages name this row: "row 3 (line 5)" or "row 3"."""
        return f"row {self.index} (line {self.line})" if self.line is not None else f"row {self.index}"

    def failed(self, kind: str, message: str) -> Row:
        return Row(self.index, self.data, RowError(kind, f"{self.where}: {message}"), self.line, self.sampling)


class SeenIds:
    """The id column's values so far: the first row with an id owns it, a later one is a `duplicate_id` error.
    Rows that could not be read own nothing. One check for a run, its shards, resumes and `plan`."""

    def __init__(self, column: str | None) -> None:
        self.column = column
        self.first: dict[str, int] = {}

    def error(self, row: Row) -> RowError | None:
        """The row's id problem (missing or duplicate), its id noted either way; None when fine or unchecked."""
        if self.column is None or row.error is not None:
            return None
        value = (row.data or {}).get(self.column)
        if value is None:
            return RowError(MISSING_COLUMN, f"{row.where}: id column {self.column!r} is missing or null")
        first = self.first.setdefault(json.dumps(value, sort_keys=True, default=str), row.index)
        if first != row.index:
            return RowError(DUPLICATE_ID, f"{row.where}: duplicate id {value!r} (first at row {first})")
        return None
