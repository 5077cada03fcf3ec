"""The Triton LoRA kernels (SGMV shrink + expand) against the torch path, on tiny shapes in Triton's interpreter
on the CPU (on a GPU, natively)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbatch.runner.lora.step import apply_torch, lora_step, max_tiles

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [24, 200])  # below one K block; four blocks, the last partial: split K
def test_triton_update_equals_torch_path(dtype: torch.dtype, in_features: int) -> None:
    from kvbatch.runner.lora.triton_kernels import apply_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    out_features, rank_pad = 80, 16  # out over one N block
    ranks = [2, 5, 16]  # three slots; the stacks are zero past each slot's rank
    a_stack = torch.zeros(len(ranks), in_features, rank_pad)
    b_stack = torch.zeros(len(ranks), rank_pad, out_features)
    slot_weights = []
    for slot, r in enumerate(ranks):
        a_t, b_t = torch.randn(in_features, r, generator=gen), torch.randn(r, out_features, generator=gen)
        a_stack[slot, :, :r], b_stack[slot, :r] = a_t, b_t
        slot_weights.append((a_t.to(device, dtype), b_t.to(device, dtype)))
    # Runs of several lengths, one over a tile of 16 rows, base rows (-1) between them, padding rows at the end.
    row_slots = np.array([1] * 3 + [-1] * 2 + [0] * 19 + [2] + [-1] + [1] * 4 + [2] * 2, dtype=np.int64)
    num_rows = len(row_slots) + 3
    x = torch.randn(num_rows, in_features, generator=gen).to(device, dtype)
    y = torch.randn(num_rows, out_features, generator=gen).to(device, dtype)

    step = lora_step(row_slots, num_rows, device, with_tiles=True)
    assert [run[0] for run in step.runs] == [1, 0, 2, 1, 2]
    assert step.tiles[:, 2].tolist() == [3, 16, 3, 1, 4, 2]  # the 19-row run cut into tiles of 16 and 3
    want = y.clone()
    apply_torch(x, want, step, slot_weights)
    got = y.clone()
    apply_triton(x, got, step.device_tiles(), a_stack.to(device, dtype), b_stack.to(device, dtype))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * 10)
    base_rows = torch.from_numpy(np.concatenate([row_slots, [-1] * 3]) < 0).to(device)
    assert torch.equal(got[base_rows], y[base_rows])  # rows of the base model and padding are left alone

    # A CUDA graph's step launches max_tiles tiles, the step's then empty ones: those change nothing.
    padded = np.zeros((max_tiles(num_rows, len(ranks) + 2), 3), np.int32)
    padded[: len(step.tiles)] = step.tiles
    assert len(padded) > len(step.tiles)
    graph_like = y.clone()
    apply_triton(x, graph_like, torch.from_numpy(padded).to(device), *(s.to(device, dtype) for s in (a_stack, b_stack)))
    assert torch.equal(graph_like, got)


def test_no_adapter_rows_is_no_step() -> None:
    assert lora_step(np.array([-1, -1, -1]), 16, torch.device("cpu"), with_tiles=True) is None
