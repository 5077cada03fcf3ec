"""The LoRA adapters an engine serves: names, host copies, device slots, and the hooks that apply them.

    registered (name -> AdapterSpec, or the AdapterError that makes it unusable)
        | first request naming it: weights read once
    host copies   LRU of at most max_cpu_loras, in the model's dtype
        | a step that runs it
    device slots  LRU of at most max_loras; the scheduler never runs more adapters at once

Slots are sized when the engine is built, from the adapters registered then: each adapted layer gets room for the
largest rank any of them gives it. On a GPU the slots are stacked tensors allocated before the KV pool is sized
(so max_loras * the largest adapter is counted out of the pool's memory); on the CPU a slot refers to the host
copy, and max_cpu_loras * the largest adapter is taken out of kv_cache_gib. An adapter added later must fit the
slots (the same layers, no larger ranks), else its requests fail as bad adapters.

Each adapted nn.Linear gets a forward hook that adds the step's update to the layer's output (runner/lora/step.py):
the model's own forward and its single base GEMM per layer are untouched. Under the fused decoder
(runner/fused_forward.py) q/k/v and gate/up are one GEMM each and their modules never run: the decoder adds
those updates itself (`update_packed`), one per GEMM, from slots packed the same way:

    a_stack [slots, in, rank_pad]      the members' A_t side by side in rank     (x @ a: every member's xa at once)
    b_stack [slots, rank_pad, out]     block diagonal: member j's B_t at its ranks and output columns, zeros elsewhere

so one shrink and one expand serve a packed GEMM, as they serve a single layer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..model_runner import HostStaging
from .step import LoraStep, apply_torch, lora_step
from .weights import (
    AdapterError,
    AdapterSpec,
    LoraModule,
    adaptable_linears,
    inspect_adapter,
    load_adapter,
    unadapted_layers,
)

logger = logging.getLogger(__name__)


def _padded_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())  # a power of two >= 16, what tl.dot takes


@dataclass(frozen=True)
class _Member:
    """One adapted module of a group: its rank columns in the group's A stack and output columns in its B."""

    index: int  # in Adapters.modules and the slot tables
    rank_start: int  # its ranks follow: as many as the largest any registered adapter gives this module
    column: int
    out_features: int

    @property
    def columns(self) -> slice:
        return slice(self.column, self.column + self.out_features)


@dataclass(frozen=True)
class _Group:
    """Modules whose updates are one shrink and one expand: a packed GEMM's adapted members, or one module."""

    members: list[_Member]
    in_features: int
    out_features: int  # the whole GEMM's: members' and unadapted linears' columns
    rank_pad: int  # the members' ranks together, padded to what tl.dot takes


