"""Randomly initialised models of real shapes, for benchmarks: throughput does not depend on weight values.

The tokenizer of a random model is a stand-in that decodes ids to nothing: a benchmark counts tokens and
never reads text, and no real tokenizer matches these vocabularies without a download.
"""

from __future__ import annotations

import torch

from . import attention_hook
from .model_loader import LoadedModel, resolve_device, resolve_dtype

# Public shapes of the models named; vocab and head_dim as in their config.json files.
SHAPES: dict[str, dict] = {
    "llama-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "llama-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=128),
    "llama-70b": dict(arch="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, head_dim=128),
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=True, head_dim=128),
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
    "tiny": dict(arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, head_dim=32),
}  # fmt: skip


class IdsOnlyTokenizer:
    """Enough of a tokenizer for the engine: no EOS, no text."""

    eos_token_id = None
    chat_template = None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def model_config(shape: str, max_model_len: int):
    from transformers import LlamaConfig, Qwen3Config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    config_class = {"llama": LlamaConfig, "qwen3": Qwen3Config}[fields.pop("arch")]
    return config_class(max_position_embeddings=max_model_len, **fields)


def random_model(
    shape: str, device: str = "auto", dtype: str = "auto", max_model_len: int = 16384, seed: int = 0, init_std: float | None = None
) -> LoadedModel:
    """A model of `shape` with random weights, loaded for kvbatch's paged attention."""
    from transformers import AutoModelForCausalLM

    attention_hook.register()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = model_config(shape, max_model_len)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device(torch_device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attention_hook.ATTN_IMPLEMENTATION)
    model.eval()
    return LoadedModel(model, IdsOnlyTokenizer(), f"random {shape}", (), max_model_len, torch_device, torch_dtype)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
