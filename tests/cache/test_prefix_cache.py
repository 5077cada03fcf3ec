"""Prefix-cache keys and the cached state of the block pool: exact ids on tiny pools, then hypothesis."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbatch.cache.block_pool import BlockPool
from kvbatch.cache.prefix_cache import ReuseEstimate, chain_hashes, hash_block, max_cached_blocks


def test_hashes_chain_over_everything_before_the_block() -> None:
    a = chain_hashes(None, [1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4)
    b = chain_hashes(None, [9, 9, 9, 9, 5, 6, 7, 8], block_size=4)
    assert len(a) == 2 and len(b) == 2  # the partial block gets no hash
    assert a[1] != b[1], "same block tokens after a different prefix must hash differently"
    assert a[0] == hash_block(None, [1, 2, 3, 4]) and a[1] == hash_block(a[0], [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], extra_key=b"lora-7") != a[0]
    assert a + chain_hashes(a[1], [9, 10, 11, 12], block_size=4) == chain_hashes(None, list(range(1, 13)), 4)
    assert len(hash_block(None, [1])) == 16


def test_the_last_token_is_never_taken_from_the_cache() -> None:
    assert [max_cached_blocks(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 0, 0, 1, 1, 2]


def test_hit_eviction_and_lru_order_exact_ids() -> None:
    pool = BlockPool(4)
    h = chain_hashes(None, list(range(12)), block_size=4)  # three chained blocks
    seq = pool.allocate(3)
    assert seq == [0, 1, 2]
    assert [pool.register(b, hb) for b, hb in zip(seq, h)] == [True, True, True]
    other = pool.allocate(1)
    assert other == [3] and pool.register(3, h[0]) is False, "a hash already cached keeps its first block"
    pool.free(other)
    assert pool.match_prefix(h) == [0, 1, 2] and pool.match_prefix([h[1]]) == [1]

    pool.free(seq)  # cached, unreferenced: evictable, the tail (block 2) first
    assert pool.num_free_blocks == 4 and pool.num_evictable_blocks == 3 and pool.num_used_blocks == 0
    pool.check_invariants()
    assert pool.num_unreferenced([0, 1]) == 2
    pool.take_cached([0, 1])  # a hit on the first two blocks
    assert pool.ref_count(0) == 1 and pool.num_free_blocks == 2
    assert pool.allocate(2) == [3, 2], "a never-cached free block goes before evicting a cached one"
    assert pool.num_evictions == 1 and pool.match_prefix(h) == [0, 1], "block 2 lost its hash when evicted"
    pool.check_invariants()


def test_lru_evicts_the_least_recently_freed_first() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    hashes = [hash_block(None, [i]) for i in range(3)]
    for b, h in zip(blocks, hashes):
        pool.register(b, h)
    for b in (1, 0, 2):
        pool.free([b])
    assert pool.allocate(1) == [1] and pool.allocate(1) == [0]
    pool.take_cached([2])  # the last one is a hit, not an eviction
    assert pool.allocate(1) is None and pool.ref_count(2) == 1
    pool.check_invariants()


def test_uncache_withdraws_a_block_and_misuse_raises() -> None:
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    h = hash_block(None, [5])
    pool.register(b, h)
    pool.free([b])
    pool.uncache([b, 1])  # 1 was never cached: skipped
    assert pool.match_prefix([h]) == [] and pool.num_evictable_blocks == 0 and pool.num_free_blocks == 2
    pool.check_invariants()
    with pytest.raises(ValueError, match="block 0 from the prefix cache: it is not cached"):
        pool.take_cached([0])
    with pytest.raises(ValueError, match="cannot register block 1: it is free"):
        pool.register(1, h)


def test_check_invariants_names_the_numbers() -> None:
    pool = BlockPool(3)
    pool.allocate(1)
    pool._free_queue.append(1)  # corrupt: block 1 twice in the free queue
    with pytest.raises(AssertionError, match="free queue holds duplicates: 3 entries, 2 distinct"):
        pool.check_invariants()


def test_reuse_estimate_counts_leading_full_block_hits() -> None:
    est = ReuseEstimate(block_size=4, capacity_blocks=100)
    system = list(range(100, 108))  # two full blocks
    assert est.add(system + [1, 2, 3]) == 0
    assert est.add(system + [4, 5, 6]) == 8
    assert est.add(system) == 4, "an identical prompt still computes its last block"
    assert est.add([7] + system) == 0
    assert est.num_reused_tokens == 12 and est.num_prompt_tokens == 11 + 11 + 8 + 9
    tiny = ReuseEstimate(block_size=4, capacity_blocks=2)
    tiny.add(system + [1])
    tiny.add(list(range(200, 212)))  # three new blocks push the system prompt out
    assert tiny.add(system + [1]) == 0


ops = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "register", "hit", "free", "uncache"]), st.integers(0, 5), st.integers(0, 10**6)
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 16), ops=ops)
def test_random_streams_keep_cached_blocks_exact(num_blocks: int, ops) -> None:
    """Holders own references; `content` is what each block's pages hold. A hit must return blocks whose
    content is the hash asked for, and no block held by anyone is ever handed out again."""
    pool = BlockPool(num_blocks)
    holders: list[list[int]] = []
    content: dict[int, bytes] = {}
    hashes = [hash_block(None, [i]) for i in range(6)]
    for op, n, pick in ops:
        held = {b for h in holders for b in h}
        if op == "alloc":
            got = pool.allocate(n)
            if got:
                assert not held & set(got), "a held block was handed out"
                for b in got:
                    content.pop(b, None)  # whatever it cached is gone: it will be overwritten
                holders.append(got)
        elif op == "register" and holders:
            holder = holders[pick % len(holders)]
            b = holder[pick % len(holder)] if holder else None
            if b is not None and pool.register(b, hashes[n]):
                content[b] = hashes[n]
        elif op == "hit":
            got = pool.match_prefix([hashes[n]])
            if got:
                assert content.get(got[0]) == hashes[n], "a hit returned a block that holds something else"
                pool.take_cached(got)
                holders.append(got)
        elif op == "free" and holders:
            pool.free(holders.pop(pick % len(holders)))
        elif op == "uncache" and holders:
            holder = holders[pick % len(holders)]
            pool.uncache(holder)
            for b in holder:
                content.pop(b, None)
        pool.check_invariants()
        refs: dict[int, int] = {}
        for h in holders:
            for b in h:
                refs[b] = refs.get(b, 0) + 1
        assert all(pool.ref_count(b) == c for b, c in refs.items())
        assert pool.num_used_blocks == len(refs)
    for h in holders:
        pool.free(h)
    assert pool.num_free_blocks == num_blocks and pool.num_used_blocks == 0
    pool.check_invariants()
