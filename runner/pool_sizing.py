"""Sizing the KV pool on a GPU from what a real step leaves free.

The largest step the scheduler can build (max_num_batched_tokens tokens, logits for up to
max_num_seqs rows) runs once against a scratch cache just big enough for it; the allocator's peak
then holds weights plus activations, and what `gpu_memory_utilization` allows beyond that becomes
pages (the equation is in kvbatch.cache.budget).
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import torch

from kvbatch.cache.block_table import num_blocks_for
from kvbatch.cache.budget import PoolSize, blocks_from_bytes, gpu_kv_bytes
from kvbatch.cache.kv_cache import KVCache
from kvbatch.cache.metadata import AttentionMetadata

from .model_runner import ModelRunner, StepInputs

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)


def profile_gpu_pool(engine: Engine, gpu_memory_utilization: float) -> PoolSize:
    device = engine.device
    # The largest step: max_num_batched_tokens tokens, as sequences of at most the context each.
    num_tokens = engine.max_num_batched_tokens
    seq_len = min(num_tokens, engine.max_model_len)
    lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    block_size = engine.kv_spec.block_size
    blocks_per_seq = num_blocks_for(seq_len, block_size)
    scratch = KVCache(engine.kv_spec, blocks_per_seq * len(lens), device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    num_logits = min(engine.config.max_num_seqs, num_tokens)
    tables = torch.arange(blocks_per_seq * len(lens), dtype=torch.int32, device=device).view(len(lens), blocks_per_seq)
    starts = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    slots = torch.cat(
        [
            tables[i].long().repeat_interleave(block_size)[:n] * block_size
            + torch.arange(n, device=device) % block_size
            for i, n in enumerate(lens)
        ]
    )
    meta = AttentionMetadata(
        query_start_loc=starts,
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=tables,
        slot_mapping=slots,
        num_decodes=0,
        max_query_len=seq_len,
        max_seq_len=seq_len,
        block_size=block_size,
    )
    inputs = StepInputs(
        input_ids=torch.zeros(1, num_tokens, dtype=torch.int64, device=device),
        positions=positions[None],
        logits_rows=torch.arange(num_tokens - num_logits, num_tokens, device=device),
        num_sampling=num_logits,
        meta=meta,
    )
    logits = ModelRunner(engine.model, scratch, engine.backend, engine.fused).forward(inputs)
    # Sampling makes a few [rows, vocab] float32 tensors; count two more copies of the logits.
    extra = 2 * logits.numel() * 4
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch.num_bytes + extra
    del logits, scratch
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    pool = blocks_from_bytes(engine.kv_spec, gpu_kv_bytes(total, peak, gpu_memory_utilization))
    logger.info(
        "GPU pool: %.1f GiB total, %.1f GiB peak for weights and a %d-token step, %s",
        total / 2**30,
        peak / 2**30,
        num_tokens,
        pool.describe(),
    )
    return pool
