"""Engine behaviour around the edges: requests that can never fit, failing steps, stop rules, reuse."""

import random

import pytest
import torch
from broken_steps import Poison
from hypothesis import given, settings
from hypothesis import strategies as st
from test_exact_vs_generate import random_prompts
from tiny_models import EOS_ID, tiny_loaded

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.scheduler import MAX_ISOLATIONS


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", seed=5)


def make_engine(loaded, **overrides) -> Engine:
    config = dict(block_size=4, num_blocks_override=64, max_num_batched_tokens=64)
    config.update(overrides)
    return Engine.from_loaded(loaded, EngineConfig(**config))


def by_id(results) -> dict:
    return {r.request_id: r for r in results}


def test_requests_that_can_never_fit_fail_alone_with_numbers(loaded) -> None:
    engine = make_engine(loaded, num_blocks_override=20)  # 80 tokens of pool; context 512
    prompts = {"ok": [5, 6, 7], "empty": [], "too-long": list(range(2, 92)), "bad-id": [5, 99999], "ok2": [9] * 30}
    results = by_id(
        engine.generate(GenerationRequest(k, p, SamplingParams(max_new_tokens=8)) for k, p in prompts.items())
    )
    assert results.keys() == prompts.keys()
    assert results["empty"].error == "the prompt is empty (0 tokens)"
    assert "the prompt has 90 tokens; at most 79 fit" in results["too-long"].error
    assert "KV pool" in results["too-long"].error
    assert "outside the vocabulary of 512" in results["bad-id"].error
    for key in ("ok", "ok2"):
        assert results[key].error is None and len(results[key].completions[0].token_ids) >= 1
    assert engine.pool.num_free_blocks == 20


def test_a_stream_of_refused_requests_is_pulled_lazily(loaded) -> None:
    """Requests refused on arrival come out as they are pulled: the engine reads at most its lookahead
    (2 x max_num_seqs) ahead of the results it has yielded, refused or not."""
    engine = make_engine(loaded, max_num_seqs=4)
    pulled = 0

    def stream():
        nonlocal pulled
        for i in range(200):
            pulled += 1
            yield GenerationRequest(i, [] if i % 10 else [5, 6, 7], SamplingParams(max_new_tokens=2))

    results = engine.generate(stream())
    first = next(results)
    assert first.error == "the prompt is empty (0 tokens)" and pulled <= 2 * 4 + 1
    rest = [first, *results]
    assert sorted(r.request_id for r in rest) == list(range(200))
    assert sum(r.error is None for r in rest) == 20
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_first_two_steps_wait_for_one_steps_tokens_only(loaded, async_scheduling) -> None:
    """The device starts once one step's tokens are taken in (here 64 tokens: 4 requests of 16 prompt tokens
    and 4 continuations of 2), not max_num_seqs (16 such requests); the second step is planned from one step's
    tokens more, and is still full."""
    engine = make_engine(loaded, max_num_seqs=64, num_blocks_override=256, async_scheduling=async_scheduling)
    pulled, pulled_at_step = 0, []

    def stream():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield GenerationRequest(i, [5 + i % 7] * 16, continuations=[[8, 9], [10, 11], [12, 13], [14, 15]])

    forward, step_tokens = engine.runner.forward, []

    def counting_forward(inputs):
        pulled_at_step.append(pulled)
        step_tokens.append(inputs.input_ids.shape[-1])
        return forward(inputs)

    engine.runner.forward = counting_forward
    results = list(engine.generate(stream()))
    assert pulled_at_step[:2] == [4, 8], pulled_at_step  # 20 input tokens each: 60 < 64 <= 80
    assert sorted(r.request_id for r in results) == list(range(40)) and all(r.error is None for r in results)
    assert step_tokens[:2] == [64, 64], step_tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_stream_that_raises_ends_the_call_and_frees_the_pool(loaded, async_scheduling) -> None:
    """With a step in flight the engine pulls requests after launching the next step; what the caller's
    iterator raises then still comes out of generate(), after the steps in flight are taken in."""
    engine = make_engine(loaded, max_num_seqs=4, async_scheduling=async_scheduling)
    prompts = random_prompts(40, 3, 12, seed=6)

    def stream():
        for i, prompt in enumerate(prompts):
            if i == 25:
                raise ValueError("row 25 is unreadable")
            yield GenerationRequest(i, prompt, SamplingParams(max_new_tokens=6))

    seen = []
    with pytest.raises(ValueError, match="row 25 is unreadable"):
        for result in engine.generate(stream()):
            seen.append(result)
    assert seen and all(r.error is None for r in seen) and {r.request_id for r in seen} <= set(range(25))
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    engine.pool.check_invariants()
    again = by_id(
        engine.generate(GenerationRequest(i, p, SamplingParams(max_new_tokens=6)) for i, p in enumerate(prompts))
    )
    assert len(again) == 40 and all(r.error is None for r in again.values())


