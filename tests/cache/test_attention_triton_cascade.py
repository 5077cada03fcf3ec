"""The shared-prefix ("cascade") Triton decode against the float64 torch reference.

make_step gives every sequence pages of its own with different K/V. share_prefix then points every decode's
first k table entries at decode 0's pages, as the prefix cache hands them out: the reference on those tables
is the answer. The cascade reads keys [0, L) through block_tables row 0 only, so it must give that same
answer from the *unshared* tables too; a decode that read its own first k pages, or a cascade that did not
run, would show the other sequences' prefix K/V (checked to differ clearly: no test passes vacuously).
"""

import copy
import random

import pytest
import torch
from test_attention_triton import (
    CUDA,
    DEVICE,
    TOLERANCE,
    attention_torch,
    attention_triton,
    make_step,
    without_host_sync,
)

from kvbatch.cache.metadata import PLAIN, LayerAttention

# (block_size, num_heads, num_kv_heads, head_dim): GQA groups 2, 1, 4 and 3 (SmolLM2-135M has 9/3).
CPU_SHAPES = [(8, 4, 2, 16), (4, 2, 2, 16), (16, 8, 2, 16), (8, 6, 2, 32)]
CUDA_SHAPES = [(16, 32, 8, 64), (16, 32, 8, 128), (16, 16, 16, 64), (32, 9, 3, 64), (16, 16, 2, 128)]


@pytest.fixture
def nan_buffers(monkeypatch):
    """Fresh float buffers (the split partials) start as NaN: a slot the reduce reads unwritten shows."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


def decode_seqs(num_decodes, prefix_len, max_own, seed):
    # Each decode: the shared prefix, 0..max_own-1 cached tokens of its own, then its new token.
    rng = random.Random(seed)
    return [(prefix_len + rng.randrange(max_own), 1) for _ in range(num_decodes)]


def share_prefix(meta, num_blocks):
    """(unshared, shared): copies of meta with L = num_blocks pages set; in `shared` every decode's first
    num_blocks table entries name decode 0's pages."""
    prefix_len = torch.tensor([num_blocks * meta.block_size], dtype=torch.int32, device=DEVICE)
    unshared = copy.copy(meta)
    unshared.shared_prefix_len = prefix_len
    shared = copy.copy(unshared)
    shared.block_tables = meta.block_tables.clone()
    nd = meta.num_decodes
    shared.block_tables[:nd, :num_blocks] = meta.block_tables[0, :num_blocks]
    assert num_blocks * meta.block_size <= int(meta.seq_lens[:nd].min()) - 1  # the contract of shared_prefix_len
    return unshared, shared


