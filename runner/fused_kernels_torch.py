"""The fused decoder's three kernels (runner/fused_kernels.py) in torch ops, for the CPU.

On the CPU the time between a layer's GEMMs goes less to the elementwise work itself than to what transformers'
modules cost around it: in SmolLM2-135M's 128-prompt chat job (2-core AMD EPYC) the layers' Python alone took
1.8 of the engine's 19.5 s. These functions do transformers' arithmetic op for op, in the same dtypes (RMSNorm's
statistics in float32, cast back before the weight; rope's two products and their sum in the model's dtype), so
each result has the bits transformers' modules give it (tests/runner/test_fused_forward.py checks equality). The
fused decoder around them saves the modules, three of a layer's seven GEMM calls (q/k/v and gate/up run as one
each) and, in a prefill step, the last layer's MLP for the rows whose logits are not kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: weight * round(x * rsqrt(mean(x^2) + eps)), the statistics in float32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); without a residual, (rms_norm(x) * weight, x)."""
    s = x if residual is None else residual + x
    return _rms_norm(s, weight, eps), s


def rope_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """fused_kernels.rope_: q and k heads of qkv rotated in place (RMS-normed first with qk_norm), each head as
    transformers' apply_rotary_pos_emb on the projection's contiguous output computes it."""
    rows, d = qkv.shape[0], head_dim
    q = qkv[:, : num_q_heads * d].view(rows, num_q_heads, d)
    k = qkv[:, num_q_heads * d : (num_q_heads + num_kv_heads) * d].view(rows, num_kv_heads, d)
    cos, sin = cos[:, None], sin[:, None]
    for heads, norm in ((q, 0), (k, 1)):
        # The norm's mean runs on a contiguous copy, as on transformers' contiguous projection; the rotation is
        # elementwise and reads the heads where they are.
        x = heads if qk_norm is None else _rms_norm(heads.contiguous(), qk_norm[norm], eps)
        rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
        heads.copy_((x * cos) + (rotated * sin))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 n] = [gate | up]: [rows, n]. torch's SiLU, as transformers' module runs
    it: the last elements of each thread's slice take its scalar code, one rounding step from the vector code's at
    times, so with many threads a row's bits can depend on the step (docs/design.md, "Batch invariance")."""
    n = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :n]) * gate_up[..., n:]
