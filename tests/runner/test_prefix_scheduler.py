"""The prefix cache in the scheduler, without a model: exact block ids on tiny pools, then hypothesis over
random streams of requests sharing prefixes, checked against a simulated KV store."""

from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvbatch.cache.block_pool import BlockPool
from kvbatch.cache.block_table import slots_for
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.scheduler import Scheduler, SchedulerConfig
from kvbatch.runner.sequence import SeqStatus, Sequence

SYSTEM = [100, 101, 102, 103, 104, 105, 106, 107]  # two blocks of 4


def make_seq(seq_id: int, prompt: list[int], max_new: int = 4, request: GenerationRequest | None = None) -> Sequence:
    request = request or GenerationRequest(seq_id, prompt, SamplingParams(max_new_tokens=max_new))
    return Sequence(seq_id, request, 0, max_new, seed=seq_id)


def make_scheduler(
    num_blocks: int, block_size: int = 4, budget: int = 100, policy: str = "optimistic", prefix_cache: bool = True
) -> tuple[Scheduler, BlockPool]:
    pool = BlockPool(num_blocks)
    config = SchedulerConfig(8, budget, block_size, policy, watermark=0.0, prefix_cache=prefix_cache)
    return Scheduler(config, pool), pool


def step(scheduler: Scheduler, token: int = 7) -> list[Sequence]:
    """Pretend the model ran: every sampling sequence gets `token`; those at their limit finish."""
    out = scheduler.schedule()
    scheduler.advance(out)
    done = []
    for item in out.scheduled:
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.output_token_ids.append(token)
            if len(item.seq.output_token_ids) >= item.seq.max_new_tokens:
                scheduler.finish(item.seq)
                done.append(item.seq)
    scheduler.pool.check_invariants()
    return done


def test_a_finished_prompts_blocks_are_a_hit_for_the_next() -> None:
    scheduler, pool = make_scheduler(8)
    a = make_seq(0, SYSTEM + [1, 2], max_new=1)
    scheduler.add(a)
    assert step(scheduler) == [a]  # blocks [0, 1, 2]; 0 and 1 full and cached; finished after one token
    assert pool.num_cached_blocks == 2 and pool.num_evictable_blocks == 2 and pool.num_free_blocks == 8

    b = make_seq(1, SYSTEM + [3])
    scheduler.add(b)
    out = scheduler.schedule()
    assert b.block_ids == [0, 1, 3] and b.num_computed_tokens == 8
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 1)]
    assert (out.num_queried_tokens, out.num_cached_tokens) == (9, 8)
    pool.check_invariants()


def test_a_whole_cached_prompt_still_computes_its_last_block() -> None:
    scheduler, pool = make_scheduler(8)
    scheduler.add(make_seq(0, SYSTEM, max_new=1))
    step(scheduler)
    again = make_seq(1, SYSTEM)
    scheduler.add(again)
    out = scheduler.schedule()
    # 8 tokens = 2 full blocks, both cached; only the first is taken, so token 7 is computed (for its
    # logits) into a fresh block instead of being written into the shared one.
    assert again.block_ids == [0, 2] and again.num_computed_tokens == 4 and out.scheduled[0].num_new_tokens == 4
    assert pool.ref_count(1) == 0 and pool.match_prefix(again.block_hashes) == [0, 1]


