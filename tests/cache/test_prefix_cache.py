"""Prefix-cache keys and the cached state of the block pool: exact ids on tiny pools, then hypothesis."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbatch.cache import prefix_cache
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


def _hashed_alone(token_ids: list[int], block_size: int, extra_key: bytes = b"") -> list[bytes]:
    """chain_hashes with no run before it to take hashes from: every block hashed."""
    prefix_cache._last_run = None
    return chain_hashes(None, token_ids, block_size, extra_key)


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(
        st.tuples(
            st.integers(0, 40),  # tokens shared with the run before (its leading ones)
            st.lists(st.integers(0, 9), max_size=30),  # then tokens of its own (few values: blocks repeat)
            st.sampled_from([1, 4, 16]),  # block size
            st.sampled_from([b"", b"lora-1"]),  # extra key
        ),
        min_size=1,
        max_size=8,
    )
)
def test_a_run_sharing_blocks_with_the_last_takes_over_only_its_own_hashes(runs) -> None:
    """Hashing from the root takes the leading blocks a run shares with the last such run from it (same block size
    and extra key): every hash is still the one hashing each block gives, whatever came before."""
    prefix_cache._last_run = None
    last: list[int] = []
    for num_shared, own, block_size, extra_key in runs:
        tokens = last[:num_shared] + own
        got = chain_hashes(None, tokens, block_size, extra_key)
        got.append(b"x" * 16)  # the caller's list: changing it must not reach later runs
        assert got[:-1] == _hashed_alone(tokens, block_size, extra_key)  # leaves tokens the last run
        last = tokens


def test_a_shared_system_prompt_is_hashed_once(monkeypatch) -> None:
    """Two prompts after one 64-token system prompt (16 blocks of 4): the second hashes only its own blocks."""
    system = list(range(100, 164))
    first, second = system + [1, 2, 3, 4, 5, 6, 7, 8], system + [9, 10, 11, 12, 13]
    prefix_cache._last_run = None
    chain_hashes(None, first, 4)
    calls = []
    blake2b = prefix_cache.hashlib.blake2b
    monkeypatch.setattr(prefix_cache.hashlib, "blake2b", lambda *a, **k: calls.append(1) or blake2b(*a, **k))
    assert chain_hashes(None, second, 4) == _hashed_alone(second, 4)[:17]
    assert len(calls) == 1 + 17, "the second prompt hashed only its own full block, then all 17 hashed alone"
    calls.clear()
    assert chain_hashes(None, second, 4, b"lora-1") == _hashed_alone(second, 4, b"lora-1")
    assert len(calls) == 2 * 17, "another extra key shares nothing"


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
