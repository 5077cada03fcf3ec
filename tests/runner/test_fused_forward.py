"""The fused decoder (runner/fused_forward.py, runner/fused_kernels.py) against transformers' own layers.

Each kernel is held against the transformers module it replaces, on the same inputs; the whole decoder against
the unfused model through the engine: same greedy tokens, log-probabilities equal to float32 summation order.
Without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets it), on tiny shapes.
"""

import dataclasses

import pytest
import torch
from test_exact_vs_generate import random_prompts
from tiny_models import tiny_loaded, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from kvbatch.runner import fused_forward, fused_kernels, fused_kernels_torch
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.fused_forward import FusedDecoder, FusedLayersError, fused_decoder_for, unfusable_reason
from kvbatch.runner.request import GenerationRequest

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if CUDA else [])


# Triton's kernels, and the same arithmetic in torch ops (the CPU's): the latter give transformers' bits exactly.
KERNELS = pytest.mark.parametrize("kernels", [fused_kernels, fused_kernels_torch], ids=["triton", "torch"])


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, kernels=fused_kernels) -> None:
    """Equal to float32 summation order; in bf16/fp16 a rounding step apart at most (the interpreter rounds to
    bf16 its own way), where `scale` is the operands' magnitude: a difference of rounded products is off by
    their rounding, however small it is. The torch kernels: equal."""
    if kernels is fused_kernels_torch:
        assert torch.equal(got, want)
    elif dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6 * scale)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2 * scale)


@KERNELS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_transformers(dtype, with_residual, kernels):
    gen = torch.Generator().manual_seed(0)
    rows, hidden = 7, 96  # not a power of two: the masked tail
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen))
    x = (3 * torch.randn(rows, hidden, generator=gen)).to(DEVICE, dtype)
    residual = (3 * torch.randn(rows, hidden, generator=gen)).to(DEVICE, dtype) if with_residual else None
    out, new_residual = kernels.add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    want_residual = residual + x if with_residual else x  # transformers' order: residual + hidden_states
    close(new_residual, want_residual, dtype, kernels=kernels)
    close(out, norm(want_residual), dtype, kernels=kernels)
    assert not torch.equal(out, want_residual)  # the norm did something


