"""The gathered LoRA update as two Triton kernels (SGMV): shrink x @ A_t and expand (x A_t) @ B_t, per row tile.

Each tile holds up to TILE_ROWS consecutive rows of one adapter slot (runner/lora/step.py); a program reads that
slot's weights from the stacked slots of the layer, so one launch serves every adapter of the step and rows of the
base model cost nothing. Ranks are padded with zeros to the stack's width (a power of two >= 16, what tl.dot takes):
zero columns add nothing.

    x      [rows, in]            a_stack [slots, in, rank_pad]     xa [rows, rank_pad]
    xa     [rows, rank_pad]      b_stack [slots, rank_pad, out]    y  [rows, out]  (+=)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .step import TILE_ROWS


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # The CPU interpreter mis-multiplies bf16 tiles, so it gets fp32 operands (UPCAST is never set on a GPU);
    # float32 models multiply in full precision (IEEE), as torch's matmul does, not in tf32.
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, tiles_ptr, K, R: tl.constexpr, BLOCK_K: tl.constexpr, TILE: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    rows = start + tl.arange(0, TILE)
    row_ok = tl.arange(0, TILE) < count
    cols = tl.arange(0, R)
    acc = tl.zeros((TILE, R), dtype=tl.float32)
    a_slot = a_ptr + slot.to(tl.int64) * K * R
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        a = tl.load(a_slot + ks[:, None] * R + cols[None, :], mask=k_ok[:, None], other=0.0)
        acc += _dot(x, a, IEEE, UPCAST)
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * R + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None]
    )


@triton.jit
def _expand_kernel(
    xa_ptr, b_ptr, y_ptr, tiles_ptr, N, R: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    rows = start + tl.arange(0, TILE)
    row_ok = tl.arange(0, TILE) < count
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rs = tl.arange(0, R)
    xa = tl.load(xa_ptr + rows[:, None].to(tl.int64) * R + rs[None, :], mask=row_ok[:, None], other=0.0)
    b = tl.load(b_ptr + slot.to(tl.int64) * R * N + rs[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0.0)
    update = _dot(xa, b, IEEE, UPCAST)
    y_at = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_at, mask=ok, other=0.0)
    tl.store(y_at, (y.to(tl.float32) + update).to(y_ptr.dtype.element_ty), mask=ok)


def apply_triton(
    x: torch.Tensor, y: torch.Tensor, tiles: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor
) -> None:
    """y += per-tile LoRA update, in place.
    x: [rows, in] contiguous; y: [rows, out] contiguous; tiles: [num_tiles, 3] int32 (slot, first row, rows);
    a_stack: [slots, in, rank_pad]; b_stack: [slots, rank_pad, out] (scaling folded in), all of x's dtype."""
    num_tiles = tiles.shape[0]
    rows, k = x.shape
    n = y.shape[1]
    r = a_stack.shape[2]
    xa = torch.empty(rows, r, dtype=x.dtype, device=x.device)  # the rank-space activations, as PEFT's lora_A output
    ieee, upcast = x.dtype == torch.float32, not x.is_cuda
    _shrink_kernel[(num_tiles,)](x, a_stack, xa, tiles, k, R=r, BLOCK_K=64, TILE=TILE_ROWS, IEEE=ieee, UPCAST=upcast)
    block_n = 64
    _expand_kernel[(num_tiles, triton.cdiv(n, block_n))](
        xa, b_stack, y, tiles, n, R=r, BLOCK_N=block_n, TILE=TILE_ROWS, IEEE=ieee, UPCAST=upcast
    )
