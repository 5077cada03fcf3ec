"""The CPU backend: float32 attention through torch's flash kernel, each row the same bits in any step.

The float64 reference (attention_torch) is batch-invariant because float64 rounding hides the order of its sums,
and it pays for that: float64 pages and arithmetic, every decode padded to the step's longest context, and a
prompt's whole context rectangle (a 5,043-token prompt spent most of its prefill there). Here rows run in float32
and are made invariant by construction: every call that computes a row has shapes that follow the row's position
alone, whatever chunk, step or neighbours it comes with, and torch's kernel, whose blocking follows the shapes,
gives it the same bits (tests/cache/test_attention_cpu.py checks it, on two threads).

Prompt rows (positions below meta.num_prompt_tokens), in query blocks of QUERY_BLOCK tokens aligned to absolute
positions (block j: positions j*Q .. j*Q+Q-1), the block always QUERY_BLOCK rows (missing rows zero), the kv
head's query heads stacked as rows (GQA):
    part 1  keys [0, j*Q)        no mask      torch's flash kernel, with its log-sum-exp
    part 2  keys [j*Q, j*Q+Q)    causal mask  (a local layer: from its first row's window start, rounded
                                          down to KEY_MULTIPLE, and masked by the window too)
    merged  o = lerp(o2, o1, sigmoid(lse1 - lse2))
Causal work is skipped block by block: a long prompt's prefill runs at transformers' speed.

Generated rows (decodes, and the rows of generated tokens a preempted sequence recomputes): one query each, its
query heads stacked as rows and padded with zero rows to a multiple of ROW_MULTIPLE; keys from the first page its
window reaches, padded to a multiple of KEY_WIDTH_MULTIPLE and masked past the row's position. The step's rows are
grouped by key width, one call a group. A recomputed row takes the path its decode took, so a preempted sequence
gets its earlier bits back; a prompt's last token alone in its chunk (the rest cached) is still a prompt row.

(ROW_MULTIPLE: the kernel slices one scratch buffer per thread by the row count; with 3 rows a head, the second
thread's slice is misaligned and its GEMMs round differently from the first's.)

Layers with soft-capping or sinks, and other dtypes or devices, run the reference throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import attention_torch
from .attention_torch import write_kv  # noqa: F401 - the backend's write is the reference's
from .metadata import PLAIN, AttentionMetadata, LayerAttention

QUERY_BLOCK = 256  # tokens per query block
SHORT_QUERY_BLOCK, SHORT_PROMPT = 64, 1024  # the block of sequences whose prompt has at most SHORT_PROMPT tokens
KEY_MULTIPLE = 16  # a local layer's part 2 starts at a multiple of it
KEY_WIDTH_MULTIPLE = 32  # a generated row's keys, padded: fewer widths (calls) against more masked keys
ROW_MULTIPLE = 4  # query rows per kv head in a generated row's call
GATHER_BYTES = 1 << 20  # keys and values gathered for one kernel call, per thread (about an L2 cache)
_MASKS: dict[tuple[int, int, int, int], torch.Tensor] = {}


def _mask(q_block: int, group: int, offset: int, window: int) -> torch.Tensor:
    """[group * q_block, offset + q_block] float32, 0 or -inf: the block's rows (query head, token) against keys
    from `offset` tokens before its first token, causal and within the window (0: none). Cached: a few shapes."""
    key = (q_block, group, offset, window)
    if key not in _MASKS:
        token = torch.arange(q_block)[:, None] + offset  # positions counted from the first key
        key_pos = torch.arange(offset + q_block)[None, :]
        hidden = (key_pos > token) | ((key_pos <= token - window) if window else False)
        _MASKS[key] = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf")).repeat(group, 1)
    return _MASKS[key]


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def paged_attention(
    query: torch.Tensor,  # [num_rows, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K already written
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    scale: float,
    layer: LayerAttention = PLAIN,
) -> torch.Tensor:  # [num_rows, num_heads, head_dim], zeros on padding rows
    fast = (
        query.device.type == "cpu"
        and query.dtype == torch.float32
        and key_cache.dtype == torch.float32
        and layer.softcap == 0.0
        and layer.sinks is None
    )
    if not fast:
        return attention_torch.paged_attention(query, key_cache, value_cache, meta, scale, layer)
    plan = _plan_for(meta, layer.sliding_window, query.shape[1] // key_cache.shape[2])
    out = torch.zeros_like(query)
    if plan.rows.shape[0]:
        _generated_rows(out, query, key_cache, value_cache, plan, scale)
    for blocks in plan.prompt_blocks:
        _prompt_rows(out, query, key_cache, value_cache, blocks, scale)
    return out


@dataclass
class _Call:
    """One flash call: `count` rows (or blocks), each against `width` keys of its own."""

    index: torch.Tensor  # [count] int64, which of the plan's rows (or blocks) it computes
    keys: torch.Tensor  # [count * width // unit] int64: each one's keys as pages or slots (0 where masked)
    unit: int  # tokens an entry of `keys` names: the block size (whole pages) or 1 (slots)
    width: int
    mask: torch.Tensor | None  # float32, 0 or -inf, broadcast over [count, kvh, rows, width]; None: no mask


@dataclass
class _PromptBlocks:
    """A step's prompt rows laid into query blocks of q_block tokens (all blocks of one q_block), and the calls
    that attend them: near (part 2) and far (part 1), merged by their log-sum-exps."""

    q_block: int
    num_blocks: int
    rows: torch.Tensor  # [r] int64, the step's prompt rows (of sequences with this q_block)
    into: torch.Tensor  # [r] int64, each one's token in the blocks ([num_blocks * q_block], block-major)
    near: list[_Call]  # each block in one of them
    far: list[_Call]  # blocks after the first of their sequence (j >= 1), global layers only


@dataclass
class _Plan:
    """A step's rows for one window size: the same for every layer of that size."""

    rows: torch.Tensor  # [r] int64, the generated rows, in call order
    calls: list[_Call]  # over the generated rows, by key width (index: their range in `rows`)
    prompt_blocks: list[_PromptBlocks]


# The step's layers share a plan: built at the first layer of each window size, kept until the next step's meta.
_cached: tuple[AttentionMetadata | None, dict[tuple[int, int], _Plan]] = (None, {})


def _plan_for(meta: AttentionMetadata, window: int, group: int) -> _Plan:
    global _cached
    if _cached[0] is not meta:
        _cached = (meta, {})
    plans = _cached[1]
    if (window, group) not in plans:
        plans[window, group] = _plan(meta, window, group)
    return plans[window, group]


def _keys(
    tables: np.ndarray, seq: np.ndarray, first: np.ndarray, width: int, block_size: int
) -> tuple[torch.Tensor, int]:
    """Positions first .. first + width - 1 of each sequence, as (index, unit): whole pages (unit = block_size)
    when every range starts and ends on a page boundary, else slots (unit = 1). Entries past the table are 0,
    where the caller masks. Gathering pages copies a page per index, not a token: a third less time."""
    unit = block_size if width % block_size == 0 and not (first % block_size).any() else 1
    pos = (first // unit)[:, None] + np.arange(width // unit)  # in units
    page = pos * unit // block_size
    inside = page < tables.shape[1]
    pages = tables[seq[:, None], np.minimum(page, tables.shape[1] - 1)].astype(np.int64)
    index = pages if unit == block_size else pages * block_size + pos % block_size
    return torch.from_numpy(np.where(inside, index, 0).reshape(-1)), unit


def _plan(meta: AttentionMetadata, window: int, group: int) -> _Plan:
    """Which rows are prompt rows and which generated ones (a decode's row is a prompt row when it is the
    prompt's last token, the rest cached), and the calls that attend them."""
    starts = meta.query_start_loc.numpy().astype(np.int64)
    seq_lens = meta.seq_lens.numpy().astype(np.int64)
    num_seqs = seq_lens.shape[0]
    prompts = meta.num_prompt_tokens.numpy() if meta.num_prompt_tokens is not None else np.zeros(num_seqs, np.int64)
    counts = np.diff(starts)
    first_pos = seq_lens - counts  # each chunk's first row's position
    prompt_rows = np.clip(prompts - first_pos, 0, counts)  # each chunk's leading prompt rows
    tables = meta.block_tables.numpy()

    # Every row of the step: its sequence and position; the first prompt_rows of each chunk are prompt rows.
    seq = np.repeat(np.arange(num_seqs), counts)
    row = np.arange(starts[-1])
    position = first_pos[seq] + row - starts[seq]
    is_prompt = row - starts[seq] < prompt_rows[seq]
    generated = ~is_prompt & (position >= 0)  # a decode with an empty context (a filler) attends to nothing
    rows, calls = _generated_plan(tables, row[generated], seq[generated], position[generated], window, meta)
    prompt_blocks = []
    for q_block in (SHORT_QUERY_BLOCK, QUERY_BLOCK):
        take = is_prompt & ((prompts[seq] <= SHORT_PROMPT) == (q_block == SHORT_QUERY_BLOCK))
        if take.any():
            prompt_blocks.append(
                _prompt_plan(tables, row[take], seq[take], position[take], q_block, group, window, meta)
            )
    return _Plan(rows, calls, prompt_blocks)


def _generated_plan(
    tables: np.ndarray, row: np.ndarray, seq: np.ndarray, position: np.ndarray, window: int, meta: AttentionMetadata
) -> tuple[torch.Tensor, list[_Call]]:
    """Each generated row's keys: from the page its window starts in to its position, padded to a multiple of
    KEY_WIDTH_MULTIPLE; the rows sorted by that width, one call a width."""
    first_key = np.maximum(position - window + 1, 0) if window else np.zeros_like(position)
    first = first_key // meta.block_size * meta.block_size
    width = -(-(position + 1 - first) // KEY_WIDTH_MULTIPLE) * KEY_WIDTH_MULTIPLE
    order = np.argsort(width, kind="stable")
    row, seq, position, first_key, first, width = (a[order] for a in (row, seq, position, first_key, first, width))
    calls, lo = [], 0
    for hi in [*(np.flatnonzero(np.diff(width)) + 1).tolist(), len(width)] if len(width) else []:
        w = int(width[lo])
        key_pos = first[lo:hi, None] + np.arange(w)
        hidden = torch.from_numpy((key_pos > position[lo:hi, None]) | (key_pos < first_key[lo:hi, None]))
        mask = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))[:, None, None]  # [m, 1, 1, w]
        keys, unit = _keys(tables, seq[lo:hi], first[lo:hi], w, meta.block_size)
        calls.append(_Call(torch.arange(lo, hi), keys, unit, w, mask))
        lo = hi
    return torch.from_numpy(row.astype(np.int64)), calls


def _page_owners(tables: np.ndarray, seq: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Each prompt row's block owner: the first of the run of neighbouring sequences with its block table, or its
    own sequence if two such rows share a position. Sequences with one table read the same pages, so their rows
    may share query blocks (a row's bits do not depend on the block's other rows). The last layer's kept rows are
    such runs, one sequence per row (runner/fused_forward's _kept_rows_meta): in their own blocks, the 3,000 scored
    rows of a rolling step over SmolLM2-135M took 40 s in that layer on two cores, against 0.1 s in the others.
    Neighbours only: one vectorised compare a step (0.07 ms at 512 x 512 on two cores; sorting took 5.6 ms)."""
    starts = np.ones(len(tables), dtype=bool)
    starts[1:] = (tables[1:] != tables[:-1]).any(axis=1)
    if starts.all():
        return seq
    owner = np.maximum.accumulate(np.where(starts, np.arange(len(tables)), 0))[seq]
    if len(np.unique(np.stack([owner, position], axis=1), axis=0)) < len(seq):
        return seq
    return owner


def _prompt_plan(
    tables: np.ndarray,
    row: np.ndarray,
    seq: np.ndarray,
    position: np.ndarray,
    q_block: int,
    group: int,
    window: int,
    meta: AttentionMetadata,
) -> _PromptBlocks:
    """The query blocks the prompt rows fall in (sequence, j), and their calls: near, one call for all blocks
    (global) or one per j (local: keys from the window start); far (global), one per j >= 1, keys [0, j*Q)."""
    j = position // q_block
    owner = _page_owners(tables, seq, position)
    blocks, block_of_row = np.unique(np.stack([owner, j], axis=1), axis=0, return_inverse=True)
    block_of_row = block_of_row.reshape(-1)
    into = block_of_row * q_block + position % q_block
    block_seq, block_j = blocks[:, 0], blocks[:, 1]
    start = block_j * q_block
    near, far = [], []
    if not window:
        keys, unit = _keys(tables, block_seq, start, q_block, meta.block_size)
        near.append(_Call(torch.arange(len(blocks)), keys, unit, q_block, _mask(q_block, group, 0, 0)))
    for jj in np.unique(block_j).tolist():
        which = np.flatnonzero(block_j == jj)
        if window:
            start_key = max(0, jj * q_block - window + 1) // KEY_MULTIPLE * KEY_MULTIPLE
            offset = jj * q_block - start_key
            first = np.full(len(which), start_key)
            keys, unit = _keys(tables, block_seq[which], first, offset + q_block, meta.block_size)
            mask = _mask(q_block, group, offset, window)
            near.append(_Call(torch.from_numpy(which), keys, unit, offset + q_block, mask))
        elif jj:
            first = np.zeros(len(which), np.int64)
            keys, unit = _keys(tables, block_seq[which], first, jj * q_block, meta.block_size)
            far.append(_Call(torch.from_numpy(which), keys, unit, jj * q_block, None))
    return _PromptBlocks(
        q_block, len(blocks), torch.from_numpy(row.astype(np.int64)), torch.from_numpy(into.astype(np.int64)), near, far
    )


def _attend(
    q: torch.Tensor,  # [n, kvh, rows, d] float32, the call's rows (or blocks) among others
    key_cache: torch.Tensor,  # [num_blocks, block_size, kvh, d] float32, the layer's pages
    value_cache: torch.Tensor,  # same
    call: _Call,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # [count, kvh, rows, d], [count, kvh, rows]
    """The call's rows, gathered and attended a few at a time: each part's keys and values (GATHER_BYTES a
    thread) are still in cache when the kernel reads them, and no part is large enough for the allocator to map
    fresh pages. A row's bits do not depend on how many rows share its call."""
    count, (kvh, d) = call.index.shape[0], key_cache.shape[2:]
    keys, values = key_cache.view(-1, call.unit, kvh, d), value_cache.view(-1, call.unit, kvh, d)
    per_part = max(1, GATHER_BYTES * torch.get_num_threads() // (2 * call.width * kvh * d * key_cache.element_size()))
    outs, lses = [], []
    for lo in range(0, count, per_part):
        hi = min(lo + per_part, count)
        n = hi - lo
        rows = q if n == q.shape[0] else q.index_select(0, call.index[lo:hi])
        index = call.keys[lo * call.width // call.unit : hi * call.width // call.unit]
        k = keys.index_select(0, index).view(n, call.width, kvh, d).transpose(1, 2)
        v = values.index_select(0, index).view(n, call.width, kvh, d).transpose(1, 2)
        mask = call.mask[lo:hi] if call.mask is not None and call.mask.dim() == 4 else call.mask
        out, lse = _flash(rows, k, v, attn_mask=mask, scale=scale)[:2]
        outs.append(out)
        lses.append(lse)
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))


def _generated_rows(
    out: torch.Tensor,  # [num_rows, num_heads, head_dim] float32, the plan's generated rows written
    query: torch.Tensor,  # same
    key_cache: torch.Tensor,  # [num_blocks, block_size, kvh, d] float32
    value_cache: torch.Tensor,  # same
    plan: _Plan,
    scale: float,
) -> None:
    n, num_heads, head_dim = plan.rows.shape[0], query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    q = query.index_select(0, plan.rows).view(n, num_kv_heads, group, head_dim)
    q = F.pad(q, (0, 0, 0, -group % ROW_MULTIPLE))  # [n, kvh, rows, d], zero rows past the group
    parts = [_attend(q, key_cache, value_cache, call, scale)[0] for call in plan.calls]
    attended = torch.cat(parts) if len(parts) > 1 else parts[0]
    out.index_copy_(0, plan.rows, attended[:, :, :group].reshape(n, num_heads, head_dim))


def _prompt_rows(
    out: torch.Tensor,  # [num_rows, num_heads, head_dim] float32, the blocks' prompt rows written
    query: torch.Tensor,  # same
    key_cache: torch.Tensor,  # [num_blocks, block_size, kvh, d] float32
    value_cache: torch.Tensor,  # same
    plan: _PromptBlocks,
    scale: float,
) -> None:
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    nb, q_block = plan.num_blocks, plan.q_block
    # Queries in whole aligned blocks: [nb, kvh, group * q_block, d], rows (query head, token), missing rows zero.
    tokens = query.new_zeros(nb * q_block, num_heads, head_dim)
    tokens.index_copy_(0, plan.into, query.index_select(0, plan.rows))
    blocks = tokens.view(nb, q_block, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    blocks = blocks.reshape(nb, num_kv_heads, group * q_block, head_dim)

    if len(plan.near) == 1:  # a global layer: every block's part 2 in one call
        merged, near_lse = _attend(blocks, key_cache, value_cache, plan.near[0], scale)
    else:
        merged, near_lse = blocks.new_empty(blocks.shape), blocks.new_empty(blocks.shape[:3])
        for call in plan.near:
            o, lse = _attend(blocks, key_cache, value_cache, call, scale)
            merged.index_copy_(0, call.index, o)
            near_lse.index_copy_(0, call.index, lse)
    for call in plan.far:  # a block without keys before it keeps its near part as it is
        far, far_lse = _attend(blocks, key_cache, value_cache, call, scale)
        near = merged.index_select(0, call.index)
        # o = (o1 e^l1 + o2 e^l2) / (e^l1 + e^l2), as a lerp from o2 (near) towards o1 (far)
        weight = torch.sigmoid(far_lse - near_lse.index_select(0, call.index))[..., None]
        merged.index_copy_(0, call.index, torch.lerp(near, far, weight))
    merged = merged.view(nb, num_kv_heads, group, q_block, head_dim).permute(0, 3, 1, 2, 4)
    out.index_copy_(0, plan.rows, merged.reshape(nb * q_block, num_heads, head_dim).index_select(0, plan.into))