def check_cascade(query, kc, vc, meta, num_blocks, scale=None, layer=PLAIN):
    """The cascade, on shared and on unshared tables, equals the reference on the shared ones."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    unshared, shared = share_prefix(meta, num_blocks)
    want = attention_torch.paged_attention(query, kc, vc, shared, scale, layer).float()
    tol = TOLERANCE[query.dtype]
    worst = 0.0
    for tables in (shared, unshared):
        got = attention_triton.paged_attention(query, kc, vc, tables, scale, layer)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        worst = max(worst, float((got.float() - want).abs().max()))
    if num_blocks:
        # Measured against the kernel's own error, not the dtype's tolerance: over 2,000 shared keys a bf16
        # decode differs from its unshared twin by ~0.1, under the bf16 tolerance but 100x the kernel's error.
        own = attention_torch.paged_attention(query, kc, vc, unshared, scale, layer).float()
        nd = meta.num_decodes
        gap = float((own[1:nd] - want[1:nd]).abs().max())
        assert gap > 20 * max(worst, 1e-5), (
            f"the shared pages change the decodes by only {gap} (error {worst}): the test proves nothing"
        )
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES if CUDA else CPU_SHAPES, ids=str)
def test_cascade_matches_reference(shape, dtype):
    block_size, num_heads, num_kv_heads, head_dim = shape
    if CUDA:
        num_blocks, num_decodes, max_own = 2000 // block_size, 300, 300
    else:
        num_blocks, num_decodes, max_own = 3, 7, 2 * block_size + 3
    seqs = decode_seqs(num_decodes, num_blocks * block_size, max_own, seed=10)
    step = make_step(
        seqs,
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        num_decodes=num_decodes,
        seed=11,
    )
    out = check_cascade(*step, num_blocks)
    assert out.dtype == dtype


@pytest.mark.parametrize("num_splits,prefix_splits", [(1, 1), (1, 4), (3, 2), (2, 5)])
def test_cascade_with_splits(monkeypatch, nan_buffers, num_splits, prefix_splits):
    # More prefix splits than prefix tiles leave some empty (lse -inf); the reduce must ignore them.
    monkeypatch.setattr(attention_triton, "_decode_num_splits", lambda *args: num_splits)
    monkeypatch.setattr(attention_triton, "_cascade_num_splits", lambda *args: prefix_splits)
    block_size = 16 if CUDA else 8
    num_blocks = 120 if CUDA else 4
    seqs = decode_seqs(40 if CUDA else 5, num_blocks * block_size, 500 if CUDA else 40, seed=12)
    step = make_step(
        seqs,
        block_size=block_size,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64 if CUDA else 16,
        dtype=torch.float32,
        num_decodes=len(seqs),
        seed=13,
    )
    check_cascade(*step, num_blocks)


@pytest.mark.parametrize("num_splits,prefix_splits", [(1, 2), (3, 1)])
def test_cascade_with_softcap_and_sinks(monkeypatch, nan_buffers, num_splits, prefix_splits):
    # The shared prefix's scores are capped like the rest, and the sink joins the merged softmax once.
    monkeypatch.setattr(attention_triton, "_decode_num_splits", lambda *args: num_splits)
    monkeypatch.setattr(attention_triton, "_cascade_num_splits", lambda *args: prefix_splits)
    seqs = decode_seqs(5, 4 * 8, 40, seed=14)
    step = make_step(
        seqs, block_size=8, num_heads=8, num_kv_heads=2, head_dim=16, dtype=torch.float32, num_decodes=5, seed=15
    )
    layer = LayerAttention(softcap=2.0, sinks=torch.linspace(-1.0, 2.0, 8, device=DEVICE))
    check_cascade(*step, 4, layer=layer)


def test_a_local_layer_ignores_the_shared_prefix(nan_buffers):
    # A sliding-window layer reads only its window: the shared prefix (mostly outside it) must not be attended.
    seqs = decode_seqs(4, 4 * 8, 20, seed=16)
    query, kc, vc, meta = make_step(
        seqs, block_size=8, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, num_decodes=4, seed=17
    )
    unshared, _ = share_prefix(meta, 4)
    layer = LayerAttention(sliding_window=10)
    want = attention_torch.paged_attention(query, kc, vc, meta, 0.25, layer)
    got = attention_triton.paged_attention(query, kc, vc, unshared, 0.25, layer)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_zero_prefix_len_reads_nothing_shared(nan_buffers):
    # L = 0 with the tensor set: every key comes from the decode's own pages, as without the cascade.
    seqs = decode_seqs(5, 0, 30, seed=14)
    query, kc, vc, meta = make_step(
        seqs, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, num_decodes=5, seed=15
    )
    unshared, _ = share_prefix(meta, 0)
    want = attention_torch.paged_attention(query, kc, vc, meta, 0.25).float()
    for splits in (1, 3):
        out = torch.full_like(query, float("nan"))
        attention_triton._decode(query, kc, vc, unshared, 0.25, out, prefix_splits=splits)
        torch.testing.assert_close(out, want, rtol=2e-4, atol=2e-4)


def test_mixed_step_with_cascade():
    # Decodes sharing a prefix, then prefill chunks (with their own tables) and padding rows.
    block_size, num_blocks = (16, 100) if CUDA else (4, 5)
    prefix_len = num_blocks * block_size
    seqs = decode_seqs(6, prefix_len, 3 * block_size, seed=16)
    seqs += [(prefix_len, 9), (0, 3 * block_size + 1), (7, 5)]
    step = make_step(
        seqs,
        block_size=block_size,
        num_heads=6,
        num_kv_heads=2,
        head_dim=64 if CUDA else 16,
        dtype=torch.float32,
        num_decodes=6,
        num_pad_rows=2,
        seed=17,
    )
    out = check_cascade(*step, num_blocks)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))  # padding rows


def test_filler_decode_past_the_prefix_is_zero():
    # A CUDA-graph bucket's filler decode (seq_len 0, a stale table row) must come out zero, not NaN, and
    # must not take the shared prefix.
    query, kc, vc, meta = make_step(
        decode_seqs(3, 8, 5, seed=18),
        block_size=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        num_decodes=3,
        seed=19,
    )
    _, shared = share_prefix(meta, 2)
    shared.seq_lens = meta.seq_lens.clone()
    shared.seq_lens[2] = 0
    want = attention_torch.paged_attention(query, kc, vc, shared, 0.25).float()  # NaN for the filler
    for splits in (1, 2):
        out = torch.full_like(query, float("nan"))
        attention_triton._decode(query, kc, vc, shared, 0.25, out, prefix_splits=splits)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        torch.testing.assert_close(out[:2], want[:2], rtol=2e-4, atol=2e-4)


def test_cascade_never_syncs(monkeypatch):
    query, kc, vc, meta = make_step(
        decode_seqs(4, 16, 9, seed=20),
        block_size=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        num_decodes=4,
        seed=21,
    )
    _, shared = share_prefix(meta, 2)
    want = attention_torch.paged_attention(query, kc, vc, shared, 0.25)
    got = without_host_sync(monkeypatch, lambda: attention_triton.paged_attention(query, kc, vc, shared, 0.25))
    torch.testing.assert_close(got, want.float(), rtol=2e-4, atol=2e-4)


def test_prefix_len_must_be_one_int32_on_the_device():
    query, kc, vc, meta = make_step(
        [(9, 1)], block_size=4, num_heads=2, num_kv_heads=1, head_dim=16, dtype=torch.float32, num_decodes=1, seed=22
    )
    meta.shared_prefix_len = torch.tensor([8], dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="one-element int32"):
        attention_triton.paged_attention(query, kc, vc, meta, 0.25)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU; the CPU run checks the no-sync rule instead")
def test_cascade_replays_in_a_cuda_graph():
    # Captured once, replayed with new contexts and a new L (0 included), as the engine does between steps.
    seqs = decode_seqs(64, 1024, 300, seed=23)
    query, kc, vc, meta = make_step(
        seqs, block_size=16, num_heads=32, num_kv_heads=8, head_dim=64, dtype=torch.bfloat16, num_decodes=64, seed=24
    )
    own_tables, own_lens = meta.block_tables.clone(), meta.seq_lens.clone()
    _, meta = share_prefix(meta, 64)
    attention_triton.paged_attention(query, kc, vc, meta, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_triton.paged_attention(query, kc, vc, meta, 0.1)
    for shift, num_blocks in ((1, 32), (2, 0), (3, 64)):
        tables = own_tables.roll(shift, 0)  # another decode 0, so other shared pages
        tables[:, :num_blocks] = tables[0, :num_blocks].clone()
        meta.block_tables.copy_(tables)
        meta.seq_lens.copy_(own_lens.roll(shift, 0))
        meta.shared_prefix_len.fill_(num_blocks * 16)
        query.copy_(torch.randn_like(query))
        graph.replay()
        want = attention_torch.paged_attention(query, kc, vc, meta, 0.1)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="the interpreter compiles nothing")
def test_warm_up_compiles_every_cascade_variant():
    # A compile mid-run costs about a second: after warm_up no batch size, split count or L may add one.
    query, kc, vc, meta = make_step(
        decode_seqs(3, 32, 20, seed=25),
        block_size=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        dtype=torch.bfloat16,
        num_decodes=3,
        seed=26,
    )
    attention_triton.warm_up(kc, vc, 32, torch.bfloat16)
    kernels = (attention_triton._decode_kernel, attention_triton._cascade_kernel, attention_triton._reduce_kernel)
    device = torch.cuda.current_device()

    def num_compiled(kernel):  # Triton >= 3.2 keeps (kernel cache, ...) per device; older ones a dict
        caches = getattr(kernel, "device_caches", None)
        return len(caches[device][0]) if caches is not None else len(kernel.cache[device])

    compiled = [num_compiled(kernel) for kernel in kernels]
    for num_decodes, num_blocks in ((1, 1), (2, 2), (3, 0), (3, 2)):
        step = copy.copy(meta)
        step.seq_lens, step.block_tables = meta.seq_lens[:num_decodes], meta.block_tables[:num_decodes]
        step.query_start_loc, step.num_decodes = meta.query_start_loc[: num_decodes + 1], num_decodes
        _, shared = share_prefix(step, num_blocks)
        attention_triton.paged_attention(query[:num_decodes], kc, vc, shared, 0.1)
    assert [num_compiled(kernel) for kernel in kernels] == compiled