def test_output_is_capped_at_the_pool_and_the_context(loaded) -> None:
    engine = make_engine(loaded, num_blocks_override=8)  # 32 tokens
    [result] = engine.generate([GenerationRequest(0, [5] * 28, SamplingParams(max_new_tokens=100, ignore_eos=True))])
    assert result.finish_reason == "length" and len(result.completions[0].token_ids) == 4


def test_a_failing_row_is_isolated_and_its_batch_mates_finish(loaded, break_steps) -> None:
    clean = make_engine(loaded)
    prompts = dict(enumerate(random_prompts(12, 2, 20, seed=3)))
    params = SamplingParams(max_new_tokens=10)
    want = by_id(clean.generate(GenerationRequest(k, p, params) for k, p in prompts.items()))
    seen = {t for p in prompts.values() for t in p} | {t for r in want.values() for t in r.completions[0].token_ids}
    poison = min(set(range(2, 512)) - seen)
    prompts["bad"] = [5, 6, poison, 7]

    engine = make_engine(loaded)
    break_steps(loaded.model, Poison(poison))
    got = by_id(engine.generate(GenerationRequest(k, p, params) for k, p in prompts.items()))
    assert got["bad"].finish_reason == "error"
    assert got["bad"].error == "generation failed: RuntimeError: poisoned row"
    for key, result in want.items():
        assert got[key].completions[0].token_ids == result.completions[0].token_ids
    assert engine.stats.num_failed_steps >= 2
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def _tokens(results) -> dict:
    return {key: r.completions[0].token_ids for key, r in results.items()}


def test_transient_step_failures_cost_no_row(loaded) -> None:
    """Four sporadic faults (an OOM, say) over a long run: every row was in several failed steps, some of them alone
    at the time, and each still finishes with its clean tokens (a row fails only if it fails alone twice)."""
    requests = [
        GenerationRequest(i, [5 + i, 6, 7, 8 + i], SamplingParams(max_new_tokens=60, ignore_eos=True)) for i in range(6)
    ]
    want = by_id(make_engine(loaded, num_blocks_override=128).generate(requests))
    engine = make_engine(loaded, num_blocks_override=128)
    forward, calls = engine.runner.forward, [0]

    def flaky(inputs):
        calls[0] += 1
        if calls[0] in (10, 30, 50, 70):
            raise RuntimeError("CUDA out of memory (transient)")
        return forward(inputs)

    engine.runner.forward = flaky
    got = by_id(engine.generate(requests))
    assert engine.stats.num_failed_steps == 4 and all(r.error is None for r in got.values())
    assert _tokens(got) == _tokens(want)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_a_failure_only_batches_trigger_ends_with_every_row_running_alone(loaded) -> None:
    """Every step of two or more sequences fails (a batch-size-dependent fault): rows are rerun alone, and after
    MAX_ISOLATIONS failed steps each runs alone to its end, so the run finishes, with the clean tokens."""
    requests = [
        GenerationRequest(i, p, SamplingParams(max_new_tokens=12, ignore_eos=True))
        for i, p in enumerate(random_prompts(4, 3, 12, seed=8))
    ]
    want = by_id(make_engine(loaded).generate(requests))
    engine = make_engine(loaded)
    forward = engine.runner.forward

    def fails_batched(inputs):
        if inputs.meta.num_seqs > 1:
            raise RuntimeError("fails in a batch")
        return forward(inputs)

    engine.runner.forward = fails_batched
    got = by_id(engine.generate(requests))
    assert all(r.error is None for r in got.values()) and _tokens(got) == _tokens(want)
    assert engine.stats.num_failed_steps >= MAX_ISOLATIONS
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_stop_strings_token_ids_and_eos(loaded) -> None:
    engine = make_engine(loaded)
    prompt = [17, 4, 99, 23]
    [free] = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))])
    tokens = free.completions[0].token_ids
    words = free.text.split()
    assert len(words) == 12
    stop = words[3]
    [by_string] = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=12, stop=(stop,)))])
    assert by_string.finish_reason == "stop" and by_string.text == free.text[: free.text.find(stop)]
    assert by_string.completions[0].token_ids == tokens[: len(by_string.completions[0].token_ids)]
    [by_id_] = engine.generate(
        [GenerationRequest(0, prompt, SamplingParams(max_new_tokens=12, stop_token_ids=(tokens[2],)))]
    )
    assert by_id_.completions[0].token_ids == tokens[:3] and by_id_.finish_reason == "stop"


