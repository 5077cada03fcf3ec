"""The preallocated KV pages: one key and one value tensor per layer.

Layout per layer: [num_blocks, block_size, num_kv_heads, head_dim], the layout flash-attn's
paged kernels read, so every backend shares one store.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """K and V for block_size tokens across all layers."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # Zeros, not empty: a masked read of a never-written slot must not meet NaN (0 * NaN = NaN).
        if torch.device(device).type == "cpu":
            pages = _zero_pages(2 * spec.num_layers, shape, spec.dtype)
            self.key, self.value = pages[0::2], pages[1::2]
        else:
            self.key = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
            self.value = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block


def _zero_pages(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """`count` zero tensors of `shape` in one anonymous memory map. The kernel hands such pages out zeroed on
    first touch, so a pool costs only the pages a job writes or reads: torch.zeros would write all of them first
    (0.47 s for 2 GiB on a 2-core x86-64 CPU) and keep them all resident."""
    per_tensor = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    whole = torch.frombuffer(mmap.mmap(-1, max(count * per_tensor, 1)), dtype=torch.uint8)
    return [whole[i * per_tensor : (i + 1) * per_tensor].view(dtype).view(shape) for i in range(count)]
