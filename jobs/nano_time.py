"""Nanosecond values in Python, to the nanosecond: time64[ns], timestamp[ns] (with or without a time zone) and
duration[ns], in a column or in its structs, lists and maps.

pyarrow reads a time64[ns] value as a `datetime.time`, which holds microseconds: the nanoseconds below them are
dropped, silently. A timestamp[ns] or duration[ns] value it reads as a pandas Timestamp or Timedelta where pandas
is installed (kvbatch does not need it), and refuses where it is not, unless the value is whole microseconds: every
row of a Parquet file pandas wrote with such a column failed. A kept column of these types goes input -> Python
row -> output, so the reader reads it as a `NanoTime`, `NanoDatetime` or `NanoDuration` (the `datetime` type with
the nanoseconds below its microseconds), the output writes it back from its nanoseconds, and a JSONL output reads
the parts the same way and writes it as text with nine digits ("00:02:03.456789012", "2023-11-14
22:13:20.123456789+00:00", "0:00:00.000000005"), whether pandas is installed or not.
"""

from __future__ import annotations

import datetime
import functools
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


class NanoDatetime(datetime.datetime):
    """A timestamp to the nanosecond: a `datetime.datetime` (its microseconds) and the nanoseconds below them."""

    nanosecond: int  # 0 to 999

    def __new__(cls, *fields: Any, nanosecond: int = 0, **named: Any) -> NanoDatetime:
        self = super().__new__(cls, *fields, **named)
        self.nanosecond = nanosecond
        return self

    @classmethod
    def of(cls, nanoseconds: int, tz: str | None) -> NanoDatetime:
        """The value timestamp[ns, tz] holds: nanoseconds since the epoch (UTC where the type has a time zone)."""
        microseconds, nanosecond = divmod(nanoseconds, _NS_PER_US)
        zone = _tzinfo(tz) if tz else None
        moment = _EPOCH + datetime.timedelta(microseconds=microseconds)
        if zone is not None:
            moment = moment.replace(tzinfo=datetime.timezone.utc).astimezone(zone)
        return cls(*moment.timetuple()[:6], moment.microsecond, moment.tzinfo, fold=moment.fold, nanosecond=nanosecond)

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        if timespec != "auto" or not self.nanosecond:
            return super().isoformat(sep, timespec)
        text = super().isoformat(sep, "microseconds")
        end = len(self.date().isoformat()) + len(sep) + len("00:00:00.000000")  # the offset, if any, follows
        return f"{text[:end]}{self.nanosecond:03d}{text[end:]}"

    def __str__(self) -> str:
        return self.isoformat(" ")

    def __repr__(self) -> str:
        text = super().__repr__()  # NanoDatetime(2023, 11, 14, ...)
        return f"{text[:-1]}, nanosecond={self.nanosecond})" if self.nanosecond else text

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:  # a Ray run pickles rows: keep the nanoseconds
        return (_nano_datetime, (super().__reduce_ex__(protocol)[1], self.nanosecond))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, datetime.datetime):
            return NotImplemented
        if (self.tzinfo is None) != (other.tzinfo is None):
            return False  # as datetime compares naive and aware times
        return datetime.datetime.__eq__(self, other) and self.nanosecond == _nanosecond(other)

    def __ne__(self, other: object) -> bool:  # datetime's own would compare the microseconds alone
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:  # equal to a datetime's where the two are equal
        return super().__hash__() if not self.nanosecond else hash((super().__hash__(), self.nanosecond))


def _nano_datetime(state: tuple[Any, ...], nanosecond: int) -> NanoDatetime:
    return NanoDatetime(*state, nanosecond=nanosecond)