@KERNELS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 2, 16), (4, 2, 24), (16, 4, 256)])  # 24: halves masked to 16 lanes;
def test_rope_matches_transformers(dtype, qk_norm, hq, hkv, head_dim, kernels):  # 256: 24 heads, three programs
    gen = torch.Generator().manual_seed(1)
    rows = 5
    qkv = (2 * torch.randn(rows, (hq + 2 * hkv) * head_dim, generator=gen)).to(DEVICE, dtype)
    angles = torch.randn(rows, head_dim // 2, generator=gen) * 3
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE, dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(DEVICE, dtype)
    q = qkv[:, : hq * head_dim].view(rows, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(rows, hkv, head_dim)
    weights = None
    if qk_norm:
        q_norm, k_norm = (
            Qwen3RMSNorm(head_dim, eps=1e-6).to(DEVICE, dtype),
            Qwen3RMSNorm(head_dim, eps=1e-6).to(DEVICE, dtype),
        )
        with torch.no_grad():
            q_norm.weight.copy_(torch.randn(head_dim, generator=gen))
            k_norm.weight.copy_(torch.randn(head_dim, generator=gen))
        q, k = q_norm(q.contiguous()), k_norm(k.contiguous())  # as transformers: on the projection's output
        weights = torch.stack([q_norm.weight, k_norm.weight]).detach()
    # transformers' layout: [batch, heads, rows, head_dim], cos/sin [batch, rows, head_dim]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    v_before = qkv[:, (hq + hkv) * head_dim :].clone()
    kernels.rope_(qkv, cos, sin, hq, hkv, head_dim, weights, 1e-6)
    scale = max(q.abs().max().item(), k.abs().max().item())
    got_q = qkv[:, : hq * head_dim].view(rows, hq, head_dim)
    got_k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(rows, hkv, head_dim)
    close(got_q, want_q[0].transpose(0, 1), dtype, scale, kernels)
    close(got_k, want_k[0].transpose(0, 1), dtype, scale, kernels)
    assert torch.equal(qkv[:, (hq + hkv) * head_dim :], v_before)  # v is not rotated


@KERNELS
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_transformers(dtype, kernels):
    gen = torch.Generator().manual_seed(2)
    rows, n = 3, 1100  # more than one 1024-wide program per row, and a masked tail
    gate_up = (4 * torch.randn(rows, 2 * n, generator=gen)).to(DEVICE, dtype)
    want = torch.nn.functional.silu(gate_up[:, :n]) * gate_up[:, n:]
    close(kernels.silu_mul(gate_up), want, dtype, kernels=kernels)


def _greedy(loaded, fused: bool, prompts: list[list[int]], **config) -> dict:
    if CUDA:  # compiled kernels instead of the interpreter
        loaded = dataclasses.replace(loaded, model=loaded.model.to(DEVICE), device=torch.device(DEVICE))
    config = dict(block_size=4, num_blocks_override=128, max_num_seqs=4, max_num_batched_tokens=40) | config
    engine = Engine.from_loaded(loaded, EngineConfig(fused_layers=fused, **config))
    assert (engine.fused is not None) == fused
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=True)
    requests = [GenerationRequest(i, p, params) for i, p in enumerate(prompts)]
    return {r.request_id: r.completions[0] for r in engine.generate(requests)}


@KERNELS
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_engine_tokens_equal_transformers_layers(arch, kernels, monkeypatch):
    """Packed prefill chunks, decodes, preemption-free batches of several rows: the fused decoder gives the
    unfused engine's greedy tokens, and log-probabilities equal to float32 summation order; with either set of
    kernels (the CPU runs the torch ones, CUDA Triton's; here each runs on this machine's device)."""
    monkeypatch.setattr(fused_forward, "kernels_for", lambda device: kernels)
    prompts = random_prompts(6, 3, 30, seed=5)
    want = _greedy(tiny_loaded(arch, seed=4), False, prompts)
    got = _greedy(tiny_loaded(arch, seed=4), True, prompts)
    for i in range(len(prompts)):
        assert got[i].token_ids == want[i].token_ids
        assert max(abs(a - b) for a, b in zip(got[i].logprobs, want[i].logprobs)) < 1e-4


def test_fused_weights_are_the_modules_weights():
    """q/k/v and gate/up are concatenated once; the modules then read slices of the concatenation (no second
    copy), and transformers' own forward still gives the same logits."""
    model = tiny_model("qwen2", seed=6)  # qwen2: q/k/v carry biases
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = tiny_model("qwen2", seed=6, attn="sdpa")(input_ids=ids).logits
    decoder = FusedDecoder(model, torch.device("cpu"))
    attn, mlp, layer = model.model.layers[0].self_attn, model.model.layers[0].mlp, decoder.layers[0]
    assert type(layer.qkv) is type(attn.q_proj) and type(layer.gate_up) is type(mlp.up_proj)
    assert attn.q_proj.weight.data_ptr() == layer.qkv.weight.data_ptr()
    assert attn.v_proj.weight.data_ptr() == layer.qkv.weight[-attn.v_proj.weight.shape[0] :].data_ptr()
    assert attn.k_proj.bias.data_ptr() == layer.qkv.bias[attn.q_proj.weight.shape[0] :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == layer.gate_up.weight[mlp.gate_proj.weight.shape[0] :].data_ptr()
    model.config._attn_implementation = "sdpa"  # transformers' path, reading the re-pointed parameters
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_which_models_fuse():
    llama = tiny_model("llama")
    assert unfusable_reason(llama) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert "gpt2" in unfusable_reason(gpt2)
    cpu = torch.device("cpu")
    assert fused_decoder_for(llama, None, cpu).kernels is fused_kernels_torch  # on by default, in torch ops
    assert fused_decoder_for(gpt2, None, cpu) is None  # unset: transformers' layers where it cannot fuse
    assert fused_decoder_for(llama, False, torch.device("cuda")) is None  # off means off, on any device
    assert fused_decoder_for(tiny_model("llama"), None, torch.device("meta")) is None
    with pytest.raises(FusedLayersError, match="gpt2"):
        fused_decoder_for(gpt2, True, cpu)
    with pytest.raises(FusedLayersError, match="runs on CUDA or the CPU"):
        fused_decoder_for(tiny_model("llama"), True, torch.device("meta"))


def test_unfusable_layers_are_named():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj = torch.nn.Identity()
    assert "nn.Linear" in unfusable_reason(model)
    model = tiny_model("llama")
    model.config.hidden_act = "gelu"
    assert "gelu" in unfusable_reason(model)


def test_kept_rows_meta_maps_kept_rows_to_their_contexts():
    """The last layer's pruned attention: each kept row becomes a one-query decode of its sequence's context up to
    itself: the whole context for a sequence's last row, less for a scored row inside a chunk; a padding entry is
    row 0."""
    from kvbatch.cache.metadata import AttentionMetadata
    from kvbatch.runner.fused_forward import _kept_rows_meta

    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 2, 7, 10], dtype=torch.int32),  # 2 decodes, chunks of 5 and 3 rows
        seq_lens=torch.tensor([9, 4, 12, 3], dtype=torch.int32),
        block_tables=torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 7], [8, 0, 0]], dtype=torch.int32),
        slot_mapping=torch.arange(10),
        num_decodes=2,
        max_query_len=5,
        max_seq_len=12,
        block_size=4,
    )
    # The decodes, two rows inside the third sequence's chunk (positions 7..11: rows 2 and 5 are at 7 and 10), the
    # fourth's last row, one padding entry.
    keep = torch.tensor([0, 1, 2, 5, 9, 0])
    got = _kept_rows_meta(meta, keep)
    assert got.num_decodes == got.num_seqs == 6 and got.max_query_len == 1
    assert got.query_start_loc.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert got.seq_lens.tolist() == [9, 4, 8, 11, 3, 9]
    assert got.block_tables.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 7], [5, 6, 7], [8, 0, 0], [1, 2, 3]]


