"""The decoder of Llama-family models (Llama, Mistral, Qwen2, Qwen3) run with fused weights and kernels.

On the H200, llama-1b's layers as transformers runs them spent 31 of a 16k-token prefill step's 79 ms and 1.9 of a
512-row decode step's 7.3 ms in small elementwise kernels, and k_proj/v_proj of that decode ran at 49 TFLOP/s.
This forward runs the same modules' weights in fewer, larger launches:

    per layer:  add_rms_norm -> qkv GEMM -> rope (+ Qwen3 q/k norm) -> paged attention -> o_proj
                add_rms_norm -> gate_up GEMM -> silu_mul -> down_proj
    (the residual add of each block runs in o_proj's and down_proj's GEMMs on CUDA, in the next norm on the CPU;
    with the Triton attention and no q/k norm, the rope runs in the K/V write and as the attention loads queries)

In a prefill step only the rows whose logits are kept (each finished prompt's last token, and scored rows) need the
last layer past its K/V: there its attention (each such row a one-query decode over its context up to itself),
o_proj and MLP run for those rows alone, about 6% of a 16-layer model's prefill GEMMs.

q/k/v and gate/up become one GEMM each: their weights are concatenated once, and the modules' own weights are
re-pointed at slices of the concatenation, so memory does not grow and transformers' modules still read the
same parameters. Embeddings, rotary tables (any rope scaling), o_proj, down_proj and lm_head are the modules
themselves. The kernels round where transformers' code rounds (runner/fused_kernels.py), so logits equal the
unfused model's up to float32 summation order and cuBLAS's choice of GEMM kernel; on CUDA the residual sums are
rounded once, not twice (`_project`).

LoRA adapters (runner/lora/adapters.py) add their updates to the two packed GEMMs' outputs through
`update_packed`, and to o_proj and down_proj through the modules' hooks. A step that runs an adapter computes
the last layer for every row: the adapters' row tiles are laid out over all of the step's rows.

On by default for the architectures above: on CUDA with the Triton kernels, on the CPU with the same arithmetic
in torch ops (runner/fused_kernels_torch.py, each result the bits of transformers' modules) and q/k/v and gate/up
through the model's own linear class (cpu_linear's oneDNN GEMMs). Greedy tokens stay transformers' `generate`'s:
tests/runner/test_exact_vs_generate.py runs this decoder on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvbatch.cache.metadata import AttentionMetadata, Rotary
from kvbatch.errors import FusedLayersError

from . import fused_kernels_torch
from .attention_hook import StepContext
from .cpu_linear import OneDNNLinear

logger = logging.getLogger(__name__)

FUSABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# The linear classes a fused GEMM can stand in for: it is built of the same class, so it takes the same path.
FUSABLE_LINEARS = (nn.Linear, OneDNNLinear)


@dataclass
class _Norm:
    weight: torch.Tensor
    eps: float


@dataclass
class _Layer:
    index: int
    input_norm: _Norm
    qkv: nn.Linear  # q/k/v as one linear of the modules' class (its weight rows: q, then k, then v)
    qk_norm: torch.Tensor | None  # [2, head_dim]: Qwen3's q_norm and k_norm weights
    qk_norm_eps: float
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    o_proj: nn.Module
    post_norm: _Norm
    gate_up: nn.Linear  # gate/up as one linear (gate's rows, then up's)
    down_proj: nn.Module
    qkv_linears: tuple[nn.Linear, ...]  # the modules whose weights qkv's weight holds, in its row order
    gate_up_linears: tuple[nn.Linear, ...]


def _norm(module: nn.Module) -> _Norm:
    return _Norm(module.weight, float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))))


def _is_rms_norm(module: nn.Module | None) -> bool:
    return (
        module is not None
        and type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def unfusable_reason(model: nn.Module) -> str | None:
    """Why this model cannot run the fused decoder, or None if it can."""
    config = model.config
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        return (
            f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(sorted(FUSABLE_MODEL_TYPES))}"
        )
    # The fused layers attend to the whole context: a local layer's window runs through transformers' layers.
    windowed = config.model_type == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if windowed and getattr(config, "sliding_window", None):
        return "the model has sliding-window layers"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    base = getattr(model, "model", None)
    if (
        base is None
        or not all(hasattr(base, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers"))
        or not hasattr(model, "lm_head")
    ):
        return "the model does not have the embed_tokens / rotary_emb / layers / norm / lm_head layout"
    if not _is_rms_norm(base.norm):
        return "the final norm is not an RMSNorm"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")] + [
            getattr(mlp, n, None) for n in ("gate_proj", "up_proj")
        ]
        if len({type(linear) for linear in linears}) != 1 or type(linears[0]) not in FUSABLE_LINEARS:
            return "q/k/v or gate/up projections are not plain nn.Linear layers (quantized or replaced)"
        if not all(hasattr(m, n) for m, n in ((attn, "o_proj"), (attn, "scaling"), (mlp, "down_proj"))):
            return "a layer lacks o_proj, scaling or down_proj"
        if not (
            _is_rms_norm(getattr(layer, "input_layernorm", None))
            and _is_rms_norm(getattr(layer, "post_attention_layernorm", None))
        ):
            return "a layer's norms are not RMSNorm"
        if (getattr(attn, "q_norm", None) is None) != (getattr(attn, "k_norm", None) is None):
            return "a layer has only one of q_norm and k_norm"
        if (
            len({linear.bias is None for linear in linears[:3]}) != 1
            or len({linear.bias is None for linear in linears[3:]}) != 1
        ):
            return "q/k/v (or gate/up) disagree on having a bias"
    return None


def _concatenate(linears: list[nn.Linear]) -> nn.Linear:
    """One linear of the linears' class holding their rows in order; each linear's parameters become views into
    its weight (and bias)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    bias = torch.cat([linear.bias.detach() for linear in linears]) if linears[0].bias is not None else None
    fused = type(linears[0])(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    if hasattr(linears[0], "pack_weight"):  # a OneDNNLinear packs its weight only if the model's linears do
        fused.pack_weight = linears[0].pack_weight
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return fused


def _layer(index: int, layer: nn.Module) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    num_q_heads = attn.q_proj.weight.shape[0] // head_dim  # from the weights: a tensor-parallel shard holds fewer heads
    num_kv_heads = attn.k_proj.weight.shape[0] // head_dim
    qkv = _concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up = _concatenate([mlp.gate_proj, mlp.up_proj])
    qk_norm, qk_eps = None, 1e-6
    if getattr(attn, "q_norm", None) is not None:
        qk_norm = torch.stack([attn.q_norm.weight.detach(), attn.k_norm.weight.detach()]).contiguous()
        qk_eps = _norm(attn.q_norm).eps
    return _Layer(
        index=getattr(attn, "layer_idx", index),
        input_norm=_norm(layer.input_layernorm),
        qkv=qkv,
        qk_norm=qk_norm,
        qk_norm_eps=qk_eps,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        scaling=float(attn.scaling),
        o_proj=attn.o_proj,
        post_norm=_norm(layer.post_attention_layernorm),
        gate_up=gate_up,
        down_proj=mlp.down_proj,
        qkv_linears=(attn.q_proj, attn.k_proj, attn.v_proj),
        gate_up_linears=(mlp.gate_proj, mlp.up_proj),
    )


class FusedDecoder:
    """The model's decoder stack, run from its own weights with fused kernels: hidden states in, last norm out."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        reason = unfusable_reason(model)
        if reason is not None:
            raise FusedLayersError(f"fused_layers cannot run this model: {reason}; set fused_layers: false")
        self.kernels = kernels_for(device)
        self.model = model
        self.base = model.model
        with torch.no_grad():
            self.layers = [_layer(i, layer) for i, layer in enumerate(self.base.layers)]
        self.final_norm = _norm(self.base.norm)
        self.adapters = None  # an Adapters built with `packed_linears()`: adds the packed GEMMs' LoRA updates

    @property
    def triton(self) -> bool:
        """Whether the kernels are Triton's: then LoRA updates run Triton's kernels too."""
        return self.kernels is not fused_kernels_torch

    def packed_linears(self) -> list[tuple[nn.Linear, ...]]:
        """The linears each fused GEMM runs, in its output columns' order: q/k/v and gate/up of every layer."""
        return [group for layer in self.layers for group in (layer.qkv_linears, layer.gate_up_linears)]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepContext, keep_rows: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, positions: [1, rows]; returns the final-normed hidden states of `keep_rows`, first in
        their order (on CUDA a few padding rows may follow).

        Only the kept rows (those that sample or are scored) need the last layer past its K/V: in a prefill step
        the last layer's attention, o_proj and MLP run for them alone (see `_kept_rows_meta`)."""
        embeds = self.base.embed_tokens(input_ids)
        cos, sin = self.base.rotary_emb(embeds, positions)
        cos, sin = cos[0], sin[0]
        hidden, residual = embeds[0], None
        k = self.kernels
        if keep_rows.is_cuda:
            keep_rows = _bucketed(keep_rows, hidden.shape[0])
        adapters = self.adapters if self.adapters is not None and self.adapters.current is not None else None
        # Shapes and the step's adapters only: every tensor-parallel rank decides alike.
        prune = keep_rows.shape[0] < hidden.shape[0] and adapters is None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = k.add_rms_norm(hidden, residual, layer.input_norm.weight, layer.input_norm.eps)
            if prune and i == last:
                attended = self._attention(layer, x, cos, sin, step, keep_rows)
                residual = residual.index_select(0, keep_rows)
            else:
                attended = self._attention(layer, x, cos, sin, step, adapters=adapters)
            hidden, residual = self._project(layer.o_proj, attended, residual, adapters)
            x, residual = k.add_rms_norm(hidden, residual, layer.post_norm.weight, layer.post_norm.eps)
            gate_up = layer.gate_up(x)
            if adapters is not None:
                adapters.update_packed(layer.gate_up_linears, x, gate_up)
            hidden, residual = self._project(layer.down_proj, k.silu_mul(gate_up), residual, adapters)
        out = k.add_rms_norm(hidden, residual, self.final_norm.weight, self.final_norm.eps)[0]
        return out if prune else out.index_select(0, keep_rows)

    def _attention(
        self,
        layer: _Layer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        step: StepContext,
        keep_rows: torch.Tensor | None = None,
        adapters=None,  # the step's Adapters when it runs one (never with keep_rows)
    ) -> torch.Tensor:
        """The attention's output for o_proj: [rows (or kept rows), q heads x head_dim]."""
        rows, hq, hkv, d = x.shape[0], layer.num_q_heads, layer.num_kv_heads, layer.head_dim
        qkv = layer.qkv(x)
        if adapters is not None:
            adapters.update_packed(layer.qkv_linears, x, qkv)
        q = qkv[:, : hq * d].view(rows, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(rows, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(rows, hkv, d)
        key_cache, value_cache = step.kv_cache.key[layer.index], step.kv_cache.value[layer.index]
        meta, rotary = step.meta, None
        if step.backend.rotary and layer.qk_norm is None:
            # The kernels rotate q and k as they read them: no pass that reads and rewrites both first (on an H100,
            # llama-1b's scoring bench spent 16 ms in it, and 7 in the K/V write that now rotates the keys).
            rotary = Rotary(cos, sin)
            step.backend.write_kv(key_cache, value_cache, k, v, meta.slot_mapping, rotary)
        else:
            self.kernels.rope_(qkv, cos, sin, hq, hkv, d, layer.qk_norm, layer.qk_norm_eps)
            step.backend.write_kv(key_cache, value_cache, k, v, meta.slot_mapping)
        # every row's K/V is written above: later steps read them
        if keep_rows is not None:
            q, meta = q.index_select(0, keep_rows), _kept_rows_meta(meta, keep_rows)
            if rotary is not None:
                rotary = dataclasses.replace(
                    rotary, cos=cos.index_select(0, keep_rows), sin=sin.index_select(0, keep_rows)
                )
        args = (q, key_cache, value_cache, meta, layer.scaling)
        out = (
            step.backend.paged_attention(*args)
            if rotary is None
            else step.backend.paged_attention(*args, rotary=rotary)
        )
        return out.reshape(-1, hq * d)

    def _project(
        self, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor, adapters
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, residual) for the next add_rms_norm, their sum residual + linear(x). With the Triton kernels a
        plain bias-free linear adds its product to the residual inside its GEMM (cuBLAS's beta = 1, in place),
        and the norm gets no residual: it then reads one tensor and writes one, not two and two. The sum is
        rounded once where transformers rounds the product first, one rounding step apart at most. On an H100,
        llama-1b's scoring bench: 1.036-1.052 -> 0.996-1.009 s, the norms 46 -> 24 ms of GPU time. The torch
        kernels keep transformers' bits; a step that runs an adapter calls the module, whose hook adds the
        adapter's update."""
        if self.triton and adapters is None and type(linear) is nn.Linear and linear.bias is None:
            return residual.addmm_(x, linear.weight.t()), None
        return linear(x), residual


def _bucketed(keep_rows: torch.Tensor, num_rows: int, smallest: int = 64) -> torch.Tensor:
    """keep_rows padded with row 0 to a power of two, at least `smallest` and at most num_rows: the pruned
    layer's GEMMs then meet a dozen row counts over a run, all met in its first steps. A new row count costs
    cuBLAS a heuristic query and, the first time it picks a kernel, a kernel load of up to 40 ms of host time
    with the GPU dry: an H100 profile of scoring (about 1,800 kept rows a step) padded to multiples of 64
    still met new counts in the timed run, three steps losing 34-38 ms each. At most half the padded rows are
    padding, in one layer of many."""
    n = keep_rows.shape[0]
    if n >= num_rows:  # a pure decode step (a CUDA graph's too): nothing to prune, nothing to pad
        return keep_rows
    padded = min(max(smallest, 1 << (n - 1).bit_length()), num_rows)
    return torch.cat([keep_rows, keep_rows.new_zeros(padded - n)]) if padded > n else keep_rows


def _kept_rows_meta(meta: AttentionMetadata, keep_rows: torch.Tensor) -> AttentionMetadata:
    """The step's attention seen from `keep_rows` alone: each a one-query decode over its sequence's context up
    to and including itself (a sampling row, its sequence's last, sees the whole context; a scored row, inside
    its sequence, only the tokens before it and itself). Built on the device from the step's own tensors (no
    host sync). A padding entry of keep_rows (row 0) repeats that row; its output is dropped."""
    rows = keep_rows.to(meta.query_start_loc.dtype)
    seq_of_row = torch.searchsorted(meta.query_start_loc[1:], rows, right=True)
    n = keep_rows.shape[0]
    # A row's context: its sequence's length less the rows of its chunk after it.
    ends = meta.query_start_loc[1:].index_select(0, seq_of_row)
    return AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=meta.query_start_loc.dtype, device=keep_rows.device),
        seq_lens=meta.seq_lens.index_select(0, seq_of_row) - (ends - 1 - rows).to(meta.seq_lens.dtype),
        block_tables=meta.block_tables.index_select(0, seq_of_row),
        slot_mapping=meta.slot_mapping[:0],
        num_decodes=n,
        max_query_len=1,
        max_seq_len=meta.max_seq_len,
        block_size=meta.block_size,
        # A prompt row stays a prompt row: the CPU attention gives it the bits it has in its chunk.
        num_prompt_tokens=None
        if meta.num_prompt_tokens is None
        else meta.num_prompt_tokens.index_select(0, seq_of_row),
    )


def kernels_for(device: torch.device):
    """The module of add_rms_norm, rope_ and silu_mul for `device`: torch ops on the CPU, Triton's on CUDA."""
    if device.type == "cpu":
        return fused_kernels_torch
    if device.type != "cuda":
        raise FusedLayersError(f"fused_layers runs on CUDA or the CPU; this engine runs on {device}")
    try:
        from . import fused_kernels  # Triton is an optional dependency: imported only where it runs
    except ImportError as exc:
        raise FusedLayersError(
            f"fused_layers needs Triton ({exc}); pip install 'kvbatch[triton]' or set fused_layers: false"
        ) from exc
    return fused_kernels


def fused_decoder_for(model: nn.Module, setting: bool | None, device: torch.device) -> FusedDecoder | None:
    """The fused decoder if `setting` asks for it (True) or allows it (None: on CUDA or the CPU, for a
    supported architecture); None to run transformers' own layers."""
    if setting is False:
        return None
    reason = unfusable_reason(model)
    if setting is None:
        if reason is None and device.type not in ("cuda", "cpu"):
            reason = f"not on CUDA or the CPU ({device})"
        if reason is not None:
            logger.info("transformers' own layers run this model (fused layers: %s)", reason)
            return None
    elif reason is not None:
        raise FusedLayersError(f"fused_layers cannot run this model: {reason}; set fused_layers: false")
    return FusedDecoder(model, device)
