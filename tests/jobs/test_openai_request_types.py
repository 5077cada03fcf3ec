"""An OpenAI Batch line whose body has a wrongly typed sampling field fails that line (`bad_request`, naming the
field); the other lines of the batch run. Such a value used to reach the engine and fail the whole job."""

from __future__ import annotations

import pytest
from openai_lines import refused
from test_openai_logprobs import request, run_openai


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"seed": "x", "temperature": 0.5}, "seed must be an integer, got 'x'"),
        ({"stop": [5]}, "stop must be a string (a list of them), got [5]"),
        ({"n": 1.5}, "n must be an integer, got 1.5"),
        # named as the body has them, not as the setting they become (max_new_tokens)
        ({"max_tokens": "2"}, "max_tokens must be an integer of at least 1, got '2'"),
        ({"max_completion_tokens": 0}, "max_completion_tokens must be an integer of at least 1, got 0"),
        ({"max_tokens": True}, "max_tokens must be an integer of at least 1, got True"),
        # vLLM's extra sampling fields are read under their names, and checked as the job's settings are
        ({"top_k": -2}, "top_k must be >= -1, got -2"),
        ({"min_p": 1.5}, "min_p must be <= 1, got 1.5"),
        ({"temperature": True}, "temperature must be a finite number, got True"),
        ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
        ({"n": 20000}, "n must be <= 128, got 20000"),  # as a job's own n
        # the tools go to the chat template; nothing would make the model call one
        ({"tool_choice": "required"}, "tool_choice 'required' is not supported"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "use 'auto' or leave it out"),
        # the API's older functions and function_call are tools and tool_choice by another name
        ({"functions": [{"name": "f"}], "function_call": {"name": "f"}}, "function_call {'name': 'f'} is not"),
        ({"functions": [{"name": "f"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, "give one"),
        ({"functions": "f"}, "functions must be a list of function objects"),
        # vLLM's prompt controls: a prompt kvbatch would not build fails the line instead of being built otherwise
        ({"continue_final_message": True}, "continue_final_message: true needs add_generation_prompt: false"),
        ({"add_generation_prompt": False}, "add_generation_prompt: false without continue_final_message"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt must be true or false, got 'no'"),
        ({"chat_template": "{{ messages }}"}, "a body's own chat_template is not supported"),
        ({"echo": True}, "echo: true is not supported"),
        ({"add_special_tokens": True}, "add_special_tokens: true is not supported"),
        # vLLM's fields kvbatch cannot follow: they were ignored and the line ran as if not asked
        # a Batch line's response is one object: a streamed request ran as if it had not asked
        ({"stream": True}, "stream: true is not supported"),
        ({"use_beam_search": True}, "use_beam_search: true is not supported"),
        ({"best_of": 3, "n": 1}, "best_of 3 is not supported (only best_of = n, the samples returned)"),
        ({"prompt_logprobs": 1}, "prompt_logprobs is not supported in an OpenAI Batch output"),
        ({"skip_special_tokens": False}, "skip_special_tokens: false is not supported"),
        ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": "[ ]*"}, "guided_whitespace_pattern is not"),
        # vLLM's -1 (cut to the context) would leave no room for a token: only a count of tokens to keep
        ({"truncate_prompt_tokens": -1}, "truncate_prompt_tokens must be >= 1, got -1"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be >= 1, got 0"),
        # a prefill body (vLLM's continue_final_message) on a job that adds a generation prompt
        (
            {"continue_final_message": True, "add_generation_prompt": False},
            "asks continue_final_message: true, but this job builds prompts with prompt.continue_final_message: false",
        ),
    ],
)
def test_a_wrongly_typed_body_field_fails_its_line_only(tmp_path, body, words) -> None:
    lines, engine = run_openai(tmp_path, [request("ok1"), request("bad", **body), request("ok2")])
    error = refused(lines[1])
    assert error.code == "bad_request" and words in error.message
    assert [r.request_id for r in engine.requests] == [0, 2]
    assert all(lines[i]["response"]["body"]["choices"] for i in (0, 2))


@pytest.mark.parametrize("temperature", [2.5, 3, 10**400])
def test_a_temperature_over_the_apis_fails_its_line_only(tmp_path, temperature) -> None:
    # The API refuses a temperature over 2 (kvbatch's own setting takes any): the line fails, the others run.
    lines, engine = run_openai(
        tmp_path, [request("ok1"), request("bad", temperature=temperature), request("ok2", temperature=2)]
    )
    error = refused(lines[1])
    assert error.code == "bad_request"
    assert f"temperature must be from 0 to 2, got {str(temperature)[:20]}" in error.message
    assert [r.request_id for r in engine.requests] == [0, 2]
    assert engine.requests[1].sampling.temperature == 2  # the range's end is the API's too


def test_prompt_controls_that_restate_the_jobs_prompt_run(tmp_path) -> None:
    lines, engine = run_openai(
        tmp_path,
        [
            request("a", add_generation_prompt=True),
            request("b", continue_final_message=False, add_generation_prompt=True, echo=False, stream=False),
        ],
    )
    assert all(line["error"] is None for line in lines) and len(engine.requests) == 2


def test_vllm_extra_sampling_fields_are_read(tmp_path) -> None:
    # A batch file written for vLLM's OpenAI server carries its extra sampling fields in the body; top_k -1 is off.
    extra = dict(
        top_k=5, min_p=0.1, repetition_penalty=1.3, min_tokens=2, ignore_eos=True, stop_token_ids=[7],
        bad_words=["x"], allowed_token_ids=[3, 4, 5], include_stop_str_in_output=True,
    )  # fmt: skip
    lines, engine = run_openai(tmp_path, [request("a", temperature=0.5, **extra), request("b", top_k=-1)])
    assert all(line["error"] is None for line in lines)
    got, off = engine.requests[0].sampling, engine.requests[1].sampling
    assert (got.top_k, got.min_p, got.repetition_penalty, got.min_tokens, got.ignore_eos) == (5, 0.1, 1.3, 2, True)
    assert (got.stop_token_ids, got.bad_words, got.allowed_token_ids) == ((7,), ("x",), (3, 4, 5))
    assert got.include_stop_str_in_output and off.top_k == 0


def test_a_top_p_of_0_runs_as_the_api_takes_it(tmp_path) -> None:
    # The API's top_p is 0 to 1, and 0 (the top token alone) is a common way to ask for deterministic output.
    lines, engine = run_openai(tmp_path, [request("a", top_p=0), request("b", top_p=0, temperature=1, seed=3)])
    assert all(line["error"] is None for line in lines)
    assert [r.sampling.top_p for r in engine.requests] == [0, 0]


def test_a_bodys_truncate_prompt_tokens_keeps_the_prompts_last_tokens(tmp_path) -> None:
    # vLLM's left truncation: the row runs on the end of its prompt, and its usage counts the tokens kept.
    long = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
    lines, engine = run_openai(
        tmp_path,
        [request("cut", messages=long, truncate_prompt_tokens=4), request("whole", messages=long)],
    )
    cut, whole = engine.requests
    assert len(whole.prompt_token_ids) > 4 and cut.prompt_token_ids == whole.prompt_token_ids[-4:]
    assert cut.sampling.truncate_prompt_tokens == 4 and whole.sampling.truncate_prompt_tokens is None
    assert lines[0]["response"]["body"]["usage"]["prompt_tokens"] == 4