def test_last_layer_runs_for_the_sampling_rows_only(monkeypatch):
    """Prefill steps compute the last layer past its K/V for the rows that sample, and the tokens stay those of
    transformers' layers (which run every row)."""
    from kvbatch.runner import fused_forward

    pruned_rows = []
    original = fused_forward._kept_rows_meta

    def spy(meta, keep_rows):
        pruned_rows.append((int(meta.query_start_loc[-1]), keep_rows.shape[0]))
        return original(meta, keep_rows)

    monkeypatch.setattr(fused_forward, "_kept_rows_meta", spy)
    prompts = random_prompts(6, 20, 30, seed=8)
    # Steps of up to 100 rows: on CUDA the kept rows are padded to 64, so smaller steps would not prune.
    config = dict(max_num_batched_tokens=100, num_blocks_override=256)
    want = _greedy(tiny_loaded("llama", seed=4), False, prompts, **config)
    got = _greedy(tiny_loaded("llama", seed=4), True, prompts, **config)
    assert pruned_rows and all(kept < rows for rows, kept in pruned_rows)
    for i in range(len(prompts)):
        assert got[i].token_ids == want[i].token_ids
        assert max(abs(a - b) for a, b in zip(got[i].logprobs, want[i].logprobs)) < 1e-4


def test_pruned_rows_are_padded_to_few_shapes():
    """On CUDA the pruned layer's rows are padded (with row 0) to a power of two from 64, at most the step's rows,
    so its GEMMs meet a handful of shapes."""
    from kvbatch.runner.fused_forward import _bucketed

    keep = torch.tensor([3, 9, 17])
    assert _bucketed(keep, 1000).tolist() == [3, 9, 17] + [0] * 61
    assert _bucketed(keep, 40).tolist() == [3, 9, 17] + [0] * 37
    full = torch.arange(64)
    assert _bucketed(full, 1000) is full
    many = torch.arange(1, 1801)
    assert _bucketed(many, 16384).tolist() == list(range(1, 1801)) + [0] * 248
    assert _bucketed(many, 2000).shape[0] == 2000
    assert {_bucketed(torch.arange(n), 16384).shape[0] for n in range(65, 16384, 7)} == {2**k for k in range(7, 15)}
    every = torch.arange(30)
    assert _bucketed(every, 30) is every  # a pure decode step: not padded
