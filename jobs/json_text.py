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
