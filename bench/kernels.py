"""GPU check of the Triton attention kernels: correctness against the torch reference, then speed.

Prints one JSON object per line:
    device        the GPU, SM count, versions
    copy          device-to-device copy bandwidth (bytes read + written, the convention of performance-anchors.md)
    correct       Triton vs the float64 torch reference at realistic shapes (bf16/fp16, contexts up to 32k)
    decode        decode attention, replayed from a CUDA graph: GB/s of K/V bytes read, % of copy bandwidth
    decode_sweep  (--sweep) tile/stage and split-count variants of the same cases
    cascade       decodes sharing a cached 2,000-token prefix, with and without shared_prefix_len: ms per call
                  (CUDA graph), effective GB/s (every decode's K/V bytes / time), error vs the torch reference
    cascade_sweep (--sweep) prefix-split counts and tile variants of the cascade kernel
    prefill       prefill attention TFLOP/s (causal FLOPs actually needed), fresh prompts, cached prefixes and a
                  scoring step (prompts among short continuations), then that step's prompts and its
                  continuations alone
    prefill_sweep (--sweep) fifteen tile variants on each prefill case

Run on the GPU machine: `kvbatch bench kernels` (about 2-4 minutes; `--sweep` compiles each variant, some
minutes more).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time

import torch
import triton
from triton.testing import do_bench

from kvbatch.cache import attention_torch, attention_triton
from kvbatch.cache.metadata import AttentionMetadata, Rotary

# (num_heads, num_kv_heads, head_dim) of the engine's three model shapes.
SHAPES = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}
DEVICE = "cuda"  # a module constant so a CPU smoke test can swap it
DECODE_CASES = [(1024, 256), (8192, 64), (32768, 16), (32768, 4)]  # (context tokens, batch)


def emit(kind: str, **fields) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


def make_step(seqs, shape, block_size, dtype, num_pad_rows=0, seed=0):
    """seqs: [(num_cached, num_new)], decodes (num_new == 1) first. Random pages, shuffled block tables."""
    num_heads, num_kv_heads, head_dim = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks_per_seq = [triton.cdiv(c + n, block_size) for c, n in seqs]
    num_blocks = sum(blocks_per_seq) + 8
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen, device=DEVICE, dtype=dtype)
    value_cache = torch.randn(cache_shape, generator=gen, device=DEVICE, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE).int()
    width = max(blocks_per_seq)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32, device=DEVICE)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    q_lens = [n for _, n in seqs]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    num_rows = starts[-1] + num_pad_rows
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32, device=DEVICE),
        block_tables=tables,
        slot_mapping=torch.full((num_rows,), -1, dtype=torch.long, device=DEVICE),
        num_decodes=next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens)),  # the leading one-row seqs
        max_query_len=max(q_lens),
        max_seq_len=max(c + n for c, n in seqs),
        block_size=block_size,
    )
    query = torch.randn(num_rows, num_heads, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    return query, key_cache, value_cache, meta


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median")
    gbps = 2 * src.numel() / ms / 1e6
    emit("copy", bytes=src.numel(), ms=round(ms, 4), gb_per_s_read_plus_write=round(gbps, 1))
    return gbps


def check_correctness() -> bool:
    long_mix = [(32767, 1), (20000, 1), (8191, 1), (1023, 1), (5, 1), (0, 1), (0, 3000), (2048, 1024), (30000, 700)]
    cases = [
        ("llama-1b", 16, torch.bfloat16, long_mix),
        ("llama-8b", 16, torch.bfloat16, long_mix),
        ("qwen3-0.6b", 64, torch.bfloat16, long_mix),
        ("llama-8b", 16, torch.float16, [(4000, 1), (100, 1), (0, 2048), (1500, 500)]),
        ("llama-8b", 16, torch.bfloat16, [(32767, 1)] * 4),  # small batch, long context: split-KV
        ("llama-1b", 32, torch.bfloat16, [(n, 1) for n in range(1, 2000, 37)]),  # 55 decodes, ragged
    ]
    all_ok = True
    for i, (name, block_size, dtype, seqs) in enumerate(cases):
        step = make_step(seqs, SHAPES[name], block_size, dtype, num_pad_rows=3 if i < 3 else 0, seed=i)
        query, kc, vc, meta = step
        scale = query.shape[-1] ** -0.5
        got = attention_triton.paged_attention(query, kc, vc, meta, scale).float()
        want = attention_torch.paged_attention(query, kc, vc, meta, scale).float()
        err = (got - want).abs()
        ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2)) and bool(torch.isfinite(got).all())
        all_ok &= ok
        emit(
            "correct",
            shape=name,
            block_size=block_size,
            dtype=str(dtype).removeprefix("torch."),
            num_decodes=meta.num_decodes,
            num_seqs=meta.num_seqs,
            max_seq_len=meta.max_seq_len,
            max_abs_err=float(err.max()),
            mean_abs_err=float(err.mean()),
            ok=ok,
        )
        del step, query, kc, vc, got, want, err
        torch.cuda.empty_cache()
    return all_ok


def time_decode(step, scale: float) -> float:
    """Median ms of one paged_attention call, replayed from a CUDA graph as the engine will run it."""
    query, kc, vc, meta = step
    attention_triton.paged_attention(query, kc, vc, meta, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention_triton.paged_attention(query, kc, vc, meta, scale)
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


def decode_bandwidth(copy_gbps: float, sweep: bool) -> None:
    for name in ("llama-8b", "llama-1b"):
        num_heads, num_kv_heads, head_dim = SHAPES[name]
        for context, batch in DECODE_CASES:
            step = make_step([(context - 1, 1)] * batch, SHAPES[name], 16, torch.bfloat16)
            kv_bytes = batch * context * num_kv_heads * head_dim * 2 * 2  # K and V, bf16
            splits = attention_triton._decode_num_splits(
                batch, num_kv_heads, step[3].block_tables.shape[1] * 16, step[0].device
            )
            ms = time_decode(step, head_dim**-0.5)
            gbps = kv_bytes / ms / 1e6
            emit(
                "decode",
                shape=name,
                context=context,
                batch=batch,
                num_splits=splits,
                ms=round(ms, 4),
                kv_gb_per_s=round(gbps, 1),
                pct_of_copy=round(100 * gbps / copy_gbps, 1),
            )
            if sweep and batch != 4 and (name == "llama-8b" or context == 1024):
                decode_sweep(step, name, context, batch, kv_bytes, head_dim)
            del step
            torch.cuda.empty_cache()


def sweep_variants(
    kind: str,
    step,
    scale: float,
    config_attr: str,
    splits_attr: str,
    configs: list[dict],
    split_counts: list[int],
    splits_key: str,
    kv_bytes: float | None = None,
    **labels,
) -> None:
    """Time each launch-parameter variant of one kernel (a tile config, or a split count) against its default,
    emitting one line each; the defaults are restored whatever happens."""
    defaults = getattr(attention_triton, config_attr), getattr(attention_triton, splits_attr)
    reference = attention_triton.paged_attention(*step, scale)
    for config, splits in [(c, None) for c in configs] + [(None, n) for n in split_counts]:
        try:
            if config is not None:
                setattr(attention_triton, config_attr, lambda hd, dev, c=config: dict(c))
            if splits is not None:
                setattr(attention_triton, splits_attr, lambda *args, n=splits: n)
            diff = float((attention_triton.paged_attention(*step, scale) - reference).abs().max())
            ms = time_decode(step, scale)
            rate = {"kv_gb_per_s": round(kv_bytes / ms / 1e6, 1)} if kv_bytes else {}
            emit(
                kind, **labels, config=config, **{splits_key: splits}, ms=round(ms, 4), **rate, max_diff_vs_default=diff
            )
        except Exception as error:  # a variant that does not fit (shared memory) is reported, not fatal
            emit(
                kind,
                **labels,
                config=config,
                **{splits_key: splits},
                error=f"{type(error).__name__}: {str(error)[:200]}",
            )
        finally:
            setattr(attention_triton, config_attr, defaults[0])
            setattr(attention_triton, splits_attr, defaults[1])


def decode_sweep(step, name, context, batch, kv_bytes, head_dim) -> None:
    variants = [
        (64, 4, 3, 1),
        (32, 4, 3, 2),
        (64, 4, 2, 2),
        (64, 4, 4, 2),
        (128, 4, 3, 2),
        (64, 8, 3, 2),
        (32, 4, 4, 4),
        (64, 8, 3, 4),
    ]
    configs = [{"BLOCK_N": n, "num_warps": w, "num_stages": s, "KV_PACK": p} for n, w, s, p in variants]
    sweep_variants(
        "decode_sweep",
        step,
        head_dim**-0.5,
        "_decode_config",
        "_decode_num_splits",
        configs,
        [1, 2, 4, 8, 16],
        "num_splits",
        kv_bytes,
        shape=name,
        context=context,
        batch=batch,
    )


CASCADE_PREFIX = 2000  # shared tokens (a multiple of the block size 16)
CASCADE_CASES = [512, 32]  # decodes per step


def shared_prefix_step(shape, num_decodes: int, dtype, seed: int):
    """num_decodes decodes whose first CASCADE_PREFIX tokens sit in the same pages, then 100-228 tokens of
    their own (the newest one this step's). Returns the step with shared_prefix_len set."""
    gen = torch.Generator().manual_seed(seed)
    own = torch.randint(100, 229, (num_decodes,), generator=gen).tolist()
    step = make_step([(CASCADE_PREFIX + n - 1, 1) for n in own], shape, 16, dtype, seed=seed)
    meta = step[3]
    shared_blocks = CASCADE_PREFIX // 16
    meta.block_tables[:, :shared_blocks] = meta.block_tables[0, :shared_blocks].clone()
    meta.shared_prefix_len = torch.tensor([CASCADE_PREFIX], dtype=torch.int32, device=DEVICE)
    return step


def cascade_speed(copy_gbps: float, sweep: bool) -> bool:
    all_ok = True
    for name in ("llama-1b", "llama-8b"):
        num_heads, num_kv_heads, head_dim = SHAPES[name]
        for num_decodes in CASCADE_CASES:
            step = shared_prefix_step(SHAPES[name], num_decodes, torch.bfloat16, seed=num_decodes)
            query, kc, vc, meta = step
            scale = head_dim**-0.5
            token_bytes = num_kv_heads * head_dim * 2 * 2  # K and V, bf16
            context_tokens = int(meta.seq_lens.sum())
            kv_bytes = context_tokens * token_bytes  # what every decode attends over
            unique_bytes = (context_tokens - (num_decodes - 1) * CASCADE_PREFIX) * token_bytes  # shared pages once
            want = attention_torch.paged_attention(query, kc, vc, meta, scale).float()
            plain = dataclasses.replace(meta, shared_prefix_len=None)
            row = {
                "shape": name,
                "num_decodes": num_decodes,
                "shared_prefix": CASCADE_PREFIX,
                "mean_context": round(float(meta.seq_lens.float().mean()), 1),
            }
            for label, variant in (("plain", plain), ("cascade", meta)):
                got = attention_triton.paged_attention(query, kc, vc, variant, scale).float()
                err = float((got - want).abs().max())
                ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2)) and bool(torch.isfinite(got).all())
                all_ok &= ok
                ms = time_decode((query, kc, vc, variant), scale)
                gbps = kv_bytes / ms / 1e6
                row[label] = {
                    "ms": round(ms, 4),
                    "effective_kv_gb_per_s": round(gbps, 1),
                    "pct_of_copy": round(100 * gbps / copy_gbps, 1),
                    "unique_kv_gb_per_s": round(unique_bytes / ms / 1e6, 1),
                    "max_abs_err": err,
                    "ok": ok,
                }
            row["num_splits"] = attention_triton._decode_num_splits(
                num_decodes, num_kv_heads, meta.block_tables.shape[1] * 16, query.device
            )
            row["num_prefix_splits"] = cascade_splits(num_decodes, SHAPES[name], meta, query.device)
            row["speedup"] = round(row["plain"]["ms"] / row["cascade"]["ms"], 2)
            emit("cascade", **row)
            if sweep:
                cascade_sweep(step, name, num_decodes, scale)
            del step, query, kc, vc, meta, plain, want, got
            torch.cuda.empty_cache()
    return all_ok


