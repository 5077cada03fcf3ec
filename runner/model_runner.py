"""Turning a scheduled step into one forward pass of the transformers model over packed tokens.

All of a step's tokens go in as one row of a batch of one (input_ids [1, num_rows]), with their
true positions, so the model sees no padding between sequences; the attention hook keeps
sequences apart through the step's block tables. Logits are computed only for the rows that
sample (the last row of each sequence that reaches its end this step).

Batch invariance: CPU BLAS takes a different reduction path for GEMMs of fewer than about a dozen
rows, so a prompt would get other bits alone than in a crowd. The runner pads every step, and the
rows it computes logits for, to at least MIN_ROWS; padding rows write no K/V and attend to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbatch.cache.backends import AttentionBackend
from kvbatch.cache.block_table import slots_for
from kvbatch.cache.kv_cache import KVCache
from kvbatch.cache.metadata import AttentionMetadata

from .attention_hook import StepContext
from .scheduler import ScheduledSeq

MIN_ROWS = 16


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, num_rows] int64
    positions: torch.Tensor  # [1, num_rows] int64
    logits_rows: torch.Tensor  # [num_logits_rows] int64, rows whose logits are kept (padded)
    num_sampling: int  # the first num_sampling entries of logits_rows are real
    meta: AttentionMetadata


def _padded(n: int) -> int:
    return max(n, MIN_ROWS)


def prepare_inputs(scheduled: list[ScheduledSeq], block_size: int, device: torch.device) -> StepInputs:
    """Lay the step's tokens end to end, decodes first (the scheduler already ordered them)."""
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_rows: list[int] = []
    num_decodes = 0
    for item in scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_new_tokens
        token_ids += seq.token_ids(start, end)
        positions += range(start, end)
        slots += slots_for(seq.block_ids, start, end, block_size)
        query_start_loc.append(len(token_ids))
        seq_lens.append(end)
        if item.num_new_tokens == 1 and num_decodes == len(seq_lens) - 1:
            num_decodes += 1
        if item.samples:
            logits_rows.append(len(token_ids) - 1)
    num_rows = len(token_ids)
    pad = _padded(num_rows) - num_rows
    token_ids += [0] * pad
    positions += [0] * pad
    slots += [-1] * pad
    num_sampling = len(logits_rows)
    logits_rows += [0] * (_padded(num_sampling) - num_sampling)

    width = max(len(item.seq.block_ids) for item in scheduled)
    tables = [item.seq.block_ids + [0] * (width - len(item.seq.block_ids)) for item in scheduled]

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        # Built on the host, copied once: no per-token device traffic.
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    meta = AttentionMetadata(
        query_start_loc=tensor(query_start_loc, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        slot_mapping=tensor(slots, torch.int64),
        num_decodes=num_decodes,
        max_query_len=max(item.num_new_tokens for item in scheduled),
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )
    return StepInputs(
        input_ids=tensor(token_ids, torch.int64)[None],
        positions=tensor(positions, torch.int64)[None],
        logits_rows=tensor(logits_rows, torch.int64),
        num_sampling=num_sampling,
        meta=meta,
    )


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, backend: AttentionBackend) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = next(model.parameters()).device
        self.graphs = None  # a DecodeGraphs once captured (runner/cuda_graphs.py): pure-decode steps replay it

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits of the sampling rows: [num_sampling, vocab_size] float32."""
        if self.graphs is not None and self.graphs.fits(inputs):
            return self.graphs.forward(inputs)
        return self.forward_eager(inputs)

    @torch.inference_mode()
    def forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        step = StepContext(inputs.meta, self.kv_cache, self.backend)
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.positions,
            use_cache=False,
            logits_to_keep=inputs.logits_rows,
            kvbatch_step=step,
        )
        return out.logits[0, : inputs.num_sampling].float()
