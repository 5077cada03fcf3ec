"""The gathered LoRA update as two Triton kernels (SGMV): shrink x @ A_t and expand (x A_t) @ B_t, per row tile.

Each tile holds up to TILE_ROWS consecutive rows of one adapter slot (runner/lora/step.py); a program reads that
slot's weights from the stacked slots of the layer, so one launch serves every adapter of the step and rows of the
base model cost nothing. Ranks are padded with zeros to the stack's width (a power of two >= 16, what tl.dot takes):
zero columns add nothing.

    x      [rows, in]                    a_stack [slots, in, rank_pad]     xa [splits, rows, rank_pad] float32
    xa     [splits, rows, rank_pad]      b_stack [slots, rank_pad, out]    y  [rows, out]  (+=)

A decode step has a few tiles (one or two per adapter), and a shrink over in_features = 8192 done by one program
a tile is a long serial loop on a handful of SMs. So the shrink splits in_features too, into as many parts as
keep about TARGET_PROGRAMS programs busy, each writing its partial sums; the expand adds the parts (in a fixed
order: no atomics, the same bits every run) and rounds the sum to the model's dtype, as PEFT's lora_A output is.
A prefill step's hundreds of tiles need no split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .step import TILE_ROWS

BLOCK_K = 64
BLOCK_N = 64
TARGET_PROGRAMS = 256  # the shrink's grid, tiles x splits, when a step has few tiles (an H100 has 132 SMs)


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


# The row count and the split change from step to step: specialising on them (a value of 1, a multiple of 16) would
# compile new variants in the middle of a run, 0.1-1 s each, after the engine's start-up compiled the rest.
@triton.jit(do_not_specialize=["num_rows", "K_PER_SPLIT"])
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, tiles_ptr, num_rows, K, K_PER_SPLIT, R: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    rows = start + tl.arange(0, TILE)
    row_ok = tl.arange(0, TILE) < count
    cols = tl.arange(0, R)
    acc = tl.zeros((TILE, R), dtype=tl.float32)
    a_slot = a_ptr + slot.to(tl.int64) * K * R
    k_begin = split * K_PER_SPLIT
    for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        a = tl.load(a_slot + ks[:, None] * R + cols[None, :], mask=k_ok[:, None], other=0.0)
        acc += _dot(x, a, IEEE, UPCAST)
    out = out_ptr + (split * num_rows + rows[:, None]).to(tl.int64) * R + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_rows", "SPLITS"])
def _expand_kernel(
    xa_ptr, b_ptr, y_ptr, tiles_ptr, num_rows, N, SPLITS, R: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
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
    xa = tl.zeros((TILE, R), dtype=tl.float32)
    for split in range(0, SPLITS):
        xa_at = xa_ptr + (split * num_rows + rows[:, None]).to(tl.int64) * R + rs[None, :]
        xa += tl.load(xa_at, mask=row_ok[:, None], other=0.0)
    xa = xa.to(b_ptr.dtype.element_ty)  # PEFT's lora_A output is in the model's dtype
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
    splits = max(1, min(triton.cdiv(k, BLOCK_K), TARGET_PROGRAMS // max(num_tiles, 1)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(k, k_per_split)  # none empty
    xa = torch.empty(splits, rows, r, dtype=torch.float32, device=x.device)  # each split's partial x @ A_t
    ieee, upcast = x.dtype == torch.float32, not x.is_cuda
    _shrink_kernel[(num_tiles, splits)](
        x, a_stack, xa, tiles, rows, k, k_per_split, R=r, BLOCK_K=BLOCK_K, TILE=TILE_ROWS, IEEE=ieee, UPCAST=upcast
    )
    _expand_kernel[(num_tiles, triton.cdiv(n, BLOCK_N))](
        xa, b_stack, y, tiles, rows, n, splits, R=r, BLOCK_N=BLOCK_N, TILE=TILE_ROWS, IEEE=ieee, UPCAST=upcast
    )