def test_eos_stops_is_kept_in_the_ids_and_left_out_of_the_text() -> None:
    loaded = tiny_loaded("llama", seed=5)
    prompt = [17, 4, 99, 23]
    [free] = make_engine(loaded).generate(
        [GenerationRequest(0, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))]
    )
    tokens, words = free.completions[0].token_ids, free.text.split()
    assert EOS_ID not in tokens
    # Make EOS likely: its output row becomes a later token's, slightly larger, so it wins within a few steps.
    head = loaded.model.get_output_embeddings().weight
    assert head.data_ptr() != loaded.model.get_input_embeddings().weight.data_ptr()  # untied: prompts read the same
    with torch.no_grad():
        head[EOS_ID] = head[tokens[3]] * 1.05
    [eos] = make_engine(loaded).generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=12))])
    ids = eos.completions[0].token_ids
    assert 1 < len(ids) <= 4 and ids == tokens[: len(ids) - 1] + [EOS_ID] and eos.finish_reason == "stop"
    assert eos.text == " ".join(words[: len(ids) - 1])  # every word before EOS, and nothing for EOS itself


def test_a_stop_string_split_by_many_special_tokens_still_stops() -> None:
    """Special tokens add nothing to the text, so the tail the check decodes must not count them (ignore_eos runs
    on past end-of-turn tokens): the row stops, as its cut text says, rather than running on to 'length'."""
    from tiny_models import word_tokenizer

    from kvbatch.runner.sequence import Sequence
    from kvbatch.runner.stopping import StopChecker

    checker = StopChecker(word_tokenizer(), (EOS_ID,))
    seq = Sequence(
        0,
        GenerationRequest(0, [5], SamplingParams(max_new_tokens=100, stop=("w5 w6",), ignore_eos=True)),
        0,
        100,
        seed=0,
    )
    reasons = []
    for token in [5] + [EOS_ID] * 30 + [6]:
        seq.output_token_ids.append(token)
        reasons.append(checker.check(seq))
    assert reasons == [None] * 31 + ["stop"] and checker.text(seq) == ""


def test_seeded_sampling_is_batch_invariant_and_n_samples_differ(loaded) -> None:
    engine = make_engine(loaded)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=42, n=3, logprobs=True)
    prompt = [8, 9, 10, 11]
    [alone] = engine.generate([GenerationRequest("x", prompt, params)])
    crowd = [
        GenerationRequest(i, p, SamplingParams(max_new_tokens=10, temperature=0.7, seed=i))
        for i, p in enumerate(random_prompts(20, 1, 30, seed=9))
    ]
    together = by_id(engine.generate(crowd[:10] + [GenerationRequest("x", prompt, params)] + crowd[10:]))["x"]
    assert [c.token_ids for c in alone.completions] == [c.token_ids for c in together.completions]
    assert len({tuple(c.token_ids) for c in alone.completions}) == 3
    assert all(len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs) for c in alone.completions)


