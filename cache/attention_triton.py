"""Paged attention in Triton: the KV write, a flash-attention prefill and a split-KV decode.

Same two calls as `attention_torch`, tested against it. Every kernel reads K/V through the block table
one key at a time (`block = block_table[seq, key // block_size]`), so any block_size works and a tile of
BLOCK_N keys may span several pages.

GQA packing: a program owns one kv head and stacks the query heads that read it into the rows of its
tiles, so each K/V tile is loaded once per kv head, not once per query head:

    rows of a tile:  (token 0, head 0) (token 0, head 1) ... (token 0, head G-1) (token 1, head 0) ...
    G = num_heads // num_kv_heads padded to a power of two; padded heads load zeros and are never stored.

Decode (the first meta.num_decodes sequences, one row each) runs flash-decoding: each (sequence, kv head)
cuts its context into num_splits equal runs of tiles, computed on the device from seq_lens, so the grid
(num_decodes x num_kv_heads, num_splits) depends only on shapes and python ints that do not change between
CUDA-graph replays. Each split writes a normalised partial output and its log-sum-exp; a reduce kernel
merges them. With one split the decode kernel writes the output directly.

Cascade decode (meta.shared_prefix_len = L set, see metadata): keys [0, L), in pages every decode shares, go
to the cascade kernel, whose tiles stack (decode, query head) rows of many sequences so each shared K/V tile
is read once per kv head rather than once per sequence; it writes num_prefix_splits extra partial slots, the
decode kernel covers keys [L, seq_len) in the first num_splits slots, and the reduce merges them all. Grids
and python ints come from shapes only, so the same launches replay in a CUDA graph for any L, L == 0 too.

Output rows that belong to no sequence come out zero: a pure-decode step (every row a decode) lets the
kernel write every row, any other step zeros only its padding rows first (none, with no launch, when
meta.num_query_rows says every row is owned). A decode with seq_len 0 gives zeros.
Softmax runs in base 2 (exp2) with fp32 statistics and fp32 accumulators for every input dtype.

Given a Rotary (metadata), q and k arrive unrotated: write_kv rotates each key before storing it, the prefill
kernel each query as it loads it, and the decode rows are rotated into a new tensor for the decode kernel.

The kernels live in attention_triton_write (KV write, padding rows), attention_triton_tile (the shared online-softmax
step), attention_triton_rotary, attention_triton_prefill, attention_triton_decode (decode + split reduce) and
attention_triton_cascade (the shared prefix); this module picks their launch parameters and holds the
public calls and warm_up.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from .attention_triton_cascade import _cascade_kernel
from .attention_triton_decode import _decode_kernel, _reduce_kernel
from .attention_triton_prefill import _prefill_kernel
from .attention_triton_rotary import _rotate_rows_kernel
from .attention_triton_write import _write_kv_kernel, _zero_rows_kernel
from .metadata import PLAIN, AttentionMetadata, LayerAttention, Rotary

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32
_MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it buys
_MIN_TOKENS_PER_PREFIX_SPLIT = 128  # two 64-key tiles: a cascade program's fixed cost is a BLOCK_M-row q tile


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so CPU tests reach the split-KV path with tiny batches
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_num_splits(num_decodes: int, num_kv_heads: int, max_context_tokens: int, device: torch.device) -> int:
    """Splits per (sequence, kv head), from shapes only (graph-safe).

    One split once the (sequence, kv head) programs fill the GPU (about 4 per SM). Below that, a power of two
    that lifts the grid to 4-8 programs per SM: on the H100 a grid just over one wave (5 splits of 128
    programs = 640) ran 10% slower than 4 or 8 splits.
    """
    programs = num_decodes * num_kv_heads
    target = 4 * _num_sms(device)
    if programs >= target:
        return 1
    splits = triton.next_power_of_2(triton.cdiv(target, max(programs, 1)))
    return max(1, min(splits, _MAX_SPLITS, triton.cdiv(max_context_tokens, _MIN_TOKENS_PER_SPLIT)))


def _cascade_num_splits(num_programs: int, max_context_tokens: int, device: torch.device) -> int:
    """Prefix splits for the cascade kernel, from shapes only (graph-safe). num_programs: its
    (row tile, kv head) programs. Each is a 128-row tile doing prefill-sized dots, so two per SM fill the GPU
    (shared memory holds 2-3 of them); at 512 llama decodes (16 row tiles x 8 kv heads) that is 4 splits,
    at 32 decodes 32, capped at one per 128 tokens the table can hold (18 for 2,228). L is unknown here
    (graph-safe), so a short prefix leaves splits empty: an empty one only stores its lse = -inf."""
    target = 2 * _num_sms(device)
    if num_programs >= target:
        return 1
    splits = triton.next_power_of_2(triton.cdiv(target, max(num_programs, 1)))
    return max(1, min(splits, _MAX_SPLITS, triton.cdiv(max_context_tokens, _MIN_TOKENS_PER_PREFIX_SPLIT)))


def _cascade_config(head_dim: int, device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8 if head_dim > 64 else 4, "num_stages": 3}


def _decode_config(head_dim: int, device: torch.device) -> dict[str, int]:
    """KV_PACK: kv heads per program (see attention_triton_decode), two for heads of 64 dims or fewer."""
    pack = 2 if head_dim <= 64 else 1
    if device.type != "cuda":
        return {"BLOCK_N": 16, "KV_PACK": pack}  # interpreter: tiny tiles keep masked work small
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "KV_PACK": pack}


def _kv_pack(config: dict[str, int], num_kv_heads: int, head_dim: int, key_cache: torch.Tensor) -> int:
    """The config's KV_PACK where the packed heads are one contiguous run per key, else 1."""
    pack = config.pop("KV_PACK", 1)
    fits = num_kv_heads % pack == 0 and head_dim & (head_dim - 1) == 0 and key_cache.stride(2) == head_dim
    return pack if fits else 1


