"""Per-token logprobs in OpenAI Batch output: asked for by `"logprobs": true`, shaped as OpenAI's ChoiceLogprobs,
with exact token bytes (runner/token_bytes.py) and the stop token left out, as it is from the text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job_fakes import SPECIALS, FakeEngine
from openai.types import BatchError
from openai.types.chat import ChatCompletion
from openai_lines import refused

from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.spec import job_from_dict
from kvbatch.jobs.token_bytes import TokenBytes
from kvbatch.runner.request import Completion, GenerationRequest, GenerationResult, TopLogprobs

ANSWER = "Olá 😀"  # multi-byte characters: their bytes must come back exactly
EOS = SPECIALS["<|im_end|>"]


ALTERNATIVES = [EOS, 1000 + ord("x"), 1000 + ord("é")]  # a special token, then plain ones


class SpellingEngine(FakeEngine):
    """Answers ANSWER one character per token (the fake tokenizer's ids), then the EOS token; with top_logprobs,
    each position's own token leads its alternatives, then ALTERNATIVES."""

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        ids = self.tokenizer.encode(ANSWER) + [EOS]
        completions = []
        for sample in range(request.sampling.n):
            logprobs = [-0.25 * (k + 1) - sample for k in range(len(ids))] if request.sampling.logprobs else None
            num_top = request.sampling.top_logprobs
            tops = None
            if num_top:
                tops = [
                    TopLogprobs(([t] + ALTERNATIVES)[:num_top], [lp - j for j in range(num_top)])
                    for t, lp in zip(ids, logprobs)
                ]
            completions.append(Completion(ANSWER, ids, "stop", logprobs, tops))
        return GenerationResult(request.request_id, len(request.prompt_token_ids), completions)


def request(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body},
    }


def run_openai(tmp_path: Path, lines: list[dict[str, Any]], **fields: Any) -> tuple[list[dict[str, Any]], FakeEngine]:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    engines: list[FakeEngine] = []

    def factory(model: str, settings: dict[str, Any]) -> FakeEngine:
        engines.append(SpellingEngine())
        return engines[-1]

    job = job_from_dict(
        {"name": "j", "output_dir": "out", "input": {"path": "batch.jsonl", "format": "openai"}, **fields},
        base_dir=str(tmp_path),
    )
    run_job(job, EngineCache(factory))
    out = (tmp_path / "out" / "j.jsonl").read_text().splitlines()
    return [json.loads(x) for x in out], engines[0]


def test_logprobs_true_gives_openai_token_logprobs_and_false_gives_null(tmp_path: Path) -> None:
    lines, engine = run_openai(
        tmp_path,
        [
            request("with", logprobs=True, top_logprobs=0),
            request("without"),
            request("two", logprobs=True, n=2),
            request("off", logprobs=False),
        ],
    )
    asked = {r.request_id: r.sampling.logprobs for r in engine.requests}
    assert asked == {0: True, 1: False, 2: True, 3: False}

    first = ChatCompletion.model_validate(lines[0]["response"]["body"]).choices[0]
    content = first.logprobs.content
    assert [t.token for t in content] == list(ANSWER)  # the EOS the model stopped on is left out, as from the text
    assert b"".join(bytes(t.bytes) for t in content) == ANSWER.encode()
    assert content[-1].bytes == list("😀".encode())
    assert [t.logprob for t in content] == [-0.25 * (k + 1) for k in range(len(ANSWER))]
    assert all(t.top_logprobs == [] for t in content)
    assert lines[0]["response"]["body"]["choices"][0]["logprobs"]["refusal"] is None

    for line in (lines[1], lines[3]):
        assert line["response"]["body"]["choices"][0]["logprobs"] is None

    two = ChatCompletion.model_validate(lines[2]["response"]["body"]).choices
    assert [c.logprobs.content[0].logprob for c in two] == [-0.25, -1.25]  # each sample its own


