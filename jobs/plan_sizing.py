"""What `kvbatch plan` needs of a model, read without loading the weights wherever a run's numbers allow it.

A plan needs the tokenizer, the context length and the KV pool. On the CPU the pool is arithmetic on the
model's config (kvbatch.cache.budget), so the config and tokenizer files suffice and the weights are never
read. On a GPU the pool is what a profiled forward pass of the loaded model leaves free (pool_sizing.py),
and a tensor-parallel engine holds a share of the kv heads per rank: those plans build the engine itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbatch.cache.backends import select_backend
from kvbatch.cache.budget import PoolSize
from kvbatch.errors import BackendUnavailableError
from kvbatch.jobs.run import EngineCache, default_engine_factory
from kvbatch.jobs.spec import JobSpec, job_adapters
from kvbatch.runner.engine import EngineConfig

# The loader's own steps, so a plan finds a model exactly where a run would, with the same safety checks.
from kvbatch.runner.model_loader import (
    ModelLoadError,
    check_folder_safety,
    context_length,
    download_allowed,
    eos_ids,
    hub_offline,
    resolve_device,
    resolve_dtype,
    source_kwargs,
)
from kvbatch.runner.pool_sizing import fixed_pool_size, kv_cache_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSizing:
    tokenizer: Any
    pool: PoolSize
    max_model_len: int
    max_num_seqs: int | None
    prefix_cache: bool
    vocab_size: int  # the model's logits width: structured-output constraints and the job's token ids
    eos_token_ids: tuple[int, ...]  # the engine's (min_tokens bans them): its admission rule needs them
    # The LoRA adapters as the engine registers them (runner/lora Adapters; over a meta-device model without
    # weights): why each one's rows fail. None where the job has none.
    adapters: Any = None


def model_sizing(job: JobSpec, engines: EngineCache) -> ModelSizing:
    """The tokenizer, context and pool a run of `job` would use; the weights load only when the pool needs them."""
    reason = _why_weights_needed(job, engines)
    if reason is None:
        return sizing_without_weights(
            EngineConfig(model=job.model, **job.engine.settings()), engines.sized_adapters(job)
        )
    log.info("plan loads the model: %s", reason)
    engine, _ = engines.get(job)
    config = getattr(engine, "config", None)
    return ModelSizing(
        engine.tokenizer,
        engine.pool_size,
        engine.max_model_len,
        getattr(config, "max_num_seqs", None),
        bool(getattr(config, "prefix_cache", False)),
        engine.vocab_size,
        _engine_eos_ids(engine),
        getattr(engine, "adapters", None),
    )


def _engine_eos_ids(engine: Any) -> tuple[int, ...]:
    """A loaded engine's EOS ids; an engine without a loaded model (a caller's own) has its tokenizer's."""
    loaded = getattr(engine, "loaded", None)
    if loaded is not None:
        return tuple(loaded.eos_token_ids)
    return eos_ids(None, engine.tokenizer)


def _why_weights_needed(job: JobSpec, engines: EngineCache) -> str | None:
    if engines.factory is not default_engine_factory:
        return "its engines come from a caller's own factory"
    if job.parallel.tensor > 1:
        return "a tensor-parallel pool is sized on each rank"
    if resolve_device(job.engine.settings().get("device", EngineConfig.device)).type != "cpu":
        return "a GPU's KV pool is sized by profiling a forward pass of the loaded model"
    return None


def sizing_without_weights(config: EngineConfig, adapters: dict[str, str] | None = None) -> ModelSizing:
    """The Engine's CPU sizing (engine.py: kv_spec, _size_pool) from the config and tokenizer files alone.
    `adapters`: the LoRA adapters its slots are sized for, whose host copies a CPU engine takes out of kv_cache_gib."""
    tokenizer, model_config = load_tokenizer_and_config(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    try:
        backend = select_backend(config.attention_backend, device, config.block_size)
    except ValueError as exc:  # a backend asked for by name that cannot run here, refused as the Engine refuses it
        raise BackendUnavailableError(str(exc)) from None
    served = _weightless_adapters(config, model_config, adapters, device, dtype) if adapters else None
    reserved = served.host_bytes if served is not None else 0
    pool = fixed_pool_size(kv_cache_spec(model_config, config.block_size, backend.name, dtype), config, reserved)
    return ModelSizing(
        tokenizer,
        pool,
        context_length(model_config, config.max_model_len),
        config.max_num_seqs,
        config.prefix_cache,
        model_config.get_text_config().vocab_size,
        eos_ids(_generation_config(config, model_config), tokenizer),
        served,
    )


def _weightless_adapters(
    config: EngineConfig, model_config: Any, adapters: dict[str, str], device: Any, dtype: Any
) -> Any:
    """The engine's own Adapters (engine.py: _make_adapters) over a meta-device model built from the config: its
    slot sizes and its checks of each adapter against the model's layers, without the model's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvbatch.runner.lora.adapters import Adapters
    from kvbatch.runner.model_loader import DEFAULT_HUB_NAME

    if config.max_loras < 1:  # as the engine refuses it
        raise ValueError(f"engine.max_loras must be >= 1 to serve adapters, got {config.max_loras}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return Adapters(
        model,
        adapters,
        device,
        dtype,
        config.max_loras,
        config.max_cpu_loras or config.max_loras,
        config.allow_pickle,
        DEFAULT_HUB_NAME if config.model.startswith("default") else config.model,
    )


def _generation_config(config: EngineConfig, model_config: Any) -> Any:
    """The generation config from_pretrained gives the model (its EOS ids): its file's, else the model config's."""
    from transformers import GenerationConfig

    source, kwargs = source_kwargs(config.model, config.allow_download)
    try:
        with hub_offline():
            return GenerationConfig.from_pretrained(source, **kwargs)
    except OSError:
        return GenerationConfig.from_model_config(model_config)


def load_tokenizer_and_config(config: EngineConfig) -> tuple[Any, Any]:
    """load_model's tokenizer and model config, found the same way (local first, download only if allowed)."""
    from transformers import AutoConfig, AutoTokenizer

    source, kwargs = source_kwargs(config.model, config.allow_download)
    if Path(source).is_dir():
        check_folder_safety(Path(source), config.allow_pickle or "gguf_file" in kwargs, config.trust_remote_code)

    def load(kwargs: dict) -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=config.trust_remote_code, clean_up_tokenization_spaces=False, **kwargs
        )
        return tokenizer, AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code, **kwargs)

    try:
        try:
            with hub_offline():
                return load(kwargs)
        except OSError:
            if not kwargs.get("local_files_only"):
                raise
            download_allowed(config.model, config.allow_download)
            log.warning("downloading %s's config and tokenizer from the Hugging Face hub", config.model)
            return load({**kwargs, "local_files_only": False})
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {config.model!r}: {exc}") from exc
    except (ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"model {config.model!r} ships its own Python code; set engine.trust_remote_code: true only if you "
                "trust it"
            ) from exc
        raise ModelLoadError(f"cannot read model {config.model!r}'s config or tokenizer: {exc}") from exc


def adapter_problems(job: JobSpec, sizing: ModelSizing) -> dict[str, str | None]:
    """Each LoRA adapter of the job -> why its rows would fail (None: they run), as the engine's adapters say."""
    adapters = job_adapters(job)
    if not adapters:
        return {}
    if sizing.adapters is None:
        return dict.fromkeys(adapters, "no adapters")
    return {name: sizing.adapters.problem(name) for name in adapters}
