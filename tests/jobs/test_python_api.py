"""The examples of docs/python-api.md run as written, with the tiny random Llama standing in for the default
model (its texts are random words: the examples assert only what holds for any model)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from job_fakes import fake_factory
from scaling_helpers import tiny_engine

import kvbatch
from kvbatch.errors import SpecError
from kvbatch.jobs import generate as generate_module
from kvbatch.jobs.run import EngineCache

DOC = Path(__file__).parents[2] / "docs" / "python-api.md"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tiny_with_chat_template(model: str, settings: dict):
    engine = tiny_engine(model, {"num_blocks_override": 128, **settings})  # not the 2 GiB pool of a real model
    engine.tokenizer.chat_template = CHAT_TEMPLATE  # the word tokenizer has none; the examples use one
    return engine


@pytest.fixture(autouse=True)
def tiny_engines(monkeypatch: pytest.MonkeyPatch) -> EngineCache:
    engines = EngineCache(tiny_with_chat_template)
    monkeypatch.setattr(generate_module, "_ENGINES", engines)
    return engines


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_the_examples_of_the_doc_run_in_order() -> None:
    namespace: dict = {}  # one namespace, as a reader running them one after the other
    blocks = examples()
    assert len(blocks) == 4
    for index, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} example {index + 1}", "exec"), namespace)
    assert namespace["empty"].error.kind == "empty_prompt"


def test_the_stop_reasons_example_holds_for_a_model_that_ends_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example asserted that a "stop" finish was the stop string's; a model's end-of-sequence token finishes
    with "stop" too, its stop reason None (the fake engine's texts end so)."""
    monkeypatch.setattr(generate_module, "_ENGINES", EngineCache(fake_factory()))
    namespace: dict = {"kvbatch": kvbatch}
    exec(compile(examples()[2], f"{DOC.name} example 3", "exec"), namespace)
    assert namespace["first"].finish_reasons == ["stop"] and namespace["first"].stop_reasons == [None]


def test_texts_are_in_prompt_order_and_match_a_job_row(tiny_engines: EngineCache) -> None:
    prompts = ["w5 w6 w7", "w9", "w11 w12 w13 w14 w15"]
    texts = kvbatch.generate(prompts, model="tiny", chat_template=False, max_new_tokens=5)
    [engine] = tiny_engines._engines.values()  # one model load for every call
    assert kvbatch.generate(prompts[1:2], model="tiny", chat_template=False, max_new_tokens=5) == texts[1:2]
    assert len(tiny_engines._engines) == 1
    # Settings spelled at their defaults are the same engine: a second load would hold a second KV pool.
    kvbatch.generate(prompts[:1], model="tiny", max_new_tokens=1, engine={"device": "auto", "block_size": 16})
    assert len(tiny_engines._engines) == 1
    ids = engine.tokenizer.encode(prompts[2])
    [reference] = engine.generate([kvbatch.GenerationRequest(0, ids, kvbatch.SamplingParams(max_new_tokens=5))])
    assert texts[2] == reference.text


def test_each_prompt_is_read_alone_and_what_was_asked_comes_back() -> None:
    # A list of messages beside strings, or a None, made every string prompt an error; logprobs and top_logprobs
    # were accepted and dropped; a bare string was read as one prompt per character.
    alone = kvbatch.generate(["w5 w6", "w9"], model="tiny", max_new_tokens=3)
    mixed = kvbatch.generate(["w5 w6", [{"role": "user", "content": "w9"}], None], model="tiny", max_new_tokens=3)
    assert mixed[:2] == alone and mixed[2] is None
    # A tuple of messages was "prompts[1] is tuple, expected a string".
    assert kvbatch.generate(["w5 w6", ({"role": "user", "content": "w9"},)], model="tiny", max_new_tokens=3) == alone
    # A pandas column of messages holds numpy arrays: each was "prompts[0] is ndarray, expected a string".
    arrays = [np.array([{"role": "user", "content": p}]) for p in ("w5 w6", "w9")]
    assert kvbatch.generate(arrays, model="tiny", max_new_tokens=3) == alone
    raw = kvbatch.generate(["w5 w6", None], model="tiny", chat_template=False, max_new_tokens=3, results=True)
    assert raw[0].error is None and raw[1].error.kind == "empty_prompt"
    (row,) = kvbatch.generate(["w5 w6"], model="tiny", max_new_tokens=3, logprobs=True, top_logprobs=2, results=True)
    assert len(row.logprobs[0]) == 3 and [len(top) for top in row.top_logprobs[0]] == [2, 2, 2]
    assert row.logprobs[0] == [top[0]["logprob"] for top in row.top_logprobs[0]]  # greedy: the chosen one leads
    with pytest.raises(TypeError, match="prompts is a string; pass a list of prompts"):
        kvbatch.generate("w5 w6", model="tiny")
    with pytest.raises(TypeError, match="continuations is a string; pass a list of continuations"):
        kvbatch.score(["w5"], " w6", model="tiny")


