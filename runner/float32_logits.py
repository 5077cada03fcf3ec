"""Logits in float32 from a half-precision model: the lm_head GEMM keeps its float32 accumulator.

transformers rounds a bf16 model's logits to bf16 before anything reads them. Near a logit of 8 a bf16 step
is 1/32 of a nat (1/8 near 30), so logprobs come out quantised, and a greedy argmax over 100k+ logits often
meets two tokens rounded to the same value: which one wins then rests on the last bit of the hidden state.
The GEMM's accumulator is float32 anyway; keeping it costs one wider write of the logits (on the H200, llama-1b,
512 decodes: 262 instead of 131 MB a step) and a wider read for the argmax: workload (a) took 2.56 s against 2.50.
Off by default; for jobs that keep logprobs (evals, labelling) it removes their bf16 quantisation.
It did not make bf16 greedy streams on random weights agree more often with the torch reference (docs/benchmarks.md):
there the hidden states' own rounding differences decide the near-ties.

Only where torch's mm has a float32 output for half inputs (CUDA); a float32 model already has them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Float32LogitsHead(nn.Module):
    """Wraps the model's lm_head (same weight tensor, tied or not) and returns float32 logits."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = torch.mm(flat, self.head.weight.t(), out_dtype=torch.float32)
        if self.head.bias is not None:
            logits += self.head.bias.float()
        return logits.view(*hidden.shape[:-1], logits.shape[-1])


def _why_not(model: nn.Module, device: torch.device) -> str | None:
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return "the model has no plain nn.Linear lm_head"
    if device.type != "cuda":
        return f"torch has no float32-output GEMM for half inputs on {device.type}"
    try:
        probe = torch.zeros(2, 8, dtype=head.weight.dtype, device=device)
        torch.mm(probe, probe.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError) as exc:
        return f"this torch has no float32-output GEMM ({exc})"
    return None


def use_float32_logits(model: nn.Module, setting: bool, device: torch.device) -> bool:
    """With `setting`, swap the model's lm_head for a Float32LogitsHead (a warning says why where it cannot);
    without, keep (or restore) the model's own. Returns whether the logits are float32 GEMM outputs."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, Float32LogitsHead):  # an earlier engine on the same loaded model swapped it
        if setting:
            return True
        model.lm_head = head = head.head
    if not setting:
        return isinstance(head, nn.Linear) and head.weight.dtype == torch.float32
    if isinstance(head, nn.Linear) and head.weight.dtype == torch.float32:
        return True
    reason = _why_not(model, device)
    if reason is not None:
        logger.warning("float32_logits: logits stay in the model's dtype: %s", reason)
        return False
    model.lm_head = Float32LogitsHead(model.lm_head)
    return True
