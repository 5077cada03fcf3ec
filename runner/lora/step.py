"""One step's LoRA work: which rows run which adapter slot, and the gathered low-rank update over them.

The base layer stays one GEMM over all the step's rows; the update is added after it, per adapter:

    rows:   | decodes a0 a0 a1 | base ... | prefill a1 a1 a1 a1 | prefill a0 a0 |
    runs:     (0, 0, 2) (1, 2, 3)           (1, 8, 12)            (0, 12, 14)      slot, first row, end row

    y[run] += (x[run] @ A_t[slot]) @ B_t[slot]        (B_t holds the scaling)

The scheduler orders a step's sequences by adapter (decodes first, then prefill chunks), so an adapter's rows
form at most two runs. The torch path loops over the runs: two small GEMMs each, on row slices (no gather). The
Triton path (triton_kernels.py) cuts the runs into tiles of at most TILE_ROWS rows and does the shrink and the
expand of every tile in one launch each, reading each tile's adapter from the stacked slot weights (SGMV).

A decode step replayed from a CUDA graph (runner/cuda_graphs.py) launches a fixed number of tiles, `max_tiles`
of its bucket: the step's tiles first, then empty ones (0 rows), which read no row and write none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TILE_ROWS = 16


def max_tiles(num_rows: int, max_runs: int) -> int:
    """The most tiles `max_runs` runs over `num_rows` rows cut into: each run ends at most one partial tile."""
    return num_rows // TILE_ROWS + max_runs


@dataclass
class LoraStep:
    num_rows: int  # the step's rows, padding included: every adapted layer sees exactly these
    runs: list[tuple[int, int, int]]  # (slot, first row, end row) of the rows that run an adapter
    tiles: np.ndarray | None = None  # [num_tiles, 3] int32: slot, first row, rows (Triton path)
    device: torch.device | None = None
    _device_tiles: torch.Tensor | None = None

    def set_device_tiles(self, tiles: torch.Tensor) -> None:
        """tiles: `tiles` already on the device, [num_tiles * 3] or [num_tiles, 3] int32."""
        self._device_tiles = tiles.view(-1, 3)

    def device_tiles(self) -> torch.Tensor:
        """`tiles` on the device, copied once for all the step's layers (a graph's step gets its static buffer)."""
        if self._device_tiles is None:
            assert self.tiles is not None and self.device is not None, "a step without tiles runs the torch path"
            self._device_tiles = torch.from_numpy(self.tiles).to(self.device, non_blocking=True)
        return self._device_tiles


def lora_step(row_slots: np.ndarray, num_rows_padded: int, device: torch.device, with_tiles: bool) -> LoraStep | None:
    """row_slots: [num_rows] int, each row's adapter slot (-1: the base model). None when no row has an adapter."""
    if not len(row_slots) or row_slots.max() < 0:
        return None
    change = np.flatnonzero(np.diff(row_slots)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(row_slots)]])
    runs = [(int(row_slots[s]), int(s), int(e)) for s, e in zip(starts, ends) if row_slots[s] >= 0]
    tiles = None
    if with_tiles:
        rows = [(slot, s, min(TILE_ROWS, e - s)) for slot, start, e in runs for s in range(start, e, TILE_ROWS)]
        tiles = np.array(rows, dtype=np.int32).reshape(-1, 3)
    return LoraStep(num_rows_padded, runs, tiles, device)


def apply_torch(
    x: torch.Tensor, y: torch.Tensor, step: LoraStep, slot_weights: list[tuple[torch.Tensor, torch.Tensor] | None]
) -> None:
    """y += the update of each run, in place.
    x: [rows, in_features], y: [rows, out_features]; slot_weights[slot]: (a_t [in, rank], b_t [rank, out]) or
    None where the slot's adapter leaves this layer alone."""
    for slot, start, end in step.runs:
        weights = slot_weights[slot]
        if weights is not None:
            a_t, b_t = weights
            y[start:end].addmm_(x[start:end] @ a_t, b_t)
