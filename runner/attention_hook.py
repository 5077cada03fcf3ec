"""kvbatch's paged attention, plugged into transformers through its AttentionInterface.

Every supported model calls `attention_interface(module, query, key, value, mask, scaling=..., **kwargs)`
after its rotary embedding; the kwargs given to the model's forward reach it unchanged. The runner
passes a `StepContext` as `kvbatch_step`, so this function writes the step's K/V into the pages of
layer `module.layer_idx` and attends over them. The model itself keeps no cache.

The mask transformers builds is not used: the paged kernels build causal (and sliding-window) masks from
positions. So every other argument a layer passes must be one the kernels implement (`softcap`,
`sliding_window`, attention sinks as `s_aux` or `sinks`) or one that changes nothing at inference; any other
is refused, by `check_model` when the model loads and again at every call, rather than silently ignored.
A layer's window is the one of the mask transformers would build for it, which `check_model` reads from the mask
function the model asks for (a layer may pass a window its mask does not have, or have one it does not pass).
`check_model` also refuses layers whose keys and values do not fit the pages (`kv_layout`, from the config), and
layers that drop the forward's keyword arguments (the step would never reach them), and models that number
positions otherwise than from 0 where the forward gives none (the engine gives each token its index).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvbatch.cache.backends import AttentionBackend
from kvbatch.cache.kv_cache import KVCache
from kvbatch.cache.metadata import PLAIN, AttentionMetadata, LayerAttention

ATTN_IMPLEMENTATION = "kvbatch_paged"

# Arguments that change nothing at inference (the forward's own kwargs passed through, and the cache flags).
_INERT = frozenset(
    {"kvbatch_step", "position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits"}
)
_SINK_NAMES = ("s_aux", "sinks")
# Layer kinds of config.layer_types whose mask is causal (within a window for the sliding ones).
_LAYER_KINDS = frozenset({"full_attention", "sliding_attention"})


class UnsupportedAttentionError(ValueError):
    """A model's attention asks for something kvbatch's paged attention does not compute."""


class ForwardFailedError(UnsupportedAttentionError):
    """The model's own code fails on the load check's plain forward: it would fail every row."""


class NoStepContextError(RuntimeError):
    """The attention was called without the step's context: outside the engine, or by a layer that drops the
    keyword arguments of the model's forward."""


def kv_layout(config) -> tuple[int, int]:
    """(key/value heads, head size) of every layer's pages, from a transformers config (its text config)."""
    text_config = config.get_text_config()
    try:
        num_heads = text_config.num_attention_heads
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
        return num_kv_heads, getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    except RuntimeError as exc:  # transformers refuses one value for all layers where layers have their own
        raise UnsupportedAttentionError(
            f"its layers have attention shapes of their own ({exc}); kvbatch's pages take one shape"
        ) from None


@dataclass
class StepContext:
    meta: AttentionMetadata
    kv_cache: KVCache
    backend: AttentionBackend
    # layer -> the sliding window of its mask (0: none), as check_model read it; None: the layers' own arguments
    sliding_windows: dict[int, int] | None = None


