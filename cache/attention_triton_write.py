"""The Triton kernels that write outside the attention proper: this step's K/V rows into their pages (see
`attention_triton.write_kv`), each key rotated first when the step hands its rotary tables (ROPE), and zeros into
the output's padding rows."""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_triton_rotary import _partner, _rotate


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    stride_cos,
    stride_k_row,
    stride_k_head,
    stride_v_row,
    stride_v_head,
    stride_c_block,
    stride_c_token,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
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
    k_at = key_ptr + row * stride_k_row + heads[:, None] * stride_k_head
    k = tl.load(k_at + d[None, :], mask=mask)
    if ROPE:
        d_ok = d < HEAD_DIM
        k = _rotate(
            k, tl.load(k_at + _partner(d, HEAD_DIM)[None, :], mask=mask),
            tl.load(cos_ptr + row * stride_cos + d, mask=d_ok)[None, :],
            tl.load(sin_ptr + row * stride_cos + d, mask=d_ok)[None, :],
            d, HEAD_DIM,
        )  # fmt: skip
    v = tl.load(value_ptr + row * stride_v_row + heads[:, None] * stride_v_head + d[None, :], mask=mask)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


# num_seqs and num_rows change from step to step; specialising on them (or on a pointer offset by num_seqs,
# whose 16-byte alignment then changes) would compile new variants in the middle of a run.
@triton.jit(do_not_specialize=["num_seqs", "num_rows"])
def _zero_rows_kernel(
    out_ptr, query_start_ptr, num_seqs, num_rows, row_numel, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Zeros rows first_row.. of out [num_rows, row_numel], first_row = query_start[num_seqs] read on the device
    (no host sync): the padding rows no sequence owns. A program whose rows all lie below first_row stores nothing."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    first_row = tl.load(query_start_ptr + num_seqs)
    rows_mask = (rows >= first_row) & (rows < num_rows)
    zeros = tl.zeros([BLOCK_R, BLOCK_C], dtype=out_ptr.dtype.element_ty)
    for c0 in range(0, row_numel, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rows_mask[:, None] & (cols < row_numel)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * row_numel + cols[None, :], zeros, mask=mask)
