"""The torch paged-attention reference against dense causal attention on unpaged tensors."""

import random

import torch

from kvbatch.cache.attention_torch import paged_attention, write_kv
from kvbatch.cache.block_table import num_blocks_for, slots_for
from kvbatch.cache.metadata import AttentionMetadata


def dense_attention(q, k, v, scale, num_cached):
    # q: [nq, h, d]; k, v: [nk, kvh, d]; query i sits at position num_cached + i
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    qpos = num_cached + torch.arange(q.shape[0])
    mask = torch.arange(k.shape[0])[None, :] <= qpos[:, None]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


def build_step(seqs, block_size, num_blocks, num_kv_heads, head_dim, num_heads, seed):
    """seqs: list of (num_cached, num_new). Returns everything a test needs, with random pages."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = torch.zeros_like(key_cache)
    tables, full_k, full_v, queries, slots, starts, lens = [], [], [], [], [], [0], []
    for num_cached, num_new in seqs:
        total = num_cached + num_new
        blocks = [free.pop() for _ in range(num_blocks_for(total, block_size))]
        k = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        cached = torch.tensor(slots_for(blocks, 0, num_cached, block_size), dtype=torch.long)
        write_kv(key_cache, value_cache, k[:num_cached], v[:num_cached], cached)
        tables.append(blocks)
        full_k.append(k)
        full_v.append(v)
        queries.append(torch.randn(num_new, num_heads, head_dim, generator=gen))
        slots += slots_for(blocks, num_cached, total, block_size)
        starts.append(starts[-1] + num_new)
        lens.append(total)
    width = max(map(len, tables))
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decodes=0,
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens),
        block_size=block_size,
    )
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    return key_cache, value_cache, meta, torch.cat(queries), new_k, new_v, full_k, full_v


def test_paged_matches_dense_for_decodes_and_prefills():
    # decodes first (num_new == 1), then prefill chunks with and without a cached prefix
    seqs = [(5, 1), (17, 1), (0, 1), (0, 9), (12, 7), (3, 20)]
    block_size, num_heads, num_kv_heads, head_dim = 4, 6, 2, 8
    kc, vc, meta, q, nk, nv, fk, fv = build_step(seqs, block_size, 64, num_kv_heads, head_dim, num_heads, seed=1)
    meta.num_decodes = 3
    write_kv(kc, vc, nk, nv, meta.slot_mapping)
    out = paged_attention(q, kc, vc, meta, scale=head_dim**-0.5)
    row = 0
    for (num_cached, num_new), k, v in zip(seqs, fk, fv):
        want = dense_attention(q[row : row + num_new], k, v, head_dim**-0.5, num_cached)
        torch.testing.assert_close(out[row : row + num_new], want, rtol=1e-5, atol=1e-5)
        row += num_new


def test_padding_rows_write_nothing_and_read_zero():
    seqs = [(3, 2)]
    kc, vc, meta, q, nk, nv, _, _ = build_step(seqs, 4, 8, 1, 4, 2, seed=2)
    before = kc.clone()
    q = torch.cat([q, torch.randn(3, 2, 4)])
    slots = torch.cat([meta.slot_mapping, torch.full((3,), -1, dtype=torch.long)])
    meta.slot_mapping = slots
    write_kv(kc, vc, torch.cat([nk, torch.randn(3, 1, 4)]), torch.cat([nv, torch.randn(3, 1, 4)]), slots)
    changed = (kc != before).any(dim=(2, 3)).nonzero().tolist()
    assert len(changed) == 2  # exactly the two real rows' slots
    out = paged_attention(q, kc, vc, meta, scale=0.5)
    assert torch.equal(out[2:], torch.zeros(3, 2, 4))


def test_a_query_gets_the_same_bits_alone_and_in_a_crowd():
    block_size, num_heads, num_kv_heads, head_dim = 4, 4, 2, 16
    crowd = [(9, 1), (40, 1), (2, 1), (0, 13), (21, 30)]
    kc, vc, meta, q, nk, nv, fk, fv = build_step(crowd, block_size, 128, num_kv_heads, head_dim, num_heads, seed=3)
    meta.num_decodes = 3
    write_kv(kc, vc, nk, nv, meta.slot_mapping)
    together = paged_attention(q, kc, vc, meta, scale=0.25)
    # Sequence 1 (a decode) alone, over the same pages.
    alone_meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=meta.seq_lens[1:2],
        block_tables=meta.block_tables[1:2],
        slot_mapping=meta.slot_mapping[1:2],
        num_decodes=1,
        max_query_len=1,
        max_seq_len=int(meta.seq_lens[1]),
        block_size=block_size,
    )
    alone = paged_attention(q[1:2], kc, vc, alone_meta, scale=0.25)
    assert torch.equal(alone, together[1:2])


def test_decode_of_an_empty_context_is_zero():
    """A decode slot with seq_len 0 (a CUDA-graph bucket's filler) comes out zero, as the Triton kernels give,
    and leaves the other decodes' outputs alone; so does a slice of decodes that are all empty."""
    seqs = [(9, 1), (3, 1), (6, 1)]
    kc, vc, meta, q, nk, nv, _, _ = build_step(seqs, 4, 32, 1, 8, 2, seed=5)
    meta.num_decodes = 3
    write_kv(kc, vc, nk, nv, meta.slot_mapping)
    want = paged_attention(q, kc, vc, meta, scale=0.3)
    meta.seq_lens[1] = 0
    got = paged_attention(q, kc, vc, meta, scale=0.3)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    meta.seq_lens[:] = 0
    assert torch.equal(paged_attention(q, kc, vc, meta, scale=0.3), torch.zeros_like(q))
