"""vLLM's sampling fields (presence/frequency penalties, min_tokens, logit_bias, bad_words, allowed_token_ids)
give the tokens transformers gives with its corresponding logits processor, greedy and seeded.

Greedy: the engine's tokens equal `model.generate(logits_processor=[...])`. Seeded: transformers' processors
and warpers give the distribution of each step on the reference model's own logits; the draw from it uses the
engine's noise (a pure function of seed, position and token), so equal distributions give equal tokens.
Presence and frequency penalties have no transformers processor: their reference is vLLM's definition in numpy.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from test_exact_vs_generate import random_prompts
from test_sampling_filters import transformers_probs
from tiny_models import EOS_ID, VOCAB_SIZE, hf_reference, tiny_loaded
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from kvbatch.errors import ErrorKind
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.sampling import uniform_noise

NUM_NEW = 10
ARCH = "llama"


class NumpyPenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties over the OUTPUT tokens, written out in numpy."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = np.bincount(input_ids[0, self.prompt_length :].numpy(), minlength=scores.shape[-1])
        penalty = self.presence * (counts > 0) + self.frequency * counts
        return scores - torch.from_numpy(penalty.astype(np.float32))[None]


@pytest.fixture(scope="module")
def models():
    return tiny_loaded(ARCH), hf_reference(ARCH)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(3, 4, 20, seed=17)


@pytest.fixture(scope="module")
def plain(models, prompts) -> list[list[int]]:
    """Each prompt's greedy tokens without any processor: the bad words and stops below are taken from them."""
    return engine_tokens(models[0], prompts, lambda i: SamplingParams(max_new_tokens=NUM_NEW, ignore_eos=True))


def make_engine(loaded, **overrides) -> Engine:
    config = dict(block_size=4, num_blocks_override=128, max_num_batched_tokens=64, max_num_seqs=8)
    return Engine.from_loaded(loaded, EngineConfig(**{**config, **overrides}))


def engine_tokens(loaded, prompts, params_of, **engine_overrides) -> list[list[int]]:
    engine = make_engine(loaded, **engine_overrides)
    results = {
        r.request_id: r for r in engine.generate(GenerationRequest(i, p, params_of(i)) for i, p in enumerate(prompts))
    }
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    return [results[i].completions[0].token_ids for i in range(len(prompts))]


# Each case: (the engine's params for prompt i, transformers' processors for it, its stop token ids besides EOS).
def cases(plain: list[list[int]], prompts: list[list[int]]) -> dict:

    def bad_words(i: int):
        """One word of two tokens taken from the greedy output, one of a single token. The word tokenizer reads
        "w2..." as its unknown token "w2" and more, so the words avoid such tokens."""
        tokens = plain[i]
        fine = [k for k in range(2, NUM_NEW) if not str(tokens[k]).startswith("2")]
        two = min(k for k in fine if k + 1 in fine)
        one = max(k for k in fine if k > two + 1)
        return (
            dict(bad_words=(f"w{tokens[two]} w{tokens[two + 1]}", f"w{tokens[one]}")),
            [NoBadWordsLogitsProcessor([[tokens[two], tokens[two + 1]], [tokens[one]]])],
            (),
        )

    allowed = sorted(set(range(2, VOCAB_SIZE, 7)))
    return {
        "repetition_penalty": lambda i: (
            dict(repetition_penalty=1.8),
            [RepetitionPenaltyLogitsProcessor(1.8)],
            (),
        ),
        "presence_frequency": lambda i: (
            dict(presence_penalty=1.5, frequency_penalty=0.7),
            [NumpyPenalties(len(prompts[i]), 1.5, 0.7)],
            (),
        ),
        "min_tokens": lambda i: (  # the greedy row would stop on its second token; min_tokens masks it
            dict(min_tokens=4, stop_token_ids=(plain[i][1],)),
            [MinNewTokensLengthLogitsProcessor(len(prompts[i]), 4, [EOS_ID, plain[i][1]])],
            (plain[i][1],),
        ),
        "logit_bias": lambda i: (
            dict(logit_bias={str(plain[i][2]): 6.0, 300: -4.5}),
            [SequenceBiasLogitsProcessor([[[plain[i][2]], 6.0], [[300], -4.5]])],
            (),
        ),
        "bad_words": bad_words,
        # transformers (SequenceBiasLogitsProcessor before RepetitionPenaltyLogitsProcessor) and vLLM (logit bias,
        # then penalties) add the bias before the repetition penalty divides or multiplies the logit.
        "logit_bias_repetition_penalty": lambda i: (
            dict(logit_bias={plain[i][0]: 8.0, plain[i][1]: -3.0, prompts[i][0]: 5.0}, repetition_penalty=1.8),
            [
                SequenceBiasLogitsProcessor([[[plain[i][0]], 8.0], [[plain[i][1]], -3.0], [[prompts[i][0]], 5.0]]),
                RepetitionPenaltyLogitsProcessor(1.8),
            ],
            (),
        ),
        "allowed_token_ids": lambda i: (
            dict(allowed_token_ids=allowed),
            [PrefixConstrainedLogitsProcessor(lambda batch_id, ids: allowed, num_beams=1)],
            (),
        ),
    }


