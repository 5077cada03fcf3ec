"""`kvbatch plan`: what a job will do, without generating.

Tokenizes every row (streaming) with the model's tokenizer and sizes the KV pool as a run would, then reports
token-length statistics, the pool in tokens and blocks, how many typical rows fit at once, how many prompt tokens
the prefix cache can be expected to reuse, and which rows will fail and why. On the CPU no weights are loaded
(plan_sizing.py); on a GPU the model loads, because the pool is sized by profiling it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kvbatch.cache.prefix_cache import ReuseEstimate
from kvbatch.errors import ErrorKind
from kvbatch.jobs.job_io import layout_for
from kvbatch.jobs.pipeline import RowPipeline
from kvbatch.jobs.plan_sizing import model_sizing
from kvbatch.jobs.prompts import prompt_columns, prompt_spec
from kvbatch.jobs.readers import open_reader
from kvbatch.jobs.records import RowResult
from kvbatch.jobs.rows import RowError
from kvbatch.jobs.run import EngineCache
from kvbatch.jobs.spec import JobSpec
from kvbatch.runner.request import GenerationRequest

MAX_LISTED_FAILURES = 20


@dataclass
class JobPlan:
    job: str
    num_rows: int = 0
    prompt_tokens: dict[str, float] = field(default_factory=dict)  # min, mean, p50, p90, max
    max_new_tokens: int = 0
    block_size: int = 0
    num_blocks: int = 0
    pool_tokens: int = 0
    max_model_len: int = 0
    max_num_seqs: int | None = None
    samples_per_row: int = 1  # sampling.n: each row holds n sequences
    rows_at_once: int = 0  # typical rows (p50 prompt + max_new_tokens) held in the pool together
    failures: Counter = field(default_factory=Counter)
    failure_examples: list[str] = field(default_factory=list)
    truncated: int = 0  # rows whose prompt + max_new_tokens passes the context: they will stop at "length"
    prefix_cache: bool = False
    reused_prompt_tokens: int = 0  # expected from the prefix cache (full-block prefix hits, pool-sized LRU)
    num_prompt_tokens: int = 0  # of the rows that will run

    def format(self) -> str:
        t = self.prompt_tokens
        lines = [f"job {self.job}: {self.num_rows} row{'' if self.num_rows == 1 else 's'}"]
        if t:
            lines.append(
                f"  prompt tokens   min {t['min']:.0f}, mean {t['mean']:.1f}, p50 {t['p50']:.0f}, p90 {t['p90']:.0f}, max {t['max']:.0f}; up to {self.max_new_tokens} new tokens each"
            )
        lines.append(
            f"  KV pool         {self.num_blocks} blocks of {self.block_size} tokens = {self.pool_tokens} tokens; context {self.max_model_len} tokens"
        )
        lines.append(
            f"  at once         about {self.rows_at_once} typical rows (p50 prompt + max_new_tokens"
            + (f", {self.samples_per_row} samples each" if self.samples_per_row > 1 else "")
            + ")"
            + (f", max_num_seqs {self.max_num_seqs}" if self.max_num_seqs else "")
        )
        if self.prefix_cache:
            share = self.reused_prompt_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
            lines.append(
                f"  prefix cache    about {self.reused_prompt_tokens} of {self.num_prompt_tokens} prompt tokens ({share:.0%}) reused from shared prefixes"
            )
        else:
            lines.append("  prefix cache    off")
        if self.truncated:
            lines.append(
                f"  truncated       {self.truncated} rows leave fewer than max_new_tokens of context and may stop at 'length'"
            )
        if self.failures:
            lines.append(
                f"  will fail       {sum(self.failures.values())} rows: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
            )
            lines += [f"    {m}" for m in self.failure_examples]
        else:
            lines.append("  will fail       none")
        return "\n".join(lines)


def plan_job(job: JobSpec, engines: EngineCache) -> JobPlan:
    pspec = prompt_spec(job)
    layout = layout_for(job, {})
    reader = open_reader(job, [*prompt_columns(pspec), *layout.data_columns()])  # the columns a run reads
    sizing = model_sizing(job, engines)
    pipeline = RowPipeline(job, sizing.tokenizer, layout)  # the rows a run would fail, failed the same way
    pool = sizing.pool
    capacity = min(sizing.max_model_len, pool.num_tokens)
    plan = JobPlan(
        job.name,
        max_new_tokens=job.sampling.max_new_tokens,
        block_size=pool.block_size,
        num_blocks=pool.num_blocks,
        pool_tokens=pool.num_tokens,
        max_model_len=sizing.max_model_len,
        max_num_seqs=sizing.max_num_seqs,
        samples_per_row=job.sampling.n,
    )
    lengths: list[int] = []
    plan.prefix_cache = sizing.prefix_cache
    reuse = ReuseEstimate(pool.block_size, pool.num_blocks) if plan.prefix_cache else None
    for row in reader:
        plan.num_rows += 1
        request = pipeline.request(row)
        error = request.error if isinstance(request, RowResult) else None
        if isinstance(request, GenerationRequest):
            pipeline.discard(request)
            ids = request.prompt_token_ids
            if not ids:
                error = RowError(ErrorKind.EMPTY_PROMPT, f"{row.where}: the prompt is empty (0 tokens)")
            elif len(ids) >= capacity:
                error = RowError(
                    ErrorKind.PROMPT_TOO_LONG,
                    f"{row.where}: the prompt has {len(ids)} tokens; at most {capacity - 1} fit "
                    f"({capacity} tokens of context/pool)",
                )
            else:
                lengths.append(len(ids))
                if reuse is not None:
                    reuse.add(ids)
                plan.truncated += len(ids) + request.sampling.max_new_tokens > capacity
        if error is not None:
            plan.failures[error.kind] += 1
            if len(plan.failure_examples) < MAX_LISTED_FAILURES:
                plan.failure_examples.append(error.message)
    if reuse is not None:
        plan.reused_prompt_tokens = reuse.num_reused_tokens
    plan.num_prompt_tokens = sum(lengths)
    if lengths:
        a = np.array(lengths)
        plan.prompt_tokens = {
            "min": a.min(),
            "mean": a.mean(),
            "p50": np.percentile(a, 50),
            "p90": np.percentile(a, 90),
            "max": a.max(),
        }
        # A row of n samples holds its prompt's blocks once (shared by the prefix cache, or copied per sample
        # without it) and n outputs: count what the samples hold apart.
        prompt = int(plan.prompt_tokens["p50"])
        new = job.sampling.max_new_tokens
        shared = plan.prefix_cache and job.sampling.n > 1
        row_tokens = (prompt + new * job.sampling.n) if shared else (prompt + new) * job.sampling.n
        blocks_per_row = max(1, math.ceil(min(capacity * job.sampling.n, row_tokens) / pool.block_size))
        plan.rows_at_once = pool.num_blocks // blocks_per_row
        if plan.max_num_seqs:
            plan.rows_at_once = min(plan.rows_at_once, max(1, plan.max_num_seqs // job.sampling.n))
    return plan
