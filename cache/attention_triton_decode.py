"""The Triton split-KV decode kernel and the reduce kernel that merges its splits (flash-decoding).

Each (sequence, kv head) cuts its context into num_splits equal runs of tiles; each split writes a
normalised partial output and its log-sum-exp into [num_decodes, num_heads, num_splits] buffers, and the
reduce kernel merges them. With one split (DIRECT) the decode kernel writes the output itself.

Cascade (CASCADE, see attention_triton_cascade): the decode kernel covers keys [L, seq_len) only, L read on
the device, and writes slots 0..num_splits-1 of [num_decodes, num_heads, num_slots] buffers whose other slots
hold the shared-prefix kernel's partials; the reduce merges all num_slots.

Packed kv heads (KV_PACK > 1, for heads of 64 or fewer dims): a program takes KV_PACK neighbouring kv heads, so
each key's read is KV_PACK * head_dim contiguous values (256 bytes for two bf16 heads of 64) instead of one
128-byte run every num_kv_heads * head_dim values; 128-byte runs left a llama-1b decode at 66-82% of the copy
bandwidth where 256-byte ones (llama-8b) reached 96-100%. The tile's columns then span the KV_PACK heads, and
each query row keeps its own head's columns (zeros elsewhere), so one Q K^T gives every row its own head's
scores; of the P V product each row stores only its own head's columns.

    rows (query heads):  r = 0 .. KV_PACK * GROUP - 1, kv head kv0 + r // GROUP
    columns:             c = 0 .. KV_PACK * HEAD_DIM - 1, kv head kv0 + c // HEAD_DIM, dim c % HEAD_DIM
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_triton_tile import _attend_tile


@triton.jit(do_not_specialize=["num_splits", "num_slots", "stride_q_head", "stride_o_head", "stride_bt_seq", "window"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    prefix_len_ptr,
    sinks_ptr,
    qk_scale,
    window,
    softcap2,
    num_splits,
    num_slots,
    stride_q_row,
    stride_q_head,
    stride_o_row,
    stride_o_head,
    stride_c_block,
    stride_c_token,
    stride_c_head,
    stride_bt_seq,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,
    CASCADE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_PACK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
):
    # One grid axis for (sequence, kv-head pack), packs fastest: a sequence's programs launch side by side and read
    # its pages together (1-2% faster than sequence-major on the H200 at 512 decodes), and the first axis holds
    # any number of decodes (the others stop at 65,535).
    NUM_PACKS: tl.constexpr = NUM_HEADS // (GROUP * KV_PACK)
    seq = tl.program_id(0) // NUM_PACKS  # decodes come first, one row each, so sequence i owns row i
    kv_pack = tl.program_id(0) % NUM_PACKS  # kv heads kv_pack * KV_PACK ..
    split = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    if CASCADE:  # keys below L are the shared prefix, attended by the cascade kernel
        key_lo = tl.load(prefix_len_ptr)
    elif WINDOW:  # a local layer: the last `window` keys, every one visible to the query (no cascade)
        key_lo = tl.maximum(seq_len - window, 0)
    else:
        key_lo = 0
    num_tiles = tl.cdiv(tl.maximum(seq_len - key_lo, 0), BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    h = tl.arange(0, BLOCK_H)
    head_mask = h < GROUP * KV_PACK
    head = kv_pack * (GROUP * KV_PACK) + h  # the packed kv heads' query heads are consecutive
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM * KV_PACK
    dd = d % HEAD_DIM
    # Each row's own head's columns (with KV_PACK 1: every column below HEAD_DIM)
    mask = head_mask[:, None] & d_mask[None, :] & ((d // HEAD_DIM)[None, :] == (h // GROUP)[:, None])
    row = seq.to(tl.int64)
    q = tl.load(q_ptr + row * stride_q_row + head[:, None] * stride_q_head + dd[None, :], mask=mask, other=0.0)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table_ptr = block_tables_ptr + row * stride_bt_seq
    kv_head_offset = (kv_pack * KV_PACK).to(tl.int64) * stride_c_head  # packed heads: stride_c_head == HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_ptr,
            key_lo + tile * BLOCK_N,
            seq_len,
            h,
            qk_scale,
            kv_head_offset,
            stride_c_block,
            stride_c_token,
            d,
            d_mask,
            window,
            softcap2,
            False,
            False,
            SOFTCAP,
            PAGE,
            BLOCK_N,
            UPCAST,
            PRECISION,
        )

    if DIRECT and SINKS:  # one split: the sink joins the denominator here (else in the reduce)
        sink = tl.load(sinks_ptr + head, mask=head_mask, other=0.0) * 1.4426950408889634  # log2 units
        m_all = tl.maximum(m_i, sink)
        keep = tl.exp2(m_i - m_all)
        acc = acc * keep[:, None]
        l_i = l_i * keep + tl.exp2(sink - m_all)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split leaves zeros, not NaN
    if DIRECT:  # a single split: no partials, no reduce
        tl.store(
            out_ptr + row * stride_o_row + head[:, None] * stride_o_head + dd[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        part = (row * NUM_HEADS + head) * num_slots + split  # [BLOCK_H] index into [decodes, heads, slots]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dd[None, :], out, mask=mask)
        tl.store(part_lse_ptr + part, lse, mask=head_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    sinks_ptr,
    num_splits,
    stride_o_row,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SINKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (row * NUM_HEADS + head) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    if SINKS:  # the head's learned logit joins the denominator, in log2 units
        sink = tl.load(sinks_ptr + head) * 1.4426950408889634
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): weights 0, output 0
    w = tl.exp2(lse - m)
    # An empty split (lse -inf) may leave its output slot unwritten (the cascade kernel's do): never read it,
    # as 0 * garbage can be NaN.
    used = (s < num_splits) & (lse > float("-inf"))
    parts = tl.load(
        part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
        mask=used[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    denom = tl.sum(w, 0)
    if SINKS:
        denom += tl.exp2(sink - m)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + row * stride_o_row + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM
    )