def test_an_unseeded_row_samples_by_its_id_not_by_what_ran_before(loaded) -> None:
    """engine.seed fixed and no sampling.seed: a row (a job's id is its input row) draws the same tokens whether
    it runs after others (one run) or first (a resumed or sharded run), and two rows draw differently."""
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    prompt = [8, 9, 10, 11]
    others = [GenerationRequest(i, p, params) for i, p in enumerate(random_prompts(5, 2, 9, seed=2))]
    one_run = by_id(make_engine(loaded, seed=7).generate(others + [GenerationRequest(17, prompt, params)]))
    resumed = by_id(
        make_engine(loaded, seed=7).generate(
            [GenerationRequest(17, prompt, params), GenerationRequest(18, prompt, params)]
        )
    )
    assert one_run[17].completions[0].token_ids == resumed[17].completions[0].token_ids
    assert resumed[17].completions[0].token_ids != resumed[18].completions[0].token_ids
    unseeded = make_engine(loaded)  # no engine.seed: two calls (two jobs, say) on one engine sample apart
    first, second = (
        [r.completions[0].token_ids for r in unseeded.generate([GenerationRequest(17, prompt, params)])]
        for _ in range(2)
    )
    assert first != second


def test_top_k_one_and_tiny_min_p_equal_greedy(loaded) -> None:
    engine = make_engine(loaded)
    prompt = [30, 31, 32]
    [greedy] = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=8))])
    for params in (
        SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=1),
        SamplingParams(max_new_tokens=8, temperature=0.8, min_p=0.999, seed=2),
        SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3),
    ):
        [sampled] = engine.generate([GenerationRequest(0, prompt, params)])
        assert sampled.completions[0].token_ids == greedy.completions[0].token_ids, params


def test_repetition_penalty_changes_greedy_choices(loaded) -> None:
    engine = make_engine(loaded)
    prompt = [40] * 6
    [plain] = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))])
    [penal] = engine.generate(
        [GenerationRequest(0, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True, repetition_penalty=5.0))]
    )
    plain_ids, penal_ids = plain.completions[0].token_ids, penal.completions[0].token_ids
    assert len(set(penal_ids)) >= len(set(plain_ids)) and penal_ids != plain_ids


def test_closing_the_stream_early_frees_the_pool(loaded) -> None:
    engine = make_engine(loaded)
    stream = engine.generate(
        GenerationRequest(i, p, SamplingParams(max_new_tokens=30))
        for i, p in enumerate(random_prompts(20, 5, 20, seed=4))
    )
    next(stream)
    assert engine.pool.num_free_blocks < engine.pool.num_blocks
    stream.close()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    engine.pool.check_invariants()


def test_a_prompt_fits_while_one_token_of_room_is_left(loaded) -> None:
    # The boundary the property test below rarely reaches: a pool of 12 blocks of 4 holds 48 tokens.
    engine = make_engine(loaded, num_blocks_override=12)
    requests = [GenerationRequest(n, [2 + j for j in range(n)], SamplingParams(max_new_tokens=5)) for n in (47, 48)]
    results = by_id(engine.generate(requests))
    assert results[47].error is None and len(results[47].completions[0].token_ids) == 1
    assert results[47].finish_reason == "length"
    assert results[48].finish_reason == "error" and "at most 47 fit" in results[48].error
    assert engine.pool.num_free_blocks == 12