def test_messages_of_a_pandas_column_are_read_as_lists_at_every_depth(tmp_path: Path) -> None:
    """pandas reads a Parquet column of messages as numpy arrays inside as well as out: a message's list of content
    parts (or of tool calls) was an ndarray, and each such prompt failed "prompts[0][0].content is ndarray,
    expected a string or a list of text parts". They are read as the lists they hold, as the same rows of a job."""
    import pandas as pd
    import pyarrow.parquet as pq

    messages = [
        [{"role": "user", "content": [{"type": "text", "text": "w5"}, {"type": "text", "text": " w6"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "w9"}]}],
    ]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "in.parquet")
    column = pd.read_parquet(tmp_path / "in.parquet")["messages"]
    assert isinstance(column[0][0]["content"], np.ndarray)
    expected = kvbatch.generate(messages, model="tiny", max_new_tokens=3, results=True)
    got = kvbatch.generate(column, model="tiny", max_new_tokens=3, results=True)
    assert [r.error for r in expected] == [None, None]
    assert [(r.texts, r.error, r.prompt_tokens) for r in got] == [(r.texts, r.error, r.prompt_tokens) for r in expected]


def test_messages_of_a_datasets_sequence_column_are_read_by_position(tmp_path: Path) -> None:
    """datasets' older `Sequence({"role": ..., "content": ...})` holds each row's messages as lists of fields by
    position, {"role": [...], "content": [...]}, as a job's messages_column reads them; passed as prompts (a
    dataset's column, or the pandas column of its Parquet file) each failed "prompts[0] is an object, expected a
    string". They are the messages they hold, as in a job."""
    import datasets
    import pandas as pd

    messages = [[{"role": "user", "content": "w5 w6"}], [{"role": "user", "content": "w9"}]]
    fields = datasets.Sequence({"role": datasets.Value("string"), "content": datasets.Value("string")})
    by_position = [{"role": [m["role"] for m in ms], "content": [m["content"] for m in ms]} for ms in messages]
    source = datasets.Dataset.from_dict({"messages": by_position}, features=datasets.Features({"messages": fields}))
    assert source["messages"][0] == {"role": ["user"], "content": ["w5 w6"]}
    source.to_parquet(str(tmp_path / "in.parquet"))
    expected = kvbatch.generate(messages, model="tiny", max_new_tokens=3)
    assert kvbatch.generate(source["messages"], model="tiny", max_new_tokens=3) == expected
    column = pd.read_parquet(tmp_path / "in.parquet")["messages"]  # its lists as numpy arrays
    assert kvbatch.generate(column, model="tiny", max_new_tokens=3) == expected
    (wrong,) = kvbatch.generate([{"role": "user"}], model="tiny", results=True)  # no messages by position
    assert (wrong.error.kind, wrong.error.message) == ("wrong_type", "prompts[0] is an object, expected a string")


def test_a_missing_value_of_a_pandas_column_is_a_null_prompt() -> None:
    """pandas holds a missing text as NaN (its default string type) or pd.NA (the "string" type): such a prompt
    failed as "prompts[1] is a number, expected a string" (wrong_type) or "is NAType", where None is "prompts[1]
    is null" (empty_prompt). Each is read as the null it stands for."""
    import numpy as np
    import pandas as pd

    for column in (
        pd.Series(["w5 w6", None]),
        pd.Series(["w5 w6", None], dtype="string"),
        pd.Series(["w5 w6", np.float32("nan")], dtype=object),
    ):
        assert column.tolist()[1] is not None  # NaN, or pd.NA
        first, missing = kvbatch.generate(column, model="tiny", max_new_tokens=3, results=True)
        assert first.error is None
        assert (missing.error.kind, missing.error.message) == ("empty_prompt", "prompts[1] is null")


