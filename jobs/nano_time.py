"""time64[ns] values in Python, to the nanosecond.

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
    """batch.to_pylist(), with each time64[ns] column's values as NanoTime (columns nested in structs or lists
    still read as datetime.time)."""
    rows = batch.to_pylist()
    for name, kind in zip(batch.schema.names, batch.schema.types):
        if kind == TIME_NS:
            values = batch.column(name).cast(pa.int64()).to_pylist()
            for row, value in zip(rows, values):
                row[name] = None if value is None else NanoTime(value)
    return rows


def time_ns_array(values: list[Any]) -> pa.Array:
    """A time64[ns] array of times of day (NanoTime, datetime.time) or None, to the nanosecond."""
    return pa.array([None if v is None else nanoseconds_of(v) for v in values], pa.int64()).cast(TIME_NS)