CASES = [
    "repetition_penalty", "presence_frequency", "min_tokens", "logit_bias", "bad_words", "allowed_token_ids",
    "logit_bias_repetition_penalty",
]  # fmt: skip


def hf_greedy(model, prompt: list[int], processors: list, stops: tuple[int, ...]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NUM_NEW,
        do_sample=False,
        logits_processor=LogitsProcessorList(processors),
        eos_token_id=[EOS_ID, *stops],
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", CASES)
def test_greedy_equals_transformers_processor(models, prompts, plain, case) -> None:
    loaded, reference = models
    make = cases(plain, prompts)[case]
    got = engine_tokens(loaded, prompts, lambda i: SamplingParams(max_new_tokens=NUM_NEW, **make(i)[0]))
    for i, prompt in enumerate(prompts):
        _, processors, stops = make(i)
        want = hf_greedy(reference, prompt, processors, stops)
        assert got[i] == want, f"{case}, prompt {i}"
    assert got != plain, f"{case} changed no token: the case tests nothing"


def hf_seeded(model, prompt: list[int], processors: list, stops, params: SamplingParams, seq_seed: int) -> list[int]:
    """Transformers' processors then warpers on the reference model's logits; the draw with the engine's noise."""
    ids = list(prompt)
    for position in range(NUM_NEW):
        with torch.no_grad():
            scores = model(torch.tensor([ids])).logits[:, -1].float()
        for processor in processors:
            scores = processor(torch.tensor([ids]), scores)
        probs = transformers_probs(scores[0], params)
        noise = uniform_noise(torch.tensor([seq_seed & ((1 << 63) - 1)]), torch.tensor([position]), probs.shape[-1])[0]
        race = torch.where(probs > 0, probs / -torch.log(noise), -1.0)
        ids.append(int(race.argmax()))
        if ids[-1] in (EOS_ID, *stops):
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("case", CASES)
def test_seeded_equals_transformers_processor(models, prompts, plain, case) -> None:
    loaded, reference = models
    make = cases(plain, prompts)[case]

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=NUM_NEW, temperature=0.9, top_k=40, seed=100 + i, **make(i)[0])

    got = engine_tokens(loaded, prompts, params)
    for i, prompt in enumerate(prompts):
        _, processors, stops = make(i)
        seq_seed = (100 + i) * 1_000_003  # the engine's seed of a request's first sample
        assert got[i] == hf_seeded(reference, prompt, processors, stops, params(i), seq_seed), f"{case}, prompt {i}"


