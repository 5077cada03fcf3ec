"""Loading a transformers causal LM and its tokenizer, with kvbatch's paged attention plugged in.

A model is named as `default` (the embedded SmolLM2), a local folder, a `.gguf` file, or a hub name
that is already in the local Hugging Face cache. Nothing is downloaded unless `allow_download` is
set and the hub can be reached. Weights load from safetensors; pickled weights and remote code only
when the job asks for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import attention_hook
from .default_model import default_model_path

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message says what to change."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    source: str  # what the model was loaded from, for logs and output metadata
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
    return names[dtype]


def _source_kwargs(name: str, allow_download: bool) -> tuple[str, dict]:
    if name == "default":
        return str(default_model_path()), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model folder {path} does not exist")
    # A hub name: the local cache first; the hub only when allowed.
    return name, {"local_files_only": not allow_download}


def _eos_ids(model: torch.nn.Module, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for token_id in source if isinstance(source, (list, tuple)) else [source]:
            if token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def _context_length(config, requested: int | None) -> int:
    native = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < native:
        # kvbatch attends to the whole context; past the window the model would differ from its training.
        logger.info("capping the context at the model's sliding window of %d tokens", window)
        native = window
    if requested is None:
        return native
    if requested > native:
        raise ModelLoadError(f"max_model_len {requested} exceeds the model's context of {native} tokens")
    return requested


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    allow_download: bool = False,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention_hook.register()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, kwargs = _source_kwargs(name, allow_download)
    if trust_remote_code:
        logger.warning("trust_remote_code is on: %s may run its own Python code", name)
    if allow_pickle:
        logger.warning("pickled weights are allowed: loading %s may run code hidden in its weight files", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attention_hook.ATTN_IMPLEMENTATION,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle or "gguf_file" in kwargs else True,
            **kwargs,
        )
    except OSError as exc:
        hint = " (not in the local Hugging Face cache, and downloads are off)" if kwargs.get("local_files_only") else ""
        raise ModelLoadError(f"cannot load model {name!r}{hint}: {exc}") from exc
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name!r} with kvbatch's paged attention: {exc}") from exc
    model.to(torch_device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=name if name != "default" else f"default ({source})",
        eos_token_ids=_eos_ids(model, tokenizer),
        max_model_len=_context_length(model.config, max_model_len),
        device=torch_device,
        dtype=torch_dtype,
    )
