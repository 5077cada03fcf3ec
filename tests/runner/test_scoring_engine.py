"""Scoring, prompt logprobs and top logprobs from the engine against float32 log_softmax of transformers' own
logits (the model run with its sdpa attention, no kvbatch code in the forward)."""

import random

import pytest
import torch
from broken_steps import Poison
from tiny_models import VOCAB_SIZE, hf_reference, tiny_loaded

from kvbatch.errors import ErrorKind
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest, SamplingParams

TOLERANCE = 1e-4


def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] float32 log_softmax of transformers' logits over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def random_ids(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(2, VOCAB_SIZE) for _ in range(count)]


def engine_for(arch: str = "llama", **overrides) -> Engine:
    settings = dict(block_size=4, num_blocks_override=256, max_num_batched_tokens=64) | overrides
    return Engine.from_loaded(tiny_loaded(arch), EngineConfig(**settings))


@pytest.mark.parametrize(
    ("arch", "policy", "async_scheduling", "prefix_cache", "fused_layers"),
    [
        ("llama", "optimistic", False, True, None),
        ("qwen3", "reserve", False, True, None),
        ("llama", "optimistic", True, True, None),
        ("llama", "optimistic", False, False, None),  # each continuation computes the prompt again
        # The cases above run the fused decoder (the default; scored rows sit inside their sequences); this one
        # transformers' layers.
        ("llama", "optimistic", False, True, False),
    ],
)
def test_continuation_scores_equal_a_plain_forward(
    arch: str, policy: str, async_scheduling: bool, prefix_cache: bool, fused_layers: bool | None
) -> None:
    rng = random.Random(3)
    # Prompts longer than the token budget (64) are prefilled in chunks; continuations of 1 to 9 tokens; every
    # other request asks for its prompt's logprobs too.
    requests = [
        GenerationRequest(
            i,
            random_ids(rng, rng.randint(1, 90)),
            SamplingParams(prompt_logprobs=i % 2 == 1),
            continuations=[random_ids(rng, rng.randint(1, 9)) for _ in range(4)],
        )
        for i in range(8)
    ]
    # A pool of 40 blocks of 4 tokens holds few sequences at once.
    engine = engine_for(
        arch,
        policy=policy,
        async_scheduling=async_scheduling,
        num_blocks_override=40,
        prefix_cache=prefix_cache,
        fused_layers=fused_layers,
    )
    assert (engine.fused is not None) == (fused_layers is not False)
    results = {r.request_id: r for r in engine.generate(requests)}
    reference = hf_reference(arch)
    for request in requests:
        result = results[request.request_id]
        assert result.error is None and len(result.scores) == 4
        prompt = request.prompt_token_ids
        if request.sampling.prompt_logprobs:
            rows = reference_logprobs(reference, prompt)[:-1]
            want = rows.gather(1, torch.tensor(prompt[1:], dtype=torch.long)[:, None])[:, 0]
            assert result.prompt_logprobs == pytest.approx([None, *want.tolist()], abs=TOLERANCE)
        else:
            assert result.prompt_logprobs is None
        for continuation, score in zip(request.continuations, result.scores):
            tokens = request.prompt_token_ids + continuation
            logprobs = reference_logprobs(reference, tokens)
            start = len(request.prompt_token_ids) - 1
            rows = logprobs[start : len(tokens) - 1]
            want = rows.gather(1, torch.tensor(continuation)[:, None])[:, 0]
            assert score.num_tokens == len(continuation)
            assert score.token_logprobs == pytest.approx(want.tolist(), abs=TOLERANCE)
            assert score.logprob == pytest.approx(want.sum().item(), abs=TOLERANCE * len(continuation))
            assert score.is_greedy == (rows.argmax(dim=-1) == torch.tensor(continuation)).all().item()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_greedy_continuation_is_flagged_greedy() -> None:
    """The model's own greedy tokens, scored back, are greedy; the same with one token changed is not."""
    engine = engine_for()
    rng = random.Random(5)
    prompt = random_ids(rng, 20)
    generated = next(iter(engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=6))])))
    greedy = generated.completions[0].token_ids
    other = greedy[:3] + [(greedy[3] + 1) % VOCAB_SIZE or 2] + greedy[4:]
    result = next(iter(engine.generate([GenerationRequest(1, prompt, continuations=[greedy, other])])))
    assert [s.is_greedy for s in result.scores] == [True, False]