@pytest.mark.parametrize("seed", [0, 41, 2**62 + 9, 2**63 - 1])
def test_the_seeds_taken_before_wider_ones_draw_as_they_did(models, prompts, seed) -> None:
    """Seeds of -2**63..2**64 - 1 are taken since 0..2**63 - 1 were: each of those must still draw its rows as
    then, every sample (n=2) on transformers' distribution with the noise keyed as it was, (seed * 1_000_003 +
    sample) mod 2**63."""
    loaded, reference = models
    params = SamplingParams(max_new_tokens=NUM_NEW, temperature=0.9, seed=seed, n=2)
    [result] = make_engine(loaded).generate([GenerationRequest(0, prompts[0], params)])
    for i, completion in enumerate(result.completions):
        want = hf_seeded(reference, prompts[0], [], (), params, (seed * 1_000_003 + i) & ((1 << 63) - 1))
        assert completion.token_ids == want, f"sample {i}"


def test_any_seed_torch_takes_is_served_as_torch_wraps_it(models, prompts) -> None:
    """Seeds outside 0..2**63 - 1 were a bad_request row, where OpenAI and vLLM take any int64 and torch any of
    -2**63..2**64 - 1: a pipeline seeding each row with random.getrandbits(64) lost half its rows. As in torch, a
    negative seed is itself plus 2**64, and a seed over 2**63 - 1 draws apart from the one 2**63 below it (the
    mask to 63 bits had made them share their samples); engine.seed takes the same range."""
    loaded = models[0]
    seeds = [-1, 2**64 - 1, -(2**63), 2**63, 0, 2**63 + 5, 5]

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=NUM_NEW, temperature=1.0, ignore_eos=True, seed=seeds[i])

    got = [tuple(tokens) for tokens in engine_tokens(loaded, [prompts[0]] * len(seeds), params)]
    assert got[0] == got[1] and got[2] == got[3]
    assert len(set(got[1:])) == 5
    unseeded = [SamplingParams(max_new_tokens=NUM_NEW, temperature=1.0, ignore_eos=True)] * 2
    by_base = [engine_tokens(loaded, prompts[:2], unseeded.__getitem__, seed=base) for base in (-1, 2**64 - 1, 1)]
    assert by_base[0] == by_base[1] != by_base[2]
    for outside, words in ((2**64, f"seed must be <= {2**64 - 1}"), (-(2**63) - 1, f"seed must be >= {-(2**63)}")):
        with pytest.raises(ValueError, match=words):
            SamplingParams(seed=outside)
        with pytest.raises(ValueError, match=words):
            EngineConfig(seed=outside)


def mixed(plain, prompts, i: int) -> SamplingParams:
    extra = cases(plain, prompts)[CASES[i % len(CASES)]](i % len(prompts))[0]
    return SamplingParams(max_new_tokens=NUM_NEW, temperature=0.8 * (i % 2), seed=i, **extra)


def test_each_row_alone_equals_the_batch_sync_and_async(models, prompts, plain) -> None:
    """Batch invariance, and async scheduling (forced on the CPU) equal to the synchronous loop, with every
    new field in one batch: rows that read their own output drain the loop, the others are planned ahead."""
    loaded = models[0]
    batch = [prompts[i % len(prompts)] for i in range(len(CASES) * 2)]
    together = engine_tokens(loaded, batch, lambda i: mixed(plain, prompts, i), async_scheduling=False)
    ahead = engine_tokens(loaded, batch, lambda i: mixed(plain, prompts, i), async_scheduling=True)
    assert ahead == together
    for i, prompt in enumerate(batch[: len(CASES)]):  # each case once alone, greedy and seeded rows alternating
        alone = engine_tokens(loaded, [prompt], lambda _, i=i: mixed(plain, prompts, i))[0]
        assert alone == together[i], f"row {i} ({CASES[i % len(CASES)]})"


