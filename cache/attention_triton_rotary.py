"""The rotary embedding as the Triton kernels apply it on load (metadata.Rotary), Llama's rotate_half layout.

For a head x of HEAD_DIM values and its partner x2 (x2[d] = x[(d + HEAD_DIM / 2) % HEAD_DIM]):

    rotate_half(x) = where(d < HEAD_DIM / 2, -x2, x2)
    y = round(round(x * cos) + round(rotate_half(x) * sin))          rounded to x's dtype, as transformers does

runner/fused_kernels.py's rope rounds the same way. In float32 no rounding separates the product from the sum,
and the compiler may fuse either product into the add, or neither, kernel by kernel: one fused multiply-add,
written out, gives every kernel that rotates a row the same bits (a token is a prefill row in one step and a
decode in another, and its results must not depend on which).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _partner(d, HEAD_DIM: tl.constexpr):
    """The column each column of a head pairs with in rotate_half."""
    half: tl.constexpr = HEAD_DIM // 2
    return tl.where(d < half, d + half, d - half)


@triton.jit
def _rotate(x, x2, cos, sin, d, HEAD_DIM: tl.constexpr):
    """x, x2: [rows, BLOCK_D] heads and their partners as loaded (zeros past HEAD_DIM); cos, sin: broadcastable
    to them. Returns x's dtype."""
    dtype = x.dtype
    half: tl.constexpr = HEAD_DIM // 2
    rotated = tl.where((d < half)[None, :], -x2.to(tl.float32), x2.to(tl.float32))
    if dtype == tl.float32:
        y = tl.fma(x, cos.to(tl.float32), rotated * sin.to(tl.float32))
    else:
        xc = (x.to(tl.float32) * cos.to(tl.float32)).to(dtype).to(tl.float32)
        y = xc + (rotated * sin.to(tl.float32)).to(dtype).to(tl.float32)
    return y.to(dtype)


@triton.jit
def _rotate_rows_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    stride_x_row,
    stride_x_head,
    stride_cos,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[row] = the rotated heads of x[row]: the queries of decode rows, which the decode kernel reads as they
    are. out: [rows, NUM_HEADS, HEAD_DIM] contiguous."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    mask = (heads < NUM_HEADS)[:, None] & d_ok[None, :]
    at = x_ptr + row * stride_x_row + heads[:, None] * stride_x_head
    y = _rotate(
        tl.load(at + d[None, :], mask=mask, other=0.0),
        tl.load(at + _partner(d, HEAD_DIM)[None, :], mask=mask, other=0.0),
        tl.load(cos_ptr + row * stride_cos + d, mask=d_ok, other=0.0)[None, :],
        tl.load(sin_ptr + row * stride_cos + d, mask=d_ok, other=0.0)[None, :],
        d, HEAD_DIM,
    )  # fmt: skip
    tl.store(out_ptr + row * NUM_HEADS * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :], y, mask=mask)
