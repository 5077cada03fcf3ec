"""Fail fast on a prompt column that no row has: a typo in `--prompt-column` on a JSONL input (which has no
schema to check up front) would otherwise load the model and turn every row into a `missing_column` error (a typo
in `adapter_column`, into a run of every row on the job's `adapter`).

The first rows are read ahead (up to FIRST_ROWS, or until one has the columns) before any model loads, and then
yielded again in order: no row is lost or read twice.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvbatch.errors import InputError, SpecError

from .rows import Row

FIRST_ROWS = 100
_SHOWN_COLUMNS = 20


def check_first_rows(rows: Iterator[Row], columns: dict[str, str], limit: int = FIRST_ROWS) -> Iterator[Row]:
    """`rows` unchanged, after checking that each column of `columns` (column -> the job field naming it) is in at
    least one of the first `limit` readable rows; else raise SpecError naming the columns the rows have. Each
    column on its own: a row's tools or template values are absent from rows without any. Unreadable rows prove
    nothing either way."""
    peeked: list[Row] = []
    failure: InputError | None = None
    missing = set(columns)
    try:
        for row in rows:
            peeked.append(row)
            if row.data is not None:
                missing -= row.data.keys()
            if not missing or len(peeked) >= limit:
                break
    except InputError as exc:  # the input breaks off: the rows before it still run, then the run fails as before
        failure = exc
    readable = [r.data for r in peeked if r.data is not None]
    if readable and missing:
        seen = list(dict.fromkeys(k for data in readable for k in data))
        shown = ", ".join(map(repr, seen[:_SHOWN_COLUMNS])) + (" ..." if len(seen) > _SHOWN_COLUMNS else "")
        named = [c for c in columns if c in missing]
        # An OpenAI Batch file read as plain rows: each line's custom_id and body are its columns
        batch = all({"custom_id", "body"} <= data.keys() for data in readable)
        hint = "; they are OpenAI Batch requests: set input.format: openai (--input-format openai)" if batch else ""
        raise SpecError(
            f"none of the first {len(readable)} rows has the column {', '.join(map(repr, named))}; "
            f"the rows have {shown or 'no columns'}{hint}",
            field=columns[named[0]],
        )
    return _replay(peeked, rows, failure)


def _replay(peeked: list[Row], rest: Iterator[Row], failure: InputError | None) -> Iterator[Row]:
    yield from peeked
    if failure is not None:
        raise failure
    yield from rest
