"""kvbatch: offline batch generation over a paged KV cache.

The code lives in top-level folders that install as subpackages: ``kvbatch.cache`` (the paged KV cache and its
attention kernels), ``kvbatch.runner`` (the engine), ``kvbatch.jobs`` (everything about a job), ``kvbatch.bench``
(benchmarks). This package holds the CLI and the public API below, imported on first use so that `import kvbatch`
stays cheap (the CLI must answer signals before torch is loaded).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_API = {
    "Engine": "kvbatch.runner.engine",
    "EngineConfig": "kvbatch.runner.config",
    "SamplingParams": "kvbatch.runner.config",
    "GenerationRequest": "kvbatch.runner.request",
    "GenerationResult": "kvbatch.runner.request",
    "Completion": "kvbatch.runner.request",
    "JobSpec": "kvbatch.jobs.spec",
    "load_jobs_file": "kvbatch.jobs.spec",
    "job_from_dict": "kvbatch.jobs.spec",
    "run_jobs": "kvbatch.jobs.runners",
    "generate": "kvbatch.jobs.generate",
    "score": "kvbatch.jobs.generate",
    "GenerateBatch": "kvbatch.jobs.ray_data",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # looked up on use: importlib.metadata takes 50 ms, before `kvbatch` takes signals
        from importlib.metadata import version

        return version("kvbatch")
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'kvbatch' has no attribute {name!r}")