def test_continuations_share_the_prompt_blocks() -> None:
    """Four continuations of a 64-token prompt compute its 16 full blocks once: the others take them cached."""
    engine = engine_for(max_num_batched_tokens=512)
    rng = random.Random(9)
    prompt = random_ids(rng, 65)
    request = GenerationRequest(0, prompt, continuations=[random_ids(rng, 3) for _ in range(4)])
    result = next(iter(engine.generate([request])))
    assert result.error is None
    # 64 of the prompt's 65 tokens sit in full blocks before the first scored row (the prompt's last token).
    assert engine.stats.num_cached_prompt_tokens == 3 * 64


def test_one_token_continuations_run_as_one_sequence() -> None:
    """Four one-token choices (a multiple-choice letter) are all scored from the prompt's last row: the engine
    computes the prompt once, and nothing else."""
    engine = engine_for()
    rng = random.Random(4)
    prompt = random_ids(rng, 30)
    choices = [[5], [6], [7], [8]]
    result = next(iter(engine.generate([GenerationRequest(0, prompt, continuations=choices)])))
    assert engine.stats.num_queried_prompt_tokens == 30 and engine.stats.num_cached_prompt_tokens == 0
    want = reference_logprobs(hf_reference("llama"), prompt)[-1]
    assert [s.logprob for s in result.scores] == pytest.approx([want[c[0]].item() for c in choices], abs=TOLERANCE)
    assert [s.is_greedy for s in result.scores] == [want.argmax().item() == c[0] for c in choices]


def test_a_row_scored_for_several_continuations_gets_its_logits_once() -> None:
    """The prompt's last row scores each of the four continuations' first token: the step computes its logits
    once (one row, four targets), and each score still equals the reference."""
    engine = engine_for()
    rng = random.Random(5)
    prompt = random_ids(rng, 30)
    choices = [[5], [6, 7], [8], [9, 10, 11]]
    forward, shapes = engine.runner.forward, []

    def counting_forward(inputs):
        shapes.append((inputs.num_score_rows, inputs.score_targets.shape[0], inputs.score_target_rows.tolist()))
        return forward(inputs)

    engine.runner.forward = counting_forward
    result = next(iter(engine.generate([GenerationRequest(0, prompt, continuations=choices)])))
    # The first sequence (the prompt: choice 0 has one token) scores all four first tokens on its last row; the
    # second scores 7 on its row 30, the fourth 10 and 11 on rows 30 and 31; choice 2 needs no sequence.
    assert sum(rows for rows, _, _ in shapes) == 1 + 1 + 2
    assert sum(targets for _, targets, _ in shapes) == 4 + 1 + 2
    assert shapes[0][2][:4] == [0, 0, 0, 0]
    want_prompt = reference_logprobs(hf_reference("llama"), prompt)[-1]
    for choice, score in zip(choices, result.scores):
        want = reference_logprobs(hf_reference("llama"), prompt + choice)
        logprobs = [want_prompt[choice[0]].item()] + [want[29 + j][t].item() for j, t in enumerate(choice) if j]
        assert score.token_logprobs == pytest.approx(logprobs, abs=TOLERANCE)


