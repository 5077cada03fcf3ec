"""PEFT LoRA adapters with random weights for tests, and PEFT's own model as the oracle (greedy generate, logprobs)."""

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


class PeftOracle:
    """PEFT's model over `base` with every adapter of `paths` loaded; `using(name)` makes one active (None: none)."""

    def __init__(self, base, paths: dict[str, str]) -> None:
        names = list(paths)
        self.has_adapters = bool(names)
        self.model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0]) if names else base
        for name in names[1:]:
            self.model.load_adapter(paths[name], adapter_name=name)

    def using(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter() if self.has_adapters else contextlib.nullcontext()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def logprobs(self, tokens: list[int], adapter: str | None) -> torch.Tensor:
        """[len(tokens), vocab] float32 log_softmax of the model's logits over `tokens` with that adapter."""
        with torch.no_grad(), self.using(adapter):
            logits = self.model(input_ids=torch.tensor([tokens])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)


def peft_greedy(
    base, paths: dict[str, str], rows: list[tuple[list[int], str | None]], max_new_tokens: int, eos_id: int, pad_id: int
) -> list[list[int]]:
    """Greedy tokens of each (prompt, adapter) row from PEFT's model with that adapter active (None: none)."""
    oracle = PeftOracle(base, paths)
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
        with torch.no_grad(), oracle.using(adapter):
            tokens = oracle.model.generate(**kwargs)
        out.append(tokens[0, len(prompt) :].tolist())
    return out
