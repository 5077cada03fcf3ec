"""Random weights for tensor-parallel benchmarks, made on each rank for its share only, yet equal to the whole.

A model of `llama-70b` shape does not fit one host once per rank, so a random Loader builds it on the meta
device (no memory), tp_shard cuts it, and `materialize_random` fills this rank's share on its GPU. Every
parameter is drawn whole from a generator seeded by its name, then sliced the way tp_shard slices it, so
rank r of N holds exactly the rows or columns the unsharded model (N = 1) has: a TP run and a one-GPU run of
the same shape and seed have the same weights, and their greedy outputs can be compared.
"""

from __future__ import annotations

import zlib

import torch

from kvbatch.runner.model_loader import LoadedModel
from kvbatch.runner.parallel.shard import ATTENTION_COLUMNS, MLP_COLUMNS

_COLUMN = tuple(f"{n}.{p}" for n in (*ATTENTION_COLUMNS, *MLP_COLUMNS) for p in ("weight", "bias"))  # split on dim 0
_ROW = ("o_proj.weight", "down_proj.weight")  # split on dim 1


def is_meta(model: torch.nn.Module) -> bool:
    return next(model.parameters()).is_meta


def random_meta_model(shape: str, max_model_len: int, dtype: torch.dtype) -> torch.nn.Module:
    """A model of a bench shape (bench_models.SHAPES) on the meta device: structure only."""
    from transformers import AutoModelForCausalLM

    from kvbatch.bench.models import model_config
    from kvbatch.runner import attention_hook

    attention_hook.register()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config(shape, max_model_len), dtype=dtype, attn_implementation=attention_hook.ATTN_IMPLEMENTATION
        )
    return model.eval()


@torch.no_grad()
def materialize_random(
    model: torch.nn.Module, device: torch.device, rank: int, world: int, std: float = 0.02, seed: int = 0
) -> None:
    """Give a meta model (already cut by tp_shard for `rank` of `world`) its share of the seeded weights."""
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if name.endswith("bias"):
            param.zero_()
            continue
        dim = 0 if name.endswith(_COLUMN) else 1 if name.endswith(_ROW) else None
        full_shape = list(param.shape)
        if dim is not None:
            full_shape[dim] *= world
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.empty(full_shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator)
        piece = full if dim is None else full.narrow(dim, rank * param.shape[dim], param.shape[dim])
        param.copy_(piece)
        del full
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:  # its inv_freq is a non-persistent buffer that to_empty left uninitialised
        with torch.device(device):
            model.model.rotary_emb = type(rotary)(config=model.config)


class RandomLoader:
    """A tensor_parallel Loader for `random:SHAPE` models (picklable, so spawned ranks can use it)."""

    def __init__(self, std: float = 0.02, seed: int = 0) -> None:
        self.std, self.seed = std, seed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RandomLoader) and (self.std, self.seed) == (other.std, other.seed)

    def __hash__(self) -> int:
        return hash((self.std, self.seed))

    def __call__(self, model: str, settings: dict, device: torch.device) -> LoadedModel:
        from kvbatch.bench.models import IdsOnlyTokenizer
        from kvbatch.runner.model_loader import resolve_dtype

        shape = model.removeprefix("random:")
        dtype = resolve_dtype(settings.get("dtype", "auto"), device)
        max_model_len = settings.get("max_model_len") or 4096
        meta = random_meta_model(shape, max_model_len, dtype)
        return LoadedModel(meta, IdsOnlyTokenizer(), f"random {shape}", (), max_model_len, device, dtype)

    def materialize(self, model: torch.nn.Module, device: torch.device, rank: int, world: int) -> None:
        """Called by tensor_parallel.build_rank_engine once `model` is cut for `rank`."""
        materialize_random(model, device, rank, world, self.std, self.seed)