def test_continuations_of_many_requests_share_prompts_a_small_pool_cannot_keep() -> None:
    """24 requests of 4 continuations of lengths 1-9, through a pool that holds about four prompts at once (and a
    budget of two a step): every request's prompt is computed once, its continuations queued next to each other
    and finding its blocks cached, as when it runs alone."""
    rng = random.Random(12)
    requests = [
        GenerationRequest(i, random_ids(rng, 40), continuations=[random_ids(rng, rng.randint(1, 9)) for _ in range(4)])
        for i in range(24)
    ]
    engine = engine_for(num_blocks_override=48, max_num_batched_tokens=96)
    assert all(r.error is None for r in engine.generate(requests))
    # 40-token prompts: the first continuation computes the 10 full blocks and scores every continuation's first
    # token; each other continuation of two tokens or more takes all 10 from the cache, one of one token never runs.
    num_later = sum(len(c) > 1 for r in requests for c in r.continuations[1:])
    assert 0 < num_later < 24 * 3
    assert engine.stats.num_cached_prompt_tokens == num_later * 40
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_and_top_logprobs_equal_a_plain_forward(arch: str) -> None:
    rng = random.Random(11)
    prompts = [random_ids(rng, rng.randint(1, 80)) for _ in range(8)]
    params = SamplingParams(max_new_tokens=12, logprobs=True, top_logprobs=5, prompt_logprobs=True, ignore_eos=True)
    # 30 blocks of 4 tokens: decodes outgrow the pool, and a preempted prompt's logprobs are computed again.
    engine = engine_for(arch, num_blocks_override=30)
    results = {r.request_id: r for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))}
    assert engine.stats.num_preemptions > 0
    reference = hf_reference(arch)
    for i, prompt in enumerate(prompts):
        completion = results[i].completions[0]
        tokens = prompt + completion.token_ids
        logprobs = reference_logprobs(reference, tokens)
        prompt_want = logprobs[: len(prompt) - 1].gather(1, torch.tensor(prompt[1:], dtype=torch.long)[:, None])[:, 0]
        assert results[i].prompt_logprobs[0] is None
        assert results[i].prompt_logprobs[1:] == pytest.approx(prompt_want.tolist(), abs=TOLERANCE)
        rows = logprobs[len(prompt) - 1 : len(tokens) - 1]
        chosen = rows.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert completion.logprobs == pytest.approx(chosen.tolist(), abs=TOLERANCE)
        top_values, top_ids = rows.topk(5, dim=-1)
        for step, top in enumerate(completion.top_logprobs):
            assert top.logprobs == pytest.approx(top_values[step].tolist(), abs=TOLERANCE)
            assert top.token_ids == top_ids[step].tolist()
            assert top.token_ids[0] == completion.token_ids[step]  # greedy: the chosen token leads


def test_sampled_rows_logprobs_are_the_models_own_distribution() -> None:
    """logprobs and top_logprobs of sampled rows are those of the model's own distribution, before the logit bias,
    penalties, temperature and filters (the job-file reference's promise, vLLM's default), for each of n samples
    and under preemption. Only greedy rows' numbers were checked against transformers: logprobs taken after the
    penalties passed the tests of the engine, its logits processors and the OpenAI output alike."""
    rng = random.Random(5)
    prompts = [random_ids(rng, rng.randint(1, 40)) for _ in range(6)]
    settings = [
        dict(temperature=0.7, top_k=20, repetition_penalty=1.3),
        dict(temperature=1.5, top_p=0.8, presence_penalty=1.0, frequency_penalty=0.5, n=2),
        dict(temperature=1.0, min_p=0.1, logit_bias={7: 5.0, 9: -3.0}, min_tokens=4),
    ]
    requests = [
        GenerationRequest(
            (i, j), prompt, SamplingParams(10, logprobs=True, top_logprobs=4, seed=i, ignore_eos=True, **extra)
        )
        for i, prompt in enumerate(prompts)
        for j, extra in enumerate(settings)
    ]
    engine = engine_for(num_blocks_override=40, max_num_batched_tokens=32)
    results = {r.request_id: r for r in engine.generate(requests)}
    assert engine.stats.num_preemptions > 0
    reference = hf_reference("llama")
    num_sampled = 0  # tokens other than the model's most likely: where processed numbers would differ most
    for (i, _), result in results.items():
        assert result.error is None
        for completion in result.completions:
            rows = reference_logprobs(reference, prompts[i] + completion.token_ids)[len(prompts[i]) - 1 : -1]
            chosen = rows.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            assert completion.logprobs == pytest.approx(chosen.tolist(), abs=TOLERANCE)
            top_values, top_ids = rows.topk(4, dim=-1)
            for step, top in enumerate(completion.top_logprobs):
                assert top.token_ids == top_ids[step].tolist()
                assert top.logprobs == pytest.approx(top_values[step].tolist(), abs=TOLERANCE)
                num_sampled += completion.token_ids[step] != top.token_ids[0]
    assert num_sampled > 20


def test_top_logprobs_order_ties_by_token_id_as_argmax_does() -> None:
    """Tokens of equal log-probability (lm_head rows copied from the greedy token's, on both sides of its id) come
    lowest id first, as argmax picks among them: the greedy token leads its top_logprobs, and a tie at the k-th
    place keeps the lowest ids. torch.topk left ties in any order (200 before 3, the greedy token)."""
    loaded, reference = tiny_loaded("llama"), hf_reference("llama")
    prompt = [5, 6, 7, 8]
    greedy = reference_logprobs(reference, prompt)[-1].argmax().item()
    with torch.no_grad():
        for model in (loaded.model, reference):
            for other in (3, 200, 511):
                model.lm_head.weight[other] = model.lm_head.weight[greedy]
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=4, num_blocks_override=64))
    rows = reference_logprobs(reference, prompt)[-1:]
    want_values, want_ids = rows.sort(dim=-1, descending=True, stable=True)
    for num_top in (1, 3, 4, 5):
        params = SamplingParams(max_new_tokens=1, logprobs=True, top_logprobs=num_top)
        completion = next(engine.generate([GenerationRequest(0, prompt, params)])).completions[0]
        (top,) = completion.top_logprobs
        assert completion.token_ids == [3] == want_ids[0, :1].tolist()
        assert top.token_ids == want_ids[0, :num_top].tolist(), num_top
        assert top.logprobs == pytest.approx(want_values[0, :num_top].tolist(), abs=TOLERANCE)


