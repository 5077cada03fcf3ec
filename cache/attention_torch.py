"""Paged attention in plain torch: the reference every other backend is tested against, and the CPU path.

The arithmetic (scores, softmax, weighted sum) runs in float64, in torch's fused attention, and is cast back
at the end (on the CPU the engine keeps float32 models' pages in float64, so no conversion is needed per step). That
makes each query's output independent of what else is in the step: padding a softmax or a matmul
to another length changes the float64 rounding by ~1e-16, far below what float32 can show, so a
prompt gets the same bits alone or packed with fifty others. The GEMMs of the model are kept
batch-invariant by the runner (it pads every step to a row count the CPU BLAS treats uniformly).

Causal rule: the query at position p sees keys 0..p of its own sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata

# Bound on elements of a float64 score tensor built at once (about 256 MiB; torch builds it where its fused
# CPU kernel does not run, e.g. float64 on CUDA), and on the gathered keys of a decode slice.
_MAX_SCORE_ELEMENTS = 32 * 2**20


def write_kv(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same
    key: torch.Tensor,  # [num_rows, num_kv_heads, head_dim]
    value: torch.Tensor,  # same
    slot_mapping: torch.Tensor,  # [num_rows] int64, -1 = skip
) -> None:
    valid = slot_mapping >= 0
    if not bool(valid.all()):  # padding rows (slot -1) write nothing
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def _gather_pages(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[num_seqs, num_blocks * block_size, num_kv_heads, head_dim] from the first num_blocks table entries."""
    table = block_tables[:, :num_blocks]
    # index_select copies whole pages (about a quarter faster here than advanced indexing)
    pages = cache.index_select(0, table.reshape(-1))  # [num_seqs * num_blocks, block_size, kvh, d]
    return pages.view(table.shape[0], num_blocks * cache.shape[1], *cache.shape[2:])


def _attend(
    query: torch.Tensor,  # [num_seqs, num_heads, num_queries, head_dim] float64
    key: torch.Tensor,  # [num_seqs, num_keys, num_kv_heads, head_dim] gathered pages, any float dtype (float64 spares a copy)
    value: torch.Tensor,  # same
    allowed: torch.Tensor,  # [num_seqs, 1, num_queries or 1, num_keys] bool
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, num_queries, head_dim] float64
    # torch's fused attention reads each kv head's keys in place (strided views of the gathered pages) and keeps
    # query head h on kv head h // group (transformers' order). On the CPU it is one C++ loop over sequences and
    # heads, in float64 throughout; elsewhere float64 falls back to the plain softmax(QK^T)V arithmetic.
    num_seqs, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = key.shape[2]
    key = key.to(torch.float64).transpose(1, 2)  # [s, kvh, keys, d]
    value = value.to(torch.float64).transpose(1, 2)
    if num_queries == 1:
        # A decode: a kv head's query heads become its query rows, so each kv head's keys are read once, not
        # once per query head (a quarter faster at SmolLM2's 3 query heads per kv head).
        grouped = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=allowed, scale=scale)
        return out.view(num_seqs, num_heads, 1, head_dim)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scale, enable_gqa=num_heads != num_kv_heads
    )


def paged_attention(
    query: torch.Tensor,  # [num_rows, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K already written
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_rows, num_heads, head_dim], zeros on padding rows
    out = torch.zeros_like(query)
    block_size = meta.block_size
    seq_lens = meta.seq_lens.tolist()
    starts = meta.query_start_loc.tolist()
    num_heads, head_dim = query.shape[1], query.shape[2]

    # Decodes: one query each, batched, in slices that bound the gathered keys.
    nd = meta.num_decodes
    if nd:
        max_len = max(max(seq_lens[:nd]), 1)
        per_seq = max_len * num_heads * head_dim
        step = max(1, _MAX_SCORE_ELEMENTS // per_seq)
        for lo in range(0, nd, step):
            hi = min(nd, lo + step)
            lens = meta.seq_lens[lo:hi].long()
            longest = int(lens.max())
            if longest == 0:
                continue  # no context at all: zeros, as the Triton kernels give
            num_blocks = -(-longest // block_size)
            k = _gather_pages(key_cache, meta.block_tables[lo:hi], num_blocks)
            v = _gather_pages(value_cache, meta.block_tables[lo:hi], num_blocks)
            positions = torch.arange(k.shape[1], device=query.device)
            allowed = (positions[None, :] < lens[:, None])[:, None, None, :]  # [s, 1, 1, keys]
            q = query[starts[lo] : starts[hi]].double()[:, :, None]  # [s, h, 1, d]
            attended = _attend(q, k, v, allowed, scale)[:, :, 0]
            # A decode with an empty context attends to nothing: zeros (a softmax over no keys is NaN).
            out[starts[lo] : starts[hi]] = attended.masked_fill((lens == 0)[:, None, None], 0.0).to(out.dtype)

    # Prefill chunks: one sequence at a time, queries sliced to bound the score tensor.
    for i in range(nd, meta.num_seqs):
        row0, row1, seq_len = starts[i], starts[i + 1], seq_lens[i]
        num_queries = row1 - row0
        num_blocks = -(-seq_len // block_size)
        k = _gather_pages(key_cache, meta.block_tables[i : i + 1], num_blocks)
        v = _gather_pages(value_cache, meta.block_tables[i : i + 1], num_blocks)
        key_pos = torch.arange(k.shape[1], device=query.device)
        step = max(1, _MAX_SCORE_ELEMENTS // (num_heads * k.shape[1]))
        for q0 in range(0, num_queries, step):
            q1 = min(num_queries, q0 + step)
            query_pos = seq_len - num_queries + torch.arange(q0, q1, device=query.device)
            allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, queries, keys]
            q = query[row0 + q0 : row0 + q1].double().transpose(0, 1)[None]  # [1, h, queries, d]
            out[row0 + q0 : row0 + q1] = _attend(q, k, v, allowed, scale)[0].transpose(0, 1).to(out.dtype)
    return out
