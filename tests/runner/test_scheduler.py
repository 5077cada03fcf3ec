"""The scheduler driven without a model: exact decisions on tiny pools, then hypothesis over random streams."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbatch.cache.block_pool import BlockPool
from kvbatch.cache.block_table import num_blocks_for
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.scheduler import Scheduler, SchedulerConfig
from kvbatch.runner.sequence import SeqStatus, Sequence


def make_seq(seq_id: int, num_prompt: int, max_new: int) -> Sequence:
    """Prompts of different sequences share no block (their first tokens differ)."""
    prompt = [1000 + seq_id] + list(range(2, 1 + num_prompt))
    request = GenerationRequest(seq_id, prompt, SamplingParams(max_new_tokens=max_new))
    return Sequence(seq_id, request, 0, max_new, seed=seq_id)


def run_step(scheduler: Scheduler) -> list[Sequence]:
    """Pretend the model ran: advance, append a token to sampling sequences, finish those at their limit."""
    out = scheduler.schedule()
    scheduler.advance(out)
    done = []
    for item in out.scheduled:
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.output_token_ids.append(5)
            if len(item.seq.output_token_ids) >= item.seq.max_new_tokens:
                scheduler.finish(item.seq)
                done.append(item.seq)
    return done


def test_reserve_holds_prompt_plus_max_new_and_waits_for_room() -> None:
    pool = BlockPool(6)
    scheduler = Scheduler(SchedulerConfig(8, 100, block_size=4, policy="reserve"), pool)
    a, b = make_seq(0, 10, 6), make_seq(1, 9, 6)  # 16 and 15 tokens: 4 blocks each
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == [a] and a.block_ids == [0, 1, 2, 3]
    assert pool.num_free_blocks == 2 and b.status is SeqStatus.WAITING


def test_chunked_prefill_under_token_budget() -> None:
    pool = BlockPool(16)
    scheduler = Scheduler(SchedulerConfig(8, 5, block_size=4), pool)
    seq = make_seq(0, 12, 2)
    scheduler.add(seq)
    chunks = []
    for _ in range(3):
        out = scheduler.schedule()
        chunks.append(out.scheduled[0].num_new_tokens)
        scheduler.advance(out)
    assert chunks == [5, 5, 2] and seq.num_computed_tokens == 12
    assert len(seq.block_ids) == 3


def test_optimistic_preempts_the_newest_when_the_pool_runs_dry() -> None:
    pool = BlockPool(4)
    scheduler = Scheduler(SchedulerConfig(8, 100, block_size=2, policy="optimistic", watermark=0.0), pool)
    old, new = make_seq(0, 4, 4), make_seq(1, 3, 4)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefilled: 2 + 2 blocks, pool full
    assert pool.num_free_blocks == 0
    out = scheduler.schedule()  # old needs a third block for token 5: new is preempted
    assert out.preempted == [new] and new.num_computed_tokens == 0 and new.status is SeqStatus.WAITING
    assert [s.seq for s in out.scheduled] == [old]


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(["reserve", "optimistic"]),
    block_size=st.sampled_from([1, 2, 4, 16]),
    num_blocks=st.integers(4, 40),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 8),
    requests=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=25),
)
def test_random_streams_finish_and_return_every_block(
    policy, block_size, num_blocks, budget, max_num_seqs, requests
) -> None:
    pool = BlockPool(num_blocks)
    capacity = num_blocks * block_size
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, block_size, policy), pool)
    seqs = []
    for i, (num_prompt, max_new) in enumerate(requests):
        if num_prompt >= capacity:
            continue  # the engine turns these into error results before they reach the scheduler
        seq = make_seq(i, num_prompt, min(max_new, capacity - num_prompt))
        seqs.append(seq)
        scheduler.add(seq)
    finished = []
    for _ in range(10_000):
        if not scheduler.has_work():
            break
        out = scheduler.schedule()
        assert out.scheduled, "a step with work waiting scheduled nothing"
        assert out.num_batched_tokens <= budget
        assert len(scheduler.running) <= max_num_seqs
        pool.check_invariants()
        owners: dict[int, int] = {}
        for seq in scheduler.running:
            for b in seq.block_ids:
                assert b not in owners, f"block {b} held by seqs {owners[b]} and {seq.seq_id}"
                owners[b] = seq.seq_id
        assert len(owners) == pool.num_used_blocks, "a block is held by nobody, or by a finished sequence"
        for item in out.scheduled:
            need = num_blocks_for(item.seq.num_computed_tokens + item.num_new_tokens, block_size)
            assert len(item.seq.block_ids) >= need
            if policy == "reserve":
                assert len(item.seq.block_ids) == num_blocks_for(item.seq.max_num_tokens, block_size)
        if policy == "reserve":
            assert not out.preempted
        scheduler.advance(out)
        for item in out.scheduled:
            if item.seq.num_computed_tokens == item.seq.num_tokens:
                item.seq.output_token_ids.append(5)
                if len(item.seq.output_token_ids) >= item.seq.max_new_tokens:
                    scheduler.finish(item.seq)
                    finished.append(item.seq)
    assert not scheduler.has_work(), "the scheduler did not drain"
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert all(len(s.output_token_ids) == s.max_new_tokens for s in seqs)
    assert pool.num_free_blocks == num_blocks
    pool.check_invariants()