def test_scoring_rows_are_checked() -> None:
    engine = engine_for(max_model_len=32)
    requests = [
        GenerationRequest(0, [5, 6], continuations=[]),
        GenerationRequest(1, [5, 6], continuations=[[7], []]),
        GenerationRequest(2, [5] * 30, continuations=[[7, 8, 9, 10]]),  # 33 tokens, 32 input
        GenerationRequest(3, [5, 6], continuations=[[VOCAB_SIZE]]),
        GenerationRequest(4, [5] * 30, continuations=[[7, 8, 9]]),  # exactly 32 input tokens: fits
    ]
    results = {r.request_id: r for r in engine.generate(requests)}
    assert "at least one continuation" in results[0].error
    assert "no continuation may be empty" in results[1].error
    assert "at most 33 tokens fit" in results[2].error
    assert "outside the vocabulary" in results[3].error
    assert results[4].error is None and results[4].scores[0].num_tokens == 3


def test_a_scoring_request_that_asks_to_cut_its_prompt_is_refused() -> None:
    # A score is of the text as given; cut, it would be another text's score under the same request.
    engine = engine_for(max_model_len=32)
    cut = SamplingParams(truncate_prompt_tokens=1)
    requests = [
        GenerationRequest(0, [5, 6, 7], cut, continuations=[[8]]),
        GenerationRequest(1, [5, 6, 7], cut, rolling_prefix=1),
        GenerationRequest(2, [5, 6, 7], continuations=[[8]]),
    ]
    results = {r.request_id: r for r in engine.generate(requests)}
    for i in (0, 1):
        assert results[i].error_kind is ErrorKind.BAD_REQUEST and "truncate_prompt_tokens" in results[i].error
    assert results[2].error is None and results[2].num_prompt_tokens == 3


def test_rolling_windows_are_lm_evals() -> None:
    """runner/rolling.py's windows are lm-eval's own (get_rolling_token_windows with context_len 1, then
    make_disjoint_window) for texts shorter than, as long as, and many times a window. lm-eval is a test extra;
    a GPU machine without it skips this CPU-only check."""
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    get_rolling_token_windows, make_disjoint_window = (
        lm_eval_utils.get_rolling_token_windows,
        lm_eval_utils.make_disjoint_window,
    )

    from kvbatch.runner.rolling import rolling_windows

    for window in (1, 2, 5, 16):
        for length in (0, 1, window - 1, window, window + 1, 2 * window, 3 * window + 2, 50):
            tokens = list(range(100, 100 + max(length, 0)))
            want = [
                tuple(map(list, make_disjoint_window(pair)))
                for pair in get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=window, context_len=1)
            ]
            assert rolling_windows(tokens, 7, window) == want, (window, length)
    with pytest.raises(ValueError, match="at least one token"):
        rolling_windows([1, 2], 7, 0)


