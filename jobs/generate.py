"""`kvbatch.generate(prompts, model=..., **sampling)`: the Python one-liner, in memory, no files.

Each prompt goes through the same row pipeline as a job's rows (chat template, safe tokenization, per-row errors),
so `generate(["Hi"])` and a job over a file with the row {"prompt": "Hi"} ask the model the same thing. Engines
are kept per (model, engine settings) for the life of the process: a second call does not load the model again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvbatch.runner.request import GenerationRequest

from .pipeline import RowPipeline
from .records import Layout, RowResult
from .rows import Row
from .run import EngineCache
from .spec import job_from_dict

_ENGINES = EngineCache()


def generate(
    prompts: Sequence[str | list[dict[str, str]]],
    model: str = "default",
    *,
    system: str | None = None,
    chat_template: bool = True,
    engine: dict[str, Any] | None = None,
    results: bool = False,
    engines: EngineCache | None = None,
    **sampling: Any,
) -> list[Any]:
    """Generate for each prompt, in order.

    prompts: strings (one user message each) or lists of {role, content} messages.
    sampling: any `SamplingParams` field (max_new_tokens, temperature, stop, n, seed, logprobs...).
    engine: `EngineConfig` fields (device, dtype, max_model_len...).
    Returns each prompt's text (a list of texts with n > 1; None for a prompt that failed), or with
    `results=True` its `RowResult`: texts, finish_reasons, stop_reasons, token counts, error (kind and message).
    """
    messages = any(not isinstance(p, str) for p in prompts)
    job = job_from_dict(
        {
            "name": "generate",
            "model": model,
            "input": {"path": "-", "format": "jsonl"},  # never opened: the rows come from `prompts`
            "prompt": {"messages_column" if messages else "column": "prompt", "system": system,
                       "chat_template": chat_template},
            "sampling": sampling,
            "engine": engine or {},
        }
    )  # fmt: skip
    eng, _ = (engines or _ENGINES).get(job)
    pipeline = RowPipeline(job, eng.tokenizer, Layout(multi=job.sampling.n > 1))
    done: dict[int, RowResult] = {}
    requests: list[GenerationRequest] = []
    for index, prompt in enumerate(prompts):
        request = pipeline.request(Row(index, {"prompt": prompt}))
        if isinstance(request, RowResult):
            done[index] = request
        else:
            requests.append(request)
    for result in eng.generate(requests):
        row = pipeline.result(result)
        done[row.row] = row
    ordered = [done[i] for i in range(len(prompts))]
    if results:
        return ordered
    return [_texts(row, job.sampling.n) for row in ordered]


def _texts(row: RowResult, n: int) -> str | list[str] | None:
    if row.error is not None:
        return None
    return row.texts if n > 1 else row.texts[0]
