"""Each sample says what stopped it (`Completion.stop_reason`, the output's `stop_reason` column): the stop
string, the stop token id, or null (the model's EOS, a length stop). With n > 1 every sample has its own finish
reason and stop reason. The tiny random Llama generates; its greedy tokens without stops are the reference."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from scaling_helpers import tiny_engine
from tiny_models import EOS_ID, tiny_loaded

from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.spec import job_from_dict
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.stopping import StopChecker

PROMPT = [5, 17, 230, 41, 99, 7]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_loaded(tiny_loaded("llama"), EngineConfig(device="cpu", num_blocks_override=64))


def one(engine: Engine, **sampling):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, **sampling)
    [result] = engine.generate([GenerationRequest(0, PROMPT, params)])
    return result


def test_a_length_stop_has_no_stop_reason(engine: Engine) -> None:
    completion = one(engine).completions[0]
    assert (completion.finish_reason, completion.stop_reason, len(completion.token_ids)) == ("length", None, 8)


def test_a_stop_token_id_is_the_stop_reason(engine: Engine) -> None:
    tokens = one(engine).completions[0].token_ids
    stop_id = tokens[3]
    completion = one(engine, stop_token_ids=(stop_id,)).completions[0]
    assert completion.token_ids == tokens[: tokens.index(stop_id) + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)


def test_the_stop_string_found_is_the_stop_reason(engine: Engine) -> None:
    tokens = one(engine).completions[0].token_ids
    word = engine.tokenizer.decode([tokens[4]])
    completion = one(engine, stop=("never-generated", word)).completions[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", word)
    assert word not in completion.text


def test_of_two_stop_strings_at_one_place_the_first_listed_is_the_stop_reason(engine: Engine) -> None:
    """ "w117" and "w11" both start where token 4's text does: the text is cut there either way, and the stop
    reason (and the stop string kept by include_stop_str_in_output) is the one the request lists first, not the
    alphabetically first."""
    tokens = one(engine).completions[0].token_ids
    word = engine.tokenizer.decode([tokens[4]]).strip()
    text = one(engine).completions[0].text
    start = text.index(word)
    assert text.find(word[:-1]) == start  # precondition: the shorter one is not found earlier
    for stops in [(word, word[:-1]), (word[:-1], word)]:
        completion = one(engine, stop=stops).completions[0]
        assert (completion.finish_reason, completion.stop_reason, completion.text) == ("stop", stops[0], text[:start])
        kept = one(engine, stop=stops, include_stop_str_in_output=True).completions[0]
        assert kept.text == text[:start] + stops[0]


def test_a_stop_string_seen_before_min_tokens_is_not_the_stop_reason(engine: Engine) -> None:
    """min_tokens=3: "w433" (token 0) does not stop the sample; "w117" (token 4) does, and is its stop reason."""
    tokens = one(engine).completions[0].token_ids
    assert tokens[:5] == [433, 508, 62, 62, 117]
    completion = one(engine, stop=("w433", "w117"), min_tokens=3).completions[0]
    assert completion.token_ids == tokens[:5]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "w117")
    assert completion.text == "w433 w508 w62 w62 "


def test_the_models_eos_leaves_the_stop_reason_null() -> None:
    checker = StopChecker(tiny_loaded("llama").tokenizer, (EOS_ID,))
    params = SamplingParams(stop_token_ids=(9,))

    def seq(tokens: list[int]) -> SimpleNamespace:
        return SimpleNamespace(
            request=SimpleNamespace(sampling=params), output_token_ids=tokens, finish_reason="stop", matcher=None
        )

    assert checker.stop_reason(seq([4, EOS_ID])) is None
    assert checker.stop_reason(seq([4, 9])) == 9


def test_rows_stop_strings_leave_nothing_behind_in_the_engine() -> None:
    """The stop strings that are special tokens were cached by each row's stop list, for the engine's life: a job whose
    rows each give their own stop (few-shot "Question 17:") grew it by about 400 bytes a row, 400 MB a million rows.
    A special token among them is still matched by its id and is the stop reason."""
    import tracemalloc

    from tiny_models import word_tokenizer

    checker = StopChecker(word_tokenizer(), (EOS_ID,))

    def seq(stop: tuple[str, ...], tokens: list[int]) -> SimpleNamespace:
        params = SamplingParams(stop=stop, ignore_eos=True, max_new_tokens=10)
        request = SimpleNamespace(sampling=params)
        return SimpleNamespace(request=request, output_token_ids=tokens, max_new_tokens=10, matcher=None)

    special = seq(("w9", "</s>"), [4, EOS_ID])
    assert checker.check(special) == "stop"
    special.finish_reason = "stop"
    assert checker.stop_reason(special) == "</s>"
    rows = [seq((f"Question {i}:", "</s>"), [4, 5]) for i in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert all(checker.check(row) is None for row in rows)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000, grown


def byte_tokenizer():
    """A byte-level BPE without merges: each UTF-8 byte is a token, so an emoji takes four."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize(
    ("min_tokens", "num_tokens", "text"),
    [(0, 4, ""), (2, 4, ""), (4, 8, "\N{GRINNING FACE}"), (5, 8, "\N{GRINNING FACE}")],
)
def test_a_stop_character_that_ends_after_min_tokens_stops_where_it_ends(min_tokens, num_tokens, text) -> None:
    """An emoji is four byte tokens. With min_tokens 2 the first ends in token 4, after the first two tokens, and
    stops the sample there (vLLM's rule). Their text, an unfinished character, decoded as one U+FFFD that was counted
    as done: the emoji was looked for past it, and the sample ran on to the second one."""
    tokenizer = byte_tokenizer()
    checker = StopChecker(tokenizer, (EOS_ID,))
    tokens = tokenizer.encode("\N{GRINNING FACE}\N{GRINNING FACE} ok", add_special_tokens=False)
    assert len(tokens) == 11
    params = SamplingParams(stop=("\N{GRINNING FACE}",), min_tokens=min_tokens, max_new_tokens=20)
    seq = SimpleNamespace(
        request=SimpleNamespace(sampling=params), output_token_ids=[], max_new_tokens=20, matcher=None
    )
    for token in tokens:
        seq.output_token_ids.append(token)
        seq.finish_reason = checker.check(seq)
        if seq.finish_reason:
            break
    assert (len(seq.output_token_ids), seq.finish_reason, checker.text(seq)) == (num_tokens, "stop", text)
    assert checker.stop_reason(seq) == "\N{GRINNING FACE}"


