"""Async scheduling (the next step planned and launched before the host has the last one's tokens) gives
exactly what the synchronous loop gives: same tokens, stop reasons and log-probabilities, under stops
that waste a planned decode, sampling, preemption, the prefix cache and failing steps.

On the CPU nothing overlaps, but every path of the pipeline runs: pending tokens, inputs filled from the
step in flight, spare decodes dropped, the fallback to draining."""

import copy
import dataclasses

import pytest
import torch
from broken_steps import FailsOnce
from hypothesis import given, settings
from hypothesis import strategies as st
from test_exact_vs_generate import random_prompts
from tiny_models import tiny_loaded

from kvbatch.cache import backends
from kvbatch.runner import engine as engine_module
from kvbatch.runner import sampling
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.scheduler import Scheduler


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", seed=11)


def make_engine(loaded, async_scheduling: bool, **overrides) -> Engine:
    config = dict(block_size=4, num_blocks_override=96, max_num_batched_tokens=48, max_num_seqs=4, seed=3)
    config.update(overrides)
    return Engine.from_loaded(loaded, EngineConfig(async_scheduling=async_scheduling, **config))


def outcome(engine: Engine, requests: list[GenerationRequest]) -> dict:
    return {
        r.request_id: (r.error, [(c.token_ids, c.finish_reason, c.logprobs) for c in r.completions])
        for r in engine.generate(requests)
    }


def first_tokens(loaded, prompts: list[list[int]], n: int) -> list[list[int]]:
    engine = make_engine(loaded, False)
    got = outcome(
        engine,
        [GenerationRequest(i, p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for i, p in enumerate(prompts)],
    )
    return [got[i][1][0][0] for i in range(len(prompts))]


def mixed_requests(loaded, seed: int) -> list[GenerationRequest]:
    """Greedy rows, rows that stop on a token they will produce (so a decode was planned past their end),
    seeded samples with n > 1, log-probabilities, and a repetition penalty (which makes the loop drain)."""
    prompts = random_prompts(14, 1, 30, seed=seed)
    early = first_tokens(loaded, prompts, 12)
    requests = []
    for i, prompt in enumerate(prompts):
        kind = i % 5
        if kind == 0:
            params = SamplingParams(max_new_tokens=6 + i, ignore_eos=True)
        elif kind == 1:
            params = SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=(early[i][4 + i % 5],))
        elif kind == 2:
            params = SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.9, n=3, seed=i, ignore_eos=True)
        elif kind == 3:
            params = SamplingParams(max_new_tokens=7, logprobs=True, ignore_eos=True)
        else:
            params = SamplingParams(max_new_tokens=8, repetition_penalty=1.3, ignore_eos=True)
        requests.append(GenerationRequest(i, prompt, params))
    return requests


def test_async_gives_what_the_synchronous_loop_gives(loaded) -> None:
    requests = mixed_requests(loaded, seed=21)
    want = outcome(make_engine(loaded, False), requests)
    engine = make_engine(loaded, True)
    got = outcome(engine, requests)
    assert got == want
    assert engine.stats.num_steps_ahead > 0
    assert engine.stats.num_output_tokens == sum(len(c[0]) for _, completions in got.values() for c in completions)
    assert engine.stats.num_spare_tokens > 0  # rows stopping on a token had a decode planned past their end
    stopped = [want[r.request_id][1][0] for r in requests if r.sampling.stop_token_ids]
    assert all(reason == "stop" and len(tokens) < 20 for tokens, reason, _ in stopped)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks  # spare decodes' pages came back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device runs ahead of the host only on CUDA")
