"""Reading a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for one base model.

A LoRA adapter adds, to a linear layer y = x W^T, a low-rank update scaled by alpha over the rank:

    y = x W^T + scaling * (x A^T) B^T        A: [rank, in_features]   B: [out_features, rank]
    scaling = alpha / rank   (alpha / sqrt(rank) under rsLoRA)

PEFT saves A and B under `base_model.model.<module>.lora_A.weight` / `lora_B.weight`; rank and alpha may
differ per module (`rank_pattern`, `alpha_pattern`). kvbatch keeps B with the scaling folded in.

Everything that makes an adapter unusable here is an `AdapterError` naming the adapter: a missing folder, a
config value of the wrong type, pickled weights only (without allow_pickle) or a damaged weights file, shapes of
another base model, a base model named other than the engine's, and what kvbatch does not run: LoRA variants
whose forward is not the update above (DoRA, biases, `modules_to_save`, embeddings, lm_head, ...) and adapters
whose initialisation PEFT replays on the base weights when it loads them (PiSSA, OLoRA, CorDA, LoftQ, Astra), and
a config field kvbatch does not know, set (a newer PEFT's variant).
`inspect_adapter` reads the safetensors header only (sizes, checks); `load_adapter` reads the tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# PEFT loads only weights named under its model's prefix; it drops any other name (as an unexpected key).
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# Config switches of LoRA variants whose forward is not the plain low-rank update above.
_UNSUPPORTED_SWITCHES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "modules_to_save": "modules_to_save (whole modules trained alongside)",
    # PEFT sets it itself for a MoE model's routed experts (3-D parameters) when target_modules names their
    # projections (all-linear, gate/up/down): the user did not ask for it by that name.
    "target_parameters": "LoRA on parameters (target_parameters, which PEFT adds for a MoE model's routed experts)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# The other fields of PEFT's LoraConfig (0.22): those read below, and those that leave a loaded adapter's forward
# the plain update (bookkeeping, training-only settings, an initialisation's own settings, which init_lora_weights
# decides on). A field outside both lists, set, is refused: a newer PEFT's variant would otherwise run as plain LoRA.
_KNOWN_FIELDS = frozenset(
    {
        *("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"),
        *("inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights"),
        *("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "bias", "lora_dropout"),
        *("megatron_config", "megatron_core", "runtime_config", "ensure_weight_tying", "qalora_group_size"),
        *("loftq_config", "eva_config", "corda_config", "astra_config", "lora_ga_config"),
    }
)
# init_lora_weights values (prefixes) that PEFT replays when it loads the adapter: they subtract the initial
# update from the base weights (W - scaling * B0 A0), so the saved A and B mean something else over the plain
# base. PEFT converts such an adapter to plain LoRA when it is saved with path_initial_model_for_weight_conversion.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "astra")
# init_lora_weights names PEFT loads without touching the base weights, as it spells them (it takes 'gaussian' and
# 'mica' in any case): each gives a layer B A = 0 to start with.
_ZERO_UPDATE_INITS = ("gaussian", "eva", "orthogonal", "lora_ga", "mica", "nora")


class AdapterError(ValueError):
    """An adapter that cannot run on this engine's model; the message names it and says why."""


@dataclass(frozen=True)
class LoraConfig:
    """What kvbatch reads of adapter_config.json, each value checked."""

    alpha: float  # lora_alpha
    use_rslora: bool
    alpha_pattern: dict[str, float]  # module name pattern -> its own alpha (PEFT's alpha_pattern)
    base_model: str | None  # base_model_name_or_path
    rank: int = 8  # r (PEFT's default 8 where not given): the tensors' rank must agree, as PEFT's loading requires
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module name pattern -> its own r
    # Which modules PEFT gives a LoRA layer when it loads the adapter (it drops the weights of any other):
    # target_modules (names, name suffixes, or one regular expression), layers_to_transform / layers_pattern,
    # exclude_modules.
    target_modules: tuple[str, ...] | str = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    # init_lora_weights false (or null): PEFT draws A and B at random for a targeted module the weights leave out
    # (every other init it loads gives such a module B A = 0, no update).
    random_init: bool = False


