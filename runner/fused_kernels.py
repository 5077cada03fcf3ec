"""Triton kernels for the elementwise work between a decoder layer's GEMMs (runner/fused_forward.py).

transformers runs each of these as five to ten small torch kernels (casts, pow, mean, rsqrt, cat, neg, ...).
On the H200 they took 31 of a 16k-token prefill step's 79 ms and 1.9 of a 512-row decode step's 7.3 ms; as
one kernel each they read and write every tensor once.

Each kernel rounds where transformers' bf16/fp16 code rounds (after each product and sum it runs in the model's
dtype), so their results equal transformers' up to the order of a float32 sum:

    add_rms_norm    s = x + residual (rounded); y = weight * round(s * rsqrt(mean(s^2) + eps))
    rope            per head of q and k, optionally RMS-normed first (Qwen3's q_norm, k_norm):
                    y = round(x * cos) + round(rotate_half(x) * sin), in place in the qkv rows
    silu_mul        y = round(silu(gate)) * up, from the [gate | up] halves of one GEMM's output
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (s + r).to(dtype).to(tl.float32)
        tl.store(residual_out_ptr + row * n + cols, s.to(dtype), mask=mask)
    variance = tl.sum(s * s, axis=0) / n
    normed = (s * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (normed * w).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    qk_norm_ptr,
    stride_row,
    stride_cos,
    num_q_heads,
    num_heads,
    eps,
    HEAD_DIM: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """A [BLOCK_HEADS, half] tile of one row's heads (q heads, then k heads: side by side at the row's start);
    a program per head was 30x slower, its 64 values too little work for a launch slot."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    mask = (heads < num_heads)[:, None] & d_mask[None, :]
    at = qkv_ptr + row * stride_row + heads[:, None] * HEAD_DIM + d[None, :]
    dtype = qkv_ptr.dtype.element_ty
    x1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(at + half, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        inv = tl.rsqrt(variance + eps)[:, None]
        w_at = (
            qk_norm_ptr + (heads >= num_q_heads).to(tl.int32)[:, None] * HEAD_DIM + d[None, :]
        )  # row 0: q_norm, 1: k_norm
        w1 = tl.load(w_at, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_at + half, mask=mask, other=0.0).to(tl.float32)
        x1 = ((x1 * inv).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * inv).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    c1 = tl.load(cos_ptr + row * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + row * stride_cos + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + row * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + row * stride_cos + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    # rotate_half(x) = [-x2, x1]; each product is rounded to the model's dtype before the sum, as in transformers
    y1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    tl.store(at, y1.to(dtype), mask=mask)
    tl.store(at + half, y2.to(dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_row, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_row + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (act * up).to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., n] as [rows, n] with a unit last stride (a view when it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); without a residual, (rms_norm(x) * weight, x)."""
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if residual is None:
        new_residual, r2 = x, x2
    else:
        r2 = _rows(residual)
        new_residual = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(rows,)](
        x2,
        r2,
        weight,
        out,
        new_residual,
        x2.stride(0),
        r2.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out.view(shape), new_residual.view(shape)


def rope_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """Rotate the q and k heads of qkv [rows, (num_q_heads + 2 num_kv_heads) * head_dim] in place, by the
    cos/sin rows [rows, head_dim] of their positions; first RMS-norm each head if qk_norm [2, head_dim] (the
    q_norm and k_norm weights) is given."""
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    rows, num_heads = qkv.shape[0], num_q_heads + num_kv_heads
    has_norm = qk_norm is not None
    block_half = triton.next_power_of_2(head_dim // 2)
    block_heads = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_half))
    _rope_kernel[(rows, triton.cdiv(num_heads, block_heads))](
        qkv,
        cos,
        sin,
        qk_norm if has_norm else cos,
        qkv.stride(0),
        cos.stride(0),
        num_q_heads,
        num_heads,
        eps,
        HEAD_DIM=head_dim,
        HAS_NORM=has_norm,
        BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half,
        num_warps=4,
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 n] = [gate | up]: [rows, n]."""
    g2 = _rows(gate_up)
    rows, n = g2.shape[0], g2.shape[1] // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(n), 1024)
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](g2, out, g2.stride(0), n, BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], n)
