"""The KV pages a model needs and, where no GPU profiling is involved, how many of them a pool gets.

Shared by the engine and by `kvbatch plan`, which sizes a CPU pool from the config files alone: both must
arrive at the same numbers.
"""

from __future__ import annotations

import os

import torch

from kvbatch.cache.budget import GIB, KVBudgetError, PoolSize, blocks_from_bytes
from kvbatch.cache.kv_cache import KVCacheSpec

from .engine_config import EngineConfig


def kv_cache_spec(model_config, block_size: int, backend_name: str, model_dtype: torch.dtype) -> KVCacheSpec:
    """Pages for `model_config` (a transformers config). The torch reference attention computes in float64, so
    float32 models keep their pages in float64 there (twice the bytes): no cached key or value is converted at
    every step."""
    text_config = model_config.get_text_config()
    num_heads = text_config.num_attention_heads
    return KVCacheSpec(
        num_layers=text_config.num_hidden_layers,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
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
    if reserved_bytes >= config.kv_cache_gib * GIB:
        raise KVBudgetError(
            f"engine.kv_cache_gib {config.kv_cache_gib:g} leaves nothing for KV pages once the LoRA adapters take "
            f"{reserved_bytes / GIB:.2f} GiB; raise it or lower max_cpu_loras"
        )
    return blocks_from_bytes(spec, int(config.kv_cache_gib * GIB) - reserved_bytes)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every system
        return None
