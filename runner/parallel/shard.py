"""Cutting a loaded transformers decoder into one rank's share for tensor parallelism (Megatron layout).

    attention:  q, k, v  column-parallel: rank r keeps heads [r*H/T, (r+1)*H/T) and KV heads [r*K/T, (r+1)*K/T)
                o        row-parallel: the matching input columns; partial sums all-reduced, then the bias
    MLP:        gate, up column-parallel: rows [r*I/T, (r+1)*I/T) of the intermediate size
                down     row-parallel, all-reduced

Contiguous head ranges keep grouped-query attention intact: query head h reads KV head h // (H/K), and rank r's
query heads all read rank r's KV heads. Embeddings, norms and the LM head stay whole on every rank (replicated),
so every rank ends a step with the same hidden states and logits; only rank 0 samples.

The config is edited to the local head counts, so the engine sizes each rank's KV pages for its own KV heads.
Per-head norms (Qwen3's q_norm/k_norm over head_dim) need no change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from kvbatch.errors import TensorParallelError
from kvbatch.runner.attention_hook import kv_layout

ATTENTION_COLUMNS = ("q_proj", "k_proj", "v_proj")
MLP_COLUMNS = ("gate_proj", "up_proj")


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: the input features are split across ranks."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out_features, in_features / T]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out + self.bias if self.bias is not None else out


def _column(linear: nn.Linear, rank: int, world: int) -> nn.Linear:
    rows = linear.out_features // world
    piece = nn.Linear(
        linear.in_features, rows, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )
    with torch.no_grad():
        piece.weight.copy_(linear.weight[rank * rows : (rank + 1) * rows])
        if linear.bias is not None:
            piece.bias.copy_(linear.bias[rank * rows : (rank + 1) * rows])
    return piece.requires_grad_(False)


def _row(linear: nn.Linear, rank: int, world: int, group: dist.ProcessGroup | None) -> RowParallelLinear:
    cols = linear.in_features // world
    weight = linear.weight.detach()[:, rank * cols : (rank + 1) * cols].clone()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return RowParallelLinear(weight, bias, group)


def check_divisible(text_config, world: int) -> None:
    heads = text_config.num_attention_heads
    kv_heads = kv_layout(text_config)[0]
    intermediate = text_config.intermediate_size
    bad = [
        f"{name} {value}"
        for name, value in (("attention heads", heads), ("KV heads", kv_heads), ("intermediate size", intermediate))
        if value % world
    ]
    if bad:
        raise TensorParallelError(
            f"cannot split the model {world} ways: {', '.join(bad)} not divisible by {world}; choose a "
            "tensor-parallel size that divides them"
        )


def shard_model(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace the attention and MLP projections of every decoder layer by rank `rank`'s share, in place."""
    text_config = model.config.get_text_config()
    check_divisible(text_config, world)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TensorParallelError(
            f"{type(model).__name__}: no model.layers; tensor parallel supports Llama-style decoders"
        )
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(attn, n) for n in (*ATTENTION_COLUMNS, "o_proj")] + [(mlp, n) for n in (*MLP_COLUMNS, "down_proj")]
        missing = [n for owner, n in names if not isinstance(getattr(owner, n, None), nn.Linear)]
        if missing:
            raise TensorParallelError(
                f"layer {i} of {type(model).__name__} has no plain Linear {', '.join(missing)}; tensor parallel "
                "supports Llama-style decoders"
            )
        for name in ATTENTION_COLUMNS:
            setattr(attn, name, _column(getattr(attn, name), rank, world))
        attn.o_proj = _row(attn.o_proj, rank, world, group)
        for name in MLP_COLUMNS:
            setattr(mlp, name, _column(getattr(mlp, name), rank, world))
        mlp.down_proj = _row(mlp.down_proj, rank, world, group)
    kv_heads, head_dim = kv_layout(text_config)  # before the heads change
    text_config.head_dim = head_dim
    text_config.num_key_value_heads = kv_heads // world
    text_config.num_attention_heads //= world
    return model