class Adapters:
    def __init__(
        self,
        model: nn.Module,
        adapters: Mapping[str, str],
        device: torch.device,
        dtype: torch.dtype,
        max_loras: int,
        max_cpu_loras: int,
        allow_pickle: bool = False,
        model_name: str | None = None,
        use_triton: bool = False,
        packed: Sequence[tuple[nn.Linear, ...]] = (),
    ) -> None:
        """packed: groups of linears run as one GEMM over the same input (outputs side by side, in this order),
        whose updates `update_packed` adds; every other adapted linear gets a hook."""
        self.device, self.dtype = device, dtype
        self.max_loras, self.max_cpu_loras = max_loras, max(max_cpu_loras, max_loras)
        self.allow_pickle, self.model_name = allow_pickle, model_name
        self.linears, self.unadapted = adaptable_linears(model), unadapted_layers(model)
        self.specs: dict[str, AdapterSpec | AdapterError] = {}
        self.paths: dict[str, str] = {}
        self._readable: set[str] = set()  # names whose weights were read once
        for name, path in adapters.items():
            self.specs[name], self.paths[name] = self._inspected(name, path), path
        valid = [s for s in self.specs.values() if isinstance(s, AdapterSpec)]
        # Slot room per layer: the largest rank any adapter registered now gives it.
        self.ranks: dict[str, int] = {}
        features: dict[str, int] = {}  # a layer's in + out features
        for spec in valid:
            for module, shape in spec.modules.items():
                self.ranks[module] = max(self.ranks.get(module, 0), shape.rank)
                features[module] = shape.in_features + shape.out_features
        self.modules = sorted(self.ranks)  # a layer's index in the slot tables
        # The most a host copy takes: an adapter registered later fits every layer's room, so it may hold more
        # than any registered now (q alone and v alone at rank 16, then q and v).
        element = torch.empty(0, dtype=dtype).element_size()
        self.slot_bytes = sum(rank * features[module] for module, rank in self.ranks.items()) * element
        # Triton's kernels where they compile, or in its CPU interpreter (the fused decoder's tests run there).
        self.use_triton = (
            use_triton
            and importlib.util.find_spec("triton") is not None
            and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
        )
        # Groups of module indices sharing one update: the packed GEMMs' members, then every other module alone.
        index = {module: i for i, module in enumerate(self.modules)}
        name_of = {id(linear): name for name, linear in self.linears.items()}
        packed_names = [tuple(name_of[id(linear)] for linear in group) for group in packed]
        self.groups: list[_Group] = []
        self._packed: dict[tuple[int, ...], int] = {}  # ids of a packed group's linears -> its group
        for linears, names in zip(packed, packed_names):
            if any(name in index for name in names):
                self._packed[tuple(map(id, linears))] = len(self.groups)
                self.groups.append(self._group(names, index))
        in_packs = {name for names in packed_names for name in names}
        hooked = [module for module in self.modules if module not in in_packs]
        self._hooked_group: dict[str, int] = {}  # module -> its group of one, applied by the module's hook
        for module in hooked:
            self._hooked_group[module] = len(self.groups)
            self.groups.append(self._group((module,), index))
        self.stacks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per group (a_stack, b_stack): GPU or Triton
        if device.type == "cuda" or self.use_triton:
            for group in self.groups:
                self.stacks.append(
                    (
                        torch.zeros(max_loras, group.in_features, group.rank_pad, dtype=dtype, device=device),
                        torch.zeros(max_loras, group.rank_pad, group.out_features, dtype=dtype, device=device),
                    )
                )
        # slot -> per layer (a_t, b_t) or None; the step's LoraStep while a forward pass runs
        self.slot_weights: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [
            [None] * len(self.modules) for _ in range(max_loras)
        ]
        self._host: OrderedDict[str, dict[str, LoraModule]] = OrderedDict()
        # A slot per weight file (AdapterSpec.key): two names of one file share it, as the scheduler counts files.
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()
        self._free_slots = list(range(max_loras - 1, -1, -1))
        self.current: LoraStep | None = None
        self._staging = HostStaging(device)  # the steps' tiles, for the Triton kernels
        self._hooks = [
            self.linears[module].register_forward_hook(self._hook(group))
            for module, group in self._hooked_group.items()
        ]
        # A slot's room: its share of the stacks where there are stacks (packed B blocks hold zeros too), else the
        # largest adapter's host copy.
        stack_bytes = sum(t.numel() * t.element_size() for pair in self.stacks for t in pair) // max_loras
        logger.info(
            "%d adapters registered (%d usable) on %d layers; %d device slots of %.1f MiB",
            len(self.specs),
            len(valid),
            len(self.modules),
            max_loras,
            (stack_bytes if self.stacks else self.slot_bytes) / 2**20,
        )

    def _group(self, names: tuple[str, ...], index: dict[str, int]) -> _Group:
        linears = [self.linears[name] for name in names]
        members, rank_start, column = [], 0, 0
        for name, linear in zip(names, linears):
            if name in index:
                members.append(_Member(index[name], rank_start, column, linear.out_features))
                rank_start += self.ranks[name]
            column += linear.out_features
        return _Group(members, linears[0].in_features, column, _padded_rank(rank_start))

    # ---- registry ----------------------------------------------------------------------------

    @property
    def host_bytes(self) -> int:
        """The most memory host copies take: what a CPU engine takes out of its KV budget."""
        return self.max_cpu_loras * self.slot_bytes

    def add(self, name: str, path: str) -> None:
        """Register `name` (again): a bad adapter is recorded, and its requests fail, rather than raising. Its
        config and header are read anew; an adapter whose files did not change keeps its copies and slot."""
        spec = self._inspected(name, path)
        known = self.specs.get(name)
        if self.paths.get(name) == path and isinstance(known, AdapterSpec) and isinstance(spec, AdapterSpec):
            if spec.key == known.key:
                return
        self._forget(name)
        if isinstance(spec, AdapterSpec):
            too_big = [m for m, s in spec.modules.items() if s.rank > self.ranks.get(m, 0)]
            if too_big:
                spec = AdapterError(
                    f"adapter {name!r} needs more room than the adapter slots this engine was built with "
                    f"({too_big[0]}: rank {spec.modules[too_big[0]].rank}, slot rank {self.ranks.get(too_big[0], 0)}); "
                    "register it when the engine is built"
                )
        self.specs[name], self.paths[name] = spec, path

    def _inspected(self, name: str, path: str) -> AdapterSpec | AdapterError:
        try:
            return inspect_adapter(name, path, self.linears, self.allow_pickle, self.model_name, self.unadapted)
        except AdapterError as exc:
            logger.warning("%s", exc)
            return exc

    def _forget(self, name: str) -> None:
        self._readable.discard(name)
        self._host.pop(name, None)
        spec = self.specs.get(name)
        slot = self._slot_of.pop(spec.key, None) if isinstance(spec, AdapterSpec) else None
        if slot is not None:
            self._free_slots.append(slot)

    def problem(self, name: str) -> str | None:
        """Why requests naming `name` cannot run (None: they can). Reads the weights on first use only: later
        requests find them in a slot, the host copies, or read them again when a step needs them."""
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            return f"adapter {name!r} is not registered (registered: {known})"
        if isinstance(spec, AdapterError):
            return str(spec)
        if name in self._readable:
            return None
        try:
            self._host_weights(name)
        except AdapterError as exc:
            self.specs[name] = exc
            return str(exc)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:  # a file changed or damaged since inspection
            self.specs[name] = AdapterError(f"adapter {name!r}: cannot read its weights: {exc}")
            return str(self.specs[name])
        self._readable.add(name)
        return None

    def key(self, name: str | None) -> bytes:
        """The prefix-cache key of requests on `name`: b"" for the base model."""
        if name is None:
            return b""
        spec = self.specs[name]
        assert isinstance(spec, AdapterSpec), f"adapter {name!r} is not usable: {spec}"
        return spec.key

    # ---- host copies and device slots --------------------------------------------------------

    def _host_weights(self, name: str) -> dict[str, LoraModule]:
        weights = self._host.get(name)
        if weights is not None:
            self._host.move_to_end(name)
            return weights
        spec = self.specs[name]
        assert isinstance(spec, AdapterSpec)
        weights = load_adapter(spec, self.dtype, torch.device("cpu"))
        self._host[name] = weights
        # On the CPU a slot uses the host copy itself: those in a slot stay (max_cpu_loras >= max_loras).
        pinned = {n for n in self._host if self.key(n) in self._slot_of} if self.device.type == "cpu" else set()
        for old in [n for n in self._host if n not in pinned and n != name][
            : max(0, len(self._host) - self.max_cpu_loras)
        ]:
            del self._host[old]
        return weights

    def _slots(self, names: list[str]) -> dict[str, int]:
        """Each name's slot, loading those not in one; names: the step's adapters."""
        keys = {self.key(name): name for name in names}  # one slot per weight file
        assert len(keys) <= self.max_loras, f"{len(keys)} adapters in one step, {self.max_loras} slots"
        for key in keys:
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
        for key, name in keys.items():
            if key not in self._slot_of:
                if self._free_slots:
                    slot = self._free_slots.pop()
                else:  # the least recently used adapter this step does not run
                    victim = next(k for k in self._slot_of if k not in keys)
                    slot = self._slot_of.pop(victim)
                try:
                    weights = self._host_weights(name)
                except Exception:
                    self._free_slots.append(slot)  # weights that fail to read take no slot: it stays usable
                    raise
                self._load_slot(slot, weights)
                self._slot_of[key] = slot
        return {name: self._slot_of[self.key(name)] for name in names}

    def _load_slot(self, slot: int, weights: dict[str, LoraModule]) -> None:
        table = self.slot_weights[slot]
        for g, group in enumerate(self.groups):
            if self.stacks:
                a_stack, b_stack = self.stacks[g]
                a_stack[slot].zero_()
                b_stack[slot].zero_()
            for m in group.members:
                w = weights.get(self.modules[m.index])
                if w is None or not self.stacks:
                    table[m.index] = (w.a_t, w.b_t) if w is not None else None
                    continue
                ranks, columns = slice(m.rank_start, m.rank_start + w.a_t.shape[1]), m.columns
                a_stack[slot, :, ranks].copy_(w.a_t, non_blocking=False)
                b_stack[slot, ranks, columns].copy_(w.b_t, non_blocking=False)
                table[m.index] = (a_stack[slot, :, ranks], b_stack[slot, ranks, columns])

    # ---- steps -------------------------------------------------------------------------------

    def prepare(self, adapter_names: list[str | None], counts: np.ndarray, num_rows_padded: int) -> LoraStep | None:
        """The step's LoraStep. adapter_names: each scheduled sequence's adapter (None: the base model), in row
        order; counts: [num_seqs] rows each. Loads the step's adapters into slots."""
        names = list(dict.fromkeys(n for n in adapter_names if n is not None))
        if not names:
            return None
        slot_of = self._slots(names)
        seq_slots = np.fromiter((slot_of[n] if n is not None else -1 for n in adapter_names), np.int64, len(counts))
        step = lora_step(np.repeat(seq_slots, counts), num_rows_padded, self.device, self.use_triton)
        if step is not None and step.tiles is not None:
            # Through pinned memory on a GPU: a copy from pageable memory would wait for the step in flight to end.
            step.set_device_tiles(self._staging.upload(step.tiles.reshape(-1))[0])
        return step

    def _hook(self, group: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.current is not None:
                self._update(group, args[0], output)
            return output

        return hook

    def update_packed(self, linears: tuple[nn.Linear, ...], x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the step's update of a packed GEMM over `linears` (as passed to the constructor), in place.
        x: [rows, in_features]; y: [rows, sum of out_features], the GEMM's output."""
        group = self._packed.get(tuple(map(id, linears)))
        if group is not None and self.current is not None:
            self._update(group, x, y)

    def _update(self, group: int, x: torch.Tensor, output: torch.Tensor) -> None:
        step = self.current
        y = output.view(-1, output.shape[-1])
        if y.shape[0] != step.num_rows:
            names = "/".join(self.modules[m.index] for m in self.groups[group].members)
            raise RuntimeError(f"{names} saw {y.shape[0]} rows of a {step.num_rows}-row step")
        x = x.reshape(-1, x.shape[-1])
        if self.use_triton:
            from .triton_kernels import apply_triton

            a_stack, b_stack = self.stacks[group]
            apply_triton(x.contiguous(), y, step.device_tiles(), a_stack, b_stack)
            return
        for m in self.groups[group].members:
            apply_torch(x, y[:, m.columns], step, [table[m.index] for table in self.slot_weights])

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
