"""The CPU backend's float32 prompt path: close to the float64 reference, and each row the same bits whatever chunk,
neighbours or padding it is computed with (what batch invariance and exact recomputation rest on)."""

import random

import pytest
import torch

from kvbatch.cache import attention_cpu, attention_torch
from kvbatch.cache.metadata import AttentionMetadata, LayerAttention

BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 6, 2, 16
NUM_TOKENS, NUM_PROMPT = 700, 650  # rows from 650 on are generated tokens


@pytest.fixture(scope="module")
def caches():
    """One sequence's K/V for NUM_TOKENS positions in shuffled pages (float64, as the engine keeps them on the
    CPU), its block table, and a query per position."""
    gen = torch.Generator().manual_seed(0)
    num_blocks = NUM_TOKENS // BLOCK_SIZE + 8
    pages = list(range(num_blocks))
    random.Random(0).shuffle(pages)
    table = pages[: -(-NUM_TOKENS // BLOCK_SIZE)]
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = (3 * torch.randn(shape, generator=gen)).float().double()
    value_cache = torch.randn(shape, generator=gen).float().double()
    query = torch.randn(NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=gen)
    return key_cache, value_cache, table, query


def step(caches, chunks: list[tuple[int, int]], prompt: int = NUM_PROMPT):
    """One step holding the sequence's rows [a, b) for each (a, b) in chunks, each as its own sequence (the same
    pages), plus two padding rows. Returns (query, meta, rows): rows[i] the step's rows of chunk i."""
    _, _, table, query = caches
    starts, rows, parts = [0], [], []
    for a, b in chunks:
        rows.append(range(starts[-1], starts[-1] + b - a))
        parts.append(query[a:b])
        starts.append(starts[-1] + b - a)
    parts.append(torch.randn(2, NUM_HEADS, HEAD_DIM))
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([b for _, b in chunks], dtype=torch.int32),
        block_tables=torch.tensor([table] * len(chunks), dtype=torch.int32),
        slot_mapping=torch.full((starts[-1] + 2,), -1, dtype=torch.long),
        num_decodes=0,
        max_query_len=max(b - a for a, b in chunks),
        max_seq_len=max(b for _, b in chunks),
        block_size=BLOCK_SIZE,
        num_prompt_tokens=torch.tensor([prompt] * len(chunks), dtype=torch.int32),
    )
    return torch.cat(parts), meta, rows


def attend(caches, chunks, layer=LayerAttention(), prompt=NUM_PROMPT):
    key_cache, value_cache, _, _ = caches
    query, meta, rows = step(caches, chunks, prompt)
    out = attention_cpu.paged_attention(query, key_cache, value_cache, meta, 0.25, layer)
    want = attention_torch.paged_attention(query, key_cache, value_cache, meta, 0.25, layer)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    return {pos: out[row] for (a, _), chunk_rows in zip(chunks, rows) for pos, row in zip(range(a, 10**9), chunk_rows)}


@pytest.mark.parametrize("layer", [LayerAttention(), LayerAttention(sliding_window=37)], ids=["global", "local"])
def test_a_row_has_the_same_bits_in_any_chunk(caches, layer) -> None:
    whole = attend(caches, [(0, NUM_TOKENS)], layer)
    rng = random.Random(1)
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, NUM_TOKENS), 5))
        bounds = [0, *cuts, NUM_TOKENS]
        chunks = list(zip(bounds[:-1], bounds[1:]))
        rng.shuffle(chunks)  # other neighbours, other row offsets in the step
        pieces = attend(caches, chunks, layer)
        for pos in range(NUM_TOKENS):
            assert torch.equal(pieces[pos], whole[pos]), f"position {pos} differs with chunks {chunks}"


def test_generated_rows_keep_the_references_bits(caches) -> None:
    # Rows past the prompt are tokens a decode computed first; recomputed, they must come back bit for bit.
    key_cache, value_cache, _, _ = caches
    query, meta, rows = step(caches, [(600, NUM_TOKENS)])
    out = attention_cpu.paged_attention(query, key_cache, value_cache, meta, 0.25)
    want = attention_torch.paged_attention(query, key_cache, value_cache, meta, 0.25)
    generated = slice(NUM_PROMPT - 600, NUM_TOKENS - 600)
    assert torch.equal(out[generated], want[generated])
    assert not torch.equal(out[: NUM_PROMPT - 600], want[: NUM_PROMPT - 600])  # the prompt rows took float32


def test_softcap_and_sinks_run_the_reference(caches) -> None:
    key_cache, value_cache, _, _ = caches
    query, meta, _ = step(caches, [(100, 300)])
    layer = LayerAttention(softcap=2.0, sinks=torch.zeros(NUM_HEADS))
    out = attention_cpu.paged_attention(query, key_cache, value_cache, meta, 0.25, layer)
    assert torch.equal(out, attention_torch.paged_attention(query, key_cache, value_cache, meta, 0.25, layer))
