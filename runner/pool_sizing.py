"""How many KV pages a pool gets: a fixed size on the CPU (or `num_blocks_override`), or on a GPU what a profiled
step leaves free.

On a GPU the largest step the scheduler can build (max_num_batched_tokens tokens, logits for up to max_num_seqs
rows) runs once against a scratch cache just big enough for it; the allocator's peak then holds weights plus
activations, and what `gpu_memory_utilization` allows beyond that becomes pages (the equation is in
kvbatch.cache.budget). `kvbatch plan` sizes a CPU pool from the config files alone with the same functions, so
both arrive at the same numbers.
"""

from __future__ import annotations

import itertools
import logging
import os

import torch

from kvbatch.cache.backends import AttentionBackend
from kvbatch.cache.block_table import num_blocks_for
from kvbatch.cache.budget import GIB, PoolSize, blocks_from_bytes, gpu_kv_bytes
from kvbatch.cache.kv_cache import KVCache, KVCacheSpec
from kvbatch.cache.metadata import AttentionMetadata
from kvbatch.errors import KVBudgetError
from kvbatch.runner.config import EngineConfig

from .attention_hook import kv_layout
from .model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)


def kv_cache_spec(model_config, block_size: int, backend_name: str, model_dtype: torch.dtype) -> KVCacheSpec:
    """Pages for `model_config` (a transformers config). The torch reference attention computes in float64, so
    float32 models keep their pages in float64 there (twice the bytes): no cached key or value is converted at
    every step. The CPU backend computes in float32 and keeps float32 pages."""
    num_kv_heads, head_dim = kv_layout(model_config)
    return KVCacheSpec(
        num_layers=model_config.get_text_config().num_hidden_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.float64 if backend_name == "torch" and model_dtype == torch.float32 else model_dtype,
    )


def fixed_pool_size(spec: KVCacheSpec, config: EngineConfig, reserved_bytes: int = 0) -> PoolSize:
    """An exact `num_blocks_override`, or the CPU pool of `kv_cache_gib` less `reserved_bytes` (the LoRA adapters'
    host copies). (A GPU pool comes from profiling.)"""
    if config.num_blocks_override:
        n = config.num_blocks_override
        return PoolSize(n, spec.block_size, n * spec.bytes_per_block)
    memory = _physical_memory()
    if memory and config.kv_cache_gib * GIB > memory:  # it would fail to allocate, or be killed for memory later
        raise KVBudgetError(
            f"engine.kv_cache_gib {config.kv_cache_gib:g} is more than this machine's {memory / GIB:.1f} GiB "
            "of memory; lower it (the weights need room too)"
        )
    pool = blocks_from_bytes(spec, max(0, int(config.kv_cache_gib * GIB) - reserved_bytes))
    if pool.num_blocks < 1:
        adapters = f" once the LoRA adapters take {reserved_bytes / GIB:.2f} GiB" if reserved_bytes else ""
        raise KVBudgetError(
            f"engine.kv_cache_gib {config.kv_cache_gib:g} holds no KV block{adapters}: one block of {spec.block_size} "
            f"tokens needs {spec.bytes_per_block / 2**20:.2f} MiB; give the cache more memory"
        )
    return pool


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every system
        return None


def profile_gpu_pool(
    model: torch.nn.Module,
    spec: KVCacheSpec,
    backend: AttentionBackend,
    fused,  # FusedDecoder | None
    config: EngineConfig,
    max_num_batched_tokens: int,
    max_model_len: int,
    device: torch.device,
) -> PoolSize:
    # The largest step: max_num_batched_tokens tokens, as sequences of at most the context each.
    num_tokens = max_num_batched_tokens
    seq_len = min(num_tokens, max_model_len)
    lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    block_size = spec.block_size
    blocks_per_seq = num_blocks_for(seq_len, block_size)
    scratch = KVCache(spec, blocks_per_seq * len(lens), device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    num_logits = min(config.max_num_seqs, num_tokens)
    tables = torch.arange(blocks_per_seq * len(lens), dtype=torch.int32, device=device).view(len(lens), blocks_per_seq)
    starts = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    slots = torch.cat(
        [
            tables[i].long().repeat_interleave(block_size)[:n] * block_size
            + torch.arange(n, device=device) % block_size
            for i, n in enumerate(lens)
        ]
    )
    meta = AttentionMetadata(
        query_start_loc=starts,
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=tables,
        slot_mapping=slots,
        num_decodes=0,
        max_query_len=seq_len,
        max_seq_len=seq_len,
        block_size=block_size,
    )
    inputs = StepInputs(
        input_ids=torch.zeros(1, num_tokens, dtype=torch.int64, device=device),
        positions=positions[None],
        logits_rows=torch.arange(num_tokens - num_logits, num_tokens, device=device),
        num_sampling=num_logits,
        meta=meta,
    )
    logits = ModelRunner(model, scratch, backend, fused).forward(inputs)
    # Sampling makes a few [rows, vocab] float32 tensors; count two more copies of the logits.
    extra = 2 * logits.numel() * 4
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch.num_bytes + extra
    del logits, scratch
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    utilization = config.gpu_memory_utilization
    free = gpu_kv_bytes(total, peak, utilization)
    pool = blocks_from_bytes(spec, free)
    if pool.num_blocks < 1:
        raise KVBudgetError(
            f"no GPU memory left for KV pages: {utilization:.0%} of {total / GIB:.1f} GiB is "
            f"{total * utilization / GIB:.1f} GiB, the model and activations peak at {peak / GIB:.1f} GiB, "
            f"which leaves {max(free, 0) / 2**20:.0f} MiB (a block needs {spec.bytes_per_block / 2**20:.2f} MiB); "
            "raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    logger.info(
        "GPU pool: %.1f GiB total, %.1f GiB peak for weights and a %d-token step, %s",
        total / 2**30,
        peak / 2**30,
        num_tokens,
        pool.describe(),
    )
    return pool