def test_the_n_samples_of_a_prompt_share_its_full_blocks_in_one_step() -> None:
    scheduler, pool = make_scheduler(8)
    request = GenerationRequest("r", SYSTEM + [1, 2], SamplingParams(max_new_tokens=4, n=3))
    seqs = [make_seq(i, [], request=request) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    out = scheduler.schedule()
    assert [s.block_ids for s in seqs] == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert [s.num_new_tokens for s in out.scheduled] == [10, 2, 2]
    assert pool.ref_count(0) == pool.ref_count(1) == 3 and pool.num_used_blocks == 5
    scheduler.advance(out)
    for seq in seqs:
        scheduler.finish(seq)
    assert pool.num_free_blocks == 8 and pool.num_cached_blocks == 2
    pool.check_invariants()


def test_lru_eviction_exact_ids() -> None:
    scheduler, pool = make_scheduler(4, block_size=2)
    # Three finished sequences, each leaving one cached full block (2 tokens) and a partial one.
    for i, prompt in enumerate(([10, 11, 12], [20, 21, 22], [30, 31, 32])):
        seq = make_seq(i, prompt, max_new=1)
        scheduler.add(seq)
        step(scheduler)
    # Block order: seq 0 took [0, 1], seq 1 [2, 3], seq 2 [1, 3]; their heads 0, 2, 1 stay cached.
    assert pool.match_prefix(make_seq(9, [10, 11, 0]).full_block_hashes(2, 2)) == [0]
    assert pool.num_cached_blocks == 3 and pool.num_evictable_blocks == 3
    # A 7-token prompt needs 4 blocks: the free block 3, then the least recently freed cached ones:
    # block 0 (seq 0's head, freed first of the cached), then 2 (seq 1), then 1 (seq 2).
    big = make_seq(3, [40, 41, 42, 43, 44, 45, 46])
    scheduler.add(big)
    scheduler.schedule()
    assert big.block_ids == [3, 0, 2, 1] and pool.num_evictions == 3 and pool.num_cached_blocks == 3
    pool.check_invariants()


def test_a_hit_on_an_evictable_block_is_counted_against_the_free_blocks() -> None:
    scheduler, pool = make_scheduler(4)
    scheduler.add(make_seq(0, SYSTEM + [1], max_new=1))
    step(scheduler)  # blocks 0, 1 cached and unreferenced, 2 and 3 free
    hog = make_seq(1, [50, 51, 52, 53, 54, 55], max_new=4)
    scheduler.add(hog)
    step(scheduler)
    assert hog.block_ids == [3, 2] and pool.num_free_blocks == 2 and pool.num_evictable_blocks == 2
    # 13 tokens: hits blocks 0 and 1 and needs 2 more. Both free blocks are those very hits, so it waits.
    late = make_seq(2, SYSTEM + [9, 9, 9, 9, 9])
    scheduler.add(late)
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == [hog] and late.status is SeqStatus.WAITING and late.block_ids == []
    assert out.num_cached_tokens == 0 and pool.num_cached_blocks == 3  # 0, 1 and the hog's full head, 3
    scheduler.advance(out)
    hog.output_token_ids.append(7)
    scheduler.finish(hog)
    out = scheduler.schedule()
    assert late.block_ids == [0, 1, 2, 3] and out.num_cached_tokens == 8  # free block 2, then evicts 3
    assert pool.num_evictions == 1
    pool.check_invariants()


def test_preempting_a_sequence_that_shares_blocks_frees_only_its_own() -> None:
    scheduler, pool = make_scheduler(5)
    a, b = make_seq(0, SYSTEM + [1, 2], max_new=8), make_seq(1, SYSTEM + [3, 4], max_new=8)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert a.block_ids == [0, 1, 2] and b.block_ids == [0, 1, 3] and pool.ref_count(0) == 2
    step(scheduler)
    step(scheduler)  # 13 tokens each, 12 computed: their third blocks are full and cached too
    out = scheduler.schedule()  # a needs a fourth block (the last free one); then b has none: b goes
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    assert a.block_ids == [0, 1, 2, 4] and b.block_ids == [] and b.num_computed_tokens == 0
    assert pool.ref_count(0) == pool.ref_count(1) == 1 and pool.num_evictable_blocks == 1  # b's block 3
    scheduler.advance(out)
    a.output_token_ids.append(7)
    # b would take 0, 1 (held by a) and its own cached 3, plus one new block: 2 of the 1 free. It waits.
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == [a] and b.status is SeqStatus.WAITING
    scheduler.advance(out)
    a.output_token_ids.append(7)
    scheduler.finish(a)
    out = scheduler.schedule()  # b resumes after its whole cached context, its own third block included
    assert b.block_ids == [0, 1, 3, 4] and b.num_computed_tokens == 12 and out.scheduled[0].num_new_tokens == 1
    assert (out.num_queried_tokens, out.num_cached_tokens) == (13, 12) and pool.num_evictions == 0
    pool.check_invariants()


def test_without_the_prefix_cache_nothing_is_shared() -> None:
    scheduler, pool = make_scheduler(8, prefix_cache=False)
    a, b = make_seq(0, SYSTEM + [1]), make_seq(1, SYSTEM + [2])
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4, 5] and pool.num_cached_blocks == 0
    assert out.num_queried_tokens == 0


def next_token(seq: Sequence) -> int:
    """A stand-in for the model: the next token depends on the whole context (and the sample)."""
    return hash((tuple(seq.all_token_ids), seq.sample_index)) % 5 + 2


tokens = st.lists(st.integers(2, 6), max_size=12)


