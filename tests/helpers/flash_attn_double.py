"""A stand-in for the two paged calls of the flash-attn package, for machines without it (all of ours).

Written from flash-attn 2's documented contract, not from its code: the docstrings of
`flash_attn_varlen_func` and `flash_attn_with_kvcache` (flash_attn/flash_attn_interface.py) for shapes and the
bottom-right causal mask, and the TORCH_CHECKs of csrc/flash_attn/flash_api.cpp for what the library refuses
(fp16/bf16 only, int32 lengths and block tables with a contiguous last axis, pages of a multiple of 256 tokens,
head sizes <= 256 and a multiple of 8). Rows the kernel never writes come back NaN, as `torch.empty` garbage
would, so a caller that forgets them shows it. The arithmetic is float64 softmax(QK^T)V, one sequence at a time.

It implements only what kvbatch's backend calls: the paged path (block_table given), no dropout, window, softcap,
ALiBi, rotary or in-place cache append. Anything else raises, so a new argument cannot pass unnoticed.
"""

from __future__ import annotations

import math

import torch


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)  # what TORCH_CHECK raises


def _check_paged(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None
) -> None:
    _check(block_table is not None, "this double implements the paged path only (block_table=...)")
    _check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    _check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "query and key must have the same dtype")
    _check(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
    _check(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
    for t in (q, k_cache, v_cache):
        _check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    _check(k_cache.shape == v_cache.shape, "k_cache and v_cache must have the same shape")
    _check(k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256")
    head_size = q.shape[-1]
    _check(head_size <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(head_size % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8")
    _check(q.shape[-2] % k_cache.shape[2] == 0, "Number of heads in key/value must divide number of heads in query")


def _lengths(name: str, t: torch.Tensor, size: int) -> list[int]:
    _check(t.dtype == torch.int32, f"{name} must have dtype int32")
    _check(t.is_contiguous(), f"{name} must be contiguous")
    _check(tuple(t.shape) == (size,), f"{name} must have shape ({size},)")
    return t.tolist()


def _attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seqlen_k: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """q: [seqlen_q, heads, d] -> [seqlen_q, heads, d] in q's dtype; the sequence's keys are its first seqlen_k
    page slots. Causal: query i of seqlen_q sees keys j <= i + seqlen_k - seqlen_q (bottom-right aligned); a
    query that sees no key gives zeros."""
    page = k_cache.shape[1]
    pages = table[: -(-seqlen_k // page)].long()
    _check(pages.numel() * page >= seqlen_k, "seqlen_k exceeds the block table")
    k = k_cache[pages].flatten(0, 1)[:seqlen_k].double()  # [keys, kv heads, d]
    v = v_cache[pages].flatten(0, 1)[:seqlen_k].double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    seqlen_q = q.shape[0]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = (
            torch.arange(seqlen_k, device=q.device)[None, :]
            <= torch.arange(seqlen_q, device=q.device)[:, None] + seqlen_k - seqlen_q
        )
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", weights, v).to(q.dtype)


def _unsupported(**options: object) -> None:
    used = [name for name, value in options.items() if value not in (None, False, 0, 0.0, (-1, -1))]
    _check(not used, f"this double does not implement {', '.join(used)}")


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q: (total_q, nheads, headdim); k, v: (num_blocks, page_block_size, nheads_k, headdim) with block_table
    (batch, max_num_blocks_per_seq). Returns (total_q, nheads, headdim)."""
    _unsupported(
        dropout_p=dropout_p,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        return_attn_probs=return_attn_probs,
    )
    _check_paged(q, k, v, block_table)
    batch = cu_seqlens_k.numel() - 1
    _check(batch > 0, "batch size must be positive")
    starts_q = _lengths("cu_seqlens_q", cu_seqlens_q, batch + 1)
    starts_k = _lengths("cu_seqlens_k", cu_seqlens_k, batch + 1)
    _check(tuple(block_table.shape[:1]) == (batch,), "block_table must have shape (batch_size, max_num_blocks_per_seq)")
    _check(starts_q[-1] <= q.shape[0], "cu_seqlens_q runs past the query rows")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.full_like(q, float("nan"))  # rows past cu_seqlens_q[-1] stay unwritten
    for b in range(batch):
        seqlen_q, seqlen_k = starts_q[b + 1] - starts_q[b], starts_k[b + 1] - starts_k[b]
        # The kernel sizes its grid and tiles from these; longer sequences would be cut short, not refused.
        _check(0 <= seqlen_q <= max_seqlen_q and 0 <= seqlen_k <= max_seqlen_k, f"sequence {b} exceeds max_seqlen")
        if seqlen_q:
            out[starts_q[b] : starts_q[b + 1]] = _attend(
                q[starts_q[b] : starts_q[b + 1]], k, v, block_table[b], seqlen_k, scale, causal
            )
    return out


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """q: (batch, seqlen, nheads, headdim); the caches paged as above; cache_seqlens (batch,) int32: each
    sequence's keys. Returns (batch, seqlen, nheads, headdim)."""
    _unsupported(
        k=k,
        v=v,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        return_softmax_lse=return_softmax_lse,
    )
    _check(q.dim() == 4, "q must be (batch_size, seqlen_q, num_heads, head_size)")
    _check_paged(q, k_cache, v_cache, block_table)
    batch = q.shape[0]
    _check(batch > 0, "batch size must be positive")
    _check(isinstance(cache_seqlens, torch.Tensor), "this double takes cache_seqlens as a tensor")
    lengths = _lengths("cache_seqlens", cache_seqlens, batch)
    _check(tuple(block_table.shape[:1]) == (batch,), "block_table must have shape (batch_size, max_num_blocks_per_seq)")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.stack(
        [_attend(q[b], k_cache, v_cache, block_table[b], lengths[b], scale, causal) for b in range(batch)]
    )
