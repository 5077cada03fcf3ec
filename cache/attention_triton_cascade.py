"""The Triton shared-prefix ("cascade") kernel: every decode's attention over the pages they all share.

When a step's decodes all start with the same L cached tokens in the same pages (a prefix-cache hit on a
common system prompt), the plain decode kernel streams those pages once per sequence. This kernel reads
them once per kv head: the rows of a tile are (decode, query head) pairs of many sequences,

    rows of a tile:  (decode d, head 0) ... (decode d, head G-1) (decode d+1, head 0) ... (BLOCK_M rows)

so each K/V tile, loaded through block_tables row 0, feeds BLOCK_M rows through tensor-core dots (a prefill
tile with no causal mask: every decode's query comes after the prefix). The grid splits the prefix's tiles
into num_prefix_splits runs; each writes a normalised partial output and its base-2 log-sum-exp into slots
first_slot.. of the decode's partial buffers, which the decode reduce kernel merges with the decode kernel's
own splits over keys [L, seq_len). L is read on the device, so a CUDA graph replays with any L; L == 0
leaves every program an empty loop and lse = -inf. Soft-capping applies here as in the decode kernel; sinks
join in the reduce; local layers (a sliding window) never take this path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_triton_tile import _attend_tile


# Integers that change from step to step are not specialised on (=1, multiple of 16): one compile serves all.
@triton.jit(do_not_specialize=["num_decodes", "num_prefix_splits", "first_slot", "num_slots", "stride_q_head"])
def _cascade_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_out_ptr,
    part_lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    prefix_len_ptr,
    qk_scale,
    softcap2,
    num_decodes,
    num_prefix_splits,
    first_slot,
    num_slots,
    stride_q_row,
    stride_q_head,
    stride_c_block,
    stride_c_token,
    stride_c_head,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    m_block = tl.program_id(0)  # fastest: neighbouring programs read the same K/V tiles (L2 reuse)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_len = tl.load(prefix_len_ptr)
    num_tiles = tl.cdiv(prefix_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_prefix_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    seq = r // GROUP_P  # decodes come first, one row each, so decode i owns query row i
    group_idx = r % GROUP_P
    row_mask = (seq < num_decodes) & (group_idx < GROUP)
    head = kv_head * GROUP + group_idx
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    rows = seq.to(tl.int64)
    # An empty split (L == 0, or more splits than tiles) loads no q and stores only lse = -inf.
    q_rows = row_mask & (seq < tl.where(tile_lo < tile_hi, num_decodes, 0))
    q = tl.load(
        q_ptr + rows[:, None] * stride_q_row + head[:, None] * stride_q_head + d[None, :],
        mask=q_rows[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_head_offset = kv_head.to(tl.int64) * stride_c_head
    for tile in range(tile_lo, tile_hi):  # the shared pages, through block_tables row 0
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            block_tables_ptr,
            tile * BLOCK_N,
            prefix_len,
            r,
            qk_scale,
            kv_head_offset,
            stride_c_block,
            stride_c_token,
            d,
            d_mask,
            0,
            softcap2,
            False,
            False,
            SOFTCAP,
            PAGE,
            BLOCK_N,
            UPCAST,
            PRECISION,
        )

    # A decode whose context does not reach past the prefix (a graph bucket's seq_len-0 filler) takes nothing
    # from it: weight 0 in the reduce, so it comes out zero as the plain decode would make it. Slots with
    # lse = -inf are never read by the reduce, so their outputs are not stored.
    seq_len = tl.load(seq_lens_ptr + seq, mask=seq < num_decodes, other=0)
    used = (l_i > 0) & (seq_len > prefix_len)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(used, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    part = (rows * NUM_HEADS + head) * num_slots + first_slot + split  # [BLOCK_M] into [decodes, heads, slots]
    tl.store(
        part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=(row_mask & used)[:, None] & d_mask[None, :]
    )
    tl.store(part_lse_ptr + part, lse, mask=row_mask)
