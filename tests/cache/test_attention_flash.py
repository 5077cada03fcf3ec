"""The flash-attn backend: its page-size rule, and its calls against the torch reference.

flash-attn is installed on none of the project's machines, so the calls run against `flash_attn_double`, a
float64 stand-in written from the library's documented contract (shapes, the bottom-right causal mask, and the
checks its C++ makes). That tests what kvbatch passes (lengths, block tables, row offsets, padding rows), not
the library's kernels.
"""

import importlib.util
import random
import sys

import flash_attn_double
import pytest
import torch

from kvbatch.cache import attention_flash, attention_torch
from kvbatch.cache.block_table import num_blocks_for, slots_for
from kvbatch.cache.metadata import AttentionMetadata


def _meta(block_size: int) -> AttentionMetadata:
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([5], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        slot_mapping=torch.tensor([4]),
        num_decodes=1,
        max_query_len=1,
        max_seq_len=5,
        block_size=block_size,
    )


def test_page_size_rule():
    assert attention_flash.supports_block_size(256)
    assert attention_flash.supports_block_size(512)
    assert not attention_flash.supports_block_size(16)
    assert not attention_flash.supports_block_size(128)


def test_small_pages_raise_before_flash_attn_is_needed():
    cache = torch.zeros(1, 16, 1, 8)
    with pytest.raises(ValueError, match="block_size is 16"):
        attention_flash.paged_attention(torch.zeros(1, 1, 8), cache, cache, _meta(16), 1.0)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_missing_package_is_named():
    cache = torch.zeros(1, 256, 1, 8)
    with pytest.raises(ImportError, match="flash_attn"):
        attention_flash.paged_attention(torch.zeros(1, 1, 8), cache, cache, _meta(256), 1.0)


PAGE = 256  # the smallest page flash-attn reads


@pytest.fixture
def flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_double)


def _step(seqs, num_decodes, num_pad_rows=0, num_heads=4, num_kv_heads=2, head_dim=16, seed=0):
    """seqs: (num_cached, num_new) each, decodes first. Shuffled pages; unused slots hold large values, so reading
    past a sequence's end shows. bf16, flash-attn's dtype."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(num_blocks_for(c + n, PAGE) for c, n in seqs) + 2
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    shape = (num_blocks, PAGE, num_kv_heads, head_dim)
    key_cache = (30 * torch.randn(shape, generator=gen)).bfloat16()
    value_cache = (30 * torch.randn(shape, generator=gen)).bfloat16()
    tables, slots, starts, lens = [], [], [0], []
    for num_cached, num_new in seqs:
        total = num_cached + num_new
        blocks = [free.pop() for _ in range(num_blocks_for(total, PAGE))]
        kv = torch.randn(2, total, num_kv_heads, head_dim, generator=gen).bfloat16()
        attention_torch.write_kv(key_cache, value_cache, kv[0], kv[1], torch.tensor(slots_for(blocks, 0, total, PAGE)))
        tables.append(blocks)
        slots += slots_for(blocks, num_cached, total, PAGE)
        starts.append(starts[-1] + num_new)
        lens.append(total)
    width = max(map(len, tables)) + 1
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots + [-1] * num_pad_rows),
        num_decodes=num_decodes,
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens),
        block_size=PAGE,
    )
    query = torch.randn(starts[-1] + num_pad_rows, num_heads, head_dim, generator=gen).bfloat16()
    return query, key_cache, value_cache, meta


STEPS = {
    # decodes whose context ends on, just past and well past a page boundary
    "decodes": ([(255, 1), (256, 1), (300, 1), (700, 1)], 4, 0),
    # fresh prompts, one longer than a page
    "prefills": ([(0, 40), (0, 300), (0, 1)], 0, 0),
    # decodes, chunks with a cached prefix (the causal mask's bottom-right alignment), a fresh prompt, padding
    "mixed": ([(10, 1), (511, 1), (250, 30), (512, 100), (0, 17)], 2, 5),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_backend_matches_the_torch_reference(flash_attn, name):
    seqs, num_decodes, num_pad = STEPS[name]
    query, key_cache, value_cache, meta = _step(seqs, num_decodes, num_pad)
    scale = 0.3
    got = attention_flash.paged_attention(query, key_cache, value_cache, meta, scale)
    want = attention_torch.paged_attention(query, key_cache, value_cache, meta, scale)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    rows = int(meta.query_start_loc[-1])
    assert torch.equal(got[rows:], torch.zeros_like(got[rows:]))  # padding rows: zeros, not the kernel's garbage
    # Not vacuous: the pages' garbage and the causal mask both change the answer beyond the tolerance.
    unmasked = attention_torch.paged_attention(query, key_cache, value_cache, _shifted(meta), scale)
    assert (unmasked[:rows] - want[:rows]).abs().max() > 0.1


def _shifted(meta: AttentionMetadata) -> AttentionMetadata:
    """Every sequence one key longer: its last query then sees a key it must not (the next slot's garbage)."""
    return AttentionMetadata(
        meta.query_start_loc,
        meta.seq_lens + 1,
        meta.block_tables,
        meta.slot_mapping,
        meta.num_decodes,
        meta.max_query_len,
        meta.max_seq_len + 1,
        meta.block_size,
    )


def test_the_double_refuses_what_flash_attn_refuses(flash_attn):
    query, key_cache, value_cache, meta = _step([(20, 1)], 1)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        attention_flash.paged_attention(query.float(), key_cache.float(), value_cache.float(), meta, 1.0)
    bad = AttentionMetadata(
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables.long(),
        meta.slot_mapping,
        meta.num_decodes,
        meta.max_query_len,
        meta.max_seq_len,
        meta.block_size,
    )
    with pytest.raises(RuntimeError, match="block_table must have dtype torch.int32"):
        attention_flash.paged_attention(query, key_cache, value_cache, bad, 1.0)
