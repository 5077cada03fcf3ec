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
the model's own forward and its single base GEMM per layer are untouched.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .step import LoraStep, apply_torch, lora_step
from .weights import AdapterError, AdapterSpec, LoraModule, adaptable_linears, inspect_adapter, load_adapter

logger = logging.getLogger(__name__)


def _padded_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())  # a power of two >= 16, what tl.dot takes


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
    ) -> None:
        self.device, self.dtype = device, dtype
        self.max_loras, self.max_cpu_loras = max_loras, max(max_cpu_loras, max_loras)
        self.allow_pickle, self.model_name = allow_pickle, model_name
        self.linears = adaptable_linears(model)
        self.specs: dict[str, AdapterSpec | AdapterError] = {}
        self.paths: dict[str, str] = {}
        self._readable: set[str] = set()  # names whose weights were read once
        for name, path in adapters.items():
            self._inspect(name, path)
        valid = [s for s in self.specs.values() if isinstance(s, AdapterSpec)]
        # Slot room per layer: the largest rank any adapter registered now gives it.
        self.ranks: dict[str, int] = {}
        for spec in valid:
            for module, shape in spec.modules.items():
                self.ranks[module] = max(self.ranks.get(module, 0), shape.rank)
        self.modules = sorted(self.ranks)  # a layer's index in the slot tables
        self.slot_bytes = max((s.num_bytes(dtype) for s in valid), default=0)
        self.use_triton = use_triton and device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.stacks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (a_stack, b_stack), GPU only
        if device.type == "cuda":
            for module in self.modules:
                linear, r = self.linears[module], _padded_rank(self.ranks[module])
                self.stacks.append(
                    (
                        torch.zeros(max_loras, linear.in_features, r, dtype=dtype, device=device),
                        torch.zeros(max_loras, r, linear.out_features, dtype=dtype, device=device),
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
        self._hooks = [
            self.linears[module].register_forward_hook(self._hook(i)) for i, module in enumerate(self.modules)
        ]
        logger.info(
            "%d adapters registered (%d usable) on %d layers; %d device slots of %.1f MiB",
            len(self.specs),
            len(valid),
            len(self.modules),
            max_loras,
            self.slot_bytes / 2**20,
        )

    # ---- registry ----------------------------------------------------------------------------

    @property
    def host_bytes(self) -> int:
        """The most memory host copies take: what a CPU engine takes out of its KV budget."""
        return self.max_cpu_loras * self.slot_bytes

    def add(self, name: str, path: str) -> None:
        """Register `name` (again): a bad adapter is recorded, and its requests fail, rather than raising."""
        if self.paths.get(name) == path and name in self.specs:
            return
        self._forget(name)
        spec = self._inspect(name, path)
        if isinstance(spec, AdapterSpec):
            too_big = [m for m, s in spec.modules.items() if s.rank > self.ranks.get(m, 0)]
            if too_big:
                self.specs[name] = AdapterError(
                    f"adapter {name!r} needs more room than the adapter slots this engine was built with "
                    f"({too_big[0]}: rank {spec.modules[too_big[0]].rank}, slot rank {self.ranks.get(too_big[0], 0)}); "
                    "register it when the engine is built"
                )

    def _inspect(self, name: str, path: str) -> AdapterSpec | AdapterError:
        try:
            spec: AdapterSpec | AdapterError = inspect_adapter(
                name, path, self.linears, self.allow_pickle, self.model_name
            )
        except AdapterError as exc:
            spec = exc
            logger.warning("%s", exc)
        self.specs[name], self.paths[name] = spec, path
        return spec

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
                self._load_slot(slot, self._host_weights(name))
                self._slot_of[key] = slot
        return {name: self._slot_of[self.key(name)] for name in names}

    def _load_slot(self, slot: int, weights: dict[str, LoraModule]) -> None:
        table = self.slot_weights[slot]
        for i, module in enumerate(self.modules):
            w = weights.get(module)
            if not self.stacks:
                table[i] = (w.a_t, w.b_t) if w is not None else None
                continue
            a_stack, b_stack = self.stacks[i]
            a_stack[slot].zero_()
            b_stack[slot].zero_()
            if w is None:
                table[i] = None
                continue
            r = w.a_t.shape[1]
            a_stack[slot, :, :r].copy_(w.a_t, non_blocking=False)
            b_stack[slot, :r].copy_(w.b_t, non_blocking=False)
            table[i] = (a_stack[slot, :, :r], b_stack[slot, :r])

    # ---- steps -------------------------------------------------------------------------------

    def prepare(self, adapter_names: list[str | None], counts: np.ndarray, num_rows_padded: int) -> LoraStep | None:
        """The step's LoraStep. adapter_names: each scheduled sequence's adapter (None: the base model), in row
        order; counts: [num_seqs] rows each. Loads the step's adapters into slots."""
        names = list(dict.fromkeys(n for n in adapter_names if n is not None))
        if not names:
            return None
        slot_of = self._slots(names)
        seq_slots = np.fromiter((slot_of[n] if n is not None else -1 for n in adapter_names), np.int64, len(counts))
        return lora_step(np.repeat(seq_slots, counts), num_rows_padded, self.device, self.use_triton)

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            step = self.current
            if step is None:
                return None
            x = args[0]
            y = output.view(-1, output.shape[-1])
            if y.shape[0] != step.num_rows:
                raise RuntimeError(f"{self.modules[index]} saw {y.shape[0]} rows of a {step.num_rows}-row step")
            x = x.reshape(-1, x.shape[-1])
            if self.use_triton:
                from .triton_kernels import apply_triton

                a_stack, b_stack = self.stacks[index]
                apply_triton(x.contiguous(), y, step.device_tiles(), a_stack, b_stack)
            else:
                apply_torch(x, y, step, [table[index] for table in self.slot_weights])
            return output

        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
