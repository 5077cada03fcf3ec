"""The KV pages: zeros of the spec's shape per layer; on the CPU, in pages the kernel maps on first touch."""

import sys

import pytest
import torch

from kvbatch.cache.kv_cache import KVCache, KVCacheSpec


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_cpu_pages_are_zero_separate_and_writable() -> None:
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    kv = KVCache(spec, 5, "cpu")
    pages = kv.key + kv.value
    assert len(pages) == 6 and all(p.shape == (5, 4, 2, 8) and p.dtype == torch.float32 for p in pages)
    assert all(not p.any() for p in pages)
    kv.key[1][2, 3] = 1.5  # one layer's write lands in that layer's key pages only
    assert [int(p.count_nonzero()) for p in pages] == [0, 16, 0, 0, 0, 0]
    assert kv.num_bytes == 5 * spec.bytes_per_block == sum(p.numel() * 4 for p in pages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_cpu_pool_costs_only_the_pages_written() -> None:
    spec = KVCacheSpec(num_layers=4, num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.float32)
    before = resident_bytes()
    kv = KVCache(spec, 2**30 // spec.bytes_per_block, "cpu")  # a 1 GiB pool
    assert resident_bytes() - before < 64 * 2**20
    kv.value[0][:100].fill_(1.0)  # 100 blocks of one layer: 1.6 MiB
    assert resident_bytes() - before < 64 * 2**20
    assert float(kv.value[0][:100].sum()) == 100 * 16 * 4 * 64