def test_async_gives_what_the_synchronous_loop_gives_on_the_gpu(loaded) -> None:
    """Where the overlap is real: CUDA graphs, fused layers, Triton kernels, steps launched before the host has
    the tokens of the one before, prompt chunks and admissions planned ahead. The same tokens and stop reasons;
    log-probabilities to float32 rounding, not bit for bit: the decodes planned past a row's stop make later steps
    batch other rows than the synchronous loop's (from the sixth step here), and cuBLAS picks its GEMM kernel by
    the row count (on an H100: 1.7e-6 apart, while each loop against itself gives the same bits)."""
    gpu = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to("cuda"), device=torch.device("cuda"))
    requests = mixed_requests(loaded, seed=21)
    want = outcome(make_engine(gpu, False), requests)
    engine = make_engine(gpu, True)
    assert engine.uses_cuda_graphs and engine.fused is not None
    got = outcome(engine, requests)
    assert got.keys() == want.keys()
    for request_id, (error, completions) in got.items():
        assert error is None and want[request_id][0] is None
        assert [c[:2] for c in completions] == [c[:2] for c in want[request_id][1]]
        for (_, _, logprobs), (_, _, expected) in zip(completions, want[request_id][1], strict=True):
            assert (logprobs is None) == (expected is None)
            if logprobs is not None:
                assert logprobs == pytest.approx(expected, abs=1e-5)
    assert engine.stats.num_steps_ahead > 0 and engine.stats.num_spare_tokens > 0
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_async_under_preemption_with_shared_prefixes(loaded) -> None:
    system = random_prompts(1, 10, 10, seed=4)[0]
    prompts = [system + p for p in random_prompts(8, 2, 10, seed=5)]
    requests = [
        GenerationRequest(i, p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)
    ]
    tight = dict(num_blocks_override=14, max_num_seqs=6)  # 56 tokens for six sequences of up to 36: preemption
    want = outcome(make_engine(loaded, False, prefix_cache=False, **tight), requests)
    engine = make_engine(loaded, True, **tight)
    assert outcome(engine, requests) == want
    assert engine.stats.num_preemptions > 0 and engine.stats.num_steps_ahead > 0
    assert engine.stats.num_cached_prompt_tokens > 0


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), max_num_seqs=st.integers(1, 6), budget=st.integers(6, 40))
def test_async_equals_sync_on_random_workloads(loaded, seed: int, max_num_seqs: int, budget: int) -> None:
    prompts = random_prompts(7, 1, 20, seed=seed)
    requests = [
        GenerationRequest(
            i, p, SamplingParams(max_new_tokens=3 + (seed + i) % 9, ignore_eos=True, stop_token_ids=(7 + i,))
        )
        for i, p in enumerate(prompts)
    ]
    shape = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    assert outcome(make_engine(loaded, True, **shape), requests) == outcome(
        make_engine(loaded, False, **shape), requests
    )


def _greedy_requests() -> list[GenerationRequest]:
    prompts = random_prompts(6, 2, 16, seed=8)
    return [GenerationRequest(i, p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)]


def test_a_step_that_raises_while_another_is_in_flight_loses_nothing(loaded, break_steps) -> None:
    requests = _greedy_requests()
    want = outcome(make_engine(loaded, False), requests)
    engine = make_engine(loaded, True)
    break_steps(loaded.model, FailsOnce(fail_at=8))  # well into the decodes planned ahead
    assert outcome(engine, requests) == want
    assert engine.stats.num_failed_steps == 1 and engine.stats.num_errors == 0
    assert engine.stats.num_spare_tokens == 0  # length limits are known ahead: nothing is decoded past them


def test_a_failure_while_waiting_for_tokens_recomputes_both_steps(loaded, monkeypatch) -> None:
    requests = _greedy_requests()
    want = outcome(make_engine(loaded, False), requests)
    real = sampling.SampledTokens.to_host
    calls = {"n": 0}

    def to_host(self):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("device fault")
        return real(self)

    monkeypatch.setattr(sampling.SampledTokens, "to_host", to_host)
    engine = make_engine(loaded, True)
    assert outcome(engine, requests) == want
    assert engine.stats.num_failed_steps == 1 and engine.stats.num_steps_ahead > 0
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_a_step_that_fails_when_read_withdraws_the_prefix_blocks_it_registered(loaded, monkeypatch) -> None:
    """A device fault shows only when the step's tokens are read, after the step's prefix blocks were registered.
    Here the first step writes garbage K/V and reading its tokens fails: the row that shares its prefix must
    not reuse those blocks, so it gets the tokens it gets alone."""
    system = random_prompts(1, 18, 18, seed=21)[0]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first, second = GenerationRequest("a", system + [7, 6, 5], params), GenerationRequest("b", system + [9, 8], params)
    settings = dict(num_blocks_override=64, max_num_batched_tokens=64, max_num_seqs=1)
    [alone] = make_engine(loaded, True, **settings).generate([second])
    [first_alone] = make_engine(loaded, True, **settings).generate([first])
    engine = make_engine(loaded, True, **settings)
    forward, calls = engine.runner.forward, {"forward": 0, "read": 0}

    def garbage_first_step(inputs):
        calls["forward"] += 1
        logits = forward(inputs)
        if calls["forward"] == 1:
            slots = inputs.meta.slot_mapping[inputs.meta.slot_mapping >= 0]
            for pages in engine.kv_cache.key + engine.kv_cache.value:
                pages.view(-1, *pages.shape[2:])[slots] = 1e3
        return logits

    real = sampling.SampledTokens.to_host

    def first_read_fails(self):
        calls["read"] += 1
        if calls["read"] == 1:
            raise RuntimeError("device fault")
        return real(self)

    engine.runner.forward = garbage_first_step
    monkeypatch.setattr(sampling.SampledTokens, "to_host", first_read_fails)
    got = {r.request_id: r for r in engine.generate([first, second])}
    # It ran alone when the fault came: rerun alone once more (the fault may be transient), it recovers.
    assert got["a"].error is None and got["a"].completions[0].token_ids == first_alone.completions[0].token_ids
    assert got["b"].error is None
    assert got["b"].completions[0].token_ids == alone.completions[0].token_ids
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("policy", ["reserve", "optimistic"])
def test_rows_waiting_for_room_do_not_stop_planning_ahead(loaded, monkeypatch, policy) -> None:
    """A queue whose head does not fit the pool cannot be admitted, so the running rows keep decoding ahead;
    the head is admitted as soon as pages come back, and every row gets the synchronous loop's tokens."""
    requests = [
        GenerationRequest(i, p, SamplingParams(max_new_tokens=10, ignore_eos=True))
        for i, p in enumerate(random_prompts(6, 12, 16, seed=9))
    ]
    tight = dict(num_blocks_override=16, max_num_seqs=6, policy=policy)  # 64 tokens: two or three rows at a time
    sync = make_engine(loaded, False, **tight)
    want = outcome(sync, requests)
    ahead_while_waiting = []
    real = Scheduler.schedule_ahead

    def spy(self):
        out = real(self)
        if out is not None and self.waiting:
            ahead_while_waiting.append(len(self.waiting))
        return out

    monkeypatch.setattr(Scheduler, "schedule_ahead", spy)
    engine = make_engine(loaded, True, **tight)
    assert outcome(engine, requests) == want
    assert ahead_while_waiting
    assert engine.stats.num_steps <= sync.stats.num_steps  # planning ahead never held an admission back