class _Probe:
    """Passed as kvbatch_step by check_model: each layer records what it asks for and the sizes of its query,
    key and value heads, and attends to nothing."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerAttention] = {}
        # layer -> (key/value heads, query head size, key head size, value head size)
        self.shapes: dict[int, tuple[int, int, int, int]] = {}
        self.repeated: set[int] = set()  # layer indexes that attended more than once in the forward
        self.masked: set[int] = set()  # layers handed a mask that is more than causal
        # layer -> the window of the mask transformers builds for it (0: none; None: neither causal nor a window)
        self.mask_windows: dict[int, int | None] = {}


def layer_attention(module: torch.nn.Module, dropout: float, kwargs: dict) -> LayerAttention:
    """What the layer's arguments add to plain causal attention; raises UnsupportedAttentionError for any
    argument the paged kernels would ignore."""
    where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if dropout:
        raise UnsupportedAttentionError(f"{where} passes attention dropout {dropout}; kvbatch runs models in eval mode")
    # sdpa reads the module's own flag when the call gives none (BERT-style layers mark bidirectional attention so).
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise UnsupportedAttentionError(f"{where} asks for non-causal attention (is_causal=False)")
    unknown = sorted(
        name
        for name, value in kwargs.items()
        if name not in _INERT
        and name not in ("softcap", "sliding_window", "is_causal", *_SINK_NAMES)
        and value is not None
    )
    if unknown:
        raise UnsupportedAttentionError(
            f"{where} passes the attention argument(s) {', '.join(unknown)}, which kvbatch's paged attention "
            "does not implement"
        )
    softcap = kwargs.get("softcap") or 0.0
    window = kwargs.get("sliding_window") or 0
    sinks = next((kwargs[name] for name in _SINK_NAMES if kwargs.get(name) is not None), None)
    if softcap == 0.0 and window == 0 and sinks is None:
        return PLAIN
    if sinks is not None:
        sinks = sinks.detach().reshape(-1).to(torch.float32)  # [num_heads]
    return LayerAttention(softcap=float(softcap), sliding_window=int(window), sinks=sinks)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_rows, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_rows, head_dim]
    value: torch.Tensor,  # [1, num_kv_heads, num_rows, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:  # ([1, num_rows, num_heads, head_dim], no weights)
    step: StepContext | _Probe | None = kwargs.get("kvbatch_step")
    if step is None:
        raise NoStepContextError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} needs a kvbatch step context; "
            f"this model was loaded for kvbatch's engine and cannot run model.generate()"
        )
    layer_options = layer_attention(module, dropout, kwargs)
    if isinstance(step, _Probe):
        if module.layer_idx in step.layers:
            step.repeated.add(module.layer_idx)
        if hasattr(attention_mask, _MASK_WINDOW):
            step.mask_windows[module.layer_idx] = getattr(attention_mask, _MASK_WINDOW)
        elif not _plain_mask(attention_mask):
            step.masked.add(module.layer_idx)
        step.layers[module.layer_idx] = layer_options
        step.shapes[module.layer_idx] = (key.shape[1], query.shape[-1], key.shape[-1], value.shape[-1])
        # The output has the values' head size, which the layer's o_proj expects (a query's may differ).
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    layer = module.layer_idx
    if step.sliding_windows is not None and step.sliding_windows[layer] != layer_options.sliding_window:
        layer_options = dataclasses.replace(layer_options, sliding_window=step.sliding_windows[layer])
    q = query[0].transpose(0, 1)  # [num_rows, num_heads, head_dim]
    k = key[0].transpose(0, 1)  # [num_rows, num_kv_heads, head_dim]
    v = value[0].transpose(0, 1)
    key_cache, value_cache = step.kv_cache.key[layer], step.kv_cache.value[layer]
    step.backend.write_kv(key_cache, value_cache, k, v, step.meta.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = step.backend.paged_attention(q, key_cache, value_cache, step.meta, scale, layer_options)
    return out.unsqueeze(0), None


def _plain_mask(mask: torch.Tensor | None) -> bool:
    """Whether a one-token forward's mask lets the token attend to itself with no bias. transformers builds no mask
    for an attention it has no mask function for (this one); a mask that arrives was built by the layer itself, a
    bias the paged kernels would drop (Doge's per-key dynamic mask)."""
    if mask is None:
        return True
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


_MASK_WINDOW = "kvbatch_sliding_window"  # set by _read_mask on the mask it hands the layers


def _read_mask(mask_function: Callable, config=None, device=None, **kwargs) -> torch.Tensor:
    """The mask function transformers calls for kvbatch's attention during the load check's forward: instead of a
    mask, which the paged kernels would not read, it returns a one-token mask that lets the token attend to itself,
    marked with the window the mask would have (_mask_window)."""
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # [batch, heads, queries, keys]
    context = getattr(config, "max_position_embeddings", None) or 1 << 17
    try:
        setattr(mask, _MASK_WINDOW, _mask_window(mask_function, context))
    except (IndexError, RuntimeError):  # a mask over the input's own tokens (blocks): unmarked, the config decides
        pass
    return mask


def _mask_window(mask_function: Callable, context: int) -> int | None:
    """The sliding window of a mask function of transformers (0: plain causal), read from the keys the last query
    of a `context`-token sequence attends to, and checked on it and on the first 64 queries; None if the mask is
    neither causal nor a sliding window (chunked, bidirectional)."""
    zero = torch.zeros((), dtype=torch.long)

    def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:  # [queries, keys] bool
        mask = mask_function(zero, zero, q_idx[:, None], kv_idx[None, :])
        return torch.broadcast_to(mask, (len(q_idx), len(kv_idx)))

    first, last = torch.arange(min(64, context)), torch.tensor([context - 1])
    num_keys = int(allowed(last, torch.arange(context)).sum())
    window = num_keys if num_keys < context else 0
    for q_idx, kv_idx in ((first, torch.arange(min(65, context))), (last, torch.arange(context))):
        want = kv_idx[None, :] <= q_idx[:, None]
        if window:
            want &= kv_idx[None, :] > q_idx[:, None] - window
        if not torch.equal(allowed(q_idx, kv_idx), want):
            return None
    return window


@contextlib.contextmanager
def _masks_read() -> Iterator[None]:
    """transformers builds no mask for an attention without a mask function (this one at run time, so no step pays
    for it); during the load check's forward, _read_mask is its mask function."""
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _read_mask)
    try:
        yield
    finally:
        del AttentionMaskInterface._global_mapping[ATTN_IMPLEMENTATION]


