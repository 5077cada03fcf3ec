"""Scoring rows: the log-probability of a known next token, and whether it is the argmax, from a step's logits.

A scoring request's continuations, and a prompt whose `prompt_logprobs` are asked for, are scored in their
prefill: row p of a sequence predicts token p + 1, so its score is log_softmax(logits[p])[token p + 1].

    context  c0 c1 c2 | continuation  x0 x1 x2        sequence = c0 c1 c2 x0 x1 (the last token is never input)
    rows     0  1  2    3  4                          scored rows 2, 3, 4 against x0, x1, x2

The sum over a continuation's rows is lm-eval's loglikelihood; it is greedy when every target is its row's
argmax. A row may be scored against several targets (a prompt's last row, against each continuation's first
token): the model computes its logits once, and each target names its row. On a GPU with Triton one kernel
(runner/scoring_kernels.py) reads a target's row once; elsewhere torch reduces rows a slice at a time, so the
float32 log-softmax of a long prompt's rows never exists whole.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

# Triton is an optional dependency: the kernel is imported only where it runs.
HAS_TRITON = importlib.util.find_spec("triton") is not None

# torch's path: log-probabilities per float32 slice. On a GPU without Triton 256 MiB (512 rows of a 128k
# vocabulary): each slice is kernels the host launches on a step's critical path. On the CPU 32 MiB, read back
# from cache by the gather and argmax (a step of 1,650 rows of SmolLM2's vocabulary: 90-105 ms, against 140 ms
# in 256 MiB slices).
SLICE_ELEMENTS = {"cuda": 2**26, "cpu": 2**23}


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


@dataclass
class ScoredRows:
    """A step's scored rows on the device, and their way to the host (as sampling.SampledTokens)."""

    logprobs: torch.Tensor  # [num_rows] float32: each target's log-probability
    greedy: torch.Tensor  # [num_rows] bool: the target is the row's argmax
    _host: tuple[torch.Tensor, torch.Tensor] | None = None
    _ready: torch.cuda.Event | None = None

    def start_download(self) -> ScoredRows:
        if self.logprobs.device.type == "cuda":
            self._host = (_pinned_copy(self.logprobs), _pinned_copy(self.greedy))
            self._ready = torch.cuda.Event()
            self._ready.record()
        return self

    def to_host(self) -> tuple[list[float], list[bool]]:
        logprobs, greedy = self.logprobs, self.greedy
        if self._ready is not None and self._host is not None:
            self._ready.synchronize()
            logprobs, greedy = self._host
        return logprobs.tolist(), greedy.tolist()


def score_on_device(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None, use_kernel: bool | None = None
) -> ScoredRows:
    """logits: [num_rows, vocab_size] in the model's dtype; targets: [num_targets] int64; rows: [num_targets]
    int64, the logits row each target is scored on (None: row i). Works in float32.

    `use_kernel`: run the Triton kernel; None (the default) runs it on a CUDA device when Triton is installed.
    True elsewhere is for tests, under Triton's CPU interpreter."""
    if use_kernel is None:
        use_kernel = logits.is_cuda and HAS_TRITON
    if use_kernel:
        from .scoring_kernels import score_rows

        return ScoredRows(*score_rows(logits, targets, rows))
    if rows is None:
        rows = torch.arange(logits.shape[0], device=logits.device)
    logprobs = torch.zeros(targets.shape[0], dtype=torch.float32, device=logits.device)
    greedy = torch.zeros(targets.shape[0], dtype=torch.bool, device=logits.device)
    rows_per_slice = max(1, SLICE_ELEMENTS.get(logits.device.type, SLICE_ELEMENTS["cpu"]) // logits.shape[1])
    for start in range(0, logits.shape[0], rows_per_slice):
        part_logits = logits[start : start + rows_per_slice]
        # bf16 logits are read as they are (no float32 copy first); the argmax of the raw logits is that of
        # their log-softmax, less the ties rounding may make.
        part = torch.log_softmax(part_logits, dim=-1, dtype=torch.float32)
        best = part_logits.argmax(dim=-1)
        # The targets on this slice's rows, picked on the device (no host sync): every target reads a clamped
        # row, and only those of the slice keep what they read.
        mine = (rows >= start) & (rows < start + part.shape[0])
        at = (rows - start).clamp(0, part.shape[0] - 1)
        logprobs = torch.where(mine, part[at, targets], logprobs)
        greedy = torch.where(mine, best[at] == targets, greedy)
    return ScoredRows(logprobs, greedy)


def warm_up(vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the scoring kernel for logits of `dtype` where it runs (CUDA with Triton) while the engine starts:
    a job's first scored step would otherwise stall on the compile. Targets and rows sit on 16-byte boundaries,
    as prepare_inputs lays them out, so this is the variant every step meets."""
    if device.type != "cuda" or not HAS_TRITON:
        return
    index = torch.zeros(1, dtype=torch.int64, device=device)
    score_on_device(torch.zeros(1, vocab_size, dtype=dtype, device=device), index, index.clone())