@settings(max_examples=8, deadline=None)
@given(
    policy=st.sampled_from(["reserve", "optimistic"]),
    num_blocks=st.integers(12, 48),
    lengths=st.lists(st.tuples(st.integers(0, 50), st.integers(1, 10)), min_size=1, max_size=10),
)
def test_random_request_streams_all_finish_and_drain(loaded, policy, num_blocks, lengths) -> None:
    engine = make_engine(loaded, policy=policy, num_blocks_override=num_blocks, max_num_batched_tokens=24)
    requests = [
        GenerationRequest(i, [2 + (i + j) % 500 for j in range(n)], SamplingParams(max_new_tokens=m))
        for i, (n, m) in enumerate(lengths)
    ]
    results = by_id(engine.generate(requests))
    assert sorted(results) == list(range(len(requests)))
    for request in requests:
        result = results[request.request_id]
        n = len(request.prompt_token_ids)
        if n == 0 or n >= num_blocks * 4:
            assert result.finish_reason == "error"
        else:
            assert result.error is None
            assert 1 <= len(result.completions[0].token_ids) <= request.sampling.max_new_tokens
    assert engine.pool.num_free_blocks == num_blocks
    engine.pool.check_invariants()


def test_one_generate_call_at_a_time(loaded) -> None:
    engine = make_engine(loaded)
    requests = [GenerationRequest(i, [5 + i, 6, 7], SamplingParams(max_new_tokens=4)) for i in range(3)]
    first = engine.generate(requests)
    next(first)
    with pytest.raises(RuntimeError, match="running another generate\\(\\) call; finish or close that one first"):
        next(engine.generate(requests))
    first.close()
    assert sorted(by_id(engine.generate(requests))) == [0, 1, 2]
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 0),
        ("block_size", -4),
        ("num_blocks_override", 0),
        ("max_num_batched_tokens", 0),
        ("max_num_seqs", 0),
        ("kv_cache_gib", 0.0),
        ("gpu_memory_utilization", 1.5),
        ("policy", "bogus"),
        ("max_model_len", 2.5),
    ],
)
def test_engine_config_refuses_values_no_engine_can_run(field, value) -> None:
    with pytest.raises(ValueError, match=f"EngineConfig.{field} must be"):
        EngineConfig(**{field: value})


