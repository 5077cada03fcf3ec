"""A row on its way through a job, and the error it may carry.

A bad row is not an exception: it carries a `RowError` and still becomes exactly one output row, so the output
always has one row per input row, and the summary can count errors by kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kvbatch.errors import ErrorKind


@dataclass(frozen=True)
class RowError:
    kind: ErrorKind
    message: str  # names the row (and line or column): "line 7: invalid JSON: Expecting ',' ..."

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ArgumentNames:
    """How messages name the rows of the Python API: items of the lists its caller passed, which name no column.
    "prompts[3] is null" where a job's row says "row 3: column 'prompt' is null"."""

    row: str  # the argument whose items the rows are ("prompts")
    columns: dict[str, str]  # a column the pipeline reads -> the argument holding its values ("prompt": "prompts")


@dataclass(frozen=True)
class Row:
    index: int  # 0-based input row index: the output's `row` column and the engine's request id
    data: dict[str, Any] | None  # column -> value; None when the row could not be read
    error: RowError | None = None
    line: int | None = None  # 1-based line number for line-based inputs
    sampling: dict[str, Any] = field(default_factory=dict)  # per-row sampling overrides (OpenAI Batch bodies)
    names: ArgumentNames | None = None  # a Python API row, named by its caller's arguments; None: an input row
    file: str | None = None  # the file of `line`, where the input is several (a folder's JSON lines files)

    @property
    def where(self) -> str:
        """How messages name this row: "row 3 (line 5)", "row 3 (line 5 of data/part-1.jsonl)" or "row 3"; a Python
        API row "prompts[3]"."""
        if self.names is not None:
            return f"{self.names.row}[{self.index}]"
        return line_place(self.index, self.line, self.file) if self.line is not None else f"row {self.index}"

    def value(self, column: str, item: int | None = None) -> str:
        """How messages name the row's value of `column`, or its `item` (a chat message): "row 3: column 'prompt'"
        and "row 3: prompt[0]"; a Python API row's "prompts[3]" and "prompts[3][0]"."""
        at = "" if item is None else f"[{item}]"
        argument = self.names.columns.get(column) if self.names is not None else None
        if argument is not None:
            return f"{argument}[{self.index}]{at}"
        return f"{self.where}: column {column!r}" if item is None else f"{self.where}: {column}{at}"

    def failed(self, kind: ErrorKind, message: str) -> Row:
        return dataclasses.replace(self, error=RowError(kind, f"{self.where}: {message}"))


def line_place(index: int, line: int, file: str | None) -> str:
    """How messages name a row read from a line: "row 3 (line 5)"; with the line's file, where the input is several
    files, "row 3 (line 5 of data/part-1.jsonl)"."""
    return f"row {index} (line {line})" if file is None else f"row {index} (line {line} of {file})"


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
        if _no_id(value):
            return _missing_id(row, self.column)
        first = self.first.setdefault(id_key(value), row.index)
        if first != row.index:
            return RowError(ErrorKind.DUPLICATE_ID, f"{row.where}: duplicate id {value!r} (first at row {first})")
        return None


class KnownDuplicates:
    """SeenIds' check when the duplicates were found beforehand over the whole input (a Ray run, whose rows are
    spread over actors): `first` maps each later row of a repeated id to the row that owns it. Same messages."""

    def __init__(self, column: str | None, first: dict[int, int]) -> None:
        self.column = column
        self.first = first

    def error(self, row: Row) -> RowError | None:
        if self.column is None or row.error is not None:
            return None
        value = (row.data or {}).get(self.column)
        if _no_id(value):
            return _missing_id(row, self.column)
        first = self.first.get(row.index)
        if first is not None:
            return RowError(ErrorKind.DUPLICATE_ID, f"{row.where}: duplicate id {value!r} (first at row {first})")
        return None


def _no_id(value: Any) -> bool:
    """A null, or a NaN (polars' and numpy's missing float), which no output writes as an id and equals nothing."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _missing_id(row: Row, column: str) -> RowError:
    return RowError(ErrorKind.MISSING_COLUMN, f"{row.where}: id column {column!r} is missing, null or NaN")


def id_key(value: Any) -> str:
    """The key two ids are the same by (SeenIds and the Ray runner's duplicate search): equal for ids an output may
    write alike. A column of mixed types is written as text (1 and "1" both as "1"), and Arrow writes ints among
    floats as floats (1 and 1.0 both as 1.0)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, default=str)


def mapping_value(value: Any) -> dict | None:
    """The mapping a row's value holds: a JSON object or an Arrow struct (a dict); an Arrow map, which reads as
    its (key, value) pairs; or JSON text of an object (a string column of Parquet); None for any other value.
    JSON gives no tuples, so a JSON list of pairs is no mapping."""
    return record_value(_unless_json_text(value))


def record_value(value: Any) -> dict | None:
    """The mapping a row's value holds as a record: a JSON object or an Arrow struct (a dict), or an Arrow map (its
    (key, value) pairs, as Spark writes a Python dict); None for any other value, text included."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
        return dict(value)
    return None


def set_fields(value: Any) -> Any:
    """A value read from Arrow structs, which hold every field any row of the column has (null where a row has
    none), as the row set it: its mappings without their null fields, at any depth (a tool's parameters, a tool
    call's arguments, a JSON Schema's properties are the row's own, not `"b": null` beside its `"a"`). A list keeps
    its null items, which are positions; JSON text (a string) is read as written, its nulls kept."""
    if isinstance(value, dict):
        return {k: set_fields(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [set_fields(v) for v in value]
    return value


def list_value(value: Any) -> list | None:
    """The list a row's value holds: a JSON or Arrow list, or JSON text of a list (a string column, as Spark, BigQuery
    and CSV exports write nested data); None for any other value."""
    value = _unless_json_text(value)
    return value if isinstance(value, list) else None


def _unless_json_text(value: Any) -> Any:
    """The value JSON text holds (a string column of nested data); a string that is no JSON is None; any other
    value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # nested past Python's parser: no value either, and not the job's end
        return None


def type_name(value: Any) -> str:
    """A value's JSON type as messages name it ("a string", "an object", "null")."""
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "an object",
    }
    return names.get(type(value), type(value).__name__) if value is not None else "null"


@dataclass
class Reader:
    """An opened input: `columns` when the format has a schema, `num_rows` when cheap to know."""

    rows: Iterator[Row]
    num_rows: int | None
    columns: list[str] | None
    schema: pa.Schema | None = None

    def __iter__(self) -> Iterator[Row]:
        return self.rows
