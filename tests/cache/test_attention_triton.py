"""The Triton kernels against the float64 torch reference.

On a machine without CUDA the kernels run in Triton's CPU interpreter on tiny shapes (CI); with CUDA the same
tests run compiled, on realistic shapes, plus a CUDA-graph capture of the decode path.
"""

import dataclasses
import os
import random

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton reads TRITON_INTERPRET when each @triton.jit runs, that is when the kernel module is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kvbatch.cache import (  # noqa: E402
    attention_torch,
    attention_triton,
)
from kvbatch.cache.block_table import num_blocks_for, slots_for  # noqa: E402
from kvbatch.cache.metadata import PLAIN, AttentionMetadata, LayerAttention, Rotary  # noqa: E402

if not CUDA and not isinstance(attention_triton._write_kv_kernel, InterpretedFunction):
    # Another module imported the kernels before the variable was set: decorate them again, interpreted,
    # the shared tile first, then the kernels that call it, then the module that launches them.
    for _name in (
        "attention_triton_tile",
        "attention_triton_rotary",
        "attention_triton_write",
        "attention_triton_prefill",
        "attention_triton_decode",
        "attention_triton_cascade",
    ):
        importlib.reload(importlib.import_module(f"kvbatch.cache.{_name}"))
    attention_triton = importlib.reload(attention_triton)

DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_step(seqs, *, block_size, num_heads, num_kv_heads, head_dim, dtype, num_decodes, num_pad_rows=0, seed=0):
    """seqs: list of (num_cached, num_new), decodes first. Pages are shuffled; unused slots hold large garbage,
    so a kernel that reads past a sequence's end shows it. The new tokens' K/V go in through the Triton write_kv."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(num_blocks_for(c + n, block_size) for c, n in seqs) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = (30 * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE)
    value_cache = (30 * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE)
    tables, slots, starts, lens, new_k, new_v = [], [], [0], [], [], []
    for num_cached, num_new in seqs:
        total = num_cached + num_new
        blocks = [free.pop() for _ in range(num_blocks_for(total, block_size))]
        k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
        v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
        prefix = torch.tensor(slots_for(blocks, 0, num_cached, block_size), dtype=torch.long, device=DEVICE)
        attention_torch.write_kv(key_cache, value_cache, k[:num_cached], v[:num_cached], prefix)
        tables.append(blocks)
        slots += slots_for(blocks, num_cached, total, block_size)
        starts.append(starts[-1] + num_new)
        lens.append(total)
        new_k.append(k[num_cached:])
        new_v.append(v[num_cached:])
    num_rows = starts[-1] + num_pad_rows
    width = max(map(len, tables)) + 1  # one spare column, as a static-width table would have
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.tensor(slots + [-1] * num_pad_rows, dtype=torch.long, device=DEVICE),
        num_decodes=num_decodes,
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens),
        block_size=block_size,
    )
    pad = torch.randn(num_pad_rows, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    attention_triton.write_kv(
        key_cache, value_cache, torch.cat(new_k + [pad]), torch.cat(new_v + [pad]), meta.slot_mapping
    )
    query = torch.randn(num_rows, num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    return query, key_cache, value_cache, meta


def check(query, key_cache, value_cache, meta, scale=None, layer=PLAIN):
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    got = attention_triton.paged_attention(query, key_cache, value_cache, meta, scale, layer)
    want = attention_torch.paged_attention(query, key_cache, value_cache, meta, scale, layer)
    tol = TOLERANCE[query.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference(dtype):
    block_size, num_kv_heads, head_dim = 4, 3, 8
    key_cache = torch.randn(10, block_size, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    value_cache = torch.randn_like(key_cache)
    # key and value as views of a fused projection: row stride > num_kv_heads * head_dim.
    # Same dtype as the cache, as in the engine (the interpreter rounds fp32 -> bf16 differently from torch).
    kv = torch.randn(6, 2, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.tensor([5, -1, 39, 0, -1, 17], dtype=torch.long, device=DEVICE)
    want_k, want_v = key_cache.clone(), value_cache.clone()
    attention_torch.write_kv(want_k, want_v, key, value, slots)
    attention_triton.write_kv(key_cache, value_cache, key, value, slots)
    assert torch.equal(key_cache, want_k)
    assert torch.equal(value_cache, want_v)


# (block_size, num_heads, num_kv_heads, head_dim): MHA, GQA 2 and 4, a group of 3 (SmolLM2-135M has 9/3).
CPU_SHAPES = [(16, 4, 2, 16), (4, 4, 1, 8), (8, 6, 2, 32), (32, 4, 4, 16)]
CUDA_SHAPES = [(16, 32, 8, 64), (16, 16, 8, 128), (32, 9, 3, 64), (64, 32, 8, 128), (16, 8, 8, 128)]


@pytest.mark.parametrize("shape", CUDA_SHAPES if CUDA else CPU_SHAPES, ids=str)
def test_mixed_step_matches_reference(shape):
    block_size, num_heads, num_kv_heads, head_dim = shape
    if CUDA:
        seqs = [(700, 1), (3000, 1), (0, 1), (31, 1), (0, 517), (1200, 300), (64, 1), (17, 2000)]
        num_decodes = 4
    else:
        seqs = [(37, 1), (2, 1), (0, 1), (0, 19), (21, 9), (5, 1)]
        num_decodes = 3
    step = make_step(
        seqs,
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=torch.float32,
        num_decodes=num_decodes,
        num_pad_rows=3,
        seed=1,
    )
    out = check(*step)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))  # padding rows


@pytest.mark.parametrize("num_pad_rows", [0, 3])
def test_rows_the_host_counts_skip_the_zeroing_only_without_padding(monkeypatch, num_pad_rows):
    """meta.num_query_rows (the rows the sequences own, from the host): with no padding rows the step launches no
    zeroing pass; with padding it still does, and the padding rows come out zero either way."""
    seqs = [(5, 1), (0, 7), (3, 4)]
    query, key_cache, value_cache, meta = make_step(
        seqs, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, num_decodes=1,
        num_pad_rows=num_pad_rows, seed=3,
    )  # fmt: skip
    meta = dataclasses.replace(meta, num_query_rows=12)
    zeroed = []
    zero_rows = attention_triton._zero_padding_rows
    monkeypatch.setattr(attention_triton, "_zero_padding_rows", lambda *a: zeroed.append(1) or zero_rows(*a))
    out = check(query, key_cache, value_cache, meta)
    assert zeroed == ([1] if num_pad_rows else [])
    assert torch.equal(out[12:], torch.zeros_like(out[12:]))


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("mix", ["random", "scoring"])
def test_random_chunk_boundaries(block_size, mix):
    # random: many prefill chunks at random offsets, so chunk starts fall on every position relative to the key
    # tiles (the causal mask is skipped for tiles wholly below a program's first query). scoring: hundreds of
    # chunks of 1-11 tokens after cached prefixes, as a scoring step's continuations, each program finding its
    # chunk among them by its query block (attention_triton_prefill's grid).
    rng = random.Random(block_size)
    if mix == "random":
        limit = 3000 if CUDA else 40
        seqs = [(rng.randrange(limit), 1) for _ in range(3)]
        seqs += [(rng.randrange(limit), rng.randrange(1, limit)) for _ in range(16 if CUDA else 10)]
    else:
        seqs = [(rng.randrange(70), rng.randrange(1, 12)) for _ in range(300 if CUDA else 11)]
    step = make_step(
        seqs,
        block_size=block_size,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64 if CUDA else 16,
        dtype=torch.float32,
        num_decodes=3 if mix == "random" else 0,
        num_pad_rows=2,
        seed=block_size,
    )
    check(*step)


def _layers(num_heads: int) -> dict[str, LayerAttention]:
    sinks = torch.linspace(-2.0, 3.0, num_heads, device=DEVICE)  # [num_heads] float32, some above the scores
    return {
        "softcap": LayerAttention(softcap=1.5),
        "window": LayerAttention(sliding_window=7),
        "window-of-one": LayerAttention(sliding_window=1),
        "sinks": LayerAttention(sinks=sinks),
        "all": LayerAttention(softcap=2.0, sliding_window=12, sinks=sinks),
    }


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("name", list(_layers(1)))
def test_layer_options_match_reference(monkeypatch, name, num_splits):
    # Soft-capping, a window shorter than the prompts and chunks (so chunks start inside, at and past it), and
    # sinks; decodes through one split (DIRECT: the sink in the decode kernel) and several (in the reduce).
    monkeypatch.setattr(attention_triton, "_decode_num_splits", lambda *args: num_splits)
    num_heads = 8 if CUDA else 6
    limit = 2000 if CUDA else 40
    rng = random.Random(num_splits)
    seqs = [(rng.randrange(limit), 1) for _ in range(3)] + [(0, 1)]
    seqs += [(0, 25), (5, 20), (rng.randrange(limit), rng.randrange(1, limit)), (30, 3)]
    step = make_step(
        seqs,
        block_size=4,
        num_heads=num_heads,
        num_kv_heads=2,
        head_dim=64 if CUDA else 16,
        dtype=torch.float32,
        num_decodes=4,
        num_pad_rows=2,
        seed=9,
    )
    out = check(*step, layer=_layers(num_heads)[name])
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    if CUDA:
        seqs, num_decodes, shape = [(4000, 1), (100, 1), (300, 800), (0, 1000)], 2, (16, 32, 8, 128)
    else:
        seqs, num_decodes, shape = [(40, 1), (10, 1), (12, 20)], 2, (8, 4, 2, 16)
    block_size, num_heads, num_kv_heads, head_dim = shape
    step = make_step(
        seqs,
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        num_decodes=num_decodes,
        seed=2,
    )
    out = check(*step)
    assert out.dtype == dtype


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_kv(monkeypatch, num_splits):
    # Contexts shorter than a split's share leave some splits empty; the reduce must ignore them.
    seqs = [(n, 1) for n in ([5000, 33, 1, 2047, 160] if CUDA else [70, 3, 0, 41])]
    monkeypatch.setattr(attention_triton, "_decode_num_splits", lambda *args: num_splits)
    step = make_step(
        seqs,
        block_size=16,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64 if CUDA else 16,
        dtype=torch.float32,
        num_decodes=len(seqs),
        seed=3,
    )
    check(*step)


def test_decode_of_an_empty_context_is_zero():
    # A padded decode slot with seq_len 0 (say, a CUDA-graph bucket's filler) must come out zero, not NaN.
    query, kc, vc, meta = make_step(
        [(9, 1), (3, 1)],
        block_size=4,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        dtype=torch.float32,
        num_decodes=2,
        seed=4,
    )
    meta.seq_lens[1] = 0
    for splits in (1, 4):
        out = torch.full_like(query, float("nan"))
        attention_triton._decode(query, kc, vc, meta, 0.25, out, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


def test_query_with_strided_rows():
    # q sliced out of a fused qkv projection: rows are strided, heads and head_dim are not.
    query, kc, vc, meta = make_step(
        [(12, 1), (0, 7), (5, 6)],
        block_size=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        num_decodes=1,
        seed=5,
    )
    fused = torch.cat([query, torch.randn_like(query)], dim=1)
    check(fused[:, :4], kc, vc, meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128] if CUDA else [16, 24])  # 80, 24: halves not a power of two, masked
def test_rotary_on_load_matches_transformers(dtype, head_dim):
    # Given a Rotary, write_kv rotates each key as it stores it, and paged_attention the queries: decodes (rotated
    # into a new tensor for the decode kernel) and prefill chunks (as each program loads them). The keys in the
    # cache must be transformers' rotation's, the output the attention over transformers' rotated rows.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if CUDA:
        seqs, (block_size, num_heads, num_kv_heads) = (
            [(700, 1), (0, 1), (31, 1), (0, 517), (1200, 300), (17, 9)],
            (16, 32, 8),
        )
    else:
        seqs, (block_size, num_heads, num_kv_heads) = [(9, 1), (0, 1), (0, 13), (5, 6), (2, 3)], (4, 6, 2)
    query, kc, vc, meta = make_step(
        seqs,
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        num_decodes=2,
        num_pad_rows=2,
        seed=11,
    )
    rows = query.shape[0]
    gen = torch.Generator().manual_seed(12)
    key = (2 * torch.randn(rows, num_kv_heads, head_dim, generator=gen)).to(dtype).to(DEVICE)
    value = torch.randn(rows, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    angles = 3 * torch.randn(rows, head_dim // 2, generator=gen)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype).to(DEVICE)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype).to(DEVICE)
    # transformers' layout: [batch, heads, rows, head_dim], cos/sin [batch, rows, head_dim]
    want_q, want_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos[None], sin[None])
    want_q, want_k = want_q[0].transpose(0, 1), want_k[0].transpose(0, 1)
    want_kc, want_vc = kc.clone(), vc.clone()
    attention_torch.write_kv(want_kc, want_vc, want_k, value, meta.slot_mapping)
    scale = head_dim**-0.5
    want = attention_triton.paged_attention(want_q, want_kc, want_vc, meta, scale)

    rotary = Rotary(cos, sin)
    before = query.clone()
    attention_triton.write_kv(kc, vc, key, value, meta.slot_mapping, rotary)
    got = attention_triton.paged_attention(query, kc, vc, meta, scale, rotary=rotary)
    assert torch.equal(query, before)  # the caller's rows are read, never rotated in place
    assert torch.equal(vc, want_vc)
    # fp32: equal to a rounding step (one fused multiply-add); bf16: a rounding step apart at most, the
    # interpreter rounding to bf16 its own way (on a GPU, as torch does); the output then moves by a few steps.
    tol = 2e-6 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(kc.float(), want_kc.float(), rtol=tol, atol=tol * 4)
    tol = 1e-5 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(got[-2:], torch.zeros_like(got[-2:]))
    # Without the rotation the output differs: the test sees it.
    unrotated = attention_torch.paged_attention(query, kc, vc, meta, scale)
    assert not torch.allclose(unrotated.float(), want.float(), atol=0.1)


def test_rotation_is_the_same_bits_in_every_kernel():
    # A token is a prefill row in one step and a decode in another (a preempted sequence recomputes its
    # generated tokens as a prompt chunk): its query must be rotated to the same bits by the prefill kernel as
    # for the decode kernel, and its key by write_kv. fp32, where no rounding separates a product from its sum.
    query, kc, vc, meta = make_step(
        [(9, 1), (3, 1), (0, 13), (5, 6)],
        block_size=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        num_decodes=2,
        seed=13,
    )
    gen = torch.Generator().manual_seed(14)
    angles = 3 * torch.randn(query.shape[0], 8, generator=gen)
    rotary = Rotary(torch.cat([angles.cos()] * 2, -1).to(DEVICE), torch.cat([angles.sin()] * 2, -1).to(DEVICE))
    rotated = attention_triton._rotated_rows(query, rotary)  # as the decode rows are
    got = attention_triton.paged_attention(query, kc, vc, meta, 0.25, rotary=rotary)
    assert torch.equal(got, attention_triton.paged_attention(rotated, kc, vc, meta, 0.25))
    # write_kv's keys: the same rows, as kv heads, into pages of one token each
    keys = query.reshape(-1, 1, 16)
    key_cache = torch.zeros(keys.shape[0], 1, 1, 16, device=DEVICE)
    repeated = Rotary(rotary.cos.repeat_interleave(4, 0), rotary.sin.repeat_interleave(4, 0))
    slots = torch.arange(keys.shape[0], device=DEVICE)
    attention_triton.write_kv(key_cache, torch.zeros_like(key_cache), keys, keys, slots, repeated)
    assert torch.equal(key_cache.reshape(rotated.shape), rotated)


def test_rotary_tables_of_the_wrong_shape_are_refused():
    query, kc, vc, meta = make_step(
        [(3, 2)], block_size=4, num_heads=2, num_kv_heads=1, head_dim=16, dtype=torch.float32, num_decodes=0
    )
    key = torch.zeros(2, 1, 16, device=DEVICE)
    short = Rotary(torch.zeros(1, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE))  # one row for two
    with pytest.raises(ValueError, match=r"rotary tables of \(1, 16\) and \(1, 16\) for 2 rows of head_dim 16"):
        attention_triton.write_kv(kc, vc, key, key, meta.slot_mapping, short)
    with pytest.raises(ValueError, match="for 2 rows of head_dim 16"):
        attention_triton.paged_attention(query, kc, vc, meta, 0.25, rotary=short)
    strided = torch.zeros(2, 32, device=DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="unit last stride"):
        attention_triton.paged_attention(query, kc, vc, meta, 0.25, rotary=Rotary(strided, strided))


def without_host_sync(monkeypatch, run):
    """run() with every read of a tensor's value back to the host made an error (on a GPU: sync debug mode)."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the decode path")

    if CUDA:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    try:
        return run()
    finally:
        monkeypatch.undo()


