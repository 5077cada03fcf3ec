"""The output of one shard: an ordinary resumable kvbatch output that holds only the shard's rows.

`row` keeps the input row index, so a shard file reads like a slice of the whole output and `kvbatch merge`
can check every row. The only difference from OutputWriter is the final check: the shard's own rows,
not rows 0..N-1.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kvbatch.errors import JobError

from .shard import Shard, parse_shard
from .writer import OutputWriter


def shard_order(table: pa.Table, shard: Shard, num_input_rows: int) -> np.ndarray:
    """Indexes into `table` that list the shard's rows once each, in input order; raise if any is missing."""
    rows = table.column("row").to_numpy()
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    expected = np.arange(shard.index, num_input_rows, shard.count)
    if not np.array_equal(sorted_rows, expected):
        missing = np.setdiff1d(expected, sorted_rows)
        unexpected = len(sorted_rows) - (len(expected) - len(missing))  # duplicates and other shards' rows
        raise JobError(
            f"shard {shard}: {len(missing)} of its rows have no result (first: {missing[:10].tolist()}), "
            f"{unexpected} rows do not belong; rerun the shard"
        )
    return order


class ShardWriter(OutputWriter):
    def __init__(self, *args, shard: Shard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shard = shard

    def output_order(self, table: pa.Table, num_rows: int) -> np.ndarray:
        """The shard's own rows of the input, in input order; `num_rows` counts the whole input."""
        return shard_order(table, self.shard, num_rows)


def job_shard(shard_text: str | None) -> Shard | None:
    """The shard a job runs as, from its `parallel.shard`; None for the whole input (also for "0/1")."""
    shard = parse_shard(shard_text, field="parallel.shard") if shard_text else None
    return shard if shard is not None and shard.count > 1 else None


def writer_for(shard: Shard | None, *args, **kwargs) -> OutputWriter:
    """OutputWriter for a whole job, ShardWriter for one shard of it (same arguments)."""
    return OutputWriter(*args, **kwargs) if shard is None else ShardWriter(*args, shard=shard, **kwargs)