def test_fewer_host_copies_than_adapter_slots_are_refused() -> None:
    # max_cpu_loras below max_loras was raised to it without a word; vLLM refuses it too
    with pytest.raises(ValueError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        EngineConfig(max_loras=4, max_cpu_loras=2)
    assert EngineConfig(max_loras=4, max_cpu_loras=4).max_cpu_loras == 4


def test_a_prompt_given_as_a_tuple_or_array_runs_through_a_preemption(loaded) -> None:
    import numpy as np

    prompts = [random_prompts(1, 9, 9, seed=s)[0] for s in (1, 2)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = by_id(make_engine(loaded).generate([GenerationRequest(i, p, params) for i, p in enumerate(prompts)]))
    engine = make_engine(loaded, num_blocks_override=7)  # 28 tokens: two rows of 21 preempt each other
    got = by_id(
        engine.generate(
            [GenerationRequest(0, tuple(prompts[0]), params), GenerationRequest(1, np.array(prompts[1]), params)]
        )
    )
    assert engine.stats.num_preemptions > 0
    assert {k: r.completions[0].token_ids for k, r in got.items()} == {
        k: r.completions[0].token_ids for k, r in want.items()
    }


def test_a_closed_engine_says_so(loaded) -> None:
    engine = make_engine(loaded)
    engine.close()
    with pytest.raises(RuntimeError, match="engine was closed"):
        next(engine.generate([GenerationRequest(0, [5, 6, 7])]))


def test_the_engine_freezes_what_exists_at_setup_and_collects_what_comes_later(loaded) -> None:
    """A full cyclic collection over torch and transformers took 210-260 ms mid-run on the GPU host: the engine
    freezes the objects alive at setup; garbage made afterwards is still collected."""
    import gc
    import weakref

    Engine.from_loaded(loaded, EngineConfig(num_blocks_override=8))
    assert gc.get_freeze_count() > 10_000

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle
    ref = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert ref() is None


def test_a_finished_request_is_freed_without_the_cyclic_collector(loaded, break_steps) -> None:
    """A request's sequences point at its state and the state at them; the engine breaks that cycle when the
    request finishes, so nothing of it waits for a full collection (on an H100 host one took 77 ms with the GPU
    idle). Samples, continuations, and a row that fails alone, with the collector off."""
    import gc

    from kvbatch.runner.sequence import Sequence

    def alive() -> int:
        return sum(isinstance(o, Sequence) for o in gc.get_objects())

    rng = random.Random(4)
    prompts = random_prompts(6, 2, 20, seed=4)
    requests = [GenerationRequest(i, p, SamplingParams(max_new_tokens=5, n=2, seed=1)) for i, p in enumerate(prompts)]
    requests.append(GenerationRequest("scored", prompts[0], continuations=[[rng.randrange(3, 500)] * 3] * 4))
    seen = {t for p in prompts for t in p}
    poison = min(set(range(2, 512)) - seen)
    gc.collect()
    gc.disable()
    try:
        results = list(make_engine(loaded).generate(requests))
        assert len(results) == len(requests) and not any(r.error for r in results)
        del results
        assert alive() == 0
        break_steps(loaded.model, Poison(poison))
        results = list(make_engine(loaded).generate([*requests[:3], GenerationRequest("bad", [5, poison, 7])]))
        assert [r.request_id for r in results if r.error] == ["bad"]
        del results
        assert alive() == 0
    finally:
        gc.enable()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefill_tokens_count_each_prompt_token_once(loaded, async_scheduling) -> None:
    """stats.num_prefill_tokens (progress's prefill rate) counts the prompt tokens each step computes: prompts
    split into chunks by a small token budget, decodes planned ahead or not, add up to the prompts' lengths."""
    prompts = random_prompts(7, 5, 40, seed=8)
    engine = make_engine(loaded, max_num_batched_tokens=16, prefix_cache=False, async_scheduling=async_scheduling)
    results = list(
        engine.generate(GenerationRequest(i, p, SamplingParams(max_new_tokens=6)) for i, p in enumerate(prompts))
    )
    assert len(results) == len(prompts) and engine.stats.num_preemptions == 0
    assert engine.stats.num_prefill_tokens == sum(map(len, prompts))


def test_the_host_counts_the_time_it_waits_for_tokens(loaded, monkeypatch) -> None:
    """stats.host_wait_s (bench's host_wait_share): the time spent in a step's to_host, each step counted."""
    import time

    from kvbatch.runner import sampling

    real = sampling.SampledTokens.to_host

    def slow(self):
        time.sleep(0.01)
        return real(self)

    monkeypatch.setattr(sampling.SampledTokens, "to_host", slow)
    engine = make_engine(loaded)
    requests = [GenerationRequest(i, [5, 6, 7, 8], SamplingParams(max_new_tokens=3, ignore_eos=True)) for i in range(2)]
    assert all(r.error is None for r in engine.generate(requests))
    assert engine.stats.num_steps >= 3 and engine.stats.host_wait_s >= 0.01 * engine.stats.num_steps


def test_a_request_of_text_or_of_a_sampling_dict_is_refused_by_name() -> None:
    """A prompt passed as text became token ids without a word ("123" -> [1, 2, 3], b"ab" -> [97, 98]), and so did
    a continuation; a dict of sampling fields failed inside the request with "AttributeError: 'dict' object has no
    attribute 'truncate_prompt_tokens'". The request says what it takes."""
    with pytest.raises(TypeError, match=r"^prompt_token_ids is a string; pass token ids \(a list of int\), "):
        GenerationRequest(0, "123")
    with pytest.raises(TypeError, match=r"^prompt_token_ids is bytes; pass token ids"):
        GenerationRequest(0, b"ab")
    with pytest.raises(TypeError, match=r"^continuations\[1\] is a string; pass token ids"):
        GenerationRequest(0, [5], continuations=[[6], "12"])
    with pytest.raises(TypeError, match=r"^sampling is a dict; pass a SamplingParams: SamplingParams\(\*\*fields\)$"):
        GenerationRequest(0, [5], {"max_new_tokens": 2})
    assert GenerationRequest(0, (5, 6), continuations=[(7,)]).prompt_token_ids == [5, 6]  # any sequence of ids
