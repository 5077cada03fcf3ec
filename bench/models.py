"""Randomly initialised models of real shapes, for benchmarks: throughput does not depend on weight values.

The tokenizer of a random model is a stand-in that decodes ids to nothing: a benchmark counts tokens and
never reads text, and no real tokenizer matches these vocabularies without a download.
"""

from __future__ import annotations

import torch

from kvbatch.bench.shapes import SHAPES
from kvbatch.errors import SpecError
from kvbatch.runner import attention_hook
from kvbatch.runner.cpu_linear import use_onednn_linears
from kvbatch.runner.model_loader import LoadedModel, resolve_device, resolve_dtype


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
    shape: str,
    device: str = "auto",
    dtype: str = "auto",
    max_model_len: int = 16384,
    seed: int = 0,
    init_std: float | None = None,
    tokenizer: str | None = None,
) -> LoadedModel:
    """A model of `shape` with random weights, loaded for kvbatch's paged attention. `tokenizer`: a folder whose
    tokenizer stands in for the shape's own (structured output needs token strings); its vocabulary must fit the
    shape's."""
    from transformers import AutoModelForCausalLM

    attention_hook.register()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = model_config(shape, max_model_len)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device(torch_device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, attn_implementation=attention_hook.ATTN_IMPLEMENTATION
        )
    model.eval()
    if torch_device.type == "cpu" and torch_dtype == torch.float32:
        use_onednn_linears(model)  # as load_model does: the bench times the GEMMs a job runs
    stand_in = IdsOnlyTokenizer()
    if tokenizer is not None:
        from transformers import AutoTokenizer

        stand_in = AutoTokenizer.from_pretrained(tokenizer)
        if len(stand_in) > config.vocab_size:
            # --tokenizer on the command line: a usage error, which `kvbatch bench` prints without a traceback
            fits = [name for name, fields in SHAPES.items() if fields["vocab_size"] >= len(stand_in)]
            raise SpecError(
                f"the tokenizer in {tokenizer} has {len(stand_in)} tokens; {shape} has {config.vocab_size}"
                f" (shapes that hold them: {', '.join(fits) or 'none'})",
                field="tokenizer",
            )
    eos = () if stand_in.eos_token_id is None else (stand_in.eos_token_id,)
    return LoadedModel(model, stand_in, f"random {shape}", eos, max_model_len, torch_device, torch_dtype)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