def test_score_gives_each_continuation_and_each_whole_text_its_logprob() -> None:
    """kvbatch.score against log_softmax of transformers' float32 logits: continuations after their prompt (a
    job's task score), and without continuations each text whole after the BOS (task score_rolling); a failed
    row is None, in its place."""
    import torch
    from tiny_models import hf_reference, word_tokenizer

    reference = hf_reference("llama")
    tok = word_tokenizer()

    def logprobs(context: list[int], tokens: list[int]) -> list[float]:
        with torch.no_grad():
            rows = torch.log_softmax(reference(torch.tensor([context + tokens])).logits[0].float(), dim=-1)
        return rows[len(context) - 1 : -1].gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()

    # As in lm-eval, a continuation starts with its space: prompt + continuation is the text scored; after an empty
    # prompt, the tokenizer's BOS (else its EOS) is the context.
    prompts = ["w5 w6 w7", "", "w9", "w20"]
    choices = [[" w10", " w11 w12"], [" w3"], [" w13 w14 w15"], [""]]
    got = kvbatch.score(prompts, choices, model="tiny")
    assert got[3] is None  # an empty continuation fails its row alone
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for prompt, continuations, scores in zip(prompts[:3], choices, got):
        assert [s["num_tokens"] for s in scores] == [len(c.split()) for c in continuations]
        for continuation, s in zip(continuations, scores):
            want = logprobs(tok.encode(prompt) or [prefix], tok.encode(continuation))
            assert s["logprob"] == pytest.approx(sum(want), abs=1e-4 * len(want))
    texts = ["w30 w31 w32 w33", "w40"]  # no "w2..." words: "w2", the unknown token, is special text
    rolling = kvbatch.score(texts, model="tiny")
    for text, (whole,) in zip(texts, rolling):
        want = logprobs([tok.bos_token_id], tok.encode(text))
        assert whole["num_tokens"] == len(want) and whole["logprob"] == pytest.approx(sum(want), abs=1e-4 * len(want))
    with pytest.raises(ValueError, match="4 prompts but 2 lists"):
        kvbatch.score(prompts, choices[:2], model="tiny")
    # A bare string where a list belongs is that prompt's wrong_type, not a list of its characters.
    bad = kvbatch.score(["w5 w6", "w7", "w8"], [" w9 w10", None, (" w11",)], model="tiny", results=True)
    assert [r.error.kind if r.error else None for r in bad] == ["wrong_type", "missing_column", None]
    assert "must be a non-empty list of non-empty strings" in bad[0].error.message
    # Without its space, "w7" joins the prompt's last word ("w6w7" is one token), leaving the choice no tokens.
    (merged,) = kvbatch.score(["w5 w6"], [["w7", " w8"]], model="tiny", results=True)
    assert merged.error.kind == "tokenize" and "continuation 'w7' has no tokens of its own" in merged.error.message


def test_a_token_id_outside_the_vocabulary_refuses_the_call() -> None:
    """The tiny model has token ids 0 to 511. A keyword naming 512 made every prompt a bad_request (each None)."""
    with pytest.raises(SpecError) as refused:
        kvbatch.generate(["w5 w6", "w9"], model="tiny", max_new_tokens=3, stop_token_ids=[511, 512])
    assert str(refused.value) == (
        "sampling.stop_token_ids: token ids [512] are outside the model's vocabulary of 512 tokens (ids 0 to 511)"
    )


def messages(rows) -> list[str | None]:
    return [row.error.message if row.error is not None else None for row in rows]


def test_errors_name_the_prompts_and_continuations_passed_not_columns() -> None:
    """The caller passes lists and names no column: a failed prompt said "row 2: column 'prompt' is null"."""
    texts = kvbatch.generate(["w5", "", None, 42], model="tiny", max_new_tokens=2, results=True)
    assert messages(texts) == [
        None,
        "prompts[1] is empty",
        "prompts[2] is null",
        "prompts[3] is an integer, expected a string",
    ]
    chats = [
        [{"role": "user", "content": "w5"}],
        [],
        [{"role": "user", "content": "w5"}, {"role": "narrator", "content": "w6"}],
        [{"role": "system", "content": "w5"}],
        "w6",
    ]
    assert messages(kvbatch.generate(chats, model="tiny", max_new_tokens=2, results=True)) == [
        None,
        "prompts[1] is an empty list",
        "prompts[2][1].role is 'narrator', expected one of system, user, assistant, tool, developer",
        "prompts[3] has no non-empty message besides the system prompt",
        None,
    ]
    (long,) = kvbatch.generate([" ".join(["w5"] * 600)], model="tiny", chat_template=False, results=True)
    assert long.error.message == (
        "prompts[0]: the prompt has 600 tokens; at most 511 fit, leaving room for one new token (the context is "
        "512 tokens)"
    )
    scores = kvbatch.score(["w5", "w5", "w5"], [[" w6"], [], None], model="tiny", results=True)
    assert messages(scores) == [
        None,
        "continuations[1] must be a non-empty list of non-empty strings",
        "continuations[2] is missing or null (task: score)",
    ]


