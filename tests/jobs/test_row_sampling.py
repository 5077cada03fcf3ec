"""A row's own sampling values: OpenAI Batch bodies' penalties, logit_bias, stop and seed; sampling columns in
the job file; and the spec hash of jobs that leave the new fields unset (earlier outputs keep resuming)."""

from __future__ import annotations

import pytest
from openai.types import BatchError
from test_openai_logprobs import request, run_openai

from kvbatch.errors import SpecError
from kvbatch.jobs.spec import (
    _PROMPT_FIELDS_V1,
    _SAMPLING_FIELDS_V1,
    job_from_dict,
    load_jobs_file,
    result_fingerprint,
)


def test_openai_bodies_penalties_bias_stop_and_seed_are_served(tmp_path) -> None:
    body = dict(presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={"50": -100, "7": 3}, stop="x", seed=9)
    lines, engine = run_openai(tmp_path, [request("a", **body), request("b")])
    asked = {r.request_id: r.sampling for r in engine.requests}
    assert (asked[0].presence_penalty, asked[0].frequency_penalty) == (0.5, -0.25)
    assert asked[0].logit_bias == ((7, 3.0), (50, -100.0)) and asked[0].stop == ("x",) and asked[0].seed == 9
    assert (asked[1].presence_penalty, asked[1].logit_bias, asked[1].seed) == (0.0, (), None)
    assert all(line["error"] is None for line in lines)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be <= 2, got 2.5"),
        ({"logit_bias": {"5": 101}}, "logit_bias 5: 101.0 needs a token id >= 0 and a bias in [-100, 100]"),
        ({"logit_bias": {"five": 1}}, "logit_bias must be a token id -> bias mapping, or [id, bias] pairs"),
        ({"logit_bias": [1, 2]}, "logit_bias must be a token id -> bias mapping"),
    ],
)
def test_a_bad_body_value_fails_its_line_only(tmp_path, body, words) -> None:
    lines, engine = run_openai(tmp_path, [request("ok"), request("bad", **body)])
    error = BatchError.model_validate(lines[1]["error"])
    assert error.code == "bad_request" and words in error.message
    assert [r.request_id for r in engine.requests] == [0]


def job(**fields):
    return job_from_dict({"name": "j", "input": {"path": "in.jsonl"}, **fields})


def test_job_file_values_of_the_new_fields() -> None:
    spec = job(sampling={"logit_bias": {"12": 1.5, 3: -2}, "bad_words": "spam", "min_tokens": 4})
    assert spec.sampling.logit_bias == ((3, -2.0), (12, 1.5)) and spec.sampling.bad_words == ("spam",)
    with pytest.raises(SpecError, match=r"sampling: min_tokens \(300\) must be <= max_new_tokens \(256\)"):
        job(sampling={"min_tokens": 300})
    with pytest.raises(SpecError, match=r"sampling_columns: 'temp' is no sampling field"):
        job(sampling_columns=["temperature", "temp"])
    with pytest.raises(SpecError, match=r"sampling.logit_bias.x: expected an integer"):
        job(sampling={"logit_bias": {"x": 1}})


def test_unset_new_fields_leave_the_fingerprint_as_it_was() -> None:
    fingerprint = result_fingerprint(job())
    assert set(fingerprint["sampling"]) == set(_SAMPLING_FIELDS_V1)
    assert set(fingerprint["prompt"]) == set(_PROMPT_FIELDS_V1)
    assert "sampling_columns" not in fingerprint and "sampling_column" not in fingerprint
    changed = result_fingerprint(job(sampling={"presence_penalty": 0.5}, sampling_column="s"))
    assert changed["sampling"]["presence_penalty"] == 0.5 and changed["sampling_column"] == "s"


def test_a_job_file_spells_logit_bias_with_integer_keys(tmp_path) -> None:
    (tmp_path / "jobs.yaml").write_text(
        "jobs:\n  - name: a\n    input: {path: in.jsonl}\n    sampling:\n      logit_bias: {50256: -100, '7': 2.5}\n"
        "      bad_words: [foo, bar baz]\n    prompt:\n      chat_template_kwargs: {enable_thinking: false}\n"
    )
    spec = load_jobs_file(tmp_path / "jobs.yaml").jobs[0]
    assert spec.sampling.logit_bias == ((7, 2.5), (50256, -100.0)) and spec.sampling.bad_words == ("foo", "bar baz")
    assert spec.prompt.chat_template_kwargs == {"enable_thinking": False}
