"""Paged attention in plain torch: the reference every other backend is tested against, and the CPU path.

The arithmetic (scores, softmax, weighted sum) runs in float64, in torch's fused attention, and is cast back
at the end (on the CPU the engine keeps float32 models' pages in float64, so no conversion is needed per step). That
makes each query's output independent of what else is in the step: padding a softmax or a matmul
to another length changes the float64 rounding by ~1e-16, far below what float32 can show, so a
prompt gets the same bits alone or packed with fifty others. The GEMMs of the model are kept
batch-invariant by the runner (it pads every step to a row count the CPU BLAS treats uniformly).

Causal rule: the query at position p sees keys 0..p of its own sequence (p - W + 1..p in a layer with a
sliding window of W). Soft-capping and sinks (metadata.LayerAttention) run in explicit float64 arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import PLAIN, AttentionMetadata, LayerAttention

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


def _gather_run(cache: torch.Tensor, block_tables: torch.Tensor, first_block: torch.Tensor, num_blocks: int):
    """[num_seqs, num_blocks * block_size, num_kv_heads, head_dim]: num_blocks table entries of each sequence
    from its first_block on (entries past the table's end read page 0 and must be masked by the caller)."""
    columns = first_block[:, None] + torch.arange(num_blocks, device=block_tables.device)  # [s, num_blocks]
    width = block_tables.shape[1]
    table = block_tables.gather(1, columns.clamp(max=width - 1)).masked_fill(columns >= width, 0)
    pages = cache.index_select(0, table.reshape(-1))
    return pages.view(table.shape[0], num_blocks * cache.shape[1], *cache.shape[2:])


def _attend(
    query: torch.Tensor,  # [num_seqs, num_heads, num_queries, head_dim] float64
    key: torch.Tensor,  # [num_seqs, num_keys, num_kv_heads, head_dim] gathered pages, any float (float64: no copy)
    value: torch.Tensor,  # same
    allowed: torch.Tensor,  # [num_seqs, 1, num_queries or 1, num_keys] bool
    scale: float,
    layer: LayerAttention,
) -> torch.Tensor:  # [num_seqs, num_heads, num_queries, head_dim] float64
    # torch's fused attention reads each kv head's keys in place (strided views of the gathered pages) and keeps
    # query head h on kv head h // group (transformers' order). On the CPU it is one C++ loop over sequences and
    # heads, in float64 throughout; elsewhere float64 falls back to the plain softmax(QK^T)V arithmetic.
    num_seqs, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = key.shape[2]
    key = key.to(torch.float64).transpose(1, 2)  # [s, kvh, keys, d]
    value = value.to(torch.float64).transpose(1, 2)
    if layer.softcap or layer.sinks is not None:
        return _attend_explicit(query, key, value, allowed, scale, layer)
    if num_queries == 1:
        # A decode: a kv head's query heads become its query rows, so each kv head's keys are read once, not
        # once per query head (a quarter faster at SmolLM2's 3 query heads per kv head).
        grouped = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=allowed, scale=scale)
        return out.view(num_seqs, num_heads, 1, head_dim)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scale, enable_gqa=num_heads != num_kv_heads
    )


def _attend_explicit(
    query: torch.Tensor,  # [num_seqs, num_heads, num_queries, head_dim] float64
    key: torch.Tensor,  # [num_seqs, num_kv_heads, num_keys, head_dim] float64
    value: torch.Tensor,  # same
    allowed: torch.Tensor,  # [num_seqs, 1, num_queries or 1, num_keys] bool
    scale: float,
    layer: LayerAttention,
) -> torch.Tensor:  # [num_seqs, num_heads, num_queries, head_dim] float64
    """Soft-capping and sinks, which torch's fused attention has no place for, in transformers' eager order:
    scale, cap, mask, softmax over the keys and the sink together."""
    num_seqs, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    grouped = query.view(num_seqs, num_kv_heads, group, num_queries, head_dim)
    scores = grouped @ key[:, :, None].transpose(-1, -2) * scale  # [s, kvh, group, queries, keys]
    if layer.softcap:
        scores = torch.tanh(scores / layer.softcap) * layer.softcap
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    if layer.sinks is not None:
        sink = layer.sinks.to(torch.float64).view(1, num_kv_heads, group, 1, 1)
        scores = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if layer.sinks is not None:
        probs = probs[..., :-1]
    out = probs @ value[:, :, None]  # [s, kvh, group, queries, d]
    return out.view(num_seqs, num_heads, num_queries, head_dim)


