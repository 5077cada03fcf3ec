"""time64[ns] values in Python, to the nanosecond (in a column, or in its structs, lists and maps).

pyarrow reads a time64[ns] value as a `datetime.time`, which holds microseconds: the nanoseconds below them are
dropped, silently. A kept column of that type goes input -> Python row -> output, so the reader reads it as a
`NanoTime` (a `datetime.time` that keeps them), the output writes it back from its nanoseconds, and a JSONL output
reads the parts the same way and writes it as ISO text with nine digits ("00:02:03.456789012").
"""

from __future__ import annotations

import datetime
from typing import Any

import pyarrow as pa

TIME_NS = pa.time64("ns")
_NS_PER_US = 1000


class NanoTime(datetime.time):
    """A time of day to the nanosecond: a `datetime.time` (its microseconds) and the nanoseconds below them."""

    nanosecond: int  # 0 to 999

    def __new__(cls, nanoseconds: int) -> NanoTime:
        microseconds, nanosecond = divmod(nanoseconds, _NS_PER_US)
        seconds, microsecond = divmod(microseconds, 1_000_000)
        minutes, second = divmod(seconds, 60)
        hour, minute = divmod(minutes, 60)
        self = super().__new__(cls, hour, minute, second, microsecond)
        self.nanosecond = nanosecond
        return self

    @property
    def nanoseconds(self) -> int:
        """Since midnight: the value time64[ns] holds."""
        seconds = (self.hour * 60 + self.minute) * 60 + self.second
        return (seconds * 1_000_000 + self.microsecond) * _NS_PER_US + self.nanosecond

    def isoformat(self, timespec: str = "auto") -> str:
        if timespec != "auto" or not self.nanosecond:
            return super().isoformat(timespec)
        return f"{super().isoformat('microseconds')}{self.nanosecond:03d}"

    __str__ = isoformat

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.nanoseconds})"

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:  # a Ray run pickles rows: keep the nanoseconds
        return (type(self), (self.nanoseconds,))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, datetime.time) and other.tzinfo is None:
            return self.nanoseconds == nanoseconds_of(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:  # datetime.time's own would compare the microseconds alone
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:  # equal to a datetime.time's where the two are equal
        return super().__hash__() if not self.nanosecond else hash((super().__hash__(), self.nanosecond))


def nanoseconds_of(value: datetime.time) -> int:
    """A time of day (a NanoTime or a datetime.time) as time64[ns] holds it."""
    if isinstance(value, NanoTime):
        return value.nanoseconds
    seconds = (value.hour * 60 + value.minute) * 60 + value.second
    return (seconds * 1_000_000 + value.microsecond) * _NS_PER_US


def python_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """batch.to_pylist(), with each time64[ns] value, in a column or nested in its structs, lists and maps (their
    keys too), a NanoTime."""
    rows = batch.to_pylist()
    for name, kind in zip(batch.schema.names, batch.schema.types):
        if holds_time_ns(kind):
            for row, value in zip(rows, python_values(batch.column(name))):
                row[name] = value
    return rows


def python_values(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """column.to_pylist(), with each time64[ns] value, in it or nested in its structs, lists and maps, a NanoTime."""
    kind = column.type
    if not holds_time_ns(kind):
        return column.to_pylist()
    return [_times(value, kind) for value in column.cast(_as_ints(kind)).to_pylist()]


def time_ns_array(values: list[Any], kind: pa.DataType) -> pa.Array:
    """An array of type `kind` (holds_time_ns) from values as python_rows gives them, to the nanosecond: pa.array
    would take each time's microseconds alone."""
    return pa.array([_nanoseconds(v, kind) for v in values], _as_ints(kind)).cast(kind)


def holds_time_ns(kind: pa.DataType) -> bool:
    """time64[ns], or a struct, list or map with it inside (the types python_rows and time_ns_array handle)."""
    if kind == TIME_NS:
        return True
    if pa.types.is_struct(kind):
        return any(holds_time_ns(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return holds_time_ns(kind.value_type)
    if pa.types.is_map(kind):
        return holds_time_ns(kind.key_type) or holds_time_ns(kind.item_type)
    return False


def _as_ints(kind: pa.DataType) -> pa.DataType:
    """`kind` with each time64[ns] an int64, its nanoseconds (the two cast into each other exactly)."""
    if kind == TIME_NS:
        return pa.int64()
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(_as_ints(kind.field(i).type)) for i in range(kind.num_fields)])
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(kind.value_field.with_type(_as_ints(kind.value_type)), kind.list_size)
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_as_ints(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_as_ints(kind.value_type)))
    if pa.types.is_map(kind):
        key, item = kind.key_field, kind.item_field
        return pa.map_(key.with_type(_as_ints(key.type)), item.with_type(_as_ints(item.type)), kind.keys_sorted)
    return kind


def _times(value: Any, kind: pa.DataType) -> Any:
    """A value of _as_ints(kind) as Python, with its nanoseconds as NanoTime."""
    if value is None or not holds_time_ns(kind):
        return value
    if kind == TIME_NS:
        return NanoTime(value)
    if pa.types.is_struct(kind):
        return {f.name: _times(value[f.name], f.type) for f in kind}
    if pa.types.is_map(kind):  # its entries, as (key, value) pairs
        return [(_times(k, kind.key_type), _times(v, kind.item_type)) for k, v in value]
    return [_times(v, kind.value_type) for v in value]


def _nanoseconds(value: Any, kind: pa.DataType) -> Any:
    """_times, undone: a Python value of `kind` with its times of day as nanoseconds."""
    if value is None or not holds_time_ns(kind):
        return value
    if kind == TIME_NS:
        return nanoseconds_of(value)
    if pa.types.is_struct(kind):
        if isinstance(value, tuple):  # a map's (key, value) entry, kept as a {key, value} struct: read by position
            return tuple(_nanoseconds(v, f.type) for v, f in zip(value, kind))
        return {f.name: _nanoseconds(value.get(f.name), f.type) for f in kind}
    if pa.types.is_map(kind):
        entries = value.items() if isinstance(value, dict) else value
        return [(_nanoseconds(k, kind.key_type), _nanoseconds(v, kind.item_type)) for k, v in entries]
    return [_nanoseconds(v, kind.value_type) for v in value]
