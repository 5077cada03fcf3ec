"""What an engine is built with (EngineConfig) and what it counts while it runs (EngineStats)."""

from __future__ import annotations

from dataclasses import dataclass

from .scheduler import POLICIES, Policy


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # "default", a local folder, a .gguf file, or a cached hub name
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: float32 on cpu, bfloat16 on cuda
    block_size: int = 16  # tokens per KV page
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens per step; None: 4096 on cpu, 16384 on cuda
    kv_cache_gib: float = 2.0  # pool size on the cpu
    gpu_memory_utilization: float = 0.9  # share of the GPU that weights, activations and pages may use
    num_blocks_override: int | None = None  # exact pool size, for tests and benchmarks
    policy: Policy = "optimistic"
    attention_backend: str = "auto"  # auto | torch | triton | flash-attn
    max_model_len: int | None = None  # None: the model's own context
    trust_remote_code: bool = False
    allow_pickle: bool = False
    allow_download: bool = False
    cuda_graphs: bool = True
    seed: int | None = None  # base of the seeds given to unseeded requests; None: random
    prefix_cache: bool = True  # reuse the K/V of full blocks shared with earlier prompts (and samples)
    async_scheduling: bool | None = None  # plan the next step while the device runs this one; None: on for cuda
    fused_layers: bool | None = (
        None  # Llama-family layers with fused kernels (runner/fused_forward.py); None: on for cuda
    )
    float32_logits: bool = False  # a bf16/fp16 model's lm_head writes float32 (runner/float32_logits.py), on CUDA
    max_loras: int = 8  # LoRA adapters on the device at once; a step mixes at most this many (runner/adapters.py)
    max_cpu_loras: int | None = None  # adapters' weights kept in host memory; None: max_loras

    def __post_init__(self) -> None:
        # A job's YAML is checked when it loads; this holds code that builds an EngineConfig itself to the same rules.
        at_least_one = {
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "num_blocks_override": self.num_blocks_override,
            "max_model_len": self.max_model_len,
            "max_loras": self.max_loras,
            "max_cpu_loras": self.max_cpu_loras,
        }
        for name, value in at_least_one.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be a whole number >= 1, got {value!r}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"EngineConfig.kv_cache_gib must be > 0, got {self.kv_cache_gib!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"EngineConfig.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


@dataclass
class EngineStats:
    num_steps: int = 0
    num_steps_ahead: int = 0  # planned while the step before was in flight (async scheduling)
    num_spare_tokens: int = 0  # decoded ahead for a sequence that had stopped on the step before, dropped
    num_failed_steps: int = 0
    num_preemptions: int = 0
    peak_kv_usage: float = 0.0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_requests: int = 0
    num_errors: int = 0
    # Prefix cache: tokens admissions had to prefill (prompt, plus output so far after a preemption),
    # and how many of those the cache held.
    num_queried_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    # Seconds the host waited for a step's sampled tokens. With async scheduling a run the device bounds spends
    # most of its time here; one the host bounds (the device idle between steps) almost none.
    host_wait_s: float = 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_cached_prompt_tokens / self.num_queried_prompt_tokens if self.num_queried_prompt_tokens else 0.0