def cascade_splits(num_decodes: int, shape, meta, device) -> int:
    num_heads, num_kv_heads, head_dim = shape
    group_p = triton.next_power_of_2(num_heads // num_kv_heads)
    block_m = max(attention_triton._cascade_config(head_dim, device)["BLOCK_M"], group_p)
    programs = triton.cdiv(num_decodes * group_p, block_m) * num_kv_heads
    return attention_triton._cascade_num_splits(programs, meta.block_tables.shape[1] * meta.block_size, device)


def cascade_sweep(step, name, num_decodes, scale) -> None:
    configs = [
        {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
        for m, n, w, s in [
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (64, 64, 4, 3),
            (128, 32, 4, 3),
            (128, 128, 8, 2),
            (64, 128, 4, 3),
            (256, 64, 8, 2),
        ]
    ]
    sweep_variants(
        "cascade_sweep",
        step,
        scale,
        "_cascade_config",
        "_cascade_num_splits",
        configs,
        [1, 2, 4, 8, 16, 32],
        "num_prefix_splits",
        shape=name,
        num_decodes=num_decodes,
    )


def prefill_flops(seqs, num_heads: int, head_dim: int) -> float:
    # Query i of a chunk with c cached tokens sees c + i + 1 keys; QK^T and PV cost 2 FLOPs per multiply-add each.
    keys = sum(n * c + n * (n + 1) // 2 for c, n in seqs)
    return 4.0 * num_heads * head_dim * keys


def scoring_step(seed: int = 0) -> list[tuple[int, int]]:
    """A scoring step's chunks: 56 fresh 256-token prompts among 224 continuations of 2-11 tokens after a
    cached 256-token prompt, in a shuffled order (the score workload's steps mix them so)."""
    rng = random.Random(seed)
    seqs = [(0, 256)] * 56 + [(256, rng.randint(2, 11)) for _ in range(224)]
    rng.shuffle(seqs)
    return seqs


def continuations_step(seed: int = 0) -> list[tuple[int, int]]:
    """A scoring step's continuations alone: 224 chunks of 2-11 tokens after a cached 256-token prompt."""
    rng = random.Random(seed)
    return [(256, rng.randint(2, 11)) for _ in range(224)]


def sharing_prompts(step, group: int, prompt_tokens: int):
    """`step` with each run of `group` sequences reading their first `prompt_tokens` tokens from the first one's
    pages, as a scoring request's continuations read their prompt's (make_step gives every sequence its own)."""
    query, key_cache, value_cache, meta = step
    tables = meta.block_tables.clone()
    num_blocks = prompt_tokens // meta.block_size
    for first in range(0, tables.shape[0], group):
        tables[first + 1 : first + group, :num_blocks] = tables[first, :num_blocks]
    return query, key_cache, value_cache, dataclasses.replace(meta, block_tables=tables)


def prompts_step(seed: int = 0, budget: int = 16384) -> list[tuple[int, int]]:
    """A workload-(a) prefill step: fresh prompts of 100-1,024 tokens while they fit the step's budget."""
    rng = random.Random(seed)
    seqs: list[tuple[int, int]] = []
    while True:
        n = rng.randint(100, 1024)
        if sum(q for _, q in seqs) + n > budget:
            return seqs
        seqs.append((0, n))


def prefill_speed(sweep: bool) -> None:
    cases = [
        ("fresh 4x4096", [(0, 4096)] * 4),
        ("prefix 8x(6144 cached + 2048)", [(6144, 2048)] * 8),
        ("fresh 32x512", [(0, 512)] * 32),
        ("score 56x256 + 224x(256 cached + 2-11)", scoring_step()),
        ("fresh 100-1024 (an (a) step)", prompts_step()),
        # The scoring step's two parts alone; its continuations read their prompt's pages in fours, as they do there.
        ("score's prompts: 56x256", [(0, 256)] * 56),
        ("score's continuations: 224x(256 cached + 2-11), prompt pages shared in fours", continuations_step()),
    ]
    for name in ("llama-8b", "llama-1b"):
        num_heads, _, head_dim = SHAPES[name]
        for label, seqs in cases:
            step = make_step(seqs, SHAPES[name], 16, torch.bfloat16)
            if "shared in fours" in label:
                step = sharing_prompts(step, 4, 256)
            fn = functools.partial(attention_triton.paged_attention, *step, head_dim**-0.5)
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
            # The same step with its queries rotated as the kernel loads them (metadata.Rotary).
            rotary = Rotary(*torch.randn(2, step[0].shape[0], head_dim, device=DEVICE, dtype=torch.bfloat16))
            rotary_fn = functools.partial(fn, rotary=rotary)
            rotary_ms = do_bench(rotary_fn, warmup=10, rep=100, return_mode="median")
            flops = prefill_flops(seqs, num_heads, head_dim)
            emit(
                "prefill",
                shape=name,
                case=label,
                ms=round(ms, 4),
                tflop_per_s=round(flops / ms / 1e9, 1),
                rotary_ms=round(rotary_ms, 4),
            )
            if sweep:
                prefill_sweep(step, name, label, fn, flops)
            del step
            torch.cuda.empty_cache()


def prefill_sweep(step, name, label, fn, flops) -> None:
    default_config = attention_triton._prefill_config
    reference = fn()
    for m, n, w, s, regs in [  # regs: a register cap a thread (maxnreg), None for the compiler's choice
        (64, 64, 4, 2, 128),
        (64, 64, 4, 3, 128),
        (64, 64, 4, 2, None),
        (64, 32, 4, 2, 128),
        (64, 32, 4, 3, 128),
        (64, 128, 4, 2, 128),
        (128, 64, 4, 2, 128),
        (128, 64, 8, 2, None),
        (128, 64, 8, 3, None),
        (128, 32, 4, 2, 128),
        (128, 32, 8, 2, None),
        (128, 128, 8, 2, None),
        (64, 64, 2, 2, None),
        (32, 32, 2, 2, None),
        (256, 64, 8, 2, None),
    ]:
        config = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
        if regs is not None:
            config["maxnreg"] = regs
        try:
            attention_triton._prefill_config = lambda hd, dev, rotary=False, c=config: dict(c)
            diff = float((fn() - reference).abs().max())
            ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
            emit(
                "prefill_sweep",
                shape=name,
                case=label,
                config=config,
                ms=round(ms, 4),
                tflop_per_s=round(flops / ms / 1e9, 1),
                max_diff_vs_default=diff,
            )
        except Exception as error:
            emit(
                "prefill_sweep",
                shape=name,
                case=label,
                config=config,
                error=f"{type(error).__name__}: {str(error)[:200]}",
            )
        finally:
            attention_triton._prefill_config = default_config


def run_kernel_check(sweep: bool = False) -> bool:
    """Every check and timing above, in order; True when every correctness case passed."""
    start = time.time()
    props = torch.cuda.get_device_properties(0)
    emit(
        "device",
        name=props.name,
        sms=props.multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        memory_gib=round(props.total_memory / 2**30, 1),
    )
    copy_gbps = copy_bandwidth()
    ok = check_correctness()
    decode_bandwidth(copy_gbps, sweep)
    ok &= cascade_speed(copy_gbps, sweep)
    prefill_speed(sweep)
    emit("done", all_correct=ok, seconds=round(time.time() - start, 1))
    return ok
