"""kvbatch: offline batch generation over a paged KV cache.

The code lives in three top-level folders that install as subpackages:
``kvbatch.cache`` (paged KV cache), ``kvbatch.runner`` (engine, scheduler, CLI), ``kvbatch.jobs`` (specs, IO).
"""

__version__ = "0.1.0"
