"""Block accounting: exact ids on tiny pools, then hypothesis over random allocate/share/free streams."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbatch.cache.block_pool import BlockPool
from kvbatch.cache.block_table import num_blocks_for, slots_for


def test_allocate_and_free_exact_ids() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free_blocks == 1
    assert pool.allocate(2) is None  # never partial
    assert pool.num_free_blocks == 1
    pool.free([1])
    assert pool.allocate(2) == [3, 1]
    pool.check_invariants()


def test_shared_block_is_free_only_after_last_holder() -> None:
    pool = BlockPool(2)
    [a] = pool.allocate(1)
    pool.share([a])
    pool.free([a])
    assert pool.num_free_blocks == 1 and pool.ref_count(a) == 1
    pool.free([a])
    assert pool.num_free_blocks == 2
    pool.check_invariants()


def test_misuse_raises_with_numbers() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="block 1: it is free"):
        pool.free([1])
    with pytest.raises(ValueError, match="blocks 0..1"):
        pool.share([5])
    with pytest.raises(ValueError, match="at least 1 block"):
        BlockPool(0)


def test_slot_math() -> None:
    assert num_blocks_for(0, 4) == 0 and num_blocks_for(4, 4) == 1 and num_blocks_for(5, 4) == 2
    assert slots_for([7, 2, 9], 8, 10, 4) == [36, 37]
    assert slots_for([7, 2, 9], 3, 5, 4) == [31, 8]
    with pytest.raises(ValueError, match="need 4 blocks"):
        slots_for([7, 2, 9], 0, 13, 4)


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "share", "free"]), st.integers(0, 6), st.integers(0, 10**6)), max_size=80
)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 24), ops=ops)
def test_random_streams_never_leak_or_double_use(num_blocks: int, ops) -> None:
    pool = BlockPool(num_blocks)
    holders: list[list[int]] = []  # each holder owns one reference to each of its blocks
    for op, n, pick in ops:
        if op == "alloc":
            got = pool.allocate(n)
            free_before = pool.num_free_blocks + (len(got) if got else 0)
            assert (got is None) == (n > free_before)
            if got:
                held = {b for h in holders for b in h}
                assert not held & set(got), "a free block was handed out while held"
                holders.append(got)
        elif op == "share" and holders:
            blocks = holders[pick % len(holders)]
            pool.share(blocks)
            holders.append(list(blocks))
        elif op == "free" and holders:
            pool.free(holders.pop(pick % len(holders)))
        pool.check_invariants()
        refs = {}
        for h in holders:
            for b in h:
                refs[b] = refs.get(b, 0) + 1
        assert all(pool.ref_count(b) == c for b, c in refs.items())
        assert pool.num_used_blocks == len(refs) <= num_blocks
    for h in holders:
        pool.free(h)
    assert pool.num_free_blocks == num_blocks
    pool.check_invariants()