class NanoDuration(datetime.timedelta):
    """A duration to the nanosecond: a `datetime.timedelta` (its microseconds) and the nanoseconds above them."""

    nanosecond: int  # 0 to 999, added to the timedelta's microseconds (-5 ns: -1 microsecond and 995)

    def __new__(cls, nanoseconds: int) -> NanoDuration:
        microseconds, nanosecond = divmod(nanoseconds, _NS_PER_US)
        self = super().__new__(cls, microseconds=microseconds)
        self.nanosecond = nanosecond
        return self

    @property
    def nanoseconds(self) -> int:
        """The value duration[ns] holds."""
        return (self // datetime.timedelta(microseconds=1)) * _NS_PER_US + self.nanosecond

    def __str__(self) -> str:
        text = super().__str__()
        if not self.nanosecond:
            return text
        return f"{text if '.' in text else text + '.000000'}{self.nanosecond:03d}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.nanoseconds})"

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (type(self), (self.nanoseconds,))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, datetime.timedelta):
            return self.nanoseconds == _duration_nanoseconds(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return super().__hash__() if not self.nanosecond else hash((super().__hash__(), self.nanosecond))


_EPOCH = datetime.datetime(1970, 1, 1)


@functools.lru_cache(maxsize=64)
def _tzinfo(tz: str) -> datetime.tzinfo:
    """The tzinfo pyarrow gives a timestamp of this time zone (a name, or an offset like +01:00)."""
    return pa.scalar(0, pa.timestamp("us", tz)).as_py().tzinfo


def _nanosecond(value: datetime.datetime | datetime.time) -> int:
    """The nanoseconds below a value's microseconds: a NanoDatetime's or NanoTime's, a pandas Timestamp's (a Ray run
    reads rows with pandas), 0 for a plain datetime."""
    nanosecond = getattr(value, "nanosecond", 0)
    return nanosecond if isinstance(nanosecond, int) else 0


def _timestamp_nanoseconds(value: datetime.datetime) -> int:
    """A timestamp as timestamp[ns] holds it: since the epoch, UTC for an aware one (pyarrow reads a naive value
    of an aware type as UTC, too)."""
    epoch = _EPOCH if value.tzinfo is None else _EPOCH.replace(tzinfo=datetime.timezone.utc)
    naive = value.replace(tzinfo=None) if value.tzinfo is None else value
    return (naive - epoch) // datetime.timedelta(microseconds=1) * _NS_PER_US + _nanosecond(value)


def _duration_nanoseconds(value: datetime.timedelta) -> int:
    """A duration as duration[ns] holds it (a pandas Timedelta's nanoseconds too)."""
    if isinstance(value, NanoDuration):
        return value.nanoseconds
    extra = getattr(value, "nanoseconds", 0)  # a pandas Timedelta: its nanoseconds below the microseconds
    return (value // datetime.timedelta(microseconds=1)) * _NS_PER_US + (extra if isinstance(extra, int) else 0)


def nanoseconds_of(value: datetime.time) -> int:
    """A time of day (a NanoTime or a datetime.time) as time64[ns] holds it."""
    if isinstance(value, NanoTime):
        return value.nanoseconds
    seconds = (value.hour * 60 + value.minute) * 60 + value.second
    return (seconds * 1_000_000 + value.microsecond) * _NS_PER_US


def python_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """batch.to_pylist(), with each nanosecond value (holds_time_ns), in a column or nested in its structs, lists and
    maps (their keys too), a NanoTime, NanoDatetime or NanoDuration. Column by column: batch.to_pylist() itself
    refuses a timestamp[ns] without pandas."""
    names = batch.schema.names
    if not names:
        return [{} for _ in range(batch.num_rows)]
    columns = [python_values(batch.column(i)) for i in range(len(names))]
    return [dict(zip(names, values)) for values in zip(*columns)]


def python_values(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """column.to_pylist(), with each nanosecond value, in it or nested in its structs, lists and maps, a NanoTime,
    NanoDatetime or NanoDuration."""
    kind = column.type
    if not holds_time_ns(kind):
        return column.to_pylist()
    return [_times(value, kind) for value in column.cast(_as_ints(kind)).to_pylist()]


def time_ns_array(values: list[Any], kind: pa.DataType) -> pa.Array:
    """An array of type `kind` (holds_time_ns) from values as python_rows gives them, to the nanosecond: pa.array
    would take each time's microseconds alone."""
    return pa.array([_nanoseconds(v, kind) for v in values], _as_ints(kind)).cast(kind)


def is_nanosecond(kind: pa.DataType) -> bool:
    """time64[ns], timestamp[ns] (any time zone) or duration[ns]: what Python's datetime types hold to the
    microsecond only."""
    return kind == TIME_NS or (
        (pa.types.is_timestamp(kind) or pa.types.is_duration(kind)) and kind.unit == "ns"  # type: ignore[attr-defined]
    )


def holds_time_ns(kind: pa.DataType) -> bool:
    """A nanosecond type (is_nanosecond), or a struct, list or map with one inside (the types python_rows and
    time_ns_array handle)."""
    if is_nanosecond(kind):
        return True
    if pa.types.is_struct(kind):
        return any(holds_time_ns(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return holds_time_ns(kind.value_type)
    if pa.types.is_map(kind):
        return holds_time_ns(kind.key_type) or holds_time_ns(kind.item_type)
    return False


def _as_ints(kind: pa.DataType) -> pa.DataType:
    """`kind` with each nanosecond type an int64, its nanoseconds (the two cast into each other exactly)."""
    if is_nanosecond(kind):
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
    """A value of _as_ints(kind) as Python, with its nanoseconds as NanoTime, NanoDatetime or NanoDuration."""
    if value is None or not holds_time_ns(kind):
        return value
    if kind == TIME_NS:
        return NanoTime(value)
    if pa.types.is_timestamp(kind):
        return NanoDatetime.of(value, kind.tz)  # type: ignore[attr-defined]
    if pa.types.is_duration(kind):
        return NanoDuration(value)
    if pa.types.is_struct(kind):
        return {f.name: _times(value[f.name], f.type) for f in kind}
    if pa.types.is_map(kind):  # its entries, as (key, value) pairs
        return [(_times(k, kind.key_type), _times(v, kind.item_type)) for k, v in value]
    return [_times(v, kind.value_type) for v in value]


def _nanoseconds(value: Any, kind: pa.DataType) -> Any:
    """_times, undone: a Python value of `kind` with its nanosecond values as their nanoseconds."""
    if value is None or not holds_time_ns(kind):
        return value
    if kind == TIME_NS:
        return nanoseconds_of(value)
    if pa.types.is_timestamp(kind):
        return _timestamp_nanoseconds(value)
    if pa.types.is_duration(kind):
        return _duration_nanoseconds(value)
    if pa.types.is_struct(kind):
        if isinstance(value, tuple):  # a map's (key, value) entry, kept as a {key, value} struct: read by position
            return tuple(_nanoseconds(v, f.type) for v, f in zip(value, kind))
        return {f.name: _nanoseconds(value.get(f.name), f.type) for f in kind}
    if pa.types.is_map(kind):
        entries = value.items() if isinstance(value, dict) else value
        return [(_nanoseconds(k, kind.key_type), _nanoseconds(v, kind.item_type)) for k, v in entries]
    return [_nanoseconds(v, kind.value_type) for v in value]
