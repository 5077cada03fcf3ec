"""Paged attention in Triton: the KV write, a flash-attention prefill and a split-KV decode.

Same two calls as `attention_torch`, tested against it. Every kernel reads K/V through the block table
one key at a time (`block = block_table[seq, key // block_size]`), so any block_size works and a tile of
BLOCK_N keys may span several pages.

GQA packing: a program owns one kv head and stacks the query heads that read it into the rows of its
tiles, so each K/V tile is loaded once per kv head, not once per query head:

    rows of a tile:  (token 0, head 0) (token 0, head 1) ... (token 0, head G-1) (token 1, head 0) ...
    G = num_heads // num_kv_heads padded to a power of two; padded heads load zeros and are never stored.

Decode (the first meta.num_decodes sequences, one row each) runs flash-decoding: each (sequence, kv head)
cuts its context into num_splits equal runs of tiles, computed on the device from seq_lens, so the grid
(num_decodes, num_kv_heads, num_splits) depends only on shapes and python ints that do not change between
CUDA-graph replays. Each split writes a normalised partial output and its log-sum-exp; a reduce kernel
merges them. With one split the decode kernel writes the output directly.

Output rows that belong to no sequence come out zero: a pure-decode step (every row a decode) lets the
kernel write every row, any other step starts from a zeroed output. A decode with seq_len 0 gives zeros.
Softmax runs in base 2 (exp2) with fp32 statistics and fp32 accumulators for every input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32
_MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it buys


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    stride_k_row, stride_k_head, stride_v_row, stride_v_head,
    stride_c_block, stride_c_token, stride_c_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_D)
    # A -1 slot (padding row) masks every load and store instead of returning early. The slot is broadcast to
    # a vector first: the CPU interpreter rejects a mask built from a scalar bool.
    heads_ok = (heads < NUM_KV_HEADS) & ((slot + 0 * heads) >= 0)
    mask = heads_ok[:, None] & (d < HEAD_DIM)[None, :]
    dst = (slot // PAGE) * stride_c_block + (slot % PAGE) * stride_c_token + heads[:, None] * stride_c_head + d[None, :]
    k = tl.load(key_ptr + row * stride_k_row + heads[:, None] * stride_k_head + d[None, :], mask=mask)
    v = tl.load(value_ptr + row * stride_v_row + heads[:, None] * stride_v_head + d[None, :], mask=mask)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The CPU interpreter mis-multiplies bf16 tiles, so it gets fp32 operands (UPCAST is never set on a GPU).
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, n0, seq_len, row_pos, qk_scale,
    kv_head_offset, stride_c_block, stride_c_token, d, d_mask,
    CAUSAL: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One online-softmax step over keys n0..n0+BLOCK_N-1. q: [ROWS, BLOCK_D]; acc: [ROWS, BLOCK_D] fp32."""
    keys = n0 + tl.arange(0, BLOCK_N)
    key_mask = keys < seq_len
    block = tl.load(table_ptr + keys // PAGE, mask=key_mask, other=0).to(tl.int64)
    offs = block * stride_c_block + (keys % PAGE) * stride_c_token + kv_head_offset
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    s = _mma(q, tl.trans(k), UPCAST, PRECISION) * qk_scale  # [ROWS, BLOCK_N], log2 units
    if CAUSAL:
        s = tl.where(key_mask[None, :] & (keys[None, :] <= row_pos[:, None]), s, float("-inf"))
    else:
        s = tl.where(key_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, UPCAST, PRECISION)
    return acc, m_new, l_i


# Integers that change from step to step are not specialised on (=1, multiple of 16): one compile serves all.
@triton.jit(do_not_specialize=["first_seq", "stride_q_head", "stride_o_head", "stride_bt_seq"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    qk_scale, first_seq,
    stride_q_row, stride_q_head, stride_o_row, stride_o_head,
    stride_c_block, stride_c_token, stride_c_head, stride_bt_seq,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P  # query tokens per program
    q_block = tl.program_id(0)
    seq = first_seq + tl.program_id(1)
    kv_head = tl.program_id(2)
    row_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - row_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the chunk's first query; keys before it are the cached prefix

    r = tl.arange(0, BLOCK_M)
    token = q_block * BLOCK_Q + r // GROUP_P
    group_idx = r % GROUP_P
    row_mask = (token < q_len) & (group_idx < GROUP)
    head = kv_head * GROUP + group_idx
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    rows = (row_start + token).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_q_row + head[:, None] * stride_q_head + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    row_pos = first_pos + token

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite, so an all-masked tile gives alpha = 1, not NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    kv_head_offset = kv_head.to(tl.int64) * stride_c_head

    # Programs past the chunk's end get an empty key range and store nothing.
    lo_pos = first_pos + q_block * BLOCK_Q
    hi_pos = tl.minimum(lo_pos + BLOCK_Q, seq_len)  # one past the last key any row here may see
    hi_pos = tl.where(q_block * BLOCK_Q < q_len, hi_pos, 0)
    # Keys below the first row's position are visible to every row: no causal mask needed there.
    full_end = tl.minimum((lo_pos + 1) // BLOCK_N * BLOCK_N, hi_pos // BLOCK_N * BLOCK_N)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, n0, seq_len, row_pos,
                                     qk_scale, kv_head_offset, stride_c_block, stride_c_token, d, d_mask,
                                     False, PAGE, BLOCK_N, UPCAST, PRECISION)
    for n0 in range(full_end, hi_pos, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, n0, seq_len, row_pos,
                                     qk_scale, kv_head_offset, stride_c_block, stride_c_token, d, d_mask,
                                     True, PAGE, BLOCK_N, UPCAST, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_o_row + head[:, None] * stride_o_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits", "stride_q_head", "stride_o_head", "stride_bt_seq"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr, seq_lens_ptr,
    qk_scale, num_splits,
    stride_q_row, stride_q_head, stride_o_row, stride_o_head,
    stride_c_block, stride_c_token, stride_c_head, stride_bt_seq,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)  # decodes come first, one row each, so sequence i owns row i
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    h = tl.arange(0, BLOCK_H)
    head_mask = h < GROUP
    head = kv_head * GROUP + h
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row = seq.to(tl.int64)
    q = tl.load(q_ptr + row * stride_q_row + head[:, None] * stride_q_head + d[None, :],
                mask=head_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table_ptr = block_tables_ptr + row * stride_bt_seq
    kv_head_offset = kv_head.to(tl.int64) * stride_c_head
    for tile in range(tile_lo, tile_hi):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, tile * BLOCK_N, seq_len,
                                     h, qk_scale, kv_head_offset, stride_c_block, stride_c_token, d, d_mask,
                                     False, PAGE, BLOCK_N, UPCAST, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split leaves zeros, not NaN
    mask = head_mask[:, None] & d_mask[None, :]
    if DIRECT:  # a single split: no partials, no reduce
        tl.store(out_ptr + row * stride_o_row + head[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        part = (row * NUM_HEADS + head) * num_splits + split  # [BLOCK_H] index into [decodes, heads, splits]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + part, lse, mask=head_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_o_row, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (row * NUM_HEADS + head) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): weights 0, output 0
    w = tl.exp2(lse - m)
    parts = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=(s < num_splits)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row * stride_o_row + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so CPU tests reach the split-KV path with tiny batches
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_num_splits(num_decodes: int, num_kv_heads: int, max_context_tokens: int, device: torch.device) -> int:
    """Splits per (sequence, kv head), from shapes only (graph-safe).

    One split once the (sequence, kv head) programs fill the GPU (about 4 per SM). Below that, a power of two
    that lifts the grid to 4-8 programs per SM: on the H100 a grid just over one wave (5 splits of 128
    programs = 640) ran 10% slower than 4 or 8 splits.
    """
    programs = num_decodes * num_kv_heads
    target = 4 * _num_sms(device)
    if programs >= target:
        return 1
    splits = triton.next_power_of_2(triton.cdiv(target, max(programs, 1)))
    return max(1, min(splits, _MAX_SPLITS, triton.cdiv(max_context_tokens, _MIN_TOKENS_PER_SPLIT)))


def _decode_config(head_dim: int, device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {"BLOCK_N": 16}  # interpreter: tiny tiles keep masked work small
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def _prefill_config(head_dim: int, device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8 if head_dim > 64 else 4, "num_stages": 3}


def _fp32_tiles(config: dict[str, int], key_cache: torch.Tensor) -> dict[str, int]:
    """Smaller tiles for fp32 pages on a GPU: at the bf16 sizes a 128-wide head needs 262 KB of shared memory
    (an H100/H200 SM has 228 KB). fp32 on a GPU is a checking path, not a fast one."""
    if key_cache.element_size() == 4 and "num_stages" in config:
        config["num_stages"] = min(config["num_stages"], 2)
        config["BLOCK_N"] = min(config["BLOCK_N"], 32)
        if "BLOCK_M" in config:
            config["BLOCK_M"] = min(config["BLOCK_M"], 64)
    return config


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, block_size: int) -> None:
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError(f"key and value caches differ: {tuple(key_cache.shape)} {key_cache.stride()} vs "
                         f"{tuple(value_cache.shape)} {value_cache.stride()}")
    if key_cache.shape[1] != block_size:
        raise ValueError(f"cache pages hold {key_cache.shape[1]} tokens, metadata says block_size {block_size}")
    if key_cache.stride(-1) != 1:
        raise ValueError("the cache's head_dim axis must be contiguous")


def _kernel_dtype_args(query: torch.Tensor, key_cache: torch.Tensor) -> dict[str, object]:
    # fp32 on a GPU: tf32x3 (three tf32 products, about fp32 accuracy) rather than plain tf32 (~1e-3 error) or
    # "ieee", whose FMA loops take minutes to compile at these tile sizes. bf16/fp16 ignore the setting.
    on_gpu = query.device.type == "cuda"
    precision = ("tf32x3" if on_gpu else "ieee") if key_cache.dtype == torch.float32 else "tf32"
    upcast = not on_gpu and torch.bfloat16 in (query.dtype, key_cache.dtype)
    return {"UPCAST": upcast, "PRECISION": precision}


def write_kv(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same
    key: torch.Tensor,  # [num_rows, num_kv_heads, head_dim], any float dtype, cast to the cache's
    value: torch.Tensor,  # same
    slot_mapping: torch.Tensor,  # [num_rows] int64, -1 = skip
) -> None:
    num_rows, num_kv_heads, head_dim = key.shape
    _check_cache(key_cache, value_cache, key_cache.shape[1])
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous head_dim axis")
    if num_rows == 0:
        return
    _write_kv_kernel[(num_rows,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=key_cache.shape[1],
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def _decode(query, key_cache, value_cache, meta, scale, out, num_splits: int | None = None) -> None:
    """Writes rows 0..num_decodes-1 of out. Reads only shapes and python ints: safe to capture in a CUDA graph."""
    num_decodes = meta.num_decodes
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        max_context_tokens = meta.block_tables.shape[1] * meta.block_size
        num_splits = _decode_num_splits(num_decodes, num_kv_heads, max_context_tokens, query.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits > 1:
        part_out = torch.empty(num_decodes, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_decodes, num_heads, num_splits, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused: the kernel writes out directly
    _decode_kernel[(num_decodes, num_kv_heads, num_splits)](
        query, key_cache, value_cache, out, part_out, part_lse, meta.block_tables, meta.seq_lens,
        scale * _LOG2E, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), meta.block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, PAGE=meta.block_size, DIRECT=num_splits == 1,
        **_kernel_dtype_args(query, key_cache), **_fp32_tiles(dict(_decode_config(head_dim, query.device)), key_cache),
    )
    if num_splits > 1:
        _reduce_kernel[(num_decodes, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        )


def _prefill(query, key_cache, value_cache, meta, scale, out) -> None:
    """Writes the rows of sequences num_decodes.. of out. Grid from meta.max_query_len (a python int)."""
    num_prefills = meta.num_seqs - meta.num_decodes
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    config = _fp32_tiles(dict(_prefill_config(head_dim, query.device)), key_cache)
    block_m = max(config.pop("BLOCK_M"), group_p)
    block_q = block_m // group_p
    grid = (triton.cdiv(meta.max_query_len, block_q), num_prefills, num_kv_heads)
    _prefill_kernel[grid](
        query, key_cache, value_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale * _LOG2E, meta.num_decodes,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=meta.block_size, BLOCK_M=block_m, **_kernel_dtype_args(query, key_cache), **config,
    )


def paged_attention(
    query: torch.Tensor,  # [num_rows, num_heads, head_dim] bf16/fp16/fp32, head_dim axis contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K already written
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_rows, num_heads, head_dim] query's dtype, zeros on padding rows
    num_rows, num_heads, _ = query.shape
    _check_cache(key_cache, value_cache, meta.block_size)
    if num_heads % key_cache.shape[2]:
        raise ValueError(f"{num_heads} query heads do not share {key_cache.shape[2]} kv heads evenly")
    if query.stride(-1) != 1:
        query = query.contiguous()
    pure_decode = meta.num_decodes == meta.num_seqs == num_rows
    # A pure-decode step (the CUDA-graph case) writes every row in the kernel and skips the memset.
    out = torch.empty_like(query) if pure_decode else torch.zeros_like(query)
    if meta.num_decodes:
        _decode(query, key_cache, value_cache, meta, scale, out)
    if meta.num_seqs > meta.num_decodes:
        _prefill(query, key_cache, value_cache, meta, scale, out)
    return out


def warm_up(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], read only
    value_cache: torch.Tensor,  # same
    num_heads: int,
    dtype: torch.dtype,  # the queries' dtype
) -> None:
    """Compile every kernel variant a run can meet (one per decode split count, DIRECT or not), so none
    compiles mid-run: a compile takes about a second, and mixed steps pick their split count from shapes."""
    block_size, head_dim = key_cache.shape[1], key_cache.shape[3]
    device = key_cache.device
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([1], dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),
        slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=device),
        num_decodes=1,
        max_query_len=1,
        max_seq_len=1,
        block_size=block_size,
    )
    query = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    out = torch.empty_like(query)
    splits = 1
    while splits <= _MAX_SPLITS:
        _decode(query, key_cache, value_cache, meta, 1.0, out, num_splits=splits)
        splits *= 2
    prefill = dataclasses.replace(meta, num_decodes=0)
    _prefill(query, key_cache, value_cache, prefill, 1.0, out)
