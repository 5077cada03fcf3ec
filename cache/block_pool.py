"""The block pool: which KV pages are free, which hold a cached prefix, and who holds the others.

Pure bookkeeping, no torch: a block id is an index into the page tensors of `KVCache`. Every block is
in exactly one of three states:

    referenced   ref count > 0: held by one or more sequences (prefix sharing, n samples)
    cached       ref count 0, but registered under a prefix hash: findable by `match_prefix`, and
                 evictable: `allocate` reclaims it (least recently freed first) when no free block is left
    free         ref count 0, holds nothing anyone will look for

    free + cached + referenced == num_blocks

`num_free_blocks` counts free and cached blocks: both can be handed out. Only full blocks, whose K/V
never changes again, are registered, so sharing one never lets two sequences write it.

Failure kinds: no room is a return value (`allocate` returns None); misuse (double free, unknown id,
sharing an uncached block) raises ValueError with the numbers; `check_invariants` raises AssertionError
with the numbers.
"""

from __future__ import annotations

from collections import OrderedDict, deque

BlockHash = bytes


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least 1 block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts: list[int] = [0] * num_blocks
        # FIFO reuse spreads writes over the pool; any order would be correct.
        self._free_queue: deque[int] = deque(range(num_blocks))
        # Unreferenced cached blocks, least recently freed first: the eviction order.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of_block: dict[int, BlockHash] = {}
        self._block_of_hash: dict[BlockHash, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out: free ones and unreferenced cached ones."""
        return len(self._free_queue) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Referenced blocks."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered under a prefix hash, referenced or not."""
        return len(self._hash_of_block)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    def usage(self) -> float:
        """Share of blocks referenced, 0.0 to 1.0."""
        return self.num_used_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` blocks (ref count 1 each), or None if fewer are free. Never partial.
        Free blocks go first; then cached ones are evicted, least recently freed first."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks > self.num_free_blocks:
            return None
        block_ids = []
        for _ in range(num_blocks):
            if self._free_queue:
                block_id = self._free_queue.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                del self._block_of_hash[self._hash_of_block.pop(block_id)]
                self.num_evictions += 1
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        """Add a holder to blocks that are already held."""
        for block_id in block_ids:
            self._check_held(block_id, "share")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one holder from each of a sequence's blocks (given in sequence order). A block whose last
        holder left is free again, or evictable if cached; a sequence's tail is evicted before its head,
        since a head is the more likely to be shared."""
        refs, num_blocks = self._ref_counts, self.num_blocks
        for block_id in reversed(block_ids):
            if not 0 <= block_id < num_blocks or refs[block_id] == 0:  # inline: this runs for every block freed
                self._check_held(block_id, "free")  # raises
            refs[block_id] -= 1
            if refs[block_id] == 0:
                if block_id in self._hash_of_block:
                    self._evictable[block_id] = None
                else:
                    self._free_queue.append(block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    # ---- the prefix cache -------------------------------------------------------------------

    def register(self, block_id: int, block_hash: BlockHash) -> bool:
        """Make a held, full block findable under `block_hash`. False (nothing changes) when another
        block already holds that hash, or this block is registered already."""
        if not 0 <= block_id < self.num_blocks or self._ref_counts[block_id] == 0:  # inline, as in free
            self._check_held(block_id, "register")  # raises
        if block_hash in self._block_of_hash or block_id in self._hash_of_block:
            return False
        self._block_of_hash[block_hash] = block_id
        self._hash_of_block[block_id] = block_hash
        return True

    def match_prefix(self, block_hashes: list[BlockHash]) -> list[int]:
        """The cached blocks of the longest leading run of `block_hashes`; nothing changes."""
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def num_unreferenced(self, block_ids: list[int]) -> int:
        """How many of these blocks have ref count 0: taking them lowers `num_free_blocks` by as much."""
        return sum(1 for block_id in block_ids if self._ref_counts[block_id] == 0)

    def take_cached(self, block_ids: list[int]) -> None:
        """Add a holder to cached blocks (a prefix hit), referenced or evictable."""
        for block_id in block_ids:
            if block_id not in self._hash_of_block:
                raise ValueError(f"cannot take block {block_id} from the prefix cache: it is not cached")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1

    def uncache(self, block_ids: list[int]) -> None:
        """Forget the hashes of these blocks (their K/V cannot be trusted: the step writing them failed).
        Blocks that are not cached are skipped."""
        for block_id in block_ids:
            block_hash = self._hash_of_block.pop(block_id, None)
            if block_hash is None:
                continue
            del self._block_of_hash[block_hash]
            if block_id in self._evictable:
                del self._evictable[block_id]
                self._free_queue.append(block_id)

    # ---- checks -----------------------------------------------------------------------------

    def _check_held(self, block_id: int, verb: str) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"cannot {verb} block {block_id}: the pool has blocks 0..{self.num_blocks - 1}")
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot {verb} block {block_id}: it is free (double free or never allocated)")

    def check_invariants(self) -> None:
        free = list(self._free_queue)
        free_set = set(free)
        assert len(free_set) == len(free), f"free queue holds duplicates: {len(free)} entries, {len(free_set)} distinct"
        assert not free_set & self._evictable.keys(), (
            f"blocks both free and cached-unreferenced: {sorted(free_set & self._evictable.keys())}"
        )
        for block_id, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {block_id} has ref count {count}"
            unreferenced = block_id in free_set or block_id in self._evictable
            assert (count == 0) == unreferenced, (
                f"block {block_id} has ref count {count} but is {'' if unreferenced else 'not '}in the free queue "
                f"or the evictable set"
            )
        for block_id in free:
            assert block_id not in self._hash_of_block, f"free block {block_id} is still registered as cached"
        for block_id in self._evictable:
            assert block_id in self._hash_of_block, f"evictable block {block_id} has no prefix hash"
        assert len(self._hash_of_block) == len(self._block_of_hash) and all(
            self._block_of_hash.get(h) == b for b, h in self._hash_of_block.items()
        ), (
            f"hash maps disagree: {len(self._hash_of_block)} blocks -> hashes, {len(self._block_of_hash)} hashes "
            "-> blocks"
        )
        referenced = sum(1 for count in self._ref_counts if count > 0)
        assert len(free) + len(self._evictable) + referenced == self.num_blocks, (
            f"free + cached-unreferenced + referenced != total: "
            f"{len(free)} + {len(self._evictable)} + {referenced} != {self.num_blocks}"
        )
