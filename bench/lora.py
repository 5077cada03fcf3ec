"""Random LoRA adapters in PEFT's format for the `lora` workload: the engine reads them as it reads PEFT's own."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapters(model: nn.Module, folder: Path, count: int, rank: int = 16, seed: int = 0) -> dict[str, str]:
    """`count` adapters of `rank` on every attention and MLP projection of `model`, saved under `folder`;
    returns name -> folder (names lora0, lora1, ...)."""
    gen = torch.Generator().manual_seed(seed)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(PROJECTIONS)}
    paths = {}
    for i in range(count):
        tensors = {}
        for name, linear in linears.items():
            a = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features**0.5
            b = torch.randn(linear.out_features, rank, generator=gen) * 0.01
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
        out = folder / f"lora{i}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(PROJECTIONS)}
        (out / "adapter_config.json").write_text(json.dumps(config))
        paths[f"lora{i}"] = str(out)
    return paths
