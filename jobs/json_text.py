"""Row values as standard JSON text.

Python's json writes float('nan') and infinities as bare NaN / Infinity, which strict readers (jq, JavaScript,
Go, Spark) refuse. Outputs that are JSON text write them as null, as pandas and datasets do; Arrow and Parquet
outputs keep the floats themselves.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """json.dumps with non-finite floats as null (the common all-finite line pays one strict dumps)."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False, **options)


# Doubles hold every integer up to this exactly; Arrow refuses to infer a double from a larger one.
_MAX_EXACT_INT = 2**53


def value_text(value: Any, **options: Any) -> str:
    """A value of a column held as JSON text (mixed types): a string as it is, a whole float as an integer, the
    rest as JSON. JSON has one kind of number, and a part whose rows mix ints and floats holds them all as floats:
    writing 1.0 as "1" makes the text the same however a column's rows fell into parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
        return str(int(value))
    return dumps(value, **options)