def _follow_masks(probe: _Probe, name: str) -> None:
    """Each layer's window becomes that of the mask transformers builds for it, where the layer received one:
    OLMoE passes its config's sliding_window to the attention but builds a full causal mask, PhiMoE the reverse."""
    for index, window in sorted(probe.mask_windows.items()):
        if window is None:
            raise UnsupportedAttentionError(
                f"model {name!r}: layer {index} is given a mask that is neither causal nor a sliding window, which "
                "kvbatch's paged attention does not build"
            )
        if probe.layers[index].sliding_window != window:
            probe.layers[index] = dataclasses.replace(probe.layers[index], sliding_window=window)


def _check_config(config, name: str) -> None:
    kinds = set(getattr(config, "layer_types", None) or ()) - _LAYER_KINDS
    if kinds:
        raise UnsupportedAttentionError(
            f"model {name!r} has layers of kind {', '.join(sorted(kinds))} (config.layer_types), which "
            "kvbatch's paged attention does not serve (it serves full and sliding-window attention layers)"
        )
    for field in ("attention_chunk_size", "use_bidirectional_attention"):
        if getattr(config, field, None):
            raise UnsupportedAttentionError(
                f"model {name!r} sets config.{field}, a mask kvbatch's paged attention does not build"
            )


@torch.inference_mode()
def check_model(model: torch.nn.Module, name: str) -> dict[int, LayerAttention]:
    """Refuse, at load, a model whose attention asks for anything the paged kernels do not compute: one
    forward of one token records every layer's arguments (the layers attend to nothing, so it costs only the
    GEMMs of one token); a second, without position_ids, checks that the model numbers positions from 0 as the
    engine does. Returns each layer's LayerAttention. Raises UnsupportedAttentionError."""
    config = model.config
    _check_config(config, name)
    probe = _Probe()
    token = _probe_token(model)
    with _masks_read():
        output = _probe_forward(model, name, input_ids=token, position_ids=torch.zeros_like(token), kvbatch_step=probe)
    if not probe.layers:
        raise UnsupportedAttentionError(f"model {name!r}: no layer sent its attention through kvbatch's interface")
    if probe.repeated:
        raise UnsupportedAttentionError(
            f"model {name!r}: layer {min(probe.repeated)} attends more than once in a forward (twice with one "
            "layer index: a differential or looped layer), and each call would overwrite its pages"
        )
    if probe.masked:
        raise UnsupportedAttentionError(
            f"model {name!r}: layer {min(probe.masked)} builds its own attention mask or bias, which kvbatch's "
            "paged attention does not apply"
        )
    _follow_masks(probe, name)
    try:
        layout = kv_layout(config)
    except UnsupportedAttentionError as exc:
        raise UnsupportedAttentionError(f"model {name!r}: {exc}") from None
    _check_shapes(probe.shapes, layout, name)
    _check_positions(model, token, output.logits, name)
    # Where no mask reached a layer (its model builds none through transformers' mask functions), the config says
    # what mask transformers would build, and it must be the one the kernels build from the layer's arguments.
    if len(probe.mask_windows) < len(probe.layers):
        _check_window(config, probe.layers, name)
    layer_types = getattr(config, "layer_types", None)
    for index, layer in probe.layers.items():
        if index in probe.mask_windows:
            continue
        if layer_types and index < len(layer_types) and layer_types[index] == "sliding_attention":
            if not layer.sliding_window:
                raise UnsupportedAttentionError(
                    f"model {name!r}: layer {index} is a sliding-window layer (config.layer_types) but passes no "
                    "sliding_window to its attention"
                )
    return probe.layers


def _probe_token(model: torch.nn.Module) -> torch.Tensor:  # [1, 1] int64 on the model's device
    # Not the padding token, which RoBERTa-style embeddings give a position of its own (see _check_positions).
    token_id = 1 if getattr(model.config.get_text_config(), "pad_token_id", None) == 0 else 0
    return torch.full((1, 1), token_id, dtype=torch.long, device=next(model.parameters()).device)


