"""The flash-attn package (FlashAttention-2) as a paged-attention backend. NEVER RUN AGAINST THE LIBRARY.

flash-attn is installed neither on the development machines nor on the project's GPU, so this module is written
from flash-attn 2's documented API and kept small. Its calls are tested against tests/cache/flash_attn_double.py,
a float64 stand-in written from that same contract, which checks what kvbatch passes (lengths, tables, row
offsets, padding) but not the library's own kernels. The import of `flash_attn` is lazy, so importing this
module works anywhere; only a call needs the package.

Page-size rule: flash-attn 2 reads a paged cache (`block_table=...`) only when each page holds a multiple of
256 tokens; csrc/flash_attn/flash_api.cpp checks `page_block_size % 256 == 0` in both mha_varlen_fwd and
mha_fwd_kvcache ("Paged KV cache block size must be divisible by 256"). kvbatch's default block_size of 16 does
not qualify: `supports_block_size` lets backend selection skip this backend, and every call checks first and
raises ValueError before flash-attn is touched. Other rules of the library: fp16/bf16 only, head_dim <= 256,
an Ampere or newer GPU, int32 block tables and sequence lengths.

Calls used:
    prefill  flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, softmax_scale=, causal=True, block_table=)
    decode   flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=, block_table=,
                                     softmax_scale=, causal=True)
flash-attn >= 2.1 aligns the causal mask to the bottom right when a sequence has fewer queries than keys,
which is kvbatch's rule (a chunk's queries are the newest tokens of its context).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn.functional as F

from .metadata import PLAIN, AttentionMetadata, LayerAttention

PAGE_MULTIPLE = 256


def supports_block_size(block_size: int) -> bool:
    return block_size % PAGE_MULTIPLE == 0


def check_block_size(block_size: int) -> None:
    if not supports_block_size(block_size):
        raise ValueError(
            f"flash-attn 2 reads paged KV only in pages of a multiple of {PAGE_MULTIPLE} tokens; "
            f"block_size is {block_size}. Use the triton backend, or block_size {PAGE_MULTIPLE}."
        )


def _flash_attn() -> ModuleType:
    try:
        return importlib.import_module("flash_attn")
    except ImportError as error:
        raise ImportError("the flash-attn backend needs the 'flash_attn' package, which is not installed") from error


def write_kv(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same
    key: torch.Tensor,  # [num_rows, num_kv_heads, head_dim]
    value: torch.Tensor,  # same
    slot_mapping: torch.Tensor,  # [num_rows] int64, -1 = skip
) -> None:
    # flash-attn has no standalone cache write; the Triton one is graph-safe and skips -1 slots.
    from .attention_triton import write_kv as triton_write_kv

    triton_write_kv(key_cache, value_cache, key, value, slot_mapping)


def paged_attention(
    query: torch.Tensor,  # [num_rows, num_heads, head_dim] fp16/bf16, contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K already written
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    scale: float,
    layer: LayerAttention = PLAIN,
) -> torch.Tensor:  # [num_rows, num_heads, head_dim], zeros on padding rows
    check_block_size(meta.block_size)
    if not layer.is_plain:
        # Never run against the library, so its window and softcap arguments are not relied on untested.
        raise ValueError(
            "the flash-attn backend runs plain causal attention only; this model's layers use soft-capping, a "
            "sliding window or attention sinks: use the triton backend"
        )
    flash_attn = _flash_attn()
    num_decodes = meta.num_decodes
    out = torch.zeros_like(query)
    if num_decodes:
        decoded = flash_attn.flash_attn_with_kvcache(
            query[:num_decodes].unsqueeze(1),
            key_cache,
            value_cache,  # q: [num_decodes, 1, num_heads, head_dim]
            cache_seqlens=meta.seq_lens[:num_decodes],
            block_table=meta.block_tables[:num_decodes],
            softmax_scale=scale,
            causal=True,
        )
        out[:num_decodes] = decoded.squeeze(1)
    if meta.num_seqs > num_decodes:
        # Prefill rows start right after the decodes (one row each); rows past the last sequence are padding.
        cu_seqlens_q = meta.query_start_loc[num_decodes:] - num_decodes  # [num_prefills + 1] int32
        cu_seqlens_k = F.pad(meta.seq_lens[num_decodes:].cumsum(0, dtype=torch.int32), (1, 0))
        prefilled = flash_attn.flash_attn_varlen_func(
            query[num_decodes:],
            key_cache,
            value_cache,
            cu_seqlens_q,
            cu_seqlens_k,
            meta.max_query_len,
            meta.max_seq_len,
            softmax_scale=scale,
            causal=True,
            block_table=meta.block_tables[num_decodes:],
        )
        rows = torch.arange(num_decodes, query.shape[0], device=query.device)
        # flash-attn leaves rows past cu_seqlens_q[-1] unwritten; masking on the device avoids a host sync.
        out[num_decodes:] = torch.where((rows < meta.query_start_loc[-1])[:, None, None], prefilled, 0)
    return out
