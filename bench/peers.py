"""The peers, run on the same model and workload in the same process: transformers `generate` in left-padded
batches (what a transformers user writes first) and `generate_batch` (its own paged continuous batching).

Both use SDPA attention on the same weights. Rows of one padded batch all run to the batch's longest
requested output; only the tokens each row asked for are counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvbatch.bench.workloads import Workload


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generation_config(model: torch.nn.Module, max_new_tokens: int):
    from transformers import GenerationConfig

    impossible_eos = model.config.get_text_config().vocab_size - 1  # prompts never hold it; min_new_tokens masks it
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=impossible_eos,
        pad_token_id=0,
    )


def _with_sdpa(model: torch.nn.Module, run: Callable[[], int]) -> int:
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        return run()
    finally:
        model.set_attn_implementation(previous)


def hf_generate_padded(model: torch.nn.Module, workload: Workload, batch_size: int = 64) -> tuple[float, int]:
    """(seconds, output tokens) of model.generate over left-padded batches in workload order."""
    device = next(model.parameters()).device

    def run(requests: list) -> int:
        counted = 0
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            width = max(len(r.prompt_token_ids) for r in chunk)
            ids = torch.tensor(
                [[0] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in chunk], device=device
            )
            mask = torch.tensor(
                [[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in chunk], device=device
            )
            config = _generation_config(model, max(r.sampling.max_new_tokens for r in chunk))
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            counted += sum(r.sampling.max_new_tokens for r in chunk)
        return counted

    _with_sdpa(model, lambda: run(workload.requests[:1]))  # untimed first: cuBLAS handles, kernels, allocator
    _sync(device)
    started = time.perf_counter()
    counted = _with_sdpa(model, lambda: run(workload.requests))
    _sync(device)
    return time.perf_counter() - started, counted


def hf_greedy_tokens(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation from model.generate, one prompt at a time (no padding)."""
    device = next(model.parameters()).device
    config = _generation_config(model, max_new_tokens)

    def run() -> list[list[int]]:
        out = []
        for prompt in prompts:
            with torch.inference_mode():
                tokens = model.generate(input_ids=torch.tensor([prompt], device=device), generation_config=config)
            out.append(tokens[0, len(prompt) :].tolist())
        return out

    return _with_sdpa(model, run)


def hf_generate_batch(model: torch.nn.Module, workload: Workload) -> tuple[float, int]:
    """(seconds, output tokens) of model.generate_batch, transformers' continuous batching."""
    device = next(model.parameters()).device
    prompts = [r.prompt_token_ids for r in workload.requests]
    config = _generation_config(model, max(r.sampling.max_new_tokens for r in workload.requests))

    def run() -> int:
        with torch.no_grad():  # generate_batch fails under inference_mode (transformers 5.17)
            results = model.generate_batch(inputs=prompts, generation_config=config)
        produced = sum(len(r.generated_tokens) for r in results.values())
        if produced == 0:
            raise RuntimeError("generate_batch produced no tokens")
        return sum(r.sampling.max_new_tokens for r in workload.requests)

    _sync(device)
    started = time.perf_counter()
    counted = _with_sdpa(model, run)
    _sync(device)
    return time.perf_counter() - started, counted