def test_a_template_file_serves_a_model_that_has_no_template(tmp_path: Path) -> None:
    """The refusal of template values for a model without a template said to give the job a
    prompt.chat_template_file, which kvbatch.generate had no keyword for."""
    from tiny_models import word_tokenizer

    engines = EngineCache(lambda model, settings: tiny_engine(model, {"num_blocks_override": 128, **settings}))
    with pytest.raises(SpecError, match="this model's tokenizer has none .* prompt.chat_template_file"):
        kvbatch.generate(["w5"], model="tiny", chat_template_kwargs={"extra": "w7"}, engines=engines)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {{ extra }} {% endfor %}")
    (row,) = kvbatch.generate(
        ["w5 w6"],
        model="tiny",
        chat_template_kwargs={"extra": "w7"},
        chat_template_file=str(template),
        engines=engines,
        max_new_tokens=2,
        results=True,
    )
    want = word_tokenizer().apply_chat_template(
        [{"role": "user", "content": "w5 w6"}], chat_template=template.read_text(), extra="w7", tokenize=True
    )
    assert row.error is None and row.prompt_tokens == len(want["input_ids"] if hasattr(want, "keys") else want) == 3


def test_a_lone_surrogate_is_named_as_not_text() -> None:
    """A Python string may hold half a surrogate pair; the tokenizer failed the row with "TypeError: TextEncodeInput
    must be Union[...]", and in a continuation blamed the prompt."""
    chat = [{"role": "user", "content": "w5 \udc80"}]
    results = kvbatch.generate(["w5 \ud800", chat, "w5"], model="tiny", max_new_tokens=2, results=True)
    assert [r.error and (r.error.kind, r.error.message) for r in results[:2]] == [
        ("invalid_utf8", "prompts[0] holds a lone surrogate (\\ud800), which is not text"),
        ("invalid_utf8", "prompts[1] holds a lone surrogate (\\udc80), which is not text"),
    ]
    assert results[2].error is None
    (scored,) = kvbatch.score(["w5"], [[" w6", " \ud800"]], model="tiny", results=True)
    assert (scored.error.kind, scored.error.message) == (
        "invalid_utf8",
        "continuations[0] holds a lone surrogate (\\ud800), which is not text",
    )


@pytest.mark.parametrize(
    ("prompts", "said"),
    [(b"w5 w6", "bytes"), ({"w5 w6": 1}, "a mapping"), (None, "None"), (5, "of type int")],
)
def test_prompts_that_are_not_a_list_refuse_the_call(prompts, said: str) -> None:
    """Bytes were read as one prompt per byte value (each an error) and a dict as one prompt per key; None and a
    number failed on `list()` with Python's own words."""
    for call in (kvbatch.generate, kvbatch.score):
        with pytest.raises(TypeError, match=f"^prompts is {said}; pass a list of prompts"):
            call(prompts, model="tiny")
    texts = kvbatch.generate(["w5", "w6"], model="tiny", max_new_tokens=2)
    assert kvbatch.generate((p for p in ["w5", "w6"]), model="tiny", max_new_tokens=2) == texts  # any iterable


def test_score_takes_prompts_and_continuations_from_any_iterable() -> None:
    """Generators, as generate takes them: with continuations, score asked both for their len() and failed."""
    want = kvbatch.score(["w5", "w7"], [[" w6"], [" w8", " w9"]], model="tiny")
    got = kvbatch.score((p for p in ["w5", "w7"]), (c for c in [[" w6"], (" w8", " w9")]), model="tiny")
    assert got == want and [len(s) for s in got] == [1, 2]
    # A pandas column of lists holds numpy arrays: each prompt's continuations were wrong_type.
    assert kvbatch.score(["w5", "w7"], [np.array([" w6"]), iter([" w8", " w9"])], model="tiny") == want
    with pytest.raises(ValueError, match="^2 prompts but 1 lists of continuations"):
        kvbatch.score(iter(["w5", "w7"]), iter([[" w6"]]), model="tiny")
    with pytest.raises(TypeError, match="^continuations is a mapping; pass a list of continuations"):
        kvbatch.score(["w5"], {"w5": [" w6"]}, model="tiny")  # its keys were read as each prompt's continuations