def test_token_ids_outside_the_vocabulary_fail_their_row_only(models, prompts) -> None:
    engine = make_engine(models[0])
    requests = [
        GenerationRequest(0, prompts[0], SamplingParams(max_new_tokens=3, logit_bias={VOCAB_SIZE: 1.0})),
        GenerationRequest(1, prompts[1], SamplingParams(max_new_tokens=3, allowed_token_ids=(5, VOCAB_SIZE + 3))),
        GenerationRequest(2, prompts[2], SamplingParams(max_new_tokens=3)),
        # min_tokens bans its stop ids by index: an id past the vocabulary failed the step, costing its rows a rerun
        GenerationRequest(3, prompts[0], SamplingParams(max_new_tokens=3, min_tokens=2, stop_token_ids=(VOCAB_SIZE,))),
    ]
    results = {r.request_id: r for r in engine.generate(requests)}
    assert results[0].error_kind == results[1].error_kind == results[3].error_kind == ErrorKind.BAD_REQUEST
    assert "logit_bias" in results[0].error and "allowed_token_ids" in results[1].error
    assert "stop_token_ids holds token ids outside the vocabulary" in results[3].error
    assert results[2].error is None and len(results[2].completions[0].token_ids) == 3
    assert engine.stats.num_failed_steps == 0


def test_allowed_token_ids_that_the_row_bans_fail_their_row_not_a_silent_token_0(models, prompts) -> None:
    """Every logit at -inf made the argmax (and the race) pick token 0, which allowed_token_ids does not allow."""
    engine = make_engine(models[0])
    contradictory = {
        0: dict(allowed_token_ids=(EOS_ID,), min_tokens=2),  # EOS only, banned under min_tokens
        1: dict(allowed_token_ids=(40, 41), stop_token_ids=(40,), bad_words=("w41",), min_tokens=1, temperature=1.0),
        2: dict(allowed_token_ids=(40,), bad_words=("w40",)),  # banned always
    }
    requests = [
        GenerationRequest(i, prompts[0], SamplingParams(max_new_tokens=4, **p)) for i, p in contradictory.items()
    ]
    fine = SamplingParams(max_new_tokens=4, allowed_token_ids=(40, EOS_ID), min_tokens=2)  # 40 is left under min_tokens
    requests.append(GenerationRequest(3, prompts[0], fine))
    results = {r.request_id: r for r in engine.generate(requests)}
    for i in contradictory:
        assert results[i].error_kind == ErrorKind.BAD_REQUEST, (i, results[i].completions)
    assert set(results[3].completions[0].token_ids) <= {40, EOS_ID}


def test_bad_words_that_come_to_ban_every_allowed_token_fail_their_row(models, prompts) -> None:
    """Bad words of several tokens ban their last token only after the others, so allowed_token_ids can pass the
    check when the row is added and still be banned whole after some output: then no token may be generated, and
    the row fails rather than take token 0, which it does not allow."""
    engine = make_engine(models[0])
    # logit_bias makes w40 come first; after it both allowed tokens are banned (greedy, sampled, under min_tokens)
    after_40 = dict(allowed_token_ids=(40, 41), bad_words=("w40 w40", "w40 w41"), logit_bias={40: 100.0})
    contradictory = {
        0: after_40,
        1: after_40 | dict(temperature=1.0, seed=3),
        2: dict(allowed_token_ids=(40, EOS_ID), bad_words=("w40 w40",), min_tokens=3, logit_bias={40: 100.0}),
    }
    requests = [
        GenerationRequest(i, prompts[0], SamplingParams(max_new_tokens=4, **p)) for i, p in contradictory.items()
    ]
    fine = dict(allowed_token_ids=(40, 41), bad_words=("w40 w40",), logit_bias={40: 100.0})  # w41 is left after w40
    requests.append(GenerationRequest(3, prompts[0], SamplingParams(max_new_tokens=4, **fine)))
    results = {r.request_id: r for r in engine.generate(requests)}
    for i in contradictory:
        assert results[i].error_kind == ErrorKind.BAD_REQUEST, (i, results[i].completions)
        assert "after 1 token" in results[i].error
    assert results[3].error is None and results[3].completions[0].token_ids == [40, 41, 40, 41]
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_a_bad_word_the_model_cannot_write_needs_no_ban() -> None:
    # The tokenizer may know more tokens than the model's vocabulary; banning one of those indexed past the logits.
    from tiny_models import word_tokenizer

    from kvbatch.runner.logits_processors import row_logits

    info = row_logits(SamplingParams(bad_words=("w400", "w5 w6")), word_tokenizer(), (EOS_ID,), vocab_size=300)
    assert info.bad_words_ids == ((5, 6),)


