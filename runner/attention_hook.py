"""kvbatch's paged attention, plugged into transformers through its AttentionInterface.

Every supported model calls `attention_interface(module, query, key, value, mask, scaling=..., **kwargs)`
after its rotary embedding; the kwargs given to the model's forward reach it unchanged. The runner
passes a `StepContext` as `kvbatch_step`, so this function writes the step's K/V into the pages of
layer `module.layer_idx` and attends over them. The model itself keeps no cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from kvbatch.cache.backends import AttentionBackend
from kvbatch.cache.kv_cache import KVCache
from kvbatch.cache.metadata import AttentionMetadata

ATTN_IMPLEMENTATION = "kvbatch_paged"


@dataclass
class StepContext:
    meta: AttentionMetadata
    kv_cache: KVCache
    backend: AttentionBackend


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_rows, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_rows, head_dim]
    value: torch.Tensor,  # [1, num_kv_heads, num_rows, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:  # ([1, num_rows, num_heads, head_dim], no weights)
    step: StepContext | None = kwargs.get("kvbatch_step")
    if step is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} needs a kvbatch step context; "
            f"this model was loaded for kvbatch's engine and cannot run model.generate()"
        )
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [num_rows, num_heads, head_dim]
    k = key[0].transpose(0, 1)  # [num_rows, num_kv_heads, head_dim]
    v = value[0].transpose(0, 1)
    key_cache, value_cache = step.kv_cache.key[layer], step.kv_cache.value[layer]
    step.backend.write_kv(key_cache, value_cache, k, v, step.meta.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = step.backend.paged_attention(q, key_cache, value_cache, step.meta, scale)
    return out.unsqueeze(0), None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