def test_decode_path_never_syncs(monkeypatch):
    # The engine captures decode in CUDA graphs: nothing may read a tensor's value back to the host.
    query, kc, vc, meta = make_step(
        [(30, 1), (7, 1)],
        block_size=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        num_decodes=2,
        seed=6,
    )
    want = attention_torch.paged_attention(query, kc, vc, meta, 0.25)
    got = without_host_sync(monkeypatch, lambda: attention_triton.paged_attention(query, kc, vc, meta, 0.25))
    torch.testing.assert_close(got, want.float(), rtol=2e-4, atol=2e-4)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU; the CPU run checks the no-sync rule instead")
def test_decode_replays_in_a_cuda_graph():
    seqs = [(n, 1) for n in (100, 2000, 7, 900)]
    query, kc, vc, meta = make_step(
        seqs, block_size=16, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, num_decodes=4, seed=7
    )
    attention_triton.paged_attention(query, kc, vc, meta, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_triton.paged_attention(query, kc, vc, meta, 0.1)
    # New contexts, written into the captured buffers in place, as the engine does between replays.
    meta.seq_lens.copy_(torch.tensor([900, 3, 2000, 100], dtype=torch.int32))
    meta.block_tables.copy_(meta.block_tables.flip(0).clone())  # capacities 912, 16, 2016, 112 tokens
    query.copy_(torch.randn_like(query))
    graph.replay()
    want = attention_torch.paged_attention(query, kc, vc, meta, 0.1)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
