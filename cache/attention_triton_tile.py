"""The online-softmax step over one tile of paged keys, shared by the prefill and decode kernels.

A tile reads K/V through the block table one key at a time (`block = block_table[seq, key // block_size]`),
so any block_size works and a tile of BLOCK_N keys may span several pages. Its rows are (token, query head)
pairs packed by the caller (see `attention_triton`); softmax runs in base 2 with fp32 statistics.

Soft-capping (SOFTCAP) caps the scores in base-2 units: with c2 = softcap * log2(e), c2 * tanh(s2 / c2) equals
log2(e) * softcap * tanh(s / softcap) for s2 = log2(e) * s, transformers' cap. A local layer's window (WINDOW,
with CAUSAL) hides keys at or below row_pos - window.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The CPU interpreter mis-multiplies bf16 tiles, so it gets fp32 operands (UPCAST is never set on a GPU).
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _tanh(x):
    # No tanh in triton.language that the CPU interpreter runs: from exp2, on |x| so nothing overflows.
    t = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    n0,
    seq_len,
    row_pos,
    qk_scale,
    kv_head_offset,
    stride_c_block,
    stride_c_token,
    d,
    d_mask,
    window,
    softcap2,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step over keys n0..n0+BLOCK_N-1. q: [ROWS, BLOCK_D]; acc: [ROWS, BLOCK_D] fp32."""
    keys = n0 + tl.arange(0, BLOCK_N)
    key_mask = keys < seq_len
    block = tl.load(table_ptr + keys // PAGE, mask=key_mask, other=0).to(tl.int64)
    offs = block * stride_c_block + (keys % PAGE) * stride_c_token + kv_head_offset
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    s = _mma(q, tl.trans(k), UPCAST, PRECISION) * qk_scale  # [ROWS, BLOCK_N], log2 units
    if SOFTCAP:
        s = softcap2 * _tanh(s / softcap2)
    if CAUSAL:
        visible = key_mask[None, :] & (keys[None, :] <= row_pos[:, None])
        if WINDOW:
            visible = visible & (keys[None, :] > row_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    else:
        s = tl.where(key_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, UPCAST, PRECISION)
    return acc, m_new, l_i