def _prefill_config(head_dim: int, device: torch.device, rotary: bool = False) -> dict[str, int]:
    """64-row tiles, 4 warps: on the H200 the fastest of nine tile/warp/stage variants at both head sizes for
    prompts of 100-1,024 tokens (0.27 against 0.35 ms a 16k-token llama-1b layer with 128-row tiles), 4 x 4,096
    and 32 x 512 (the tile table is in docs/benchmarks.md's git history); only 8 x (6,144 cached + 2,048) at 128
    dims ran 5% faster with 128 x 128 tiles.

    Heads of 64 dims or fewer cap the kernel at 128 registers a thread (none spill): four of its 4-warp programs
    then fit an SM's 64K registers, and a program's few tiles (two or three in a scoring step) leave latency that
    only more programs hide. On an H100, llama-1b layer-steps: a scoring mix 0.223 -> 0.200 ms, 28 prompts of
    100-1,024 tokens 0.290 -> 0.258 ms, the same bits. At 128 dims the cap spilled and ran slower (llama-8b
    0.560 -> 0.670 ms).

    At 128 dims a program that rotates its queries as it loads them (`rotary`) takes 32-key tiles: on an H100,
    llama-8b layer-steps ran 0.482 -> 0.393 ms on a scoring mix, 0.348 -> 0.285 ms on its 56 prompts of 256
    tokens and 0.556 -> 0.517 ms on prompts of 100-1,024 tokens. Without the rotation (qwen3-0.6b, whose q/k
    norms come first) 32-key tiles ran slower: 0.270 -> 0.296 ms on the scoring mix."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    if head_dim <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "maxnreg": 128}
    return {"BLOCK_M": 64, "BLOCK_N": 32 if rotary else 64, "num_warps": 4, "num_stages": 3}


def _fp32_tiles(config: dict[str, int], key_cache: torch.Tensor) -> dict[str, int]:
    """Smaller tiles for fp32 pages on a GPU: at the bf16 sizes a 128-wide head needs 262 KB of shared memory
    (an H100/H200 SM has 228 KB). fp32 on a GPU is a checking path, not a fast one."""
    if key_cache.element_size() == 4 and "num_stages" in config:
        config.pop("maxnreg", None)  # the register cap was measured on 16-bit tiles only
        config["num_stages"] = min(config["num_stages"], 2)
        config["BLOCK_N"] = min(config["BLOCK_N"], 32)
        if "BLOCK_M" in config:
            config["BLOCK_M"] = min(config["BLOCK_M"], 64)
    return config


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, block_size: int) -> None:
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError(
            f"key and value caches differ: {tuple(key_cache.shape)} {key_cache.stride()} vs "
            f"{tuple(value_cache.shape)} {value_cache.stride()}"
        )
    if key_cache.shape[1] != block_size:
        raise ValueError(f"cache pages hold {key_cache.shape[1]} tokens, metadata says block_size {block_size}")
    if key_cache.stride(-1) != 1:
        raise ValueError("the cache's head_dim axis must be contiguous")


def _check_prefix_len(prefix_len: torch.Tensor, device: torch.device) -> None:
    # Python-side checks only (no sync). Another dtype would also compile a new kernel variant mid-run.
    if prefix_len.dtype != torch.int32 or prefix_len.numel() != 1 or prefix_len.device != device:
        raise ValueError(
            f"shared_prefix_len must be a one-element int32 tensor on {device}, got "
            f"{prefix_len.dtype} {tuple(prefix_len.shape)} on {prefix_len.device}"
        )


def _kernel_dtype_args(query: torch.Tensor, key_cache: torch.Tensor) -> dict[str, object]:
    # fp32 on a GPU: tf32x3 (three tf32 products, about fp32 accuracy) rather than plain tf32 (~1e-3 error) or
    # "ieee", whose FMA loops take minutes to compile at these tile sizes. bf16/fp16 ignore the setting.
    on_gpu = query.device.type == "cuda"
    precision = ("tf32x3" if on_gpu else "ieee") if key_cache.dtype == torch.float32 else "tf32"
    upcast = not on_gpu and torch.bfloat16 in (query.dtype, key_cache.dtype)
    return {"UPCAST": upcast, "PRECISION": precision}


def write_kv(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same
    key: torch.Tensor,  # [num_rows, num_kv_heads, head_dim], any float dtype, cast to the cache's
    value: torch.Tensor,  # same
    slot_mapping: torch.Tensor,  # [num_rows] int64, -1 = skip
    rotary: Rotary | None = None,  # the keys arrive unrotated: rotate each before storing it
) -> None:
    num_rows, num_kv_heads, head_dim = key.shape
    _check_cache(key_cache, value_cache, key_cache.shape[1])
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous head_dim axis")
    if num_rows == 0:
        return
    rope = _rotary_args(rotary, num_rows, head_dim, key)
    _write_kv_kernel[(num_rows,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        rope["cos"],
        rope["sin"],
        rope["stride_cos"],
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE=key_cache.shape[1],
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        ROPE=rope["ROPE"],
    )


def _rotary_args(rotary: Rotary | None, num_rows: int, head_dim: int, like: torch.Tensor) -> dict[str, object]:
    """The kernels' rotary arguments (constexpr ROPE off, pointers never read, without a Rotary)."""
    if rotary is None:
        return {"cos": like, "sin": like, "stride_cos": 0, "ROPE": False}
    cos, sin = rotary.cos, rotary.sin
    if cos.shape != (num_rows, head_dim) or sin.shape != cos.shape:
        shapes = f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        raise ValueError(f"rotary tables of {shapes} for {num_rows} rows of head_dim {head_dim}")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride() or head_dim % 2:
        raise ValueError("rotary tables need one row stride, a unit last stride and an even head_dim")
    return {"cos": cos, "sin": sin, "stride_cos": cos.stride(0), "ROPE": True}


