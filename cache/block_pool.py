"""The block pool: which KV pages are free, and who holds the others.

Pure bookkeeping, no torch: a block id is an index into the page tensors of `KVCache`.
A block is free exactly when its reference count is 0. Sharing a block (prefix reuse, n samples)
raises its count; a block goes back to the free queue when the last holder frees it.

Failure kinds: no room is a return value (`allocate` returns None); misuse (double free, unknown id)
raises ValueError with the numbers; `check_invariants` raises AssertionError with the numbers.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least 1 block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts: list[int] = [0] * num_blocks
        # FIFO reuse spreads writes over the pool; any order would be correct.
        self._free_queue: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    def usage(self) -> float:
        """Share of blocks held, 0.0 to 1.0."""
        return self.num_used_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks (ref count 1 each), or None if fewer are free. Never partial."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks > len(self._free_queue):
            return None
        block_ids = [self._free_queue.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        """Add a holder to blocks that are already held."""
        for block_id in block_ids:
            self._check_held(block_id, "share")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one holder from each block; a block whose last holder left is free again."""
        for block_id in block_ids:
            self._check_held(block_id, "free")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_queue.append(block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def _check_held(self, block_id: int, verb: str) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"cannot {verb} block {block_id}: the pool has blocks 0..{self.num_blocks - 1}")
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot {verb} block {block_id}: it is free (double free or never allocated)")

    def check_invariants(self) -> None:
        free = list(self._free_queue)
        free_set = set(free)
        assert len(free_set) == len(free), f"free queue holds duplicates: {len(free)} entries, {len(free_set)} distinct"
        for block_id, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {block_id} has ref count {count}"
            assert (count == 0) == (block_id in free_set), (
                f"block {block_id} has ref count {count} but is {'in' if block_id in free_set else 'not in'} "
                f"the free queue"
            )
        held = sum(1 for count in self._ref_counts if count > 0)
        assert held + len(free) == self.num_blocks, (
            f"free + held != total: {len(free)} + {held} != {self.num_blocks}"
        )
