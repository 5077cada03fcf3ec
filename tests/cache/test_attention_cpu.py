"""The CPU backend's float32 attention: close to the float64 reference, and each row the same bits whatever chunk,
neighbours, padding or thread it is computed with (what batch invariance and exact recomputation rest on)."""

import random

import pytest
import torch

from kvbatch.cache import attention_cpu, attention_torch
from kvbatch.cache.metadata import AttentionMetadata, LayerAttention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 16
NUM_TOKENS, NUM_PROMPT = 700, 650  # rows from 650 on are generated tokens


# 4 divides every key range the backend gathers, which it then gathers as whole pages; 48 divides none of them
# (32-key widths, 64-token blocks), which it gathers slot by slot.
@pytest.fixture(scope="module", params=[4, 48], ids=["pages", "slots"])
def caches(request):
    """One sequence's K/V for NUM_TOKENS positions in shuffled pages of `request.param` tokens (float32, as the
    CPU backend keeps them), its block table, and a query per position."""
    block_size = request.param
    gen = torch.Generator().manual_seed(0)
    num_blocks = NUM_TOKENS // block_size + 8
    pages = list(range(num_blocks))
    random.Random(0).shuffle(pages)
    table = pages[: -(-NUM_TOKENS // block_size)]
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_cache = 3 * torch.randn(shape, generator=gen)
    value_cache = torch.randn(shape, generator=gen)
    query = torch.randn(NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=gen)
    return key_cache, value_cache, table, query


def step(caches, chunks: list[tuple[int, int]], prompt: int = NUM_PROMPT):
    """One step holding the sequence's rows [a, b) for each (a, b) in chunks, each as its own sequence (the same
    pages), plus two padding rows; chunks of one row come first, as decodes. Returns (query, meta, rows): rows[i]
    the step's rows of chunk i."""
    key_cache, _, table, query = caches
    chunks = sorted(chunks, key=lambda c: c[1] - c[0] != 1)  # stable: the decodes first, in their given order
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
        num_decodes=sum(b - a == 1 for a, b in chunks),
        max_query_len=max(b - a for a, b in chunks),
        max_seq_len=max(b for _, b in chunks),
        block_size=key_cache.shape[1],
        num_prompt_tokens=torch.tensor([prompt] * len(chunks), dtype=torch.int32),
    )
    return torch.cat(parts), meta, rows


LAYERS = [LayerAttention(), LayerAttention(sliding_window=37)]


@pytest.fixture(autouse=True)
def two_threads():
    """Two threads at least (the CPU machines' count), where the flash kernel's second thread runs its own slices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def attend(caches, chunks, layer=LayerAttention(), prompt=NUM_PROMPT):
    """{position: output row} of one step, checked against the float64 reference."""
    key_cache, value_cache, _, _ = caches
    query, meta, rows = step(caches, chunks, prompt)
    out = attention_cpu.paged_attention(query, key_cache, value_cache, meta, 0.25, layer)
    want = attention_torch.paged_attention(query, key_cache, value_cache, meta, 0.25, layer)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    chunks = sorted(chunks, key=lambda c: c[1] - c[0] != 1)
    return {pos: out[row] for (a, _), chunk_rows in zip(chunks, rows) for pos, row in zip(range(a, 10**9), chunk_rows)}


@pytest.mark.parametrize("short_prompt", [attention_cpu.SHORT_PROMPT, 100], ids=["short-blocks", "long-blocks"])
@pytest.mark.parametrize("layer", LAYERS, ids=["global", "local"])
def test_a_row_has_the_same_bits_in_any_chunk(caches, layer, short_prompt, monkeypatch) -> None:
    # A prompt longer than SHORT_PROMPT takes QUERY_BLOCK-token blocks: lowered, these 650 tokens take them too.
    monkeypatch.setattr(attention_cpu, "SHORT_PROMPT", short_prompt)
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


@pytest.mark.parametrize("layer", LAYERS, ids=["global", "local"])
def test_a_decode_has_the_same_bits_in_any_crowd(caches, layer) -> None:
    """Generated positions as decodes, alone and in shuffled crowds of other decodes and chunks (so on either of
    the flash kernel's threads, and in groups of other sizes), and recomputed inside a chunk: the same bits."""
    positions = list(range(NUM_PROMPT, NUM_TOKENS))
    alone = {pos: attend(caches, [(pos, pos + 1)], layer)[pos] for pos in positions}
    rng = random.Random(2)
    for _ in range(4):
        crowd = rng.sample(positions, rng.randrange(2, len(positions)))
        chunks = [(p, p + 1) for p in crowd] + [(rng.randrange(0, 300), rng.randrange(300, NUM_TOKENS))]
        rng.shuffle(chunks)
        rows = attend(caches, chunks, layer)
        for pos in crowd:
            assert torch.equal(rows[pos], alone[pos]), f"decode at {pos} differs in a crowd of {len(crowd)}"
    # A preempted sequence recomputes its generated tokens in a prefill chunk: they must come back bit for bit.
    recomputed = attend(caches, [(600, NUM_TOKENS)], layer)
    for pos in positions:
        assert torch.equal(recomputed[pos], alone[pos]), f"recomputed row {pos} differs"


@pytest.mark.parametrize("layer", LAYERS, ids=["global", "local"])
def test_a_row_has_the_same_bits_in_any_part_of_its_call(caches, layer, monkeypatch) -> None:
    """A call's rows are gathered and attended a few at a time (GATHER_BYTES): one row a part, the same bits as
    the whole call in one part."""
    chunks = [(p, p + 1) for p in range(NUM_PROMPT, NUM_TOKENS, 3)] + [(0, 300), (300, NUM_PROMPT)]
    whole = attend(caches, chunks, layer)
    monkeypatch.setattr(attention_cpu, "GATHER_BYTES", 1)
    parts = attend(caches, chunks, layer)
    for pos, row in whole.items():
        assert torch.equal(parts[pos], row), f"position {pos} differs when its call is split"


def test_softcap_and_sinks_run_the_reference(caches) -> None:
    key_cache, value_cache, _, _ = caches
    query, meta, _ = step(caches, [(650, 651), (100, 300)])
    layer = LayerAttention(softcap=2.0, sinks=torch.zeros(NUM_HEADS))
    out = attention_cpu.paged_attention(query, key_cache, value_cache, meta, 0.25, layer)
    assert torch.equal(out, attention_torch.paged_attention(query, key_cache, value_cache, meta, 0.25, layer))


def test_a_prompt_token_alone_in_its_chunk_is_a_prompt_row(caches) -> None:
    # With the rest of the prompt cached, its last token is a one-row chunk among the decodes: still a prompt row.
    whole = attend(caches, [(0, NUM_TOKENS)])
    rows = attend(caches, [(NUM_PROMPT - 1, NUM_PROMPT), (10, 11), (NUM_PROMPT, NUM_PROMPT + 1), (300, 500)])
    for pos in (NUM_PROMPT - 1, 10, NUM_PROMPT, *range(300, 500)):
        assert torch.equal(rows[pos], whole[pos]), f"position {pos}"


@pytest.mark.parametrize("layer", LAYERS, ids=["global", "local"])
def test_one_row_sequences_on_one_table_share_their_query_blocks(caches, layer) -> None:
    """The last layer's kept rows come as one-row sequences of one block table (fused_forward._kept_rows_meta):
    rows of one 64-token block share its call, as in their chunk, with the chunk's bits."""
    whole = attend(caches, [(0, NUM_TOKENS)], layer)
    positions = list(range(0, NUM_PROMPT, 5))
    rows = attend(caches, [(p, p + 1) for p in positions], layer)
    for pos in positions:
        assert torch.equal(rows[pos], whole[pos]), f"position {pos}"
    _, meta, _ = step(caches, [(p, p + 1) for p in positions])
    (blocks,) = attention_cpu._plan(meta, layer.sliding_window, NUM_HEADS // NUM_KV_HEADS).prompt_blocks
    assert blocks.num_blocks == len({p // blocks.q_block for p in positions}) < len(positions)