def test_top_logprobs_come_back_in_the_api_shape(tmp_path: Path) -> None:
    lines, engine = run_openai(
        tmp_path, [request("top", logprobs=True, top_logprobs=3), request("two", logprobs=True, top_logprobs=2, n=2)]
    )
    assert [r.sampling.top_logprobs for r in engine.requests] == [3, 2]
    content = ChatCompletion.model_validate(lines[0]["response"]["body"]).choices[0].logprobs.content
    assert len(content) == len(ANSWER)  # the EOS the model stopped on is left out, its alternatives with it
    for k, token in enumerate(content):
        assert [t.token for t in token.top_logprobs] == [ANSWER[k], "<|im_end|>", "x"]
        assert [t.logprob for t in token.top_logprobs] == [token.logprob, token.logprob - 1, token.logprob - 2]
        assert token.top_logprobs[0].bytes == token.bytes
        assert token.top_logprobs[1].bytes is None  # a special token has no bytes of text
    two = ChatCompletion.model_validate(lines[1]["response"]["body"]).choices
    assert [len(c.logprobs.content[0].top_logprobs) for c in two] == [2, 2]
    assert [c.logprobs.content[0].top_logprobs[0].logprob for c in two] == [-0.25, -1.25]  # each sample its own


def test_unsupported_logprobs_requests_fail_their_row(tmp_path: Path) -> None:
    lines, engine = run_openai(
        tmp_path,
        [
            request("no-logprobs", top_logprobs=3),
            request("legacy", logprobs=5),
            request("too-many", logprobs=True, top_logprobs=21),
            request("ok", logprobs=True),
        ],
    )
    for line, words in (
        (lines[0], "top_logprobs needs logprobs: true"),
        (lines[1], "logprobs must be true or false, got 5"),
        (lines[2], "top_logprobs must be an integer from 0 to 20, got 21"),
    ):
        error = refused(line)
        assert error.code == "bad_request" and words in error.message
    assert [r.request_id for r in engine.requests] == [3]
    assert lines[3]["response"]["body"]["choices"][0]["logprobs"]["content"]


def test_ray_actors_write_the_token_bytes(tmp_path: Path) -> None:
    # GenerateBatch is what each Ray actor runs; the parts it writes are all the merge gets: the tokens must be in it.
    from kvbatch.jobs.job_io import layout_for
    from kvbatch.jobs.ray_data import GenerateBatch
    from kvbatch.jobs.ray_input import block_of_rows
    from kvbatch.jobs.rows import Row
    from kvbatch.jobs.spec import job_from_dict

    job = job_from_dict({"name": "j", "input": {"path": str(tmp_path / "batch.jsonl"), "format": "openai"}})
    layout = layout_for(job, {})
    generate = GenerateBatch(job, engine_factory=lambda model, settings: SpellingEngine(), layout=layout)
    messages = [{"role": "user", "content": "hi"}]
    rows = [
        Row(0, {"custom_id": "a", "messages": messages}, line=1, sampling={"logprobs": True}),
        Row(1, {"custom_id": "b", "messages": messages}, line=2),
    ]
    out = generate(block_of_rows(rows)).to_pylist()
    assert [r["custom_id"] for r in out] == ["a", "b"]
    assert out[0]["token_bytes"] == [[c.encode() for c in ANSWER] + [None]]  # the EOS is kept, marked special
    assert len(out[0]["logprobs"][0]) == len(ANSWER) + 1
    assert out[1]["token_bytes"] is None and out[1]["logprobs"] is None