def test_stop_strings_under_min_tokens_and_include_stop_str(models, prompts, plain) -> None:
    """A stop string in the first min_tokens tokens does not stop the sample; include_stop_str_in_output keeps
    the stop string in the text (the word tokenizer decodes token t as 'wt')."""
    loaded, i = models[0], 0
    stop = f"w{plain[i][1]}"
    engine = make_engine(loaded)

    def run(**extra):
        params = SamplingParams(max_new_tokens=NUM_NEW, ignore_eos=True, stop=(stop,), **extra)
        return next(iter(engine.generate([GenerationRequest(0, prompts[i], params)]))).completions[0]

    cut = run()
    assert cut.token_ids == plain[i][:2] and cut.text == f"w{plain[i][0]} " and cut.finish_reason == "stop"
    kept = run(include_stop_str_in_output=True)
    assert kept.token_ids == plain[i][:2] and kept.text == f"w{plain[i][0]} {stop}"
    late = run(min_tokens=3)  # the stop string at token 2 is too early; greedy tokens are unchanged by it
    later = [k for k in range(2, NUM_NEW) if plain[i][k] == plain[i][1]]
    assert late.token_ids == (plain[i][: later[0] + 1] if later else plain[i])
    assert late.finish_reason == ("stop" if later else "length")


def test_a_stop_string_counts_only_once_it_ends_after_min_tokens_tokens(models, prompts, plain) -> None:
    """vLLM's rule, and EOS's (masked until min_tokens tokens are out): a stop string in the min_tokens-th token is
    too early; one ending in a later token stops the sample, even if it began in the first min_tokens tokens."""
    loaded, i = models[0], 0
    tokens = plain[i]
    assert tokens[:4] == [117, 415, 292, 411] and 292 not in tokens[3:]  # "w117 w415 w292 w411"
    engine = make_engine(loaded)

    def run(stop: str, min_tokens: int):
        params = SamplingParams(max_new_tokens=NUM_NEW, ignore_eos=True, stop=(stop,), min_tokens=min_tokens)
        completion = next(iter(engine.generate([GenerationRequest(0, prompts[i], params)]))).completions[0]
        return completion.token_ids, completion.text, completion.finish_reason

    assert run("w292", min_tokens=2) == (tokens[:3], "w117 w415 ", "stop")
    assert run("w292", min_tokens=3) == (tokens, " ".join(f"w{t}" for t in tokens), "length")
    assert run("w415 w292", min_tokens=2) == (tokens[:3], "w117 ", "stop")  # begins in token 2, ends in token 3
    assert run("w117", min_tokens=1) == (tokens, " ".join(f"w{t}" for t in tokens), "length")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device runs ahead of the host only on CUDA")
def test_on_the_gpu_async_equals_sync(models, prompts, plain) -> None:
    """On CUDA (graphs, fused layers, steps launched before the host has the tokens of the one before): every new
    field in one batch gives the same tokens planned ahead as in the synchronous loop."""
    gpu = dataclasses.replace(models[0], model=copy.deepcopy(models[0].model).to("cuda"), device=torch.device("cuda"))
    batch = [prompts[i % len(prompts)] for i in range(len(CASES) * 2)]
    sync = engine_tokens(gpu, batch, lambda i: mixed(plain, prompts, i), async_scheduling=False)
    assert engine_tokens(gpu, batch, lambda i: mixed(plain, prompts, i), async_scheduling=True) == sync
