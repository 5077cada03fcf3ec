"""Results as OpenAI Batch API output lines (one JSON object per request, as the Batch API writes them).

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200, "request_id": "…",
     "body": <a chat.completion object>}, "error": null}

A row that failed is written as OpenAI writes a request it refused, its error in the response's body, and with the
same error at the top level as well, where vLLM's batch runner and kvbatch's earlier outputs put it, so that a
reader written for either finds it:

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 400, "request_id": "…",
     "body": {"error": {"message": "…", "type": "invalid_request_error", "param": null, "code": "bad_request"}}},
     "error": {"code": "bad_request", "message": "…"}}

The code is the row's error kind; a model step that failed for the row (kind `engine`) is a 500 `server_error`.
tests/jobs check these lines against the `openai` package's own pydantic types (ChatCompletion, ErrorObject,
BatchError).

A request whose body asked for `"logprobs": true` gets, per choice, the chosen tokens' log-probabilities:

    "logprobs": {"content": [{"token": " Paris", "logprob": -0.12, "bytes": [32, 80, 97, 114, 105, 115],
                              "top_logprobs": []}, ...], "refusal": null}

`bytes` are the token's exact UTF-8 bytes (a token holding part of a character shows it as U+FFFD in `token`);
special tokens such as the end-of-turn token the model stopped on are left out, as they are from the text.
`top_logprobs` holds the body's `top_logprobs` most likely tokens at each position, most likely first, in the same
shape (a special token among them: its own text, `bytes` null); empty when it asked for none.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kvbatch.errors import ErrorKind


def output_line(record: dict[str, Any], model: str, created: int, id_column: str = "custom_id") -> dict[str, Any]:
    custom_id = record.get(id_column)
    digest = hashlib.sha256(f"{custom_id}\0{record['row']}".encode()).hexdigest()[:24]
    line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": custom_id}
    if record.get("error") is not None:
        code, message = record.get("error_kind") or "error", record["error"]
        server = code == ErrorKind.ENGINE
        error = {"message": message, "type": "server_error" if server else "invalid_request_error"}
        body = {"error": error | {"param": None, "code": code}}
        line["response"] = {"status_code": 500 if server else 400, "request_id": digest, "body": body}
        line["error"] = {"code": code, "message": message}
        return line
    texts = record["text"] if isinstance(record["text"], list) else [record["text"]]
    reasons = record.get("finish_reasons") or [record["finish_reason"]] * len(texts)
    logprobs = _per_sample(record.get("logprobs"), len(texts))
    token_bytes = _per_sample(record.get("token_bytes"), len(texts))
    tops = _per_sample(record.get("top_logprobs"), len(texts), depth=3)
    reasoning = record.get("reasoning") or []  # per sample (OpenAI output is multi-sample): vLLM's reasoning_content
    reasoning = (reasoning if isinstance(reasoning, list) else [reasoning]) + [None] * len(texts)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None}
            | ({"reasoning_content": reasoning[i]} if reasoning[i] is not None else {}),
            "finish_reason": reason,
            "logprobs": _choice_logprobs(logprobs[i], token_bytes[i], tops[i]),
        }
        for i, (text, reason) in enumerate(zip(texts, reasons))
    ]
    prompt_tokens = record.get("prompt_tokens") or 0
    output_tokens = record.get("output_tokens") or 0
    body = {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens,
        },
    }
    line["response"] = {"status_code": 200, "request_id": digest, "body": body}
    line["error"] = None
    return line


def _per_sample(values: list | None, num_samples: int, depth: int = 2) -> list[list | None]:
    """A record's per-sample lists (a single sample's list when the output is not multi-sample). `depth`: how
    deep a multi-sample value nests lists (per sample, per token[, per alternative])."""
    if values is None:
        return [None] * num_samples
    if num_samples == 1 and _list_depth(values) < depth:
        return [values]
    return list(values) + [None] * (num_samples - len(values))


def _list_depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    return depth + isinstance(value, list)


def _choice_logprobs(
    logprobs: list[float] | None, token_bytes: list[bytes | None] | None, tops: list[list[dict]] | None = None
) -> dict[str, Any] | None:
    """OpenAI's ChoiceLogprobs for one sample; None when the request did not ask for logprobs."""
    if logprobs is None:
        return None
    content = []
    for i, logprob in enumerate(logprobs):
        # Parts written before tokens were recorded have logprobs only: the token is then unknown, not skipped.
        raw = token_bytes[i] if token_bytes is not None and i < len(token_bytes) else b""
        if raw is None:
            continue  # a special token: not part of the text
        top = tops[i] if tops is not None and i < len(tops) and tops[i] else []
        content.append(
            {
                "token": raw.decode("utf-8", errors="replace"),
                "logprob": logprob,
                "bytes": list(raw),
                "top_logprobs": [
                    {
                        "token": t["token"],
                        "logprob": t["logprob"],
                        "bytes": list(t["bytes"]) if t["bytes"] is not None else None,
                    }
                    for t in top
                ],
            }
        )
    return {"content": content, "refusal": None}
