"""Results as OpenAI Batch API output lines (one JSON object per request, as the Batch API writes them).

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200, "request_id": "…",
     "body": <a chat.completion object>}, "error": null}

A row that failed has `"response": null` and `"error": {"code": …, "message": …}`. tests/jobs check these
lines against the `openai` package's own pydantic types (ChatCompletion, BatchError).
"""

from __future__ import annotations

import hashlib
from typing import Any


def output_line(record: dict[str, Any], model: str, created: int, id_column: str = "custom_id") -> dict[str, Any]:
    custom_id = record.get(id_column)
    digest = hashlib.sha256(f"{custom_id}\0{record['row']}".encode()).hexdigest()[:24]
    line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": custom_id}
    if record.get("error") is not None:
        line["response"] = None
        line["error"] = {"code": record.get("error_kind") or "error", "message": record["error"]}
        return line
    texts = record["text"] if isinstance(record["text"], list) else [record["text"]]
    reasons = record.get("finish_reasons") or [record["finish_reason"]] * len(texts)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": reason,
            "logprobs": None,
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
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens, "total_tokens": prompt_tokens + output_tokens},
    }
    line["response"] = {"status_code": 200, "request_id": digest, "body": body}
    line["error"] = None
    return line
