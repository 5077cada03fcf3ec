"""Loading a transformers causal LM and its tokenizer, with kvbatch's paged attention plugged in.

A model is named as `default` (the embedded SmolLM2), a local folder, a `.gguf` file, or a hub name
that is already in the local Hugging Face cache. Nothing is downloaded unless `allow_download` is
set and the hub can be reached. Weights load from safetensors; pickled weights and remote code only
when the job asks for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbatch.cache.metadata import LayerAttention
from kvbatch.errors import ContextLengthError, ModelLoadError

from . import attention_hook
from .cpu_linear import use_onednn_linears
from .default_model import default_model_path, gguf_bars_follow_transformers

logger = logging.getLogger(__name__)

DEFAULT_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `default` is (adapters trained on it name it)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    source: str  # what the model was loaded from, for logs and output metadata
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    device: torch.device
    dtype: torch.dtype
    # Each layer's attention as the load check recorded it (attention_hook.check_model); None: not checked here
    # (a model built in code), so the engine probes it where it needs to know.
    layers: dict[int, LayerAttention] | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"engine.device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"engine.device is {device!r}, but torch {torch.__version__} sees no CUDA GPU here; "
                "use device auto or cpu, or install a CUDA build of torch"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"engine.device is {device!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
    return names[dtype]


def source_kwargs(name: str, allow_download: bool) -> tuple[str, dict]:
    if name == "default":
        return str(default_model_path()), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if path.exists():  # an input file passed as the model (--model in.jsonl): say what it is, not that it is missing
        raise ModelLoadError(f"model {path} is a file, not a model folder or a .gguf file")
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model folder {path} does not exist")
    # A hub name: the local cache first; the hub only when allowed (see download_allowed).
    return name, {"local_files_only": True}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cached_snapshot(name: str) -> Path | None:
    """The local cache's folder for hub name `name` (what an earlier download left), or None if it has none."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: transformers gives the error then
        return None


def downloaded_json(name: str) -> Path:
    """The local cache's folder for hub name `name` once its JSON files (configs, a safetensors index) are in it."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.json"]))


def check_folder_safety(folder: Path, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse, before transformers runs anything, a folder that needs pickled weights or its own code."""
    if not allow_pickle and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelLoadError(
                f"{folder} has only pickled weights ({', '.join(pickled)}), and loading a pickle can run code "
                "hidden in it; "
                "convert them to safetensors, or set engine.allow_pickle: true if you trust where the model came from"
            )
    if not allow_pickle:
        # transformers loads each shard a safetensors index names, and unpickles one whose name is not .safetensors.
        shards = sorted({s for index in folder.glob("*.safetensors.index*.json") for s in _indexed_shards(index)})
        pickled = [s for s in shards if not s.endswith(".safetensors")]
        if pickled:
            raise ModelLoadError(
                f"{folder} has a safetensors index naming weight files that are not safetensors "
                f"({', '.join(pickled)}), and loading those unpickles them, which can run code hidden in them; "
                "set engine.allow_pickle: true only if you trust where the model came from"
            )
    if not trust_remote_code:
        for config_name in ("config.json", "tokenizer_config.json"):
            try:
                auto_map = json.loads((folder / config_name).read_text()).get("auto_map")
            except (OSError, ValueError, AttributeError):
                continue
            if auto_map:
                raise ModelLoadError(
                    f"{folder} ships its own Python code (auto_map in {config_name}), which kvbatch does not run "
                    "by default; "
                    "set engine.trust_remote_code: true only if you trust where the model came from"
                )


def _indexed_shards(index: Path) -> list[str]:
    """The weight files a safetensors index maps tensors to (none if it is not such an index)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(v) for v in weight_map.values()] if isinstance(weight_map, dict) else []


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub cannot be reached (None if it answers), found in seconds: huggingface_hub itself retries
    an unreachable host with back-off for about a minute before giving up."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection(
            (url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s
        ):
            return None
    except OSError as exc:
        return f"{endpoint} cannot be reached ({exc})"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """No network while loading from the local cache: huggingface_hub otherwise contacts the hub even for
    local_files_only loads (an agent-detection registry fetched once per process, with a 3 s timeout)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def download_allowed(name: str, allow_download: bool) -> None:
    """Raise unless a model missing from the local cache may be, and can be, downloaded now."""
    if not allow_download:
        raise ModelLoadError(
            f"model {name!r} is not a local folder and not in the local Hugging Face cache, and downloads are off; "
            "pass a local folder, or set engine.allow_download: true on a machine that can reach the hub"
        )
    if offline():
        raise ModelLoadError(
            f"model {name!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
        )
    reason = hub_unreachable()
    if reason:
        raise ModelLoadError(
            f"model {name!r} is not in the local Hugging Face cache and cannot be downloaded: {reason}"
        )


