"""How many KV blocks fit: memory -> blocks -> tokens.

    bytes_per_block = 2 (K and V) * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes

    CPU:  num_blocks = floor(kv_cache_gib * 2**30 / bytes_per_block)
    GPU:  num_blocks = floor((gpu_memory_utilization * total_bytes - peak_bytes_after_profile) / bytes_per_block)

where peak_bytes_after_profile is the allocator's peak after loading the weights and running one
forward pass at the largest step (max_num_batched_tokens), so activations are already counted.
A pool is reported both ways: num_blocks and num_blocks * block_size tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kv_cache import KVCacheSpec

GIB = 2**30


@dataclass(frozen=True)
class PoolSize:
    num_blocks: int
    block_size: int
    num_bytes: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return f"{self.num_blocks} blocks of {self.block_size} tokens = {self.num_tokens} tokens, {self.num_bytes / GIB:.2f} GiB"


def blocks_from_bytes(spec: KVCacheSpec, num_bytes: int) -> PoolSize:
    """The whole blocks `num_bytes` holds; none (num_blocks 0) is a value, for the caller to report."""
    num_blocks = max(0, int(num_bytes // spec.bytes_per_block))
    return PoolSize(num_blocks, spec.block_size, num_blocks * spec.bytes_per_block)


def gpu_kv_bytes(total_bytes: int, peak_bytes: int, gpu_memory_utilization: float) -> int:
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    # What is left for KV pages; zero or less is a value, for the caller to report with these numbers.
    return int(total_bytes * gpu_memory_utilization) - peak_bytes
