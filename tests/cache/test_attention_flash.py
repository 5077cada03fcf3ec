"""The flash-attn backend's page-size rule. flash-attn itself is not installed here, so nothing calls into it:
these tests cover only the checks that run before the library is imported."""

import importlib.util

import pytest
import torch

from kvbatch.cache import attention_flash
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