@settings(max_examples=120, deadline=None)
@given(
    policy=st.sampled_from(["reserve", "optimistic"]),
    block_size=st.sampled_from([1, 2, 4]),
    num_blocks=st.integers(6, 40),
    budget=st.integers(1, 48),
    max_num_seqs=st.integers(1, 6),
    prefixes=st.lists(tokens, min_size=1, max_size=3),
    requests=st.lists(
        st.tuples(st.integers(0, 2), tokens.filter(bool), st.integers(1, 8), st.integers(1, 3), st.integers(0, 30)),
        min_size=1,
        max_size=14,
    ),
    failed_steps=st.sets(st.integers(0, 40), max_size=3),
)
def test_random_shared_prefix_streams_read_only_their_own_kv(
    policy, block_size, num_blocks, budget, max_num_seqs, prefixes, requests, failed_steps
) -> None:
    """A simulated KV store holds, for every slot, the context its writer had: a sequence must read exactly
    its own context at every position, whoever computed it. Also: a written block has one holder, pool
    references match the running sequences, the pool checks out after every step and is whole at the end."""
    pool = BlockPool(num_blocks)
    capacity = num_blocks * block_size
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, block_size, policy), pool)
    arrivals: dict[int, list[Sequence]] = {}
    seqs = []
    for i, (which, suffix, max_new, n, arrival) in enumerate(requests):
        prompt = prefixes[which % len(prefixes)] + suffix
        if len(prompt) >= capacity:
            continue
        max_new = min(max_new, capacity - len(prompt))
        request = GenerationRequest(i, prompt, SamplingParams(max_new_tokens=max_new, n=n))
        for k in range(n):
            seq = Sequence(len(seqs), request, k, max_new, seed=0)
            seqs.append(seq)
            arrivals.setdefault(arrival, []).append(seq)
    kv: dict[int, tuple] = {}
    num_steps = num_cached_tokens = 0
    for _ in range(10_000):
        for seq in arrivals.pop(num_steps, []):
            scheduler.add(seq)
        if not scheduler.has_work():
            if not arrivals:
                break
            num_steps = min(arrivals)
            continue
        out = scheduler.schedule()
        assert out.scheduled and out.num_batched_tokens <= budget
        num_cached_tokens += out.num_cached_tokens
        pool.check_invariants()
        holders: dict[int, int] = {}
        for seq in scheduler.running:
            for b in seq.block_ids:
                holders[b] = holders.get(b, 0) + 1
        assert all(pool.ref_count(b) == n for b, n in holders.items()), "a held block's ref count is off"
        assert pool.num_used_blocks == len(holders), "a block is referenced by no running sequence"
        writers: dict[int, int] = {}
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            for i in range(start // block_size, (end - 1) // block_size + 1):
                b = seq.block_ids[i]
                assert writers.setdefault(b, seq.seq_id) == seq.seq_id, f"block {b} written by two sequences"
                # Shared only if this very step fills it (it was registered when scheduled): a sequence
                # admitted in the same step reads it after the write, and nobody writes it again.
                assert pool.ref_count(b) == 1 or end >= (i + 1) * block_size, (
                    f"seq {seq.seq_id} writes shared block {b}"
                )
        failed = num_steps in failed_steps
        for item in out.scheduled:  # every row's K/V is written before any row attends
            seq, start = item.seq, item.seq.num_computed_tokens
            slots = slots_for(seq.block_ids, start, start + item.num_new_tokens, block_size)
            context = seq.all_token_ids
            for p, slot in zip(range(start, start + item.num_new_tokens), slots):
                kv[slot] = ("garbage",) if failed and p % 2 else tuple(context[: p + 1])
        if failed:
            scheduler.requeue_isolated([item.seq for item in out.scheduled])
            num_steps += 1
            continue
        for item in out.scheduled:
            seq, end = item.seq, item.seq.num_computed_tokens + item.num_new_tokens
            context = seq.all_token_ids
            for p, slot in zip(range(end), slots_for(seq.block_ids, 0, end, block_size)):
                assert kv[slot] == tuple(context[: p + 1]), f"seq {seq.seq_id} reads someone else's K/V at {p}"
        scheduler.advance(out)
        for item in out.scheduled:
            seq = item.seq
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(next_token(seq))
                if len(seq.output_token_ids) >= seq.max_new_tokens:
                    scheduler.finish(seq)
        pool.check_invariants()
        num_steps += 1
    event(
        f"prefix hits: {num_cached_tokens > 0}, preemptions: {scheduler.num_preemptions > 0}, "
        f"evictions: {pool.num_evictions > 0}"
    )
    assert not scheduler.has_work() and not arrivals, "the scheduler did not drain"
    assert all(s.status is SeqStatus.FINISHED and len(s.output_token_ids) == s.max_new_tokens for s in seqs)
    assert pool.num_free_blocks == num_blocks and pool.num_used_blocks == 0
    pool.check_invariants()
