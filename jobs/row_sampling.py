"""A row's own sampling values: from an OpenAI Batch body, from columns named like the fields
(`sampling_columns: [temperature, seed]`), or from one column holding a mapping per row (`sampling_column:
settings`). A null leaves the job's value; the values are checked as the job's are, when the pipeline builds the
row's SamplingParams (a bad one is that row's `bad_request` error row). A column's whole float where the field is an
integer (`64.0`: pandas stores an integer column with missing values as floats) is that integer, and a decimal
(DuckDB's and Spark's type of a literal such as 0.7) the number it spells; JSON text or an Arrow map where the field
is a mapping (structured_outputs, logit_bias) is that mapping. A null token in a logit_bias mapping is no bias: an
Arrow struct holds every key of the column on every row, null where the row set none.

Precedence: sampling_columns > sampling_column > the OpenAI body > the job's `sampling:`.
"""

from __future__ import annotations

import dataclasses
import typing
from decimal import Decimal
from typing import Any

from kvbatch.errors import ErrorKind
from kvbatch.runner.config import SamplingParams

from .rows import Row, RowError, mapping_value, type_name
from .spec import WHOLE_VALUES, JobSpec, unread_sampling

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
INTEGER_FIELDS = frozenset(
    name for name, hint in typing.get_type_hints(SamplingParams).items() if hint in (int, int | None)
)
DEFAULT_SAMPLING = SamplingParams()
FLOAT_FIELDS = frozenset(
    name for name, hint in typing.get_type_hints(SamplingParams).items() if hint in (float, float | None)
)


def sampling_columns(job: JobSpec) -> list[str]:
    """The input columns a job reads for its rows' sampling values."""
    return [*job.sampling_columns, *([job.sampling_column] if job.sampling_column else [])]


def row_sampling(row: Row, job: JobSpec) -> dict[str, Any] | RowError:
    """The row's sampling values over the job's, as keyword arguments for dataclasses.replace."""
    data = row.data or {}
    values = dict(row.sampling)
    column = job.sampling_column
    if column is not None and data.get(column) is not None:
        mapping = mapping_value(data[column])
        if mapping is None:
            got = type_name(data[column])
            return RowError(
                ErrorKind.WRONG_TYPE,
                f"{row.where}: column {column!r} is {got}, expected a mapping of sampling fields (or JSON text of one)",
            )
        unknown = [k for k in mapping if k not in SAMPLING_FIELDS]
        if unknown:
            return RowError(
                ErrorKind.BAD_REQUEST,
                f"{row.where}: column {column!r} sets {', '.join(map(repr, unknown))}, not a sampling field "
                f"(fields: {', '.join(SAMPLING_FIELDS)})",
            )
        given = {k: _whole(k, v) for k, v in mapping.items() if v is not None}  # a struct's unset fields
        # As the job's own values and its sampling_columns are refused at load: a value this job's rows never
        # read (a scoring row's temperature, a stop beside the job's constraint) would be dropped without a word.
        # A sampling_column from `defaults:` serves the file's other jobs too: its values meant for them pass over.
        unread = unread_sampling(job) if given and not job.takes_from_defaults("sampling_column") else {}
        for name, value in given.items():
            if name in unread and not _is_default(name, value):
                return RowError(
                    ErrorKind.BAD_REQUEST, f"{row.where}: column {column!r} sets {name}, which {unread[name]}"
                )
        values.update(given)
    for name in job.sampling_columns:
        if data.get(name) is not None:
            values[name] = _whole(name, data[name])
    return values


def _is_default(name: str, value: Any) -> bool:
    """Whether `value` is the field's default as SamplingParams reads it: `stop: []` is its `()`, `logit_bias: {}`
    its no bias, as the job's own values are compared once parsed. A value it refuses is no default."""
    try:
        return getattr(dataclasses.replace(DEFAULT_SAMPLING, **{name: value}), name) == getattr(DEFAULT_SAMPLING, name)
    except (TypeError, ValueError):
        return False


def _whole(name: str, value: Any) -> Any:
    """A column's value as the field reads it: a whole float of an integer field is that integer; JSON text or an
    Arrow map where the field is one mapping (a constraint, logit_bias) is that mapping."""
    if isinstance(value, Decimal) and value.is_finite():
        # DuckDB and Spark write a literal such as 0.7 as DECIMAL(2,1): it is the number it spells. One that is
        # not whole stays a Decimal where the field is an integer, refused as any other non-integer.
        if name in FLOAT_FIELDS:
            return float(value)
        if name in INTEGER_FIELDS and value == value.to_integral_value():
            return int(value)
    if name in INTEGER_FIELDS and type(value) is float and value.is_integer():
        return int(value)
    if name in WHOLE_VALUES and isinstance(value, (str, list)):
        mapping = mapping_value(value)
        value = value if mapping is None else mapping
    if name == "logit_bias" and isinstance(value, dict):
        # pandas writes a column of {"50256": -100} and {"7": 2} dicts as struct<50256, 7>: each row then reads
        # every key, the ones it did not set null, and every row failed as a bad logit_bias.
        return {token: bias for token, bias in value.items() if bias is not None}
    return value