@torch.inference_mode()
def layer_options(model: torch.nn.Module, name: str) -> dict[int, LayerAttention]:
    """Each layer's LayerAttention, from one forward of one token (the layers attend to nothing), for a model
    check_model has passed: what a backend must compute for it."""
    probe = _Probe()
    token = _probe_token(model)
    with _masks_read():
        _probe_forward(model, name, input_ids=token, position_ids=torch.zeros_like(token), kvbatch_step=probe)
    _follow_masks(probe, name)
    return probe.layers


def _probe_forward(model: torch.nn.Module, name: str, **inputs):
    """One forward of the load check, whatever it raises turned into UnsupportedAttentionError: a model that fails
    here (a drafter that needs its main model's states, an encoder that needs a language id) would fail every row."""
    try:
        return model(**inputs, use_cache=False)
    except UnsupportedAttentionError as exc:
        raise UnsupportedAttentionError(f"model {name!r}: {exc}") from None
    except NoStepContextError:
        raise UnsupportedAttentionError(
            f"model {name!r}: its {model.config.model_type} layers call the attention without the keyword arguments "
            "of the model's forward, so kvbatch's paged attention cannot reach its pages"
        ) from None
    except torch.cuda.OutOfMemoryError:
        raise  # the device's state, not the model's code
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own code, named rather than raised mid-job
        raise ForwardFailedError(
            f"model {name!r}: a one-token forward fails ({type(exc).__name__}: {exc}), as every row would"
        ) from exc


def _check_positions(model: torch.nn.Module, token: torch.Tensor, logits: torch.Tensor, name: str) -> None:
    """kvbatch gives each token its index from 0 as position_ids. A model that numbers positions otherwise when the
    forward gives none (RoBERTa-style embeddings count from padding_idx + 1 and skip padding tokens, from the token
    ids) computes other numbers from them than transformers' own forward: the first token, once without
    position_ids, must give the logits it gave at position 0."""
    # token: [1, 1] int64; logits: [1, 1, vocab] of the probe forward with position_ids [[0]]
    own = _probe_forward(model, name, input_ids=token, kvbatch_step=_Probe()).logits.float()
    # Same inputs give the same logits up to rounding (a GPU's atomic adds reorder sums: bf16 ulps); another position
    # embedding moves them by a good part of their size.
    if (own - logits.float()).abs().max() > 0.05 * logits.float().abs().max():
        raise UnsupportedAttentionError(
            f"model {name!r}: its {model.config.model_type} model numbers its own positions otherwise than from 0 "
            "when the forward gives none (as RoBERTa's embeddings count from padding_idx + 1), where kvbatch "
            "gives each token its index from 0"
        )


def _check_window(config, layers: dict[int, LayerAttention], name: str) -> None:
    """A config without layer_types whose sliding window is shorter than the context has its mask built from that
    window: some layer must pass it on, else the kernels would attend past it (PhiMoE builds the mask and passes no
    window)."""
    text_config = config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    if (
        getattr(text_config, "layer_types", None)
        or not window
        or getattr(text_config, "use_sliding_window", None) is False
    ):
        return
    context = getattr(text_config, "max_position_embeddings", None)
    if context is not None and window >= context:
        return
    if not any(layer.sliding_window for layer in layers.values()):
        raise UnsupportedAttentionError(
            f"model {name!r}: its config has a sliding window of {window} tokens, which no layer passes to its "
            "attention"
        )


def _check_shapes(shapes: dict[int, tuple[int, int, int, int]], layout: tuple[int, int], name: str) -> None:
    """Every layer's keys and values must fit the pages kv_layout sizes from the config, one head size for
    queries, keys and values (the kernels take one)."""
    num_kv_heads, head_dim = layout
    for index, (heads, q_dim, k_dim, v_dim) in sorted(shapes.items()):
        if not q_dim == k_dim == v_dim:
            raise UnsupportedAttentionError(
                f"model {name!r}: layer {index} attends with heads of {q_dim} (queries), {k_dim} (keys) and "
                f"{v_dim} (values) dimensions; kvbatch's paged attention takes one head size"
            )
        if (heads, k_dim) != layout:
            raise UnsupportedAttentionError(
                f"model {name!r}: layer {index} attends with {heads} key/value heads of {k_dim} dimensions, where "
                f"its config gives {num_kv_heads} of {head_dim}, the size of kvbatch's pages"
            )


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