def test_an_empty_prompt_scores_alike_beside_a_list_of_messages() -> None:
    """Beside a list of messages a string prompt becomes one user message, and an empty one then failed
    (empty_prompt: "has no non-empty message besides the system prompt") where among strings it is lm-eval's
    unconditional case: a prompt's score hung on the other prompts of the call. A whole text still needs one."""
    chat = [{"role": "user", "content": "w5 w6"}]
    alone = kvbatch.score([""], [[" w9", " w10 w11"]], model="tiny")
    mixed = kvbatch.score(["", chat], [[" w9", " w10 w11"], [" w7"]], model="tiny")
    assert mixed[1] is not None and [s["num_tokens"] for s in mixed[0]] == [s["num_tokens"] for s in alone[0]] == [1, 2]
    for got, want in zip(mixed[0], alone[0], strict=True):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-5)
    # With the chat template an empty message is what the template makes of it: here nothing, alone or not.
    (alone,) = kvbatch.score([""], [[" w9"]], model="tiny", chat_template=True, results=True)
    mixed, _ = kvbatch.score(["", chat], [[" w9"], [" w7"]], model="tiny", chat_template=True, results=True)
    assert mixed.error == alone.error and alone.error.message == "prompts[0]: the prompt is empty (0 tokens)"
    rolling = kvbatch.score(["", chat], model="tiny", results=True)
    assert rolling[0].error.kind == "empty_prompt" and rolling[1].error is None


def test_a_bad_keyword_is_named_with_the_call_not_a_command_line() -> None:
    """A typo in a keyword or an engine setting said "command line: sampling.max_new_token: unknown field"."""
    with pytest.raises(SpecError) as typo:
        kvbatch.generate(["w5"], model="tiny", max_new_token=2)
    assert str(typo.value) == "kvbatch.generate: sampling.max_new_token: unknown field (did you mean 'max_new_tokens'?)"
    with pytest.raises(SpecError, match=r"^kvbatch.generate: sampling.temperature: must be >= 0, got -1.0$"):
        kvbatch.generate(["w5"], model="tiny", temperature=-1)
    with pytest.raises(SpecError, match=r"^kvbatch.score: engine.devcie: unknown field \(did you mean 'device'\?\)$"):
        kvbatch.score(["w5"], model="tiny", engine={"devcie": "cpu"})
    # Without continuations each text is scored raw: chat_template=True was dropped without a word.
    with pytest.raises(SpecError) as dropped:
        kvbatch.score(["w5"], model="tiny", chat_template=True)
    assert str(dropped.value) == (
        "kvbatch.score: prompt.chat_template: task score_rolling scores each text raw, without the chat template; "
        "leave it out"
    )


def test_no_prompts_load_no_model(tiny_engines: EngineCache) -> None:
    """An empty list loaded the model (minutes for a large one) to return []; a job of no rows loads none."""
    assert kvbatch.generate([], model="tiny", n=2) == [] and kvbatch.score([], [], model="tiny") == []
    assert kvbatch.generate([], model="tiny", results=True) == [] and tiny_engines._engines == {}
    with pytest.raises(SpecError, match="unknown field"):  # the keywords are still checked
        kvbatch.generate([], model="tiny", max_new_token=2)