@pytest.mark.parametrize("fused_layers", [None, False])
def test_rolling_scores_equal_a_plain_forward_per_window(fused_layers: bool | None) -> None:
    """A rolling request scores each prompt token once, in the windows of the engine's context: the sum equals
    transformers' logprobs over each window alone (its context, then the tokens it predicts)."""
    from kvbatch.runner.rolling import rolling_windows

    rng = random.Random(11)
    context = 24
    lengths = [1, 5, 23, 24, 25, 70, 130]  # one token, within one window, exactly one, just over, many windows
    requests = [GenerationRequest(i, random_ids(rng, n), rolling_prefix=1) for i, n in enumerate(lengths)]
    engine = engine_for(max_model_len=context, num_blocks_override=40, fused_layers=fused_layers)
    results = {r.request_id: r for r in engine.generate(requests)}
    reference = hf_reference("llama")
    for request in requests:
        result = results[request.request_id]
        assert result.error is None and result.completions == [] and len(result.scores) == 1
        want, greedy = [], True
        for window_context, predicted in rolling_windows(request.prompt_token_ids, 1, context):
            tokens = window_context + predicted
            assert len(tokens) - 1 <= context
            rows = reference_logprobs(reference, tokens)[len(window_context) - 1 : -1]
            want += rows.gather(1, torch.tensor(predicted)[:, None])[:, 0].tolist()
            greedy &= bool((rows.argmax(dim=-1) == torch.tensor(predicted)).all())
        score = result.scores[0]
        assert score.num_tokens == len(request.prompt_token_ids) == result.num_prompt_tokens
        assert score.token_logprobs == pytest.approx(want, abs=TOLERANCE)
        assert score.logprob == pytest.approx(sum(want), abs=TOLERANCE * len(want))
        assert score.is_greedy == greedy
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_rolling_rows_are_checked() -> None:
    engine = engine_for(max_model_len=16)
    requests = [
        GenerationRequest(0, [], rolling_prefix=1),
        GenerationRequest(1, [5, 6, VOCAB_SIZE], rolling_prefix=1),
        GenerationRequest(2, [5, 6], rolling_prefix=VOCAB_SIZE),
        GenerationRequest(3, [5] * 40, rolling_prefix=1),  # longer than the context: windows, no error
    ]
    results = {r.request_id: r for r in engine.generate(requests)}
    assert "empty" in results[0].error
    assert "outside the vocabulary" in results[1].error and "outside the vocabulary" in results[2].error
    assert results[3].error is None and results[3].scores[0].num_tokens == 40


def test_rolling_windows_are_the_context_not_the_pool() -> None:
    # A pool of 6 blocks of 4 tokens holds 24 tokens, under the 32-token context: windows of the pool would make
    # the scores depend on the machine's memory, so the row is refused by name and the pool is left whole.
    small = engine_for(max_model_len=32, num_blocks_override=6)
    assert small.pool_size.num_tokens < small.max_model_len
    result = next(small.generate([GenerationRequest(0, [5] * 40, rolling_prefix=1)]))
    assert result.error_kind is ErrorKind.PROMPT_TOO_LONG and "windows of the context (32 tokens)" in result.error
    assert small.pool.num_free_blocks == small.pool.num_blocks
    # With the context at the pool's size, the same text scores in 24-token windows: two of them for 40 tokens.
    fits = engine_for(max_model_len=24, num_blocks_override=6)
    score = next(fits.generate([GenerationRequest(0, [5] * 40, rolling_prefix=1)])).scores[0]
    assert score.num_tokens == 40


@pytest.mark.parametrize("scored", ["continuations", "prompt_logprobs"])
def test_a_scoring_request_that_fails_stops_counting_as_scoring(scored: str, break_steps) -> None:
    """A request with scored rows that ends as an engine error leaves the engine's count of scoring requests, as
    one that finishes does: the steps after it gather no scored rows. It stayed counted until generate() ended."""
    loaded = tiny_loaded("llama")
    long_row = GenerationRequest("long", [5, 6, 7, 8], SamplingParams(max_new_tokens=40, ignore_eos=True))
    (clean,) = engine_for().generate([long_row])
    poison = min(set(range(2, VOCAB_SIZE)) - {5, 6, 7, 8, *clean.completions[0].token_ids})
    if scored == "continuations":
        bad = GenerationRequest("bad", [9, 10, poison], SamplingParams(), continuations=[[11, 12], [13]])
    else:
        bad = GenerationRequest("bad", [9, 10, poison], SamplingParams(max_new_tokens=2, prompt_logprobs=True))
    settings = dict(block_size=4, num_blocks_override=256, max_num_batched_tokens=64)
    engine = Engine.from_loaded(loaded, EngineConfig(**settings))
    break_steps(loaded.model, Poison(poison))
    after_error: list[int] = []  # the count after each step that follows the failure
    failed = False

    def on_step() -> None:
        if failed:
            after_error.append(engine._num_scoring)

    results = {}
    for result in engine.generate([bad, long_row], on_step=on_step):
        results[result.request_id] = result
        if result.request_id == "bad":
            failed = True
            assert engine._num_scoring == 0
    assert results["bad"].error_kind == ErrorKind.ENGINE
    assert results["long"].completions[0].token_ids == clean.completions[0].token_ids
    assert after_error and set(after_error) == {0}
