"""What one forward step tells the attention kernels about its packed tokens.

The step's tokens are laid end to end, sequence after sequence, decodes first:

    rows:  | s0 | s1 | s2 | s3 s3 s3 s3 | s4 s4 | pad pad ... |
             decodes (1 row each)   prefill chunks     padding (slot -1, attends to nothing)

Sequence i owns rows query_start_loc[i]:query_start_loc[i+1]. Its last row sits at position
seq_lens[i] - 1: the chunk's tokens are the newest ones of a context of seq_lens[i] tokens, whose
earlier tokens are already in the pages named by block_tables[i].

shared_prefix_len (optional, Triton decode only): L, a multiple of block_size, such that every decode
sequence i < num_decodes reads its first L keys from the same pages as decode 0
(block_tables[i, :L // block_size] == block_tables[0, :L // block_size]) and keeps at least its newest token
outside them (L <= seq_lens[i] - 1). The Triton decode then reads those pages once per kv head for all
decodes ("cascade"). A device tensor, not an int, so a captured CUDA graph replays with each step's L.
Decodes with L >= seq_lens[i] (a graph bucket's seq_len-0 filler) come out zero. Other backends ignore it.

LayerAttention is what one layer's attention adds to that causal softmax(scale * q k^T) v, as transformers
hands it to the attention function (attention_hook reads it from the layer's own arguments):

    softcap:         scores become softcap * tanh(scores / softcap), after scaling, before the mask (Gemma 2)
    sliding_window:  W > 0: the query at position p sees keys max(0, p - W + 1) .. p only (transformers'
                     `kv_idx > q_idx - sliding_window`); local layers have it, global ones do not
    sinks:           [num_heads] float32, one learned logit per query head that joins every softmax's
                     denominator and contributes no value (gpt-oss's `s_aux`)

Rotary is the rotary embedding a Triton step applies as it reads the rows, so no kernel of its own reads and
rewrites q and k first: write_kv rotates each key before it stores it, the prefill kernel each query as it loads
it (transformers' Llama layout, rotate_half; see attention_triton_rotary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerAttention:
    softcap: float = 0.0  # 0: no soft-capping
    sliding_window: int = 0  # 0: the whole context
    sinks: torch.Tensor | None = None  # [num_heads] float32 on the step's device; None: no sinks

    @property
    def is_plain(self) -> bool:
        return not self.softcap and not self.sliding_window and self.sinks is None

    def window_start(self, position: int) -> int:
        """The first key position the query at `position` sees."""
        return max(0, position - self.sliding_window + 1) if self.sliding_window else 0


PLAIN = LayerAttention()


@dataclass(frozen=True)
class Rotary:
    """The step's rotary tables, rows aligned with its query rows: row r of q and k is rotated by cos[r], sin[r]
    as x * cos + rotate_half(x) * sin, each product rounded to the rows' dtype (transformers' rounding). A model
    that norms each head first (Qwen3's q_norm, k_norm) rotates its rows itself and hands none."""

    cos: torch.Tensor  # [num_rows, head_dim], the rows' dtype, unit last stride
    sin: torch.Tensor  # same, cos's strides


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query rows
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_rows] int64, page slot of each row's K/V; -1 = write nothing
    num_decodes: int  # the first num_decodes sequences have exactly one query row each
    max_query_len: int
    max_seq_len: int
    block_size: int
    shared_prefix_len: torch.Tensor | None = None  # [1] int32 on the step's device; None: no cascade
    # [num_seqs] int32 on the host, decodes included: each sequence's prompt length, so the CPU backend can tell
    # prompt rows (aligned query blocks) from rows of tokens it generated (one query each, as a decode computes
    # them, also when recomputed after a preemption). None: every row is treated as a generated one. Other backends
    # ignore it.
    num_prompt_tokens: torch.Tensor | None = None
    # Rows the sequences own (query_start_loc[-1]), known on the host; the rows past them are padding. None: not
    # known there, so a backend that zeros the padding rows finds them on the device.
    num_query_rows: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_decode_rows(self) -> int:
        return self.num_decodes
