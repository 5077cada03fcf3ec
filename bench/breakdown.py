"""Where a run's device time goes, from a torch.profiler chrome trace: `kvbatch bench throughput --profile`.

Every kernel (and copy) is put in one cell of a table:

    rows:    the engine phase that launched it: forward_decode_graph (a pure-decode step replayed from a CUDA
             graph), forward_eager (steps with prompt tokens, and decodes that could not replay), sample,
             prepare_inputs, or "outside" (launched outside any kvbatch phase)
    columns: gemm (cuBLAS), attention (the paged kernels), kv_write, norm_rope_act (RMSNorm, rope, SiLU),
             copy (memcpy/memset), other (torch's own elementwise, index and reduction kernels)

A kernel is attributed through the profiler's correlation id: kernel -> the runtime call that launched it (a
cudaGraphLaunch for every kernel of a replayed graph) -> the `kvbatch.<phase>` range around that call (the
engine's StepTimer marks its phases while a profiler runs). The device's idle time is the run's span minus the
union of its kernels: the host's share of the run.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"_decode_kernel|_reduce_kernel|_prefill_kernel|_cascade_kernel|_attend")),
    ("kv_write", re.compile(r"_write_kv_kernel|_zero_rows_kernel")),
    ("norm_rope_act", re.compile(r"_add_rms_norm|_rope_kernel|_silu_mul")),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|splitk|cublas", re.IGNORECASE)),
)
COLUMNS = ("gemm", "attention", "kv_write", "norm_rope_act", "copy", "other")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def category(event: dict) -> str:
    if event.get("cat") != "kernel":
        return "copy"
    name = event["name"]
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


@dataclass
class Breakdown:
    span_ms: float  # first kernel's start to last kernel's end
    busy_ms: float  # the union of kernel intervals
    ms: dict[str, dict[str, float]]  # phase -> column -> ms of kernel time
    phase_calls: dict[str, int]  # how many times each phase ran
    top_other: list[tuple[str, float]] = field(default_factory=list)  # the largest "other" kernels, ms

    @property
    def idle_ms(self) -> float:
        return self.span_ms - self.busy_ms

    def as_dict(self) -> dict:
        return {
            "span_ms": round(self.span_ms, 1),
            "busy_ms": round(self.busy_ms, 1),
            "idle_ms": round(self.idle_ms, 1),
            "phase_calls": self.phase_calls,
            "ms": {p: {c: round(v, 1) for c, v in cols.items()} for p, cols in self.ms.items()},
            "top_other": [(n, round(v, 1)) for n, v in self.top_other],
        }

    def table(self) -> str:
        """The breakdown as a markdown table: one row per phase, ms of device time per column."""
        lines = [
            "| phase | calls | " + " | ".join(COLUMNS) + " | total |",
            "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " | ---: |",
        ]
        for phase, cols in sorted(self.ms.items(), key=lambda kv: -sum(kv[1].values())):
            cells = " | ".join(f"{cols.get(c, 0.0):.1f}" for c in COLUMNS)
            lines.append(f"| {phase} | {self.phase_calls.get(phase, 0)} | {cells} | {sum(cols.values()):.1f} |")
        lines.append(f"\nspan {self.span_ms:.1f} ms, device busy {self.busy_ms:.1f} ms, idle {self.idle_ms:.1f} ms")
        return "\n".join(lines)


def breakdown(events: list[dict], prefix: str = "kvbatch.") -> Breakdown:
    """The table for a chrome trace's `traceEvents` (see the module docstring)."""
    ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"][len(prefix) :]) for e in events if _is_phase(e, prefix))
    starts = [r[0] for r in ranges]
    phase_of_launch: dict[int, str] = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {}):
            i = bisect.bisect_right(starts, e["ts"]) - 1
            inside = i >= 0 and ranges[i][0] <= e["ts"] <= ranges[i][1]
            phase_of_launch[e["args"]["correlation"]] = ranges[i][2] if inside else "outside"
    device = [e for e in events if e.get("cat") in DEVICE_CATS and e.get("dur", 0) > 0]
    ms: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0.0))
    others: Counter[str] = Counter()
    for e in device:
        phase = phase_of_launch.get(e.get("args", {}).get("correlation", -1), "outside")
        cat = category(e)
        ms[phase][cat] += e["dur"] / 1e3
        if cat == "other":
            others[e["name"][:80]] += e["dur"] / 1e3
    span, busy, _ = device_time([(e["ts"], e["ts"] + e["dur"]) for e in device])
    return Breakdown(
        span_ms=span / 1e3,
        busy_ms=busy / 1e3,
        ms=dict(ms),
        phase_calls=dict(Counter(r[2] for r in ranges)),
        top_other=others.most_common(6),
    )


def _is_phase(event: dict, prefix: str) -> bool:
    return event.get("cat") == "user_annotation" and event.get("name", "").startswith(prefix) and "dur" in event


def device_time(
    intervals: list[tuple[float, float]], min_gap_us: float = 200.0
) -> tuple[float, float, list[tuple[float, float]]]:
    """(span, busy, gaps) of (start, stop) intervals in microseconds (the trace's unit): the first start to the
    last stop, the length of their union, and the holes longer than min_gap_us as (length, offset from the first
    start), longest first."""
    if not intervals:
        return 0.0, 0.0, []
    intervals = sorted(intervals)
    first = intervals[0][0]
    busy, end, gaps = 0.0, None, []
    for start, stop in intervals:
        if end is None or start > end:
            if end is not None and start - end > min_gap_us:
                gaps.append((start - end, end - first))
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return end - first, busy, sorted(gaps, reverse=True)