def test_prefill_chunks_and_admissions_are_planned_ahead(loaded, monkeypatch):
    """Prompts longer than a step's budget and more rows than slots: chunks and admissions read only prompt
    tokens, so they are planned while the step before runs, and the tokens equal the synchronous loop's."""
    prompts = random_prompts(10, 20, 60, seed=9)
    requests = [
        GenerationRequest(i, p, SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=True))
        for i, p in enumerate(prompts)
    ]
    want = outcome(make_engine(loaded, False), requests)
    planned = []
    real = Scheduler.schedule_ahead

    def spy(self):
        out = real(self)
        if out is not None:
            planned.append(out)
        return out

    monkeypatch.setattr(Scheduler, "schedule_ahead", spy)
    engine = make_engine(loaded, True)
    assert outcome(engine, requests) == want
    assert any(item.num_new_tokens > 1 for out in planned for item in out.scheduled)  # prefill chunks
    assert any(out.num_queried_tokens for out in planned)  # admissions (their prefix-cache lookups)
    assert any(
        len({item.num_new_tokens > 1 for item in out.scheduled}) == 2 for out in planned
    )  # decodes beside chunks
    assert engine.stats.num_steps_ahead >= engine.stats.num_steps - 3


def test_closing_generate_with_a_step_in_flight_withdraws_its_prefix_blocks(loaded) -> None:
    """The step launched last was never read, so a device fault in it would never show: the prefix blocks it
    registered are withdrawn when the caller closes generate(), like those of a step that failed when read."""
    engine = make_engine(loaded, True, max_num_batched_tokens=5)
    shared = list(range(10, 30))  # five full blocks, registered a block a step
    requests = [GenerationRequest("long", shared + [99], SamplingParams(max_new_tokens=5, ignore_eos=True))]
    requests += [
        GenerationRequest(i, [100 + 5 * i + j for j in range(5)] + [7], SamplingParams(max_new_tokens=1))
        for i in range(12)
    ]
    stream = engine.generate(requests)
    for _ in stream:
        in_flight = stream.gi_frame.f_locals["in_flight"]
        if in_flight is not None and in_flight.registered:
            break
    unread = list(in_flight.registered)
    assert unread and all(engine.pool._hash_of_block.get(b) is not None for b in unread)
    stream.close()
    assert not any(b in engine.pool._hash_of_block for b in unread)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    engine.pool.check_invariants()


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the CPU form, in Triton's interpreter; on a GPU the test above, "
    "test_async_gives_what_the_synchronous_loop_gives_on_the_gpu, runs the compiled kernels",
)
def test_async_with_the_triton_kernels_and_fused_layers_gives_the_reference_tokens(loaded, monkeypatch) -> None:
    """The GPU's configuration (Triton attention, fused layers, async scheduling) run on the CPU in Triton's
    interpreter, against the synchronous torch reference with transformers' layers."""
    requests = [
        GenerationRequest(i, p, SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=True))
        for i, p in enumerate(random_prompts(4, 3, 14, seed=12))
    ]
    want = outcome(make_engine(loaded, False, fused_layers=False), requests)
    monkeypatch.setattr(engine_module, "select_backend", lambda *args: backends._load("triton"))
    engine = make_engine(loaded, True, fused_layers=True)
    assert engine.backend.name == "triton" and engine.fused is not None and engine.async_scheduling
    got = outcome(engine, requests)
    assert {k: v[1][0][0] for k, v in got.items()} == {k: v[1][0][0] for k, v in want.items()}  # the tokens
    for key, (error, [(_, reason, logprobs)]) in got.items():
        assert error is None and reason == "length"
        torch.testing.assert_close(logprobs, want[key][1][0][2], rtol=1e-4, atol=1e-4)
    assert engine.stats.num_steps_ahead > 0