def eos_ids(generation_config, tokenizer) -> tuple[int, ...]:
    """The ids that end a sequence: the model's generation config's, then the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for token_id in source if isinstance(source, (list, tuple)) else [source]:
            if token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


_UNSUPPORTED = (
    "model {name!r} cannot run on kvbatch's paged attention: {why}. kvbatch runs the models whose attention goes "
    "through transformers' attention interface (the families tested are listed in the README)"
)
_DEFAULT_HINT = "; remove the converted default model's folder (see KVBATCH_CACHE) and it is converted again"


def has_sentencepiece() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None


def _tokenizer_hint(folder: Path | None) -> str:
    """Why a folder whose tokenizer is only a SentencePiece tokenizer.model (Llama 2, Mistral, T5-era models) failed
    to load: without the sentencepiece package transformers reads the file as a tiktoken vocabulary, and its
    error asks for tiktoken, which cannot read it either."""
    if folder is None or not (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
        return ""
    if has_sentencepiece():
        return ""
    return (
        "; its tokenizer is only tokenizer.model, which is read with the sentencepiece package, and that is not "
        "installed (install it, or save the tokenizer with a tokenizer.json)"
    )


def _check_weights(name: str, info: dict) -> None:
    """Refuse a checkpoint with weights missing or of the wrong shape: transformers would fill them at random, and
    every run (and every resume) would generate from other random weights."""
    missing = list(info.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        listed = ", ".join((missing + mismatched)[:5]) + (" ..." if len(missing) + len(mismatched) > 5 else "")
        raise ModelLoadError(
            f"model {name!r} lacks weights its config needs, or has them in another shape ({listed}); "
            "transformers would fill them at random"
        )


def length_dependent_rope(config) -> int | None:
    """The length past which the model's rotary frequencies depend on the forward's longest position, or None.

    LongRoPE (Phi-3/3.5 128k, Phi-4-mini) rotates every position of a forward with its long factors once any
    position of that forward passes original_max_position_embeddings, and with its short ones otherwise. In
    transformers' generate a forward is one sequence (its whole prompt, then one token); in the engine it is a
    step of chunks and decodes of many rows: a row's keys were rotated with the short factors in early chunks and
    the long ones later, or with the long factors because another row shared its step. Up to this length every
    forward takes the short factors, as transformers' does."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_layer = params.values() if params and all(isinstance(v, dict) for v in params.values()) else [params]
    limits = [
        int(p["original_max_position_embeddings"])
        for p in per_layer
        if (p.get("rope_type") or p.get("type")) == "longrope" and p.get("original_max_position_embeddings")
    ]
    return min(limits) if limits else None