def byte_level_tokenizer():
    """A tiny GPT-2-style byte-level BPE, trained here: an emoji it never saw splits into single-byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, the café is open", "hello again world"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_token_bytes_of_a_byte_level_bpe_are_exact() -> None:
    tokenizer = byte_level_tokenizer()
    text = "hello café 😀 world"
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    got = TokenBytes(tokenizer)(ids)
    assert got[-1] is None  # special: not part of the text
    assert b"".join(got[:-1]) == text.encode()
    emoji = [b for b in got if b and b[0] >= 0x80 and len(b) == 1]
    assert emoji == [bytes([b]) for b in "😀".encode()]  # each half-character token has its own byte, not U+FFFD's


class SentencePieceLike:
    """Llama-2-style decoding: a word decoded alone loses its leading space; bytes are <0xNN> fallback pieces."""

    pieces = {5: "▁hello", 6: "<0xE2>", 7: "ok", 2: "</s>"}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces[token_id]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        (token_id,) = ids
        if token_id == 2:
            return "" if skip_special_tokens else "</s>"
        return {5: "hello", 6: "\ufffd", 7: "ok"}[token_id]


def test_token_bytes_of_sentencepiece_pieces() -> None:
    assert TokenBytes(SentencePieceLike())([5, 6, 7, 2]) == [b" hello", b"\xe2", b"ok", None]


def test_the_jobs_logprobs_setting_is_each_bodys_default(tmp_path: Path) -> None:
    lines, _ = run_openai(
        tmp_path, [request("asks not"), request("turns off", logprobs=False)], sampling={"logprobs": True}
    )
    with_logprobs = ChatCompletion.model_validate(lines[0]["response"]["body"]).choices[0].logprobs
    assert with_logprobs is not None and with_logprobs.content
    assert ChatCompletion.model_validate(lines[1]["response"]["body"]).choices[0].logprobs is None
    # top_logprobs without `logprobs` takes the job's default too: refused only where logprobs is off for the row
    lines, _ = run_openai(
        tmp_path / "again",
        [request("top", top_logprobs=2), request("top, turned off", logprobs=False, top_logprobs=2)],
        sampling={"logprobs": True},
    )
    (token, *_) = ChatCompletion.model_validate(lines[0]["response"]["body"]).choices[0].logprobs.content
    assert len(token.top_logprobs) == 2
    error = BatchError.model_validate(lines[1]["error"])
    assert error.code == "bad_request" and "top_logprobs needs logprobs: true" in error.message


def test_the_jobs_prompt_logprobs_are_refused_for_openai_batch_output(tmp_path: Path) -> None:
    """OpenAI Batch output lines have no place for prompt log-probabilities: the rows computed a logits row per prompt
    token and the lines were written without them, with no word. Refused as the job loads; another output format
    gets its prompt_logprobs column."""
    import pytest

    from kvbatch.errors import SpecError
    from kvbatch.jobs.job_io import layout_for

    def job(**fields: Any):
        base = {"name": "j", "input": {"path": "batch.jsonl", "format": "openai"}}
        return job_from_dict(base | {"sampling": {"prompt_logprobs": True}} | fields, base_dir=str(tmp_path))

    with pytest.raises(SpecError, match="prompt log-probabilities have no place in OpenAI Batch output") as refused:
        layout_for(job(), {})
    assert refused.value.field == "sampling.prompt_logprobs"
    assert layout_for(job(output={"format": "jsonl"}), {}).prompt_logprobs


class TextEosEngine(SpellingEngine):
    """Answers as SpellingEngine, but ends each sample on a token with text, "." (a model whose generation config
    names a plain token as an end-of-sequence id); a constrained row's text leaves it out, as the engine does."""

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        result = super()._answer(request)
        dot = self.tokenizer.encode(".")[0]
        completions = [
            Completion(c.text, [*c.token_ids[:-1], dot], c.finish_reason, c.logprobs, c.top_logprobs)
            for c in result.completions
        ]
        return GenerationResult(result.request_id, result.num_prompt_tokens, completions)


def test_a_constrained_rows_logprobs_leave_out_the_text_eos_its_grammar_stopped_on(tmp_path: Path) -> None:
    """A constrained row's text leaves out the end-of-sequence token its grammar stopped on, even one that is no
    special token; its logprobs content still spelled it, so the tokens read `Olá 😀.` beside the text `Olá 😀`.
    A free row's text keeps such a token, and so does its content."""
    (tmp_path / "batch.jsonl").write_text(
        json.dumps(request("json", logprobs=True, response_format={"type": "json_object"})) + "\n"
        + json.dumps(request("free", logprobs=True)) + "\n"
    )  # fmt: skip
    job = job_from_dict(
        {"name": "j", "output_dir": "out", "input": {"path": "batch.jsonl", "format": "openai"}}, base_dir=str(tmp_path)
    )
    run_job(job, EngineCache(lambda model, settings: TextEosEngine()))
    lines = [json.loads(x) for x in (tmp_path / "out" / "j.jsonl").read_text().splitlines()]
    constrained, free = (ChatCompletion.model_validate(line["response"]["body"]).choices[0] for line in lines)
    assert "".join(t.token for t in constrained.logprobs.content) == constrained.message.content == ANSWER
    assert [t.logprob for t in constrained.logprobs.content] == [-0.25 * (k + 1) for k in range(len(ANSWER))]
    assert "".join(t.token for t in free.logprobs.content) == ANSWER + "."