def _rotated_rows(query: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """The rows of query [n, num_heads, head_dim] rotated by rotary's first n rows, in a new tensor."""
    num_rows, num_heads, head_dim = query.shape
    first = dataclasses.replace(rotary, cos=rotary.cos[:num_rows], sin=rotary.sin[:num_rows])
    rope = _rotary_args(first, num_rows, head_dim, query)
    out = torch.empty((num_rows, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_rows:
        _rotate_rows_kernel[(num_rows,)](
            query,
            out,
            rope["cos"],
            rope["sin"],
            query.stride(0),
            query.stride(1),
            rope["stride_cos"],
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out


def _layer_args(layer: LayerAttention, meta: AttentionMetadata) -> dict[str, object]:
    """The kernels' arguments for a layer's soft-capping, window and sinks (constexpr flags compile each
    combination once; a layer without them runs the same code as before they existed)."""
    if layer.sinks is not None and layer.sinks.dtype != torch.float32:
        raise ValueError(f"sinks must be float32, got {layer.sinks.dtype}")
    return {
        "sinks_ptr": layer.sinks if layer.sinks is not None else meta.seq_lens,  # never read without SINKS
        "window": layer.sliding_window,
        "softcap2": layer.softcap * _LOG2E if layer.softcap else 1.0,
        "WINDOW": layer.sliding_window > 0,
        "SOFTCAP": layer.softcap > 0,
        "SINKS": layer.sinks is not None,
    }


def _decode(
    query,
    key_cache,
    value_cache,
    meta,
    scale,
    out,
    num_splits: int | None = None,
    prefix_splits: int | None = None,
    layer: LayerAttention = PLAIN,
) -> None:
    """Writes rows 0..num_decodes-1 of out. Reads only shapes and python ints: safe to capture in a CUDA graph.
    A local layer (sliding window) reads only its window, so it skips the cascade's shared prefix."""
    num_decodes = meta.num_decodes
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    max_context_tokens = meta.block_tables.shape[1] * meta.block_size
    decode_config = _fp32_tiles(dict(_decode_config(head_dim, query.device)), key_cache)
    pack = _kv_pack(decode_config, num_kv_heads, head_dim, key_cache)
    if num_splits is None:
        num_splits = _decode_num_splits(num_decodes, num_kv_heads // pack, max_context_tokens, query.device)
    cascade = meta.shared_prefix_len is not None and not layer.sliding_window
    layer_args = _layer_args(layer, meta)
    if cascade:
        _check_prefix_len(meta.shared_prefix_len, query.device)
        group_p = triton.next_power_of_2(group)
        cascade_config = _fp32_tiles(dict(_cascade_config(head_dim, query.device)), key_cache)
        block_m = max(cascade_config.pop("BLOCK_M"), group_p)
        row_tiles = triton.cdiv(num_decodes * group_p, block_m)
        if prefix_splits is None:
            prefix_splits = _cascade_num_splits(row_tiles * num_kv_heads, max_context_tokens, query.device)
    num_slots = num_splits + (prefix_splits if cascade else 0)
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = num_slots == 1
    if direct:
        part_out = part_lse = out  # unused: the kernel writes out directly
    else:
        part_out = torch.empty(num_decodes, num_heads, num_slots, head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_decodes, num_heads, num_slots, dtype=torch.float32, device=query.device)
    dtype_args = _kernel_dtype_args(query, key_cache)
    prefix_len = meta.shared_prefix_len if cascade else meta.seq_lens  # a pointer the kernel never reads if not
    _decode_kernel[(num_decodes * (num_kv_heads // pack), num_splits)](
        query,
        key_cache,
        value_cache,
        out,
        part_out,
        part_lse,
        meta.block_tables,
        meta.seq_lens,
        prefix_len,
        layer_args["sinks_ptr"],
        scale * _LOG2E,
        layer_args["window"],
        layer_args["softcap2"],
        num_splits,
        num_slots,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        meta.block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group * pack)),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim * pack)),
        PAGE=meta.block_size,
        DIRECT=direct,
        CASCADE=cascade,
        KV_PACK=pack,
        WINDOW=layer_args["WINDOW"],
        SOFTCAP=layer_args["SOFTCAP"],
        SINKS=layer_args["SINKS"],
        **dtype_args,
        **decode_config,
    )
    if cascade:
        _cascade_kernel[(row_tiles, num_kv_heads, prefix_splits)](
            query,
            key_cache,
            value_cache,
            part_out,
            part_lse,
            meta.block_tables,
            meta.seq_lens,
            prefix_len,
            scale * _LOG2E,
            layer_args["softcap2"],
            num_decodes,
            prefix_splits,
            num_splits,
            num_slots,
            query.stride(0),
            query.stride(1),
            key_cache.stride(0),
            key_cache.stride(1),
            key_cache.stride(2),
            NUM_HEADS=num_heads,
            GROUP=group,
            GROUP_P=group_p,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            PAGE=meta.block_size,
            BLOCK_M=block_m,
            SOFTCAP=layer_args["SOFTCAP"],
            **dtype_args,
            **cascade_config,
        )
    if not direct:
        _reduce_kernel[(num_decodes, num_heads)](
            part_out,
            part_lse,
            out,
            layer_args["sinks_ptr"],
            num_slots,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_slots),
            SINKS=layer_args["SINKS"],
        )


def _prefill(
    query, key_cache, value_cache, meta, scale, out, layer: LayerAttention = PLAIN, rotary: Rotary | None = None
) -> None:
    """Writes the rows of sequences num_decodes.. of out. Grid from shapes (see attention_triton_prefill)."""
    num_prefills = meta.num_seqs - meta.num_decodes
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    config = _fp32_tiles(dict(_prefill_config(head_dim, query.device, rotary is not None)), key_cache)
    block_m = max(config.pop("BLOCK_M"), group_p)
    block_q = block_m // group_p
    grid = (triton.cdiv(query.shape[0] - meta.num_decodes, block_q) + num_prefills, num_kv_heads)
    layer_args = _layer_args(layer, meta)
    rope = _rotary_args(rotary, query.shape[0], head_dim, query)
    _prefill_kernel[grid](
        query,
        key_cache,
        value_cache,
        out,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        layer_args["sinks_ptr"],
        rope["cos"],
        rope["sin"],
        rope["stride_cos"],
        scale * _LOG2E,
        layer_args["window"],
        layer_args["softcap2"],
        meta.num_decodes,
        meta.num_seqs,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=group,
        GROUP_P=group_p,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=meta.block_size,
        BLOCK_M=block_m,
        WINDOW=layer_args["WINDOW"],
        SOFTCAP=layer_args["SOFTCAP"],
        SINKS=layer_args["SINKS"],
        ROPE=rope["ROPE"],
        **_kernel_dtype_args(query, key_cache),
        **config,
    )


def _zero_padding_rows(out: torch.Tensor, meta: AttentionMetadata) -> None:
    """Zeros the rows past the last sequence's (query_start_loc[-1] on); the kernels write all the others.
    A program whose rows are all owned stores nothing: a full memset took 21 us a layer of a 16k-token step."""
    num_rows, row_numel = out.shape[0], out[0].numel()
    if num_rows == 0:
        return
    block_r = 16
    _zero_rows_kernel[(triton.cdiv(num_rows, block_r),)](
        out,
        meta.query_start_loc,
        meta.num_seqs,
        num_rows,
        row_numel,
        BLOCK_R=block_r,
        BLOCK_C=min(triton.next_power_of_2(row_numel), 1024),
    )


def paged_attention(
    query: torch.Tensor,  # [num_rows, num_heads, head_dim] bf16/fp16/fp32, head_dim axis contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K already written
    value_cache: torch.Tensor,  # same
    meta: AttentionMetadata,
    scale: float,
    layer: LayerAttention = PLAIN,  # soft-capping, sliding window, sinks ([num_heads] float32 on query's device)
    rotary: Rotary | None = None,  # the queries arrive unrotated (their keys were written with it)
) -> torch.Tensor:  # [num_rows, num_heads, head_dim] query's dtype, zeros on padding rows
    num_rows, num_heads, _ = query.shape
    _check_cache(key_cache, value_cache, meta.block_size)
    if num_heads % key_cache.shape[2]:
        raise ValueError(f"{num_heads} query heads do not share {key_cache.shape[2]} kv heads evenly")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous: _zero_padding_rows needs it
    # A pure-decode step writes every row in the kernel, and a step whose rows the host knows are all owned has no
    # padding: only the others launch the zeroing, a launch a layer (73 us of host time each under cProfile on an
    # H100 host).
    padded = meta.num_query_rows is None or meta.num_query_rows < num_rows
    if padded and not meta.num_decodes == meta.num_seqs == num_rows:
        _zero_padding_rows(out, meta)
    if meta.num_decodes:
        # The decode kernel reads its rows as they are: rotate them first (a prefill program rotates its own).
        decodes = query if rotary is None else _rotated_rows(query[: meta.num_decodes], rotary)
        _decode(decodes, key_cache, value_cache, meta, scale, out, layer=layer)
    if meta.num_seqs > meta.num_decodes:
        _prefill(query, key_cache, value_cache, meta, scale, out, layer, rotary)
    return out


def warm_up(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], read only
    value_cache: torch.Tensor,  # same
    num_heads: int,
    dtype: torch.dtype,  # the queries' dtype
) -> None:
    """Compile every kernel variant a run can meet (one per decode split count, DIRECT or not, the
    cascade's kernels with every reduce width its extra slots reach, and the rotary variants), so none compiles
    mid-run: a compile takes about a second, and mixed steps pick their split counts from shapes."""
    block_size, head_dim = key_cache.shape[1], key_cache.shape[3]
    device = key_cache.device
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([1], dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),
        slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=device),
        num_decodes=1,
        max_query_len=1,
        max_seq_len=1,
        block_size=block_size,
    )
    query = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    out = torch.empty_like(query)
    cascade = dataclasses.replace(meta, shared_prefix_len=torch.zeros(1, dtype=torch.int32, device=device))
    splits = 1
    while splits <= _MAX_SPLITS:
        _decode(query, key_cache, value_cache, meta, 1.0, out, num_splits=splits)
        # num_splits + prefix_splits slots reach every power-of-two reduce width up to 2 * _MAX_SPLITS
        _decode(query, key_cache, value_cache, cascade, 1.0, out, num_splits=splits, prefix_splits=splits)
        splits *= 2
    prefill = dataclasses.replace(meta, num_decodes=0)
    _prefill(query, key_cache, value_cache, prefill, 1.0, out)
    if head_dim % 2 == 0:  # the variants that rotate q and k as they read them (metadata.Rotary)
        table = torch.zeros(1, head_dim, dtype=dtype, device=device)
        rotary = Rotary(table, table)
        _prefill(query, key_cache, value_cache, prefill, 1.0, out, rotary=rotary)
        _rotated_rows(query, rotary)
        kv = torch.zeros(1, key_cache.shape[2], head_dim, dtype=dtype, device=device)
        write_kv(key_cache, value_cache, kv, kv, meta.slot_mapping, rotary)  # slot -1: writes nothing
