"""An OpenAI Batch line whose body has a wrongly typed sampling field fails that line (`bad_request`, naming the
field); the other lines of the batch run. Such a value used to reach the engine and fail the whole job."""

from __future__ import annotations

import pytest
from openai.types import BatchError
from test_openai_logprobs import request, run_openai


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"seed": "x", "temperature": 0.5}, "seed must be an integer, got 'x'"),
        ({"stop": [5]}, "stop must be a string (a list of them), got [5]"),
        ({"n": 1.5}, "n must be an integer, got 1.5"),
        ({"max_tokens": "2"}, "max_new_tokens must be an integer, got '2'"),
        ({"temperature": True}, "temperature must be a finite number, got True"),
        ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
        ({"n": 20000}, "n 20000 is over 128, the most a row may ask"),
        # the tools go to the chat template; nothing would make the model call one
        ({"tool_choice": "required"}, "tool_choice 'required' is not supported"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "use 'auto' or leave it out"),
    ],
)
def test_a_wrongly_typed_body_field_fails_its_line_only(tmp_path, body, words) -> None:
    lines, engine = run_openai(tmp_path, [request("ok1"), request("bad", **body), request("ok2")])
    error = BatchError.model_validate(lines[1]["error"])
    assert error.code == "bad_request" and words in error.message and lines[1]["response"] is None
    assert [r.request_id for r in engine.requests] == [0, 2]
    assert all(lines[i]["response"]["body"]["choices"] for i in (0, 2))


@pytest.mark.parametrize("temperature", [2.5, 3, 10**400])
def test_a_temperature_over_the_apis_fails_its_line_only(tmp_path, temperature) -> None:
    # The API refuses a temperature over 2 (kvbatch's own setting takes any): the line fails, the others run.
    lines, engine = run_openai(
        tmp_path, [request("ok1"), request("bad", temperature=temperature), request("ok2", temperature=2)]
    )
    error = BatchError.model_validate(lines[1]["error"])
    assert error.code == "bad_request" and lines[1]["response"] is None
    assert f"temperature must be from 0 to 2, got {str(temperature)[:20]}" in error.message
    assert [r.request_id for r in engine.requests] == [0, 2]
    assert engine.requests[1].sampling.temperature == 2  # the range's end is the API's too
