"""An OpenAI Batch output line's error, read as OpenAI's own types read it."""

from __future__ import annotations

from typing import Any

from openai.types import BatchError
from openai.types.shared import ErrorObject


def refused(line: dict[str, Any]) -> BatchError:
    """The error of a refused request's line, checked in both places it is written: the response's body, as
    OpenAI's Batch API writes a request it refused, and the top-level error, as vLLM's batch runner does."""
    error = BatchError.model_validate(line["error"])
    response = line["response"]
    body = ErrorObject.model_validate(response["body"]["error"])
    assert response["status_code"] == (500 if error.code == "engine" else 400)
    assert (body.code, body.message, body.param) == (error.code, error.message, None)
    assert body.type == ("server_error" if error.code == "engine" else "invalid_request_error")
    return error