def context_length(config, requested: int | None) -> int:
    # Sliding-window layers attend to their window in the paged kernels, so the whole native context runs.
    native = getattr(config, "max_position_embeddings", None) or 2048
    rope_limit = length_dependent_rope(config)
    if rope_limit is not None and rope_limit < (requested or native):
        if requested is not None:
            raise ContextLengthError(
                f"max_model_len {requested} is past this model's original_max_position_embeddings ({rope_limit}): "
                "there LongRoPE's frequencies follow each forward's longest position, which batched steps do not "
                f"reproduce; set engine.max_model_len to at most {rope_limit}"
            )
        logger.warning(
            "context capped at %d tokens (of %d): past original_max_position_embeddings, longrope's frequencies "
            "follow each forward's longest position, which the engine's batched steps do not reproduce",
            rope_limit,
            native,
        )
        return rope_limit
    if requested is None:
        return native
    if requested > native:
        raise ContextLengthError(f"max_model_len {requested} exceeds the model's context of {native} tokens")
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
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention_hook.register()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, kwargs = source_kwargs(name, allow_download)
    if "gguf_file" in kwargs:
        gguf_bars_follow_transformers()
    # A hub name already in the cache is held to the same rules as a folder, before transformers reads it.
    folder = (
        Path(source) if Path(source).is_dir() else cached_snapshot(source) if kwargs.get("local_files_only") else None
    )
    if folder is not None:
        check_folder_safety(folder, allow_pickle or "gguf_file" in kwargs, trust_remote_code)
    if trust_remote_code:
        logger.warning("trust_remote_code is on: %s may run its own Python code", name)
    if allow_pickle:
        logger.warning("pickled weights are allowed: loading %s may run code hidden in its weight files", name)

    def load(kwargs: dict) -> tuple:
        # No clean-up of spaces around punctuation: the text is what the model generated (and BPE ignores it anyway).
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, clean_up_tokenization_spaces=False, **kwargs
        )
        model, info = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attention_hook.ATTN_IMPLEMENTATION,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle or "gguf_file" in kwargs else True,
            output_loading_info=True,
            **kwargs,
        )
        _check_weights(name, info)
        return tokenizer, model

    try:
        try:
            with hub_offline():  # the local cache or folder first, without touching the network
                tokenizer, model = load(kwargs)
        except OSError:
            if not kwargs.get("local_files_only"):
                raise
            download_allowed(name, allow_download)  # not in the cache: download only if allowed and possible
            logger.warning("downloading %s from the Hugging Face hub", name)
            # Its JSON first (configs, the safetensors index): held to a folder's rules before any weights come.
            check_folder_safety(downloaded_json(name), allow_pickle, trust_remote_code)
            tokenizer, model = load({**kwargs, "local_files_only": False})
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}{_tokenizer_hint(folder)}") from exc
    except (ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"model {name!r} ships its own Python code; set engine.trust_remote_code: true only if you trust it"
            ) from exc
        if "safetensors" in str(exc) and not allow_pickle:
            raise ModelLoadError(
                f"model {name!r} has no safetensors weights; set engine.allow_pickle: true to load pickled ones if "
                "you trust it"
            ) from exc
        if isinstance(exc, KeyError) and attention_hook.ATTN_IMPLEMENTATION in str(exc):
            raise ModelLoadError(_UNSUPPORTED.format(name=name, why="its attention cannot be replaced")) from exc
        raise ModelLoadError(f"cannot load model {name!r}: {exc}{_tokenizer_hint(folder)}") from exc
    except ModelLoadError:
        raise
    except MemoryError as exc:
        raise ModelLoadError(f"not enough memory to load model {name!r}") from exc
    except (RuntimeError, SafetensorError) as exc:  # a truncated weights file, a tensor of the wrong shape
        if "allocate memory" in str(exc):  # "unable to mmap ...: Cannot allocate memory", DefaultCPUAllocator
            raise ModelLoadError(f"not enough memory to load model {name!r}: {str(exc).splitlines()[0]}") from exc
        raise ModelLoadError(
            f"cannot load model {name!r}: its weights are damaged or do not fit its config "
            f"({type(exc).__name__}: {exc}){_DEFAULT_HINT if name == 'default' else ''}"
        ) from exc
    if not getattr(model, "_supports_attention_backend", False):
        # BLOOM, XGLM, MPT, CodeGen, StableLM, Mamba...: attention (or none) in their own code, which would ignore the
        # paged cache (wrong text, or every row an error) instead of failing here.
        raise ModelLoadError(
            _UNSUPPORTED.format(
                name=name, why=f"{model.config.model_type} does not send its attention through that interface"
            )
        )
    model.to(torch_device).eval()
    try:
        layers = attention_hook.check_model(model, name)
    except attention_hook.ForwardFailedError as exc:
        raise ModelLoadError(f"{exc}, so kvbatch does not load it") from exc
    except attention_hook.UnsupportedAttentionError as exc:
        raise ModelLoadError(f"{exc}; kvbatch would compute another model's numbers, so it does not load it") from exc
    if torch_device.type == "cpu" and torch_dtype == torch.float32:
        use_onednn_linears(model)  # AVX-512 GEMMs on any x86 CPU (MKL uses them only on Intel's)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=name if name != "default" else f"default ({source})",
        eos_token_ids=eos_ids(getattr(model, "generation_config", None), tokenizer),
        max_model_len=context_length(model.config, max_model_len),
        device=torch_device,
        dtype=torch_dtype,
        layers=layers,
    )