@dataclass(frozen=True)
class ModuleShape:
    rank: int
    in_features: int
    out_features: int
    scaling: float


@dataclass(frozen=True)
class AdapterSpec:
    """What the header and config say: enough to check an adapter against the model and size its slots."""

    name: str
    folder: Path
    weights_file: Path
    modules: dict[str, ModuleShape]  # the base model's module name -> its update's shape
    key: bytes  # names these weights in the prefix cache: never equal for two different adapters

    def num_bytes(self, dtype: torch.dtype) -> int:
        per_element = torch.empty(0, dtype=dtype).element_size()
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules.values()) * per_element


@dataclass(frozen=True)
class LoraModule:
    a_t: torch.Tensor  # [in_features, rank], A transposed (x @ a_t is the shrink)
    b_t: torch.Tensor  # [rank, out_features], scaling * B transposed (the expand)


def adaptable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers an adapter may target: every nn.Linear of the decoder except the output head (it sees
    only the rows that sample, not every token). Projections of routed experts are left out: they see a subset
    of the tokens."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and "experts" not in name.split(".")
    }


def unadapted_layers(model: nn.Module) -> dict[str, bool]:
    """The layers PEFT can give a LoRA layer that kvbatch does not adapt (the output head, embeddings, GPT-2's
    Conv1D, routed experts' linears): name -> whether target_modules 'all-linear' takes it in (any linear layer
    but the output head)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = adaptable_linears(model)
    return {
        name: isinstance(module, (nn.Linear, Conv1D)) and module is not head
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding, Conv1D)) and name not in linears
    }


def resolve_folder(name: str, path: str) -> Path:
    """A local folder, else a hub name already in the local Hugging Face cache."""
    try:
        folder = Path(path).expanduser()
    except RuntimeError:  # `~name/...` for a user this machine does not have
        raise AdapterError(f"adapter {name!r}: {path} names a home folder this machine does not have") from None
    if folder.is_dir():
        return folder
    if not folder.is_absolute() and not path.startswith((".", "~")) and path.count("/") == 1:
        from kvbatch.runner.model_loader import cached_snapshot

        snapshot = cached_snapshot(path)
        if snapshot is not None:
            return snapshot
    raise AdapterError(f"adapter {name!r}: {path} is neither a folder nor a name in the local Hugging Face cache")


def inspect_adapter(
    name: str,
    path: str,
    linears: dict[str, nn.Linear],
    allow_pickle: bool = False,
    model_name: str | None = None,
    unadapted: Mapping[str, bool] | None = None,
) -> AdapterSpec:
    """Check adapter `name` at `path` against the model's adaptable `linears` (and its `unadapted_layers`, which
    it must not change) from its config and weight header."""
    folder = resolve_folder(name, path)
    config = _read_config(name, folder)
    weights_file = folder / SAFETENSORS_FILE
    if not weights_file.is_file():
        if not (folder / PICKLE_FILE).is_file():
            raise AdapterError(f"adapter {name!r}: {folder} has no {SAFETENSORS_FILE}")
        if not allow_pickle:
            raise AdapterError(
                f"adapter {name!r}: {folder} has only pickled weights ({PICKLE_FILE}), and loading a pickle can run "
                "code hidden in it; convert it to safetensors, or set engine.allow_pickle: true if you trust it"
            )
        weights_file = folder / PICKLE_FILE
    base = config.base_model
    if model_name and base and _hub_name(base) and _hub_name(model_name):
        if _model_of(base) != _model_of(model_name):
            raise AdapterError(f"adapter {name!r} was trained on {base}, not on this engine's model {model_name}")
    shapes = _tensor_shapes(name, weights_file)
    modules = _module_shapes(name, config, shapes, linears, unadapted or {})
    return AdapterSpec(name, folder, weights_file, modules, _weights_key(weights_file, modules))


def _weights_key(weights_file: Path, modules: dict[str, ModuleShape]) -> bytes:
    """The prefix-cache key of these weights: the file (its size and time too, so a file saved over is another)
    and the scalings. The slot holds B with its scaling folded in: two configs over one weights file (a symlink,
    a hub snapshot's blob) are two adapters."""
    stat = weights_file.stat()
    scalings = ",".join(f"{module}={shape.scaling!r}" for module, shape in sorted(modules.items()))
    identity = f"{weights_file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{scalings}"
    return hashlib.blake2b(identity.encode(), digest_size=16).digest()


def load_adapter(spec: AdapterSpec, dtype: torch.dtype, device: torch.device) -> dict[str, LoraModule]:
    """The update of every module `spec` targets, in `dtype` on `device`, scaling folded into B. Weights saved
    over since they were checked are refused, even of the same shapes: K/V cached under the key of the old ones
    would serve the new."""
    try:
        changed = _weights_key(spec.weights_file, spec.modules) != spec.key
    except OSError as exc:
        raise AdapterError(f"adapter {spec.name!r}: cannot read {spec.weights_file}: {exc}") from None
    if changed:
        raise AdapterError(
            f"adapter {spec.name!r}: {spec.weights_file} changed since it was checked; register it again"
        )
    tensors = _read_tensors(spec)
    out = {}
    for module, shape in spec.modules.items():
        a, b = tensors[module]
        if (tuple(a.shape), tuple(b.shape)) != ((shape.rank, shape.in_features), (shape.out_features, shape.rank)):
            raise AdapterError(
                f"adapter {spec.name!r}: {spec.weights_file} changed since it was checked ({module}'s A is now "
                f"{list(a.shape)} and B {list(b.shape)}, not {[shape.rank, shape.in_features]} and "
                f"{[shape.out_features, shape.rank]}); register it again"
            )
        out[module] = LoraModule(
            a_t=a.to(torch.float32).t().contiguous().to(device=device, dtype=dtype),
            b_t=(b.to(torch.float32) * shape.scaling).t().contiguous().to(device=device, dtype=dtype),
        )
    return out


def _read_config(name: str, folder: Path) -> LoraConfig:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"adapter {name!r}: {folder} has no {CONFIG_FILE}, so it is not a PEFT adapter") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {folder / CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r} is a {config.get('peft_type')!r} adapter; kvbatch runs LoRA adapters")
    for switch, what in _UNSUPPORTED_SWITCHES.items():
        if config.get(switch):
            raise AdapterError(f"adapter {name!r} uses {what}, which kvbatch does not run")
    unknown = sorted(key for key, value in config.items() if value and key not in _KNOWN_FIELDS)
    if unknown:
        raise AdapterError(
            f"adapter {name!r}: {CONFIG_FILE} sets {', '.join(unknown)}, which kvbatch does not know (a LoRA variant "
            "of a newer PEFT?), so it cannot tell the adapter's forward is plain LoRA's"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(
            f"adapter {name!r} was saved with init_lora_weights={init!r}, which PEFT replays on the base weights "
            "when it loads the adapter; convert it to a plain LoRA adapter (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion) to run it here"
        )
    # PEFT draws a layer's A and B at random for any false value (null too), and refuses to load an init it does
    # not know: an init_lora_weights of 'false' or 1 is no adapter PEFT runs.
    known = isinstance(init, str) and (init in _ZERO_UPDATE_INITS or init.lower() in ("gaussian", "mica"))
    if init and init is not True and not known:
        raise AdapterError(
            f"adapter {name!r}: {CONFIG_FILE}'s init_lora_weights is {init!r}, not true, false or one of PEFT's "
            f"initialisations ({', '.join(_ZERO_UPDATE_INITS)}), and PEFT refuses to load it"
        )

    def bad(field: str, value: object, wanted: str) -> AdapterError:
        return AdapterError(f"adapter {name!r}: {CONFIG_FILE}'s {field} is {value!r}, not {wanted}")

    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if not _is_number(alpha):
        raise bad("lora_alpha", alpha, "a number")
    use_rslora = config.get("use_rslora") or False
    if not isinstance(use_rslora, bool):
        raise bad("use_rslora", use_rslora, "true or false")
    rank = config.get("r", 8)  # PEFT's default
    if not _is_rank(rank):
        raise bad("r", rank, "a whole number of at least 1")

    def patterns(key: str, valid, wanted: str) -> dict:
        """PEFT's per-module map (alpha_pattern, rank_pattern): regular expressions of module names -> values."""
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise bad(key, value, "an object of module name patterns and their values")
        for pattern, item in value.items():
            if not valid(item):
                raise bad(f"{key}[{pattern!r}]", item, f"a {wanted}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise bad(key, pattern, f"a regular expression ({exc})") from None
        return dict(value)

    alpha_pattern = patterns("alpha_pattern", _is_number, "number")
    rank_pattern = patterns("rank_pattern", _is_rank, "whole number of at least 1")

    def names(key: str, regex: bool) -> tuple[str, ...] | str | None:
        """A list of module names (or, where `regex`, one regular expression), as PEFT's matching takes them."""
        value = config.get(key)
        if value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            return tuple(value) if value is not None else None
        if not (regex and isinstance(value, str)):
            raise bad(key, value, "a list of module names" + (" or a regular expression" if regex else ""))
        try:
            re.compile(value)
        except re.error as exc:
            raise bad(key, value, f"a regular expression ({exc})") from None
        return value

    target_modules, exclude_modules = names("target_modules", True), names("exclude_modules", True)
    if target_modules is None:
        # PEFT then adapts its defaults for the model type (q_proj and v_proj for most) and drops the other weights.
        raise AdapterError(
            f"adapter {name!r}: {CONFIG_FILE} names no target_modules, so PEFT would adapt only its default modules "
            "for the model type and drop the adapter's other weights; list the modules its weights adapt there"
        )
    layers_pattern = config.get("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,) if layers_pattern else None  # PEFT: an empty one lets any layer name pass
    else:
        layers_pattern = names("layers_pattern", False)
    layers = config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise bad("layers_to_transform", layers, "a layer index or a list of them")
    # PEFT's LoraConfig refuses these combinations, so PEFT loads no such adapter.
    if isinstance(target_modules, str) and (layers is not None or config.get("layers_pattern") is not None):
        raise AdapterError(
            f"adapter {name!r}: {CONFIG_FILE} gives layers_to_transform or layers_pattern beside target_modules "
            f"{target_modules!r}, a string, not a list, and PEFT refuses to load such a config"
        )
    if config.get("layers_pattern") and layers is None:
        raise AdapterError(
            f"adapter {name!r}: {CONFIG_FILE} gives layers_pattern without layers_to_transform, and PEFT refuses to "
            "load such a config"
        )
    base = config.get("base_model_name_or_path")
    return LoraConfig(
        float(alpha),
        use_rslora,
        alpha_pattern,
        base if isinstance(base, str) else None,
        rank,
        rank_pattern,
        target_modules,
        tuple(layers) if layers is not None else None,
        layers_pattern,
        exclude_modules,
        not init,
    )


def _is_number(value: object) -> bool:
    # An int past a float's range is no usable number (math.isfinite would raise OverflowError converting it).
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _hub_name(name: str) -> bool:
    """An `org/model` name (not a path): the only spelling two sides can be compared by."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


# What a copy of a model adds to its name: a quantisation or a format (unsloth/llama-3-8b-Instruct-bnb-4bit is
# meta-llama/Meta-Llama-3-8B-Instruct's weights in 4 bits: an adapter trained on it fits the original).
_COPY_SUFFIX = re.compile(r"(-(unsloth|bnb|4bit|8bit|awq|gptq|gguf|fp8|fp16|bf16|int4|int8|hf))+$")


def _model_of(hub_name: str) -> str:
    """The model a hub name stands for, as two names of one model can be compared: the part after the owner,
    lowercased, without a copy's suffix, and without `meta-` (Meta has renamed Meta-Llama-3.1-8B-Instruct to
    Llama-3.1-8B-Instruct). Another model keeps another name: Llama-3.2-1B is not SmolLM2-135M, nor
    Llama-3-8B Llama-3-8B-Instruct."""
    model = _COPY_SUFFIX.sub("", hub_name.rsplit("/", 1)[-1].lower())
    return model.removeprefix("meta-")


def _tensor_shapes(name: str, weights_file: Path) -> dict[str, tuple[int, ...]]:
    if weights_file.suffix == ".bin":
        return {k: tuple(v.shape) for k, v in _load_pickle(name, weights_file).items()}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {weights_file}: {exc}") from None


def _load_pickle(name: str, weights_file: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: tensors and plain containers, no arbitrary objects (still only with allow_pickle)
        raw = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in the unpickler's own ways
        raise AdapterError(f"adapter {name!r}: cannot read {weights_file}: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in raw.items()):
        raise AdapterError(f"adapter {name!r}: {weights_file} does not hold a mapping of names to tensors")
    return raw


def _read_tensors(spec: AdapterSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if spec.weights_file.suffix == ".bin":
        raw = _load_pickle(spec.name, spec.weights_file)
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(str(spec.weights_file))
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"adapter {spec.name!r}: cannot read {spec.weights_file}: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = tensor
    for module in spec.modules:
        if not {"A", "B"} <= pairs.get(module, {}).keys():  # read again after the file was replaced
            raise AdapterError(
                f"adapter {spec.name!r}: {spec.weights_file} changed since it was checked (it holds no A and B for "
                f"{module}); register it again"
            )
    return {module: (pairs[module]["A"], pairs[module]["B"]) for module in spec.modules}


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first pattern that matches the module name's end
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _untargeted(config: LoraConfig, module: str) -> str | None:
    """Why PEFT would give `module` no LoRA layer under this config (None: it would), as PEFT's
    check_target_module_exists decides: its weights would be dropped as unexpected keys when PEFT loads them."""
    excluded = config.exclude_modules
    if excluded is not None:
        if re.fullmatch(excluded, module) if isinstance(excluded, str) else _named(excluded, module):
            return "its exclude_modules names it"
    targets = config.target_modules
    if isinstance(targets, str):
        if targets.lower() == "all-linear" or re.fullmatch(targets, module):  # adaptable linears are all linear
            return None
        return f"its target_modules {targets!r} does not match it"
    if module in targets:
        return None
    if not any(module.endswith(f".{target}") for target in targets):
        return f"its target_modules {list(targets)} do not name it"
    if not config.layers_to_transform:
        return None
    patterns = config.layers_pattern or ()
    if patterns:
        found = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module) for p in patterns)
        match = next((m for m in found if m is not None), None)
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    if match is None or int(match["idx"]) not in config.layers_to_transform:
        return f"its layers_to_transform {list(config.layers_to_transform)} leaves its layer out"
    return None


def _named(names: tuple[str, ...], module: str) -> bool:
    return module in names or any(module.endswith(f".{name}") for name in names)


def _not_lora_reason(name: str, others: list[str], keys: list[str]) -> str:
    """Why weights beyond LoRA A/B matrices make the adapter unusable, named by what PEFT saved them for: LoRA on an
    embedding (lora_embedding_A/B) or on lm_head (PEFT saves the layer's base weights beside its A and B), trained
    biases (bias='all' or 'lora_only'), else the first such weight."""
    for key in keys:
        if ".lora_embedding_" in key:
            module = key.split(".lora_embedding_")[0]
            return f"adapter {name!r} targets the embedding {module}, which kvbatch does not adapt (LoRA on embeddings)"
    biases = [key for key in others if key.endswith(".bias")]
    if biases:
        return (
            f"adapter {name!r} holds trained biases ({biases[0]}: PEFT's bias='all' or 'lora_only'), which kvbatch "
            "does not run"
        )
    for key in others:
        module = key.split(".base_layer.")[0] if key.endswith(".base_layer.weight") else None
        if module is not None and any(k.startswith(f"{module}.lora_") for k in keys):
            return (
                f"adapter {name!r} targets {module} and saved its base weights with it ({key}); kvbatch adapts the "
                "decoder's linear projections, not embeddings or lm_head"
            )
    return f"adapter {name!r} holds {others[0]}, which is not a LoRA A/B weight kvbatch can apply"


def _module_shapes(
    name: str,
    config: LoraConfig,
    shapes: dict[str, tuple[int, ...]],
    linears: dict[str, nn.Linear],
    unadapted: Mapping[str, bool],
) -> dict[str, ModuleShape]:
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    unprefixed = [key for key in shapes if not key.startswith(_PREFIX)]
    if unprefixed:
        raise AdapterError(
            f"adapter {name!r} holds {unprefixed[0]}, named without PEFT's prefix {_PREFIX!r}: PEFT would load the "
            "adapter without it"
        )
    others = [key.removeprefix(_PREFIX) for key in shapes if _KEY.match(key) is None]
    if others:
        raise AdapterError(_not_lora_reason(name, others, [k.removeprefix(_PREFIX) for k in shapes]))
    for key, shape in shapes.items():
        match = _KEY.match(key)
        parts.setdefault(match["module"], {})[match["part"]] = shape
    if not parts:
        raise AdapterError(f"adapter {name!r} holds no LoRA weights")
    modules = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r} has lora_A without lora_B (or the reverse) for {module}")
        if len(pair["A"]) != 2 or len(pair["B"]) != 2:
            raise AdapterError(f"adapter {name!r}: {module}'s LoRA weights are not matrices")
        linear = linears.get(module)
        if linear is None:
            raise AdapterError(
                f"adapter {name!r} targets {module}, which this model does not have as an adaptable linear layer "
                "(kvbatch adapts the decoder's linear projections, not embeddings or lm_head)"
            )
        (rank, a_in), (b_out, b_rank) = pair["A"], pair["B"]
        if (a_in, b_out, b_rank) != (linear.in_features, linear.out_features, rank):
            raise AdapterError(
                f"adapter {name!r} does not fit this model: {module} has A {list(pair['A'])} and B {list(pair['B'])}, "
                f"the model's layer is {linear.out_features}x{linear.in_features} (an adapter of another base model?)"
            )
        if rank < 1:
            raise AdapterError(f"adapter {name!r}: {module}'s LoRA weights have rank 0")
        untargeted = _untargeted(config, module)
        if untargeted is not None:
            raise AdapterError(
                f"adapter {name!r} holds LoRA weights for {module}, but {untargeted}: PEFT would load the adapter "
                f"without them (a config and weights of two different adapters?)"
            )
        declared = _pattern_value(config.rank_pattern, module, config.rank)
        if declared != rank:
            raise AdapterError(
                f"adapter {name!r}: {CONFIG_FILE} gives {module} rank {declared}, its weights have rank {rank} "
                "(a config and weights of two different adapters?)"
            )
        module_alpha = _pattern_value(config.alpha_pattern, module, config.alpha)
        scaling = module_alpha / math.sqrt(rank) if config.use_rslora else module_alpha / rank
        modules[module] = ModuleShape(rank, a_in, b_out, float(scaling))
    if config.random_init:
        # PEFT gives every targeted module a LoRA layer and loads what the file holds into it: a module the file
        # leaves out keeps its random A and B, an update no two loads agree on. That holds of the layers kvbatch
        # does not adapt (lm_head, embeddings) too, but for 'all-linear', which takes in linear layers only.
        all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
        for module in [*linears, *(m for m, linear in unadapted.items() if linear or not all_linear)]:
            if module not in parts and _untargeted(config, module) is None:
                raise AdapterError(
                    f"adapter {name!r} holds no LoRA weights for {module}, which its config targets, and was saved "
                    "with init_lora_weights=false: PEFT would give that layer a random update when it loads it "
                    "(a damaged or trimmed weights file?)"
                )
    return modules
