"""PEFT LoRA adapters with random weights for tests, and PEFT's own greedy generate as the oracle."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Four adapters of different ranks, targets and scalings (rsLoRA, per-module rank and alpha).
ADAPTER_CONFIGS = {
    "r2-qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r8-rslora": dict(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS, use_rslora=True),
    "r4-mlp": dict(
        r=4,
        lora_alpha=8,
        target_modules=["o_proj", "gate_proj", "down_proj"],
        rank_pattern={"down_proj": 6},
        alpha_pattern={"o_proj": 2},
    ),
    "r16-all": dict(r=16, lora_alpha=8, target_modules=ALL_PROJECTIONS),
}


def save_adapters(make_base, folder: Path, configs: dict = ADAPTER_CONFIGS, seed: int = 100) -> dict[str, str]:
    """Save one random adapter per config over a fresh base model from `make_base()`; returns name -> folder.
    init_lora_weights=False draws B at random too (PEFT's default zero B would leave the model unchanged)."""
    paths = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed + i)
        model = get_peft_model(make_base(), LoraConfig(init_lora_weights=False, **config))
        model.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def peft_greedy(
    base, paths: dict[str, str], rows: list[tuple[list[int], str | None]], max_new_tokens: int, eos_id: int, pad_id: int
) -> list[list[int]]:
    """Greedy tokens of each (prompt, adapter) row from PEFT's model with that adapter active (None: none)."""
    names = list(paths)
    model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0]) if names else base
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    out = []
    for prompt, adapter in rows:
        kwargs = dict(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter() if names else contextlib.nullcontext():
                    tokens = model.generate(**kwargs)
            else:
                model.set_adapter(adapter)
                tokens = model.generate(**kwargs)
        out.append(tokens[0, len(prompt) :].tolist())
    return out
