"""float32 linear layers through oneDNN on the CPU.

torch's CPU `linear` calls MKL's sgemm. MKL picks its AVX-512 kernels only on Intel processors; on
AMD (such as the EPYC measured here) it runs AVX2 code well below the machine's float32 peak. oneDNN,
shipped inside torch, dispatches on the instruction set alone and runs the same GEMMs faster there
(SmolLM2-135M's five projection shapes on two cores of an AVX-512 EPYC: 117 -> 201 GFLOP/s at 128 rows,
149 -> 177 at 2,048 rows).

Both are plain float32 arithmetic; only the order of the additions differs, so logits move by about
1e-7 relative and greedy tokens stay transformers' (all 128 rows of examples/data/chat_128.jsonl, 64
tokens each, equal `generate`'s text). Batch invariance holds as before: oneDNN gives a row the same
bits for any row count of 2 or more (the engine pads steps to 16 rows anyway); a single row takes
another kernel, so one row is computed as two.

`KVBATCH_CPU_LINEAR=aten` keeps torch's own linear (MKL), for comparing the two.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_VAR = "KVBATCH_CPU_LINEAR"
# Packed weights are a second copy: made only for models whose linear weights take at most this much.
PACK_LIMIT_BYTES = 2 * 2**30


class OneDNNLinear(torch.nn.Linear):
    """An nn.Linear whose float32 CPU inference runs oneDNN's matmul; anything else runs torch's linear.

    With `pack_weight`, oneDNN reads the weight from a copy in its own blocked layout (5-10% faster than the
    plain one, the same bits), made at the first call and again whenever `weight` is replaced or changed in
    place (tensor parallel shards it after loading).
    """

    pack_weight = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        if (
            x.dtype != torch.float32
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and self.weight.requires_grad)
        ):
            return F.linear(x, self.weight, self.bias)
        weight = self._packed_weight() if self.pack_weight else self.weight
        rows = x.numel() // max(1, x.shape[-1])
        if rows == 1:  # oneDNN computes a single row with another kernel: keep its bits those of any larger batch
            return onednn_linear(x.reshape(1, -1).expand(2, -1), weight, self.bias)[:1].view(*x.shape[:-1], -1)
        return onednn_linear(x, weight, self.bias)

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        stamp = (w.data_ptr(), w._version, tuple(w.shape))
        if self.__dict__.get("_packed_stamp") != stamp:
            self.__dict__["_packed"] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self.__dict__["_packed_stamp"] = stamp
        return self.__dict__["_packed"]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [..., in] float32, weight: [out, in] float32 (plain or packed by oneDNN) -> [..., out] float32
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def onednn_usable() -> bool:
    """oneDNN is built into this torch, and not turned off by KVBATCH_CPU_LINEAR=aten."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("aten", "mkl", "off", "0"):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_linears(model: torch.nn.Module, pack_limit_bytes: int = PACK_LIMIT_BYTES) -> int:
    """Turn the float32 CPU nn.Linear layers of `model` into OneDNNLinear in place; returns how many.

    Their weights are packed (a second copy) only while all of them together take at most pack_limit_bytes.
    """
    if not onednn_usable():
        return 0
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    ]
    pack = (
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and sum(m.weight.nbytes for m in layers) <= pack_limit_bytes
    )
    for module in layers:
        module.__class__ = OneDNNLinear
        module.pack_weight = pack
    logger.info("%d linear layers run through oneDNN (%s weights)", len(layers), "packed" if pack else "plain")
    return len(layers)