@pytest.mark.parametrize(
    ("text", "max_new_tokens", "want"),
    [
        ("\N{GRINNING FACE}\N{GRINNING FACE} ok", 11, (11, "length", "\N{GRINNING FACE}\N{GRINNING FACE} ok", None)),
        (b"\xf0\x9f ok", 5, (3, "stop", "", "\ufffd")),  # an emoji's first two bytes, then a space: broken bytes
        (b"\xf0\x9f", 2, (2, "length", "\ufffd", None)),  # still unfinished where the sample ends
    ],
)
def test_an_unfinished_character_does_not_match_a_stop_string_of_replacement_characters(
    text, max_new_tokens, want
) -> None:
    """A character split over byte tokens decodes as U+FFFD until its last byte comes, and so do the last bytes of
    one the stop check's tail of tokens begins inside. A stop string "\ufffd" (for bytes that are no UTF-8) matched
    those: every emoji stopped its sample after its first byte, and the text was cut where the model had written no
    U+FFFD. The stop string now counts once the bytes before it stay broken (a later token decodes after them), as
    vLLM's detokenizer holds back a text that ends in U+FFFD."""
    tokenizer = byte_tokenizer()
    checker = StopChecker(tokenizer, (EOS_ID,))
    if isinstance(text, bytes):  # bytes that are no text: the byte tokens of a text that begins with them
        tokens = tokenizer.encode("\N{GRINNING FACE}", add_special_tokens=False)[:2]
        tokens += tokenizer.encode(text[2:].decode(), add_special_tokens=False)
    else:
        tokens = tokenizer.encode(text, add_special_tokens=False)
    # ignore_eos: the space's byte token is the tiny models' EOS id
    params = SamplingParams(stop=("\ufffd",), max_new_tokens=max_new_tokens, ignore_eos=True)
    seq = SimpleNamespace(
        request=SimpleNamespace(sampling=params), output_token_ids=[], max_new_tokens=max_new_tokens, matcher=None
    )
    for token in tokens:
        seq.output_token_ids.append(token)
        seq.finish_reason = checker.check(seq)
        if seq.finish_reason:
            break
    got = (len(seq.output_token_ids), seq.finish_reason, checker.text(seq), checker.stop_reason(seq))
    assert got == want


def run(tmp_path: Path, sampling: dict) -> list[dict]:
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": " ".join(f"w{t}" for t in PROMPT)}) + "\n")
    job = job_from_dict(
        {
            "name": "s",
            "input": {"path": "in.jsonl"},
            "prompt": {"chat_template": False},
            "sampling": {"max_new_tokens": 8, "ignore_eos": True, **sampling},
            "output_dir": "out",
            "engine": {"device": "cpu", "num_blocks_override": 64},
        },
        base_dir=str(tmp_path),
    )
    run_job(job, EngineCache(tiny_engine))
    return read_arrow(tmp_path / "out" / "s.arrow").to_pylist()


def test_the_output_has_a_stop_reason_column(tmp_path: Path, engine: Engine) -> None:
    tokens = one(engine).completions[0].token_ids
    [row] = run(tmp_path, {"stop_token_ids": [tokens[2]]})
    assert (row["finish_reason"], row["stop_reason"]) == ("stop", str(tokens[2]))  # one string column for both


def test_n_samples_each_have_their_finish_and_stop_reason(tmp_path: Path, engine: Engine) -> None:
    # Sampled at temperature 1 with a fixed seed (each sample its own seed): a token that some samples make and
    # others do not stops exactly the samples that make it.
    sampling = {"n": 4, "temperature": 1.0, "seed": 3}
    free = [c.token_ids for c in one(engine, **sampling).completions]
    stop_id = next(t for t in sorted({t for s in free for t in s}) if 0 < sum(t in s for s in free) < len(free))
    [row] = run(tmp_path, {**sampling, "stop_token_ids": [stop_id]})
    assert row["finish_reasons"] == ["stop" if stop_id in s else "length" for s in free]
    assert row["stop_reason"] == [str(stop_id) if stop_id in s else None for s in free]
    assert row["finish_reason"] == row["finish_reasons"][0]