def paged_attention(
    query: torch.Tensor,  # [num_rows, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K already written
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    scale: float,
    layer: LayerAttention = PLAIN,
) -> torch.Tensor:  # [num_rows, num_heads, head_dim], zeros on padding rows
    out = torch.zeros_like(query)
    attend_decodes(out, query, key_cache, value_cache, meta, scale, layer)
    starts = meta.query_start_loc.tolist()
    for i in range(meta.num_decodes, meta.num_seqs):
        attend_chunk_rows(out, query, key_cache, value_cache, meta, i, 0, starts[i + 1] - starts[i], scale, layer)
    return out


def attend_decodes(
    out: torch.Tensor,  # [num_rows, num_heads, head_dim], rows 0..num_decodes-1 written
    query: torch.Tensor,  # [num_rows, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    scale: float,
    layer: LayerAttention = PLAIN,
) -> None:
    """The decodes (one query each), batched, in slices that bound the gathered keys. A local layer gathers only
    the pages its window reaches."""
    nd = meta.num_decodes
    if not nd:
        return
    block_size, window = meta.block_size, layer.sliding_window
    num_heads, head_dim = query.shape[1], query.shape[2]
    seq_lens = meta.seq_lens[:nd].tolist()
    starts = meta.query_start_loc[: nd + 1].tolist()
    max_len = max(max(seq_lens), 1)
    per_seq = min(max_len, window + block_size if window else max_len) * num_heads * head_dim
    step = max(1, _MAX_SCORE_ELEMENTS // per_seq)
    for lo in range(0, nd, step):
        hi = min(nd, lo + step)
        lens = meta.seq_lens[lo:hi].long()
        longest = int(lens.max())
        if longest == 0:
            continue  # no context at all: zeros, as the Triton kernels give
        first_key = (lens - window).clamp(min=0) if window else torch.zeros_like(lens)
        first_block = first_key // block_size
        num_blocks = int((-(-lens // block_size) - first_block).max())
        k = _gather_run(key_cache, meta.block_tables[lo:hi], first_block, num_blocks)
        v = _gather_run(value_cache, meta.block_tables[lo:hi], first_block, num_blocks)
        positions = first_block[:, None] * block_size + torch.arange(k.shape[1], device=query.device)
        allowed = ((positions < lens[:, None]) & (positions >= first_key[:, None]))[:, None, None, :]
        q = query[starts[lo] : starts[hi]].double()[:, :, None]  # [s, h, 1, d]
        attended = _attend(q, k, v, allowed, scale, layer)[:, :, 0]
        # A decode with an empty context attends to nothing: zeros (a softmax over no keys is NaN).
        out[starts[lo] : starts[hi]] = attended.masked_fill((lens == 0)[:, None, None], 0.0).to(out.dtype)


def attend_chunk_rows(
    out: torch.Tensor,  # [num_rows, num_heads, head_dim], the chunk's rows q_lo..q_hi-1 written
    query: torch.Tensor,  # [num_rows, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    seq: int,  # a prefill sequence (seq >= meta.num_decodes)
    q_lo: int,  # first row, counted from the chunk's first
    q_hi: int,  # one past the last
    scale: float,
    layer: LayerAttention = PLAIN,
) -> None:
    """Rows q_lo..q_hi-1 of one prefill chunk, queries sliced to bound the score tensor; each slice gathers the
    keys from its first query's window start to its last query."""
    block_size, window = meta.block_size, layer.sliding_window
    num_heads = query.shape[1]
    row0 = int(meta.query_start_loc[seq])
    seq_len = int(meta.seq_lens[seq])
    first_pos = seq_len - (int(meta.query_start_loc[seq + 1]) - row0)
    table = meta.block_tables[seq : seq + 1]
    step = max(1, _MAX_SCORE_ELEMENTS // (num_heads * (min(seq_len, window + block_size) if window else seq_len)))
    for q0 in range(q_lo, q_hi, step):
        q1 = min(q_hi, q0 + step)
        first_block = layer.window_start(first_pos + q0) // block_size
        num_blocks = -(-(first_pos + q1) // block_size) - first_block
        first = torch.tensor([first_block], device=table.device)
        k = _gather_run(key_cache, table, first, num_blocks)
        v = _gather_run(value_cache, table, first, num_blocks)
        key_pos = first_block * block_size + torch.arange(k.shape[1], device=query.device)
        query_pos = first_pos + torch.arange(q0, q1, device=query.device)
        allowed = key_pos[None, :] <= query_pos[:, None]
        if window:
            allowed &= key_pos[None, :] > query_pos[:, None] - window
        q = query[row0 + q0 : row0 + q1].double().transpose(0, 1)[None]  # [1, h, queries, d]
        attended = _attend(q, k, v, allowed[None, None], scale, layer)
        out[row0 + q0 : row0 + q1] = attended[0].transpose(0, 1).to(out.dtype)
