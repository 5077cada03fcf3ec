"""`kvbatch.generate(prompts, model=..., **sampling)` and `kvbatch.score(prompts, continuations)`: the Python
one-liners, in memory, no files.

Each prompt goes through the same row pipeline as a job's rows (chat template, safe tokenization, per-row errors),
so `generate(["Hi"])` and a job over a file with the row {"prompt": "Hi"} ask the model the same thing, and
`score` runs a job's `task: score` (with continuations) or `task: score_rolling` (without). The engine is kept for
the calls after it (jobs/run.py's EngineCache): a second call with the same model and engine settings does not load
the model again.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kvbatch.errors import ErrorKind
from kvbatch.runner.request import GenerationRequest

from .pipeline import RowPipeline
from .prompts import positions_of
from .records import Layout, RowResult
from .rows import ArgumentNames, Row, RowError
from .run import EngineCache
from .spec import JobSpec, check_job_on_engine, job_from_dict, splits_reasoning

_ENGINES = EngineCache()
# The rows' columns as this module's callers know them: the items of the lists they passed.
_NAMES = ArgumentNames("prompts", {"prompt": "prompts", "continuations": "continuations"})


def generate(
    prompts: Sequence[str | list[dict[str, str]]],
    model: str | os.PathLike[str] = "default",
    *,
    system: str | None = None,
    chat_template: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    chat_template_file: str | os.PathLike[str] | None = None,
    split_reasoning: bool | None = None,
    engine: dict[str, Any] | None = None,
    results: bool = False,
    engines: EngineCache | None = None,
    **sampling: Any,
) -> list[Any]:
    """Generate for each prompt, in order.

    prompts: strings (one user message each) or lists of {role, content} messages.
    system, chat_template, chat_template_kwargs, chat_template_file, split_reasoning: a job file's `prompt` fields of
    those names (a template file relative to the working folder).
    sampling: any `SamplingParams` field (max_new_tokens, temperature, stop, n, seed, logprobs...).
    engine: `EngineConfig` fields (device, dtype, max_model_len...).
    Returns each prompt's text (a list of texts with n > 1; None for a prompt that failed), or with
    `results=True` its `RowResult`: texts, reasonings, finish_reasons, stop_reasons, token counts, error (kind and
    message).
    """
    prompt = {
        "system": system,
        "chat_template": chat_template,
        "chat_template_kwargs": chat_template_kwargs,
        "chat_template_file": chat_template_file,
        "split_reasoning": split_reasoning,
    }
    job, ordered = _run(_prompt_rows(prompts), model, prompt, engine, engines, sampling=sampling)
    if results:
        return ordered
    return [_texts(row, job.sampling.n) for row in ordered]


def score(
    prompts: Sequence[str | list[dict[str, str]]],
    continuations: Sequence[Sequence[str]] | None = None,
    model: str | os.PathLike[str] = "default",
    *,
    chat_template: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
    results: bool = False,
    engines: EngineCache | None = None,
) -> list[Any]:
    """Score each prompt, in order: with `continuations` (a list of strings per prompt), each continuation's
    log-likelihood after its prompt (a job's `task: score`); without, each prompt's own text whole, in windows of
    the context (`task: score_rolling`, lm-eval's loglikelihood_rolling).

    Returns per prompt a list of {logprob, num_tokens, is_greedy}, one per continuation (without continuations,
    one for the whole text); None for a prompt that failed. With `results=True` its `RowResult` (`scores`, `error`).
    chat_template: False (the default) reads prompts as raw text, as lm-eval does; see docs/scoring.md.
    chat_template_kwargs: a job file's `prompt.chat_template_kwargs`, given to the chat template.
    """
    rows = _prompt_rows(prompts)
    if continuations is None:
        task = "score_rolling"
    else:
        _check_a_list("continuations", continuations, "a list of strings per prompt")
        continuations = list(continuations)  # prompts and continuations may be generators: `rows` is a list
        if len(continuations) != len(rows):
            given = f"{len(continuations)} lists of continuations"
            raise ValueError(f"{len(rows)} prompts but {given}; pass a list of strings per prompt")
        # Any iterable of strings per prompt (a pandas column of lists holds numpy arrays); anything else goes to
        # the row as it is, whose check makes it that prompt's wrong_type (a bare string must not become a list of
        # its characters).
        for row, c in zip(rows, continuations, strict=True):
            row["continuations"] = list(c) if _not_a_list(c) is None else c
        task = "score"
    prompt = {"chat_template": chat_template, "chat_template_kwargs": chat_template_kwargs}
    _, ordered = _run(rows, model, prompt, engine, engines, task=task)
    return ordered if results else [None if row.error is not None else row.scores for row in ordered]


def _prompt_rows(prompts: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per prompt. Where any prompt is a list of messages, a string prompt becomes the one user message it
    stands for (what the chat template, or the raw text, makes of it either way), so each prompt is read alike."""
    _check_a_list("prompts", prompts, "each a string or a list of messages")
    prompts = [_prompt_value(p) for p in prompts]
    if any(isinstance(p, list) for p in prompts):
        return [{"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p} for p in prompts]
    return [{"prompt": p} for p in prompts]


def _prompt_value(prompt: Any) -> Any:
    """A prompt as a job's row would hold it: a missing value (pandas: NaN, pd.NA) as None; a tuple or another
    iterable of messages (a pandas column of them holds numpy arrays) as a list of them; datasets' older Sequence of
    {role, content}, its fields' lists by position, as its messages (prompts.positions_of, as a messages_column)."""
    if _missing(prompt):
        return None
    if isinstance(prompt, Mapping):
        return positions_of(_as_lists(dict(prompt)))  # a mapping that holds no messages so stays one: wrong_type
    return [_as_lists(m) for m in prompt] if _not_a_list(prompt) is None else prompt


def _missing(value: Any) -> bool:
    """None, or a missing value as pandas holds one: NaN (its default string type's; numpy's float32 one of an
    object column too), pd.NA, NaT."""
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return value is None or type(value).__name__ in ("NAType", "NaTType")  # pandas is not needed to tell


def _as_lists(value: Any) -> Any:
    """`value` with each numpy array in it, at any depth, as a list: pandas reads a Parquet column of messages as
    arrays inside too (a message's content parts, its tool calls), which the messages' checks take for no list."""
    if isinstance(value, np.ndarray):
        return [_as_lists(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_lists(v) for v in value]
    return value


# Iterable, but as characters, byte values or keys: each would become a prompt (or its continuations) of its own.
_NOT_A_LIST = ((str, "a string"), ((bytes, bytearray), "bytes"), (Mapping, "a mapping"))


def _not_a_list(value: Any) -> str | None:
    """What `value` is where it is no list, tuple or other iterable of items ("a string", "None"); else None."""
    kind = next((k for t, k in _NOT_A_LIST if isinstance(value, t)), None)
    if kind is None and not isinstance(value, Iterable):
        kind = "None" if value is None else f"of type {type(value).__name__}"
    return kind


def _check_a_list(name: str, value: Any, each: str) -> None:
    """`value` must be a list, a tuple or another iterable of items, one per prompt."""
    kind = _not_a_list(value)
    if kind is not None:
        raise TypeError(f"{name} is {kind}; pass a list of {name} ({each})")


def _run(
    rows: list[dict[str, Any]],
    model: str | os.PathLike[str],
    prompt: dict[str, Any],
    engine: dict[str, Any] | None,
    engines: EngineCache | None,
    **fields: Any,
) -> tuple[JobSpec, list[RowResult]]:
    """The job of `prompt` (its `prompt:` settings) and `fields` over `rows` (its input never opened), and the
    rows' results in order."""
    messages = any(isinstance(r["prompt"], list) for r in rows)
    # A pathlib path names a folder or file as its text does (a job's fields are the text a file would hold).
    prompt = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in prompt.items()}
    job = job_from_dict(
        {
            "name": fields.get("task", "generate"),
            "model": os.fspath(model) if isinstance(model, os.PathLike) else model,
            "input": {"path": "-", "format": "jsonl"},  # never opened: the rows come from `rows`
            "prompt": {"messages_column" if messages else "column": "prompt", **prompt},
            "engine": engine or {},
            **fields,
        },
        source="kvbatch.score" if "task" in fields else "kvbatch.generate",  # no command line to blame
    )  # fmt: skip
    if not rows:  # as a job of no rows: the settings are checked, and no model is loaded for nothing to run
        return job, []
    eng, _ = (engines or _ENGINES).get(job)
    check_job_on_engine(job, eng)
    sampling = job.sampling
    layout = Layout(
        multi=sampling.n > 1,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs > 0,
        prompt_logprobs=sampling.prompt_logprobs,
        scores=job.is_scoring,
        reasoning=splits_reasoning(job),
    )
    pipeline = RowPipeline(job, eng.tokenizer, layout)
    done: dict[int, RowResult] = {}
    requests: list[GenerationRequest] = []
    for index, data in enumerate(rows):
        row = Row(index, data, names=_NAMES)
        lone = next(((column, c) for column, value in data.items() if (c := _lone_surrogate(value))), None)
        if lone is not None:  # the tokenizer would fail it with its own words, naming no argument
            message = f"{row.value(lone[0])} holds a lone surrogate (\\u{ord(lone[1]):04x}), which is not text"
            row = dataclasses.replace(row, error=RowError(ErrorKind.INVALID_UTF8, message))
        request = pipeline.request(row)
        if isinstance(request, RowResult):
            done[index] = request
        else:
            requests.append(request)
    for result in eng.generate(requests):
        row = pipeline.result(result)
        done[row.row] = row
    return job, [done[i] for i in range(len(rows))]


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in the strings of `value` (a Python string may hold half a surrogate pair, which
    no UTF-8 text can), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = next((c for c in item if "\ud800" <= c <= "\udfff"), None)
            if found is not None:
                return found
        elif isinstance(item, dict):
            stack += reversed(list(item.values()))
        elif isinstance(item, (list, tuple)):
            stack += reversed(item)
    return None


def _texts(row: RowResult, n: int) -> str | list[str] | None:
    if row.error is not None:
        return None
    return row.texts if n > 1 else row.texts[0]