def test_generate_takes_the_prompt_settings_chat_template_kwargs_and_split_reasoning() -> None:
    """A job file's prompt.chat_template_kwargs and prompt.split_reasoning had no keyword: `enable_thinking: false`
    could not reach a Qwen3 template, nor a thinking model's answer come apart from its thinking."""

    def styled(model: str, settings: dict):
        engine = tiny_with_chat_template(model, settings)
        engine.tokenizer.chat_template = CHAT_TEMPLATE + "{% if style %}{{ style }} {% endif %}"
        return engine

    engines = EngineCache(styled)
    (row,) = kvbatch.generate(
        ["w5"], model="tiny", chat_template_kwargs={"style": "w8"}, max_new_tokens=3, results=True, engines=engines
    )
    (raw,) = kvbatch.generate(["w5 w8 "], model="tiny", chat_template=False, max_new_tokens=3, engines=engines)
    assert row.prompt_tokens == 2 and row.texts == [raw]
    with pytest.raises(SpecError, match="prompt.chat_template_kwargs"):  # checked as a job file's
        kvbatch.generate(["w5"], model="tiny", chat_template_kwargs={"tokenize": True}, engines=engines)
    (scored,) = kvbatch.score(
        ["w5"], [[" w6"]], model="tiny", chat_template=True, chat_template_kwargs={"style": "w8"}, engines=engines
    )
    assert scored == kvbatch.score(["w5 w8 "], [[" w6"]], model="tiny", engines=engines)[0]

    def thinking(model: str, settings: dict):
        engine = fake_factory()(model, settings)
        answer = engine._answer

        def think(request):
            result = answer(request)
            completions = [dataclasses.replace(c, text=f"<think>plan</think> {c.text}") for c in result.completions]
            return dataclasses.replace(result, completions=completions)

        engine._answer = think
        return engine

    thinker = EngineCache(thinking)
    (whole,) = kvbatch.generate(["w5"], model="tiny", engines=thinker)  # the fake model's template has no <think>
    thought, answer = whole.split("</think> ")
    assert thought == "<think>plan" and answer.startswith("echo ")
    (row,) = kvbatch.generate(["w5"], model="tiny", split_reasoning=True, results=True, engines=thinker)
    assert row.texts == [answer] and row.reasonings == ["plan"]
    samples = kvbatch.generate(["w5"], model="tiny", split_reasoning=True, n=2, engines=thinker)
    assert samples == [[f"{answer} #0", f"{answer} #1"]]


def test_generate_batch_names_itself_in_the_errors_of_its_job_dict() -> None:
    """kvbatch.GenerateBatch, built from a dict in Python, blamed a command line too. The refusal is raised from
    each batch, as an engine's refusal is: raised by the constructor, in a Ray actor, it reached the driver only as
    the text of an ActorDiedError (tests/jobs/test_ray_data.py). kvbatch.job_from_dict in the driver refuses it
    before any actor starts."""
    job = {"name": "x", "model": "tiny", "input": {"path": "-"}, "sampling": {"max_new_token": 3}}
    generate = kvbatch.GenerateBatch(job, engine_factory=tiny_with_chat_template)
    with pytest.raises(SpecError) as typo:
        generate(pa.table({"prompt": ["w5"]}))
    assert str(typo.value) == "GenerateBatch: sampling.max_new_token: unknown field (did you mean 'max_new_tokens'?)"
    with pytest.raises(SpecError) as driver:
        kvbatch.job_from_dict(job, source="GenerateBatch")
    assert str(driver.value) == str(typo.value)


def test_a_pathlib_path_names_the_model_and_the_template_file(tiny_engines: EngineCache, tmp_path: Path) -> None:
    # Refused before with "expected a string": a Path is how Python code names folders and files.
    (tmp_path / "tiny").mkdir()
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    by_text = kvbatch.generate(["w5"], model=str(tmp_path / "tiny"), max_new_tokens=3)
    by_path = kvbatch.generate(
        ["w5"], model=tmp_path / "tiny", chat_template_file=tmp_path / "t.jinja", max_new_tokens=3
    )
    assert by_path == by_text and len(tiny_engines._engines) == 1
    with pytest.raises(SpecError, match="expected a string"):
        kvbatch.generate(["w5"], model=3)


@pytest.mark.parametrize(
    ("jobs", "said"),
    [
        ("jobs.yaml", "jobs is a string"),
        (Path("jobs.yaml"), "jobs is a path"),
        ({"name": "x", "input": {"path": "in.jsonl"}}, "jobs is a mapping"),
        ([{"name": "x", "input": {"path": "in.jsonl"}}], "jobs[0] is a dict"),
        (None, "jobs is None"),
    ],
)
def test_run_jobs_names_what_it_takes_when_given_something_else(jobs, said: str) -> None:
    """A job file's path (a string or a Path), a job's dict or a list of dicts failed deep in the engine plan with
    "AttributeError: 'str' object has no attribute 'engine'" (a string was read as one job per character), and
    None with "'NoneType' object is not iterable"; the call now says what it takes, before anything runs."""
    with pytest.raises(TypeError) as refused:
        kvbatch.run_jobs(jobs)
    assert str(refused.value) == (
        f"{said}; pass a loaded job file (kvbatch.load_jobs_file), a JobSpec (kvbatch.job_from_dict) or a list of them"
    )
