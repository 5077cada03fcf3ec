"""The Triton prefill kernel: flash attention over each chunk's query tokens and its cached prefix.

A program owns (a block of query tokens, one sequence, one kv head); its rows stack the query heads of that
kv head under each token, and keys below the first row's position skip the causal mask. With ROPE the queries
arrive unrotated and the program rotates them as it loads them (attention_triton_rotary).

The grid's first axis runs over the step's query blocks, all sequences' laid end to end: sequence s owns the
blocks from T(s) = (query_start[s] - query_start[first]) // BLOCK_Q + (s - first) on, at least
cdiv(q_len, BLOCK_Q) of them (floor((a + L) / B) - floor(a / B) + 1 >= cdiv(L, B)), and a program finds its
sequence by a binary search over T. The grid, cdiv(rows, BLOCK_Q) + sequences, comes from shapes alone; a
rectangle of (longest chunk's blocks) x sequences would launch mostly empty programs in a step that mixes
long prompts with short chunks (a scoring step's continuations: three empty programs in four).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_triton_rotary import _partner, _rotate
from .attention_triton_tile import _attend_tile


@triton.jit
def _find_seq(query_start_ptr, block, first_seq, num_seqs, first_row, BLOCK_Q: tl.constexpr):
    """The last sequence s in [first_seq, num_seqs) whose first query block T(s) is at most `block`."""
    lo = first_seq
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = (tl.load(query_start_ptr + mid) - first_row) // BLOCK_Q + (mid - first_seq)
        if start <= block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Integers that change from step to step are not specialised on (=1, multiple of 16): one compile serves all.
@triton.jit(do_not_specialize=["first_seq", "num_seqs", "stride_q_head", "stride_o_head", "stride_bt_seq", "window"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    sinks_ptr,
    cos_ptr,
    sin_ptr,
    stride_cos,
    qk_scale,
    window,
    softcap2,
    first_seq,
    num_seqs,
    stride_q_row,
    stride_q_head,
    stride_o_row,
    stride_o_head,
    stride_c_block,
    stride_c_token,
    stride_c_head,
    stride_bt_seq,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
    ROPE: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P  # query tokens per program
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    first_row = tl.load(query_start_ptr + first_seq)
    seq = _find_seq(query_start_ptr, block, first_seq, num_seqs, first_row, BLOCK_Q)
    row_start = tl.load(query_start_ptr + seq)
    q_block = block - ((row_start - first_row) // BLOCK_Q + (seq - first_seq))  # past its chunk: no work
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
    q_at = q_ptr + rows[:, None] * stride_q_row + head[:, None] * stride_q_head
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_at + d[None, :], mask=q_mask, other=0.0)
    if ROPE:  # q arrives unrotated (metadata.Rotary)
        cos_at = rows[:, None] * stride_cos + d[None, :]
        q = _rotate(
            q, tl.load(q_at + _partner(d, HEAD_DIM)[None, :], mask=q_mask, other=0.0),
            tl.load(cos_ptr + cos_at, mask=q_mask, other=0.0), tl.load(sin_ptr + cos_at, mask=q_mask, other=0.0),
            d, HEAD_DIM,
        )  # fmt: skip
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
    if WINDOW:  # from the tile of the first row's window start, every tile masked
        win_lo = tl.maximum(lo_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        for n0 in range(win_lo, hi_pos, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, n0, seq_len, row_pos, qk_scale,
                kv_head_offset, stride_c_block, stride_c_token, d, d_mask, window, softcap2,
                True, True, SOFTCAP, PAGE, BLOCK_N, UPCAST, PRECISION,
            )  # fmt: skip
    else:
        # Keys below the first row's position are visible to every row: no causal mask needed there.
        full_end = tl.minimum((lo_pos + 1) // BLOCK_N * BLOCK_N, hi_pos // BLOCK_N * BLOCK_N)
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, n0, seq_len, row_pos, qk_scale,
                kv_head_offset, stride_c_block, stride_c_token, d, d_mask, window, softcap2,
                False, False, SOFTCAP, PAGE, BLOCK_N, UPCAST, PRECISION,
            )  # fmt: skip
        for n0 in range(full_end, hi_pos, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, n0, seq_len, row_pos, qk_scale,
                kv_head_offset, stride_c_block, stride_c_token, d, d_mask, window, softcap2,
                True, False, SOFTCAP, PAGE, BLOCK_N, UPCAST, PRECISION,
            )  # fmt: skip

    if SINKS:  # the sink joins the denominator: rescale both to max(m_i, sink)
        sink = tl.load(sinks_ptr + head, mask=row_mask, other=0.0) * 1.4426950408889634  # log2 units
        m_all = tl.maximum(m_i, sink)
        keep = tl.exp2(m_i - m_all)
        acc = acc * keep[:, None]
        l_i = l_i * keep + tl.exp2(sink - m_all)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_o_row + head[:, None] * stride_o_head + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )
