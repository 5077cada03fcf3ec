"""The CPU backend: prompt rows in float32 through torch's fused flash kernel, the rest through the reference.

The float64 reference (attention_torch) makes every row batch-invariant but reads and multiplies the whole
context rectangle in float64: a 5,043-token prompt spent most of its prefill there. Prompt rows (positions
below meta.num_prompt_tokens) come here instead, in float32, arranged so that each row's arithmetic is a
function of its own position only, whatever chunk, step or neighbours it is computed with:

    query blocks of QUERY_BLOCK tokens aligned to absolute positions (block j: positions j*Q .. j*Q+Q-1), the
    block always QUERY_BLOCK rows (missing rows zero), the kv head's query heads stacked as rows (GQA):
        part 1  keys [0, j*Q)        no mask      torch's flash kernel, with its log-sum-exp
        part 2  keys [j*Q, j*Q+Q)    causal mask  (a local layer: from its first row's window start, rounded
                                              down to KEY_MULTIPLE, and masked by the window too)
        merged  o = lerp(o2, o1, sigmoid(lse1 - lse2))

So every call that computes a given row has the same shapes (rows, keys) whatever chunk, step or neighbours
the row comes with, and torch's kernel, whose blocking follows the shapes alone, gives it the same bits
(tests/cache/test_attention_cpu.py checks it; a key count chosen by the chunk's end did not: 144 and 256 keys
took different paths). Causal work is skipped block by block.

Rows of tokens the sequence generated (recomputed after a preemption) and decodes keep the reference's float64
arithmetic, which a decode used when it first computed them: a recomputed sequence gets its earlier bits back.
Layers with soft-capping or sinks, and other dtypes or devices, run the reference throughout.
"""

from __future__ import annotations

import torch

from . import attention_torch
from .attention_torch import write_kv  # noqa: F401 - the backend's write is the reference's
from .metadata import PLAIN, AttentionMetadata, LayerAttention

QUERY_BLOCK = 256  # tokens per query block
SHORT_QUERY_BLOCK, SHORT_PROMPT = 64, 1024  # the block of sequences whose prompt has at most SHORT_PROMPT tokens
KEY_MULTIPLE = 16
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
        and meta.num_prompt_tokens is not None
        and layer.softcap == 0.0
        and layer.sinks is None
    )
    if not fast:
        return attention_torch.paged_attention(query, key_cache, value_cache, meta, scale, layer)
    out = torch.zeros_like(query)
    attention_torch.attend_decodes(out, query, key_cache, value_cache, meta, scale, layer)
    starts = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    prompts = meta.num_prompt_tokens.tolist()
    for i in range(meta.num_decodes, meta.num_seqs):
        num_queries = starts[i + 1] - starts[i]
        first_pos = seq_lens[i] - num_queries
        prompt_end = min(num_queries, max(0, prompts[i] - first_pos))  # chunk rows below it are prompt rows
        if prompt_end:
            _prompt_rows(out, query, key_cache, value_cache, meta, i, prompt_end, scale, layer.sliding_window)
        if prompt_end < num_queries:
            attention_torch.attend_chunk_rows(
                out, query, key_cache, value_cache, meta, i, prompt_end, num_queries, scale, layer
            )
    return out


def _prompt_rows(
    out: torch.Tensor,  # [num_rows, num_heads, head_dim] float32
    query: torch.Tensor,  # same
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    seq: int,
    num_rows: int,  # the chunk's first num_rows rows are prompt rows
    scale: float,
    window: int,  # 0: none
) -> None:
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    row0 = int(meta.query_start_loc[seq])
    first_pos = int(meta.seq_lens[seq]) - (int(meta.query_start_loc[seq + 1]) - row0)
    last_pos = first_pos + num_rows  # one past
    # Short prompts take short blocks (less padding); the choice follows the prompt, fixed for the sequence.
    q_block = SHORT_QUERY_BLOCK if int(meta.num_prompt_tokens[seq]) <= SHORT_PROMPT else QUERY_BLOCK
    first_block, end_block = first_pos // q_block, -(-last_pos // q_block)
    num_q_blocks = end_block - first_block

    # Keys [0, key_end) of this sequence, float32, [1, kv_heads, keys, head_dim]; keys past last_pos are masked.
    # Up to the end of the last query block: every block's part 2 reads exactly its own block's keys.
    key_end = end_block * q_block
    num_pages = -(-key_end // meta.block_size)  # may pass the table's end: those read page 0, masked
    table, first = meta.block_tables[seq : seq + 1], torch.zeros(1, dtype=torch.long)
    keys = attention_torch._gather_run(key_cache, table, first, num_pages)[0, :key_end]  # [key_end, kvh, d]
    values = attention_torch._gather_run(value_cache, table, first, num_pages)[0, :key_end]
    keys = keys.to(torch.float32).permute(1, 0, 2).contiguous()[None]  # [1, kvh, key_end, d]
    values = values.to(torch.float32).permute(1, 0, 2).contiguous()[None]

    # Queries in whole aligned blocks: [num_q_blocks, kvh, group * q_block, d], rows (query head, token).
    blocks = query.new_zeros(num_q_blocks * q_block, num_heads, head_dim)
    offset = first_pos - first_block * q_block
    blocks[offset : offset + num_rows] = query[row0 : row0 + num_rows]
    blocks = blocks.view(num_q_blocks, q_block, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    blocks = blocks.reshape(num_q_blocks, num_kv_heads, group * q_block, head_dim)

    if window:
        near, near_lse, far, far_lse = _local_parts(blocks, keys, values, first_block, q_block, group, window, scale)
    else:
        near, near_lse, far, far_lse = _global_parts(blocks, keys, values, first_block, q_block, group, scale)
    # o = (o1 e^l1 + o2 e^l2) / (e^l1 + e^l2), as a lerp from o2 towards o1
    merged = torch.lerp(near, far, torch.sigmoid(far_lse - near_lse)[..., None])
    merged = merged.view(num_q_blocks, num_kv_heads, group, q_block, head_dim).permute(0, 3, 1, 2, 4)
    out[row0 : row0 + num_rows] = merged.reshape(num_q_blocks * q_block, num_heads, head_dim)[
        offset : offset + num_rows
    ]


def _global_parts(
    blocks: torch.Tensor,  # [num_q_blocks, kvh, group * q_block, d] float32
    keys: torch.Tensor,  # [1, kvh, key_end, d] float32
    values: torch.Tensor,  # same
    first_block: int,
    q_block: int,
    group: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Part 2 of every block in one call (each block a batch entry with its own keys), part 1 one call a block.
    Returns near, near_lse, far, far_lse: [num_q_blocks, kvh, rows, d] and [num_q_blocks, kvh, rows]."""
    num_q_blocks, num_kv_heads, _, head_dim = blocks.shape
    own = slice(first_block * q_block, (first_block + num_q_blocks) * q_block)

    def per_block(cache: torch.Tensor) -> torch.Tensor:  # [num_q_blocks, kvh, q_block, d], each block's own keys
        return cache[0, :, own].view(num_kv_heads, num_q_blocks, q_block, head_dim).transpose(0, 1)

    near, near_lse = _flash(
        blocks, per_block(keys), per_block(values), attn_mask=_mask(q_block, group, 0, 0), scale=scale
    )
    far, far_lse = [], []
    for b in range(num_q_blocks):
        start = (first_block + b) * q_block
        if start:
            o, lse = _flash(blocks[b : b + 1], keys[:, :, :start], values[:, :, :start], scale=scale)
        else:  # no key before the first block: weight zero in the merge
            o, lse = torch.zeros_like(near[:1]), torch.full_like(near_lse[:1], float("-inf"))
        far.append(o)
        far_lse.append(lse)
    return near, near_lse, torch.cat(far), torch.cat(far_lse)


def _local_parts(
    blocks: torch.Tensor,  # [num_q_blocks, kvh, group * q_block, d] float32
    keys: torch.Tensor,  # [1, kvh, key_end, d] float32
    values: torch.Tensor,  # same
    first_block: int,
    q_block: int,
    group: int,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A local layer's blocks: part 2 from the first row's window start (rounded down to KEY_MULTIPLE), no part 1
    (far is zero with weight zero). Same returns as _global_parts."""
    near, near_lse = [], []
    for b in range(blocks.shape[0]):
        start = (first_block + b) * q_block
        start_key = max(0, start - window + 1) // KEY_MULTIPLE * KEY_MULTIPLE
        mask = _mask(q_block, group, start - start_key, window)
        end = start + q_block
        o, lse = _flash(
            blocks[b : b + 1], keys[:, :, start_key:end], values[:, :, start_key:end], attn_mask=mask, scale=scale
        )
        near.append(o)
        near_lse.append(lse)
    near, near_lse = torch.cat(near), torch.cat(near_lse)
    return near, near_lse, torch.zeros_like(near), torch.full_like(near_lse, float("-inf"))
