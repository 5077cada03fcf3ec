"""The roofline a workload cannot beat on a device, from the model's shape alone.

    prefill: compute-bound      t_prefill = prefill FLOPs / peak FLOP/s   (a scoring request: its prompt once, then
                                                                          each continuation less its last token,
                                                                          never input, and a logits row for each
                                                                          of its tokens)
    decode:  bandwidth-bound    t_decode  = max(decode FLOPs / peak FLOP/s,
                                                (steps x weight bytes + K/V bytes read) / bandwidth)
    bound = t_prefill + t_decode

It assumes the ideal schedule: every request decodes in one batch, so the weights are read once per step
(steps = the longest output less its first token, which the prefill gives), and each decode step reads its
row's whole context's K/V once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbatch.bench.workloads import Workload

# Dense bf16 tensor-core peaks and HBM bandwidth from the vendors' data sheets (SXM parts).
DEVICE_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


@dataclass(frozen=True)
class Bound:
    device: str
    seconds: float
    prefill_s: float
    decode_s: float
    peak_flops: float
    bandwidth: float


def device_peaks(device: torch.device) -> tuple[str, float, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (flops, bandwidth) in DEVICE_PEAKS.items():
        if key in name:
            return name, flops, bandwidth
    return None


def workload_bound(
    model: torch.nn.Module, dtype: torch.dtype, workload: Workload, device: torch.device
) -> Bound | None:
    peaks = device_peaks(device)
    if peaks is None:
        return None
    name, peak_flops, bandwidth = peaks
    config = model.config.get_text_config()
    num_layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    item = torch.tensor([], dtype=dtype).element_size()
    embedding = vocab * hidden
    params = sum(p.numel() for p in model.parameters())
    body = params - embedding * (1 if config.tie_word_embeddings else 2)  # the layers, without embedding and head
    kv_bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * item
    attn_flops_per_pair = 4 * num_layers * num_heads * head_dim  # QK^T and PV, 2 FLOPs a multiply-add

    prefill_flops = decode_flops = kv_bytes = 0.0
    for request in workload.requests:
        prompt = len(request.prompt_token_ids)
        if request.continuations is not None:  # scoring: the prompt once, then each continuation after it
            prefill_flops += 2 * body * prompt + attn_flops_per_pair * prompt * (prompt + 1) / 2
            for continuation in map(len, request.continuations):
                # Its tokens but the last are input, each attending to the prompt and itself; each of its tokens is
                # scored by a logits row (the first by the prompt's last position).
                inputs = continuation - 1
                pairs = inputs * prompt + inputs * (inputs + 1) / 2
                prefill_flops += 2 * body * inputs + 2 * embedding * continuation + attn_flops_per_pair * pairs
            continue
        out = request.sampling.max_new_tokens
        prefill_flops += 2 * body * prompt + 2 * embedding + attn_flops_per_pair * prompt * (prompt + 1) / 2
        # The first output token comes from the prefill's last row: out - 1 decode steps, step k (from 1) inputting
        # the token before and attending to prompt + k tokens.
        contexts = (out - 1) * prompt + (out - 1) * out / 2
        decode_flops += (2 * body + 2 * embedding) * (out - 1) + attn_flops_per_pair * contexts
        kv_bytes += kv_bytes_per_token * contexts
    steps = max((r.sampling.max_new_tokens - 1 for r in workload.requests if r.continuations is None), default=0)
    head_bytes = embedding * item
    weight_bytes = (body * item + head_bytes) * steps
    prefill_s = prefill_flops / peak_flops
    decode_s = max(decode_flops / peak_flops, (weight_bytes + kv_bytes) / bandwidth)
    return Bound(name, prefill_s + decode_s, prefill_s, decode_s, peak_flops, bandwidth)
