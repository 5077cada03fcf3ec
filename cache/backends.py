"""Choosing the attention kernels: flash-attn when importable (GPU), then Triton (GPU), then the CPU's own.

Every backend exposes the same two calls as `attention_torch`:
    write_kv(key_cache, value_cache, key, value, slot_mapping) -> None
    paged_attention(query, key_cache, value_cache, meta, scale) -> out
so one test compares any of them with the reference.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "flash-attn")
# "torch": the float64 reference everything else is tested against, batch-invariant to the bit on any device.
# "cpu": the CPU's default (attention_cpu): float32 through torch's flash kernel, batch-invariant to the bit by
# the shapes it calls the kernel with, and bit-identical with the prefix cache on and off.
_MODULES = {
    "torch": "attention_torch",
    "cpu": "attention_cpu",
    "triton": "attention_triton",
    "flash-attn": "attention_flash",
}


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    warm_up: Callable[..., None] | None = None  # (key_cache, value_cache, num_heads, dtype): compile kernels now
    cascade: bool = False  # reads AttentionMetadata.shared_prefix_len (the others attend to the whole context anyway)
    rotary: bool = False  # write_kv and paged_attention take `rotary=` (metadata.Rotary): q and k arrive unrotated


def _load(name: str) -> AttentionBackend:
    module = importlib.import_module(f"{__package__}.{_MODULES[name]}")
    return AttentionBackend(
        name,
        module.write_kv,
        module.paged_attention,
        getattr(module, "warm_up", None),
        cascade=name == "triton",
        rotary=name == "triton",
    )


def why_unavailable(name: str, device: torch.device, block_size: int) -> str | None:
    if name == "torch":
        return None
    if name == "cpu":
        return None if device.type == "cpu" else f"the cpu backend runs on the CPU, the model runs on {device.type}"
    if device.type != "cuda":
        return f"the {name} backend needs a CUDA device, the model runs on {device.type}"
    package = "flash_attn" if name == "flash-attn" else "triton"
    if importlib.util.find_spec(package) is None:
        return f"the {name} backend needs the '{package}' package, which is not installed"
    if name == "flash-attn":
        from .attention_flash import PAGE_MULTIPLE, supports_block_size

        if not supports_block_size(block_size):
            multiple = f"a multiple of {PAGE_MULTIPLE}, the engine's is {block_size}"
            return f"flash-attn's paged kernels need block_size {multiple}"
    return None


def why_not_for_layers(name: str, plain_layers: Callable[[], bool]) -> str | None:
    """Why backend `name` cannot compute the model's layers, or None. flash-attn runs plain causal attention only
    (attention_flash), so a model with soft-capping, a sliding window or sinks would fail every step on it."""
    if name == "flash-attn" and not plain_layers():
        return (
            "the flash-attn backend runs plain causal attention only, and this model's layers use soft-capping, a "
            "sliding window or attention sinks: use the triton backend"
        )
    return None


def select_backend(
    name: str, device: torch.device | str, block_size: int = 16, plain_layers: Callable[[], bool] = lambda: True
) -> AttentionBackend:
    """`auto` takes the first of flash-attn, triton, cpu, torch that can run on `device` with pages of `block_size`
    and computes the model's layers. `plain_layers` says whether every layer is plain causal attention; it is called
    only where flash-attn could otherwise run (the engine answers it with a probe forward)."""
    device = torch.device(device)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name != "auto":
        reason = why_unavailable(name, device, block_size) or why_not_for_layers(name, plain_layers)
        if reason:  # the engine reports it as a BackendUnavailableError
            raise ValueError(reason)
        return _load(name)
    for candidate in ("flash-attn", "triton", "cpu", "torch"):
        if why_unavailable(candidate, device, block_size) is None and not why_not_for_layers(candidate, plain_layers):
            return _load(candidate)
    raise AssertionError("the torch backend is always available")
