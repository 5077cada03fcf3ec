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
from kvbatch.jobs.job_io import layout_for, read_as_run
from kvbatch.jobs.pipeline import RowPipeline, input_columns
from kvbatch.jobs.plan_sizing import ModelSizing, adapter_problems, model_sizing
from kvbatch.jobs.readers import open_reader
from kvbatch.jobs.records import RowResult
from kvbatch.jobs.rows import RowError
from kvbatch.jobs.run import EngineCache, left_out
from kvbatch.jobs.shard_output import job_shard
from kvbatch.jobs.spec import (
    JobSpec,
    check_chat_template,
    check_job_adapter,
    check_job_constraint,
    check_token_ids,
    named_where_written,
    output_path,
)
from kvbatch.runner.admission import AdmissionLimits, never_fits
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.sequence import capped_new_tokens
from kvbatch.runner.structured import GrammarCache, first_token_problem
from kvbatch.runner.structured_outputs import StructuredOutputs

MAX_LISTED_FAILURES = 20
MAX_LISTED_CONSTRAINTS = 10


@dataclass
class JobPlan:
    job: str
    num_rows: int = 0  # of the shard, for a shard's plan
    shard: str | None = None  # "I/N": the rows that shard of the job runs (parallel.shard, --shard, a Slurm array)
    prompt_tokens: dict[str, float] = field(default_factory=dict)  # min, mean, p50, p90, max
    max_new_tokens: int = 0  # the most any row that runs may generate (its own sampling's, capped by the context)
    max_asked_new_tokens: int = 0  # the most any row that runs asks for, before the engine's cap
    scoring: bool = False  # task score or score_rolling: nothing is generated
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
    # Structured output: each distinct constraint, its rows and its compile time (None: it does not compile)
    constraints: list[tuple[str, int, float | None]] = field(default_factory=list)
    reused_prompt_tokens: int = 0  # expected from the prefix cache (full-block prefix hits, pool-sized LRU)
    num_prompt_tokens: int = 0  # of the rows that will run
    adapters: dict[str, str | None] = field(default_factory=dict)  # LoRA adapter -> why its rows fail, or None

    def format(self) -> str:
        t = self.prompt_tokens
        lines = [f"job {self.job}{f', shard {self.shard}' if self.shard else ''}: {_rows(self.num_rows)}"]
        if t:
            lines.append(
                f"  prompt tokens   min {t['min']:.0f}, mean {t['mean']:.1f}, p50 {t['p50']:.0f}, p90 "
                f"{t['p90']:.0f}, max {t['max']:.0f}; "
                + ("scored, nothing generated" if self.scoring else f"up to {self.max_new_tokens} new tokens each")
                + (
                    f" (max_new_tokens {self.max_asked_new_tokens}, capped by the "
                    f"{'context' if self.max_model_len <= self.pool_tokens else 'KV pool'})"
                    if not self.scoring and self.max_asked_new_tokens > self.max_new_tokens
                    else ""
                )
            )
        lines.append(
            f"  KV pool         {self.num_blocks} blocks of {self.block_size} tokens = {self.pool_tokens} tokens; "
            f"context {self.max_model_len} tokens"
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
                f"  prefix cache    about {self.reused_prompt_tokens} of {self.num_prompt_tokens} prompt tokens "
                f"({share:.0%}) reused from shared prefixes"
            )
        else:
            lines.append("  prefix cache    off")
        if self.constraints:
            num_bad = sum(1 for _, _, seconds in self.constraints if seconds is None)
            lines.append(
                f"  constraints     {len(self.constraints)} distinct"
                + (f", {num_bad} that do not compile" if num_bad else "")
                + f", compiled in {sum(s or 0.0 for _, _, s in self.constraints) * 1000:.0f} ms"
            )
            for text, rows, seconds in self.constraints[:MAX_LISTED_CONSTRAINTS]:
                took = "bad" if seconds is None else f"{seconds * 1000:.1f} ms"
                lines.append(f"    {_rows(rows)}, {took}: {text}")
        if self.adapters:
            usable = [name for name, problem in self.adapters.items() if problem is None]
            lines.append(
                f"  adapters        {len(self.adapters)}: {', '.join(self.adapters)}"
                + (f" ({len(self.adapters) - len(usable)} unusable)" if len(usable) < len(self.adapters) else "")
            )
        if self.truncated:
            lines.append(
                f"  truncated       {_rows(self.truncated)} leave{'s' if self.truncated == 1 else ''} fewer than "
                "max_new_tokens of context and may stop at 'length'"
            )
        if self.failures:
            lines.append(
                f"  will fail       {_rows(sum(self.failures.values()))}: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
            )
            lines += [f"    {m}" for m in self.failure_examples]
        else:
            lines.append("  will fail       none")
        return "\n".join(lines)


def _rows(count: int) -> str:
    return f"{count} row{'' if count == 1 else 's'}"


def plan_job(job: JobSpec, engines: EngineCache) -> JobPlan:
    output_path(job)  # a run stops on an output it cannot write (a folder, the input itself): so does its plan
    layout = layout_for(job, {})
    reader = open_reader(job, input_columns(job, layout))  # the columns a run reads
    # Read as a run reads them: it stops on a prompt column none of the first rows has, and decodes JSON values
    layout = read_as_run(job, reader, layout)
    sizing = model_sizing(job, engines)
    constraints = _Constraints(sizing)
    with named_where_written(job):  # each refusal names the line of the job file, as a run's does
        check_chat_template(job, sizing.tokenizer)  # a run stops on settings no template reads: so does its plan
        check_token_ids(job, sizing.vocab_size)  # a run stops on them before any row: so does its plan
        check_job_constraint(job, constraints.problem)  # and on the job's own constraint, when no row may begin it
        adapters = adapter_problems(job, sizing)
        check_job_adapter(job, lambda name: adapters.get(name, f"adapter {name!r} is not registered"))  # its adapter
    pipeline = RowPipeline(job, sizing.tokenizer, layout)  # the rows a run would fail, failed the same way
    pool = sizing.pool
    limits = AdmissionLimits(
        sizing.max_model_len, pool.num_tokens, sizing.vocab_size, sizing.tokenizer, sizing.eos_token_ids
    )
    capacity = limits.capacity_tokens  # the engine's
    shard = job_shard(job.parallel.shard)  # as a run picks it
    plan = JobPlan(
        job.name,
        shard=None if shard is None else str(shard),
        max_new_tokens=job.sampling.max_new_tokens,
        block_size=pool.block_size,
        num_blocks=pool.num_blocks,
        pool_tokens=pool.num_tokens,
        max_model_len=sizing.max_model_len,
        max_num_seqs=sizing.max_num_seqs,
        samples_per_row=job.sampling.n,
        scoring=job.is_scoring,
    )
    lengths: list[int] = []
    new_tokens: list[int] = []  # what each row that runs may generate, and its samples: its own sampling's
    samples: list[int] = []
    plan.prefix_cache = sizing.prefix_cache
    reuse = ReuseEstimate(pool.block_size, pool.num_blocks) if plan.prefix_cache else None
    plan.adapters = adapters
    for row in reader:
        if left_out(row, shard, pipeline):  # another shard's row: its id still counts, as in the shard's run
            continue
        plan.num_rows += 1
        request = pipeline.request(row)
        error = request.error if isinstance(request, RowResult) else None
        if isinstance(request, GenerationRequest):
            pipeline.discard(request)
            ids = request.prompt_token_ids
            adapter = request.adapter
            bad_adapter = plan.adapters.get(adapter, f"adapter {adapter!r} is not registered") if adapter else None
            refusal = (ErrorKind.BAD_ADAPTER, bad_adapter) if bad_adapter else never_fits(request, limits)
            if refusal is not None:  # the engine's own rule and message, as a run writes them
                error = RowError(refusal[0], f"{row.where}: {refusal[1]}")
            elif request.sampling.structured_outputs is not None:
                error = constraints.error(request, row.where)
            if error is None:
                lengths.append(len(ids))
                asked = request.sampling.max_new_tokens
                new_tokens.append(0 if request.is_scoring else capped_new_tokens(asked, len(ids), capacity))
                plan.max_asked_new_tokens = max(plan.max_asked_new_tokens, 0 if request.is_scoring else asked)
                samples.append(request.sampling.n)
                if reuse is not None:
                    reuse.add(ids)
                # a scoring row generates nothing, so nothing of it is cut
                plan.truncated += not request.is_scoring and len(ids) + request.sampling.max_new_tokens > capacity
        if error is not None:
            plan.failures[error.kind] += 1
            if len(plan.failure_examples) < MAX_LISTED_FAILURES:
                plan.failure_examples.append(error.message)
    plan.constraints = constraints.summary()
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
        new, n = int(np.percentile(new_tokens, 50)), int(np.percentile(samples, 50))
        plan.max_new_tokens, plan.samples_per_row = max(new_tokens), n
        shared = plan.prefix_cache and n > 1
        row_tokens = (prompt + new * n) if shared else (prompt + new) * n
        blocks_per_row = max(1, math.ceil(min(capacity * n, row_tokens) / pool.block_size))
        plan.rows_at_once = pool.num_blocks // blocks_per_row
        if plan.max_num_seqs:
            plan.rows_at_once = min(plan.rows_at_once, max(1, plan.max_num_seqs // n))
    return plan


class _Constraints:
    """The distinct constraints of a job's rows, each compiled once as a run would (the run compiles them again)."""

    def __init__(self, sizing: ModelSizing) -> None:
        self.sizing = sizing
        self.grammars: GrammarCache | None = None
        self.rows: Counter[StructuredOutputs] = Counter()
        self.problems: dict[StructuredOutputs, str | None] = {}

    def problem(self, constraint: StructuredOutputs) -> str | None:
        """Why a row under `constraint` fails before its first token (the engine's own message), or None."""
        if self.grammars is None:
            sizing = self.sizing
            self.grammars = GrammarCache(sizing.tokenizer, sizing.vocab_size, sizing.eos_token_ids)
        if constraint not in self.problems:
            self.problems[constraint] = first_token_problem(self.grammars, constraint)
        return self.problems[constraint]

    def error(self, request: GenerationRequest, where: str) -> RowError | None:
        """The row's error if its constraint does not compile or no token may begin it, as a run writes it."""
        constraint = request.sampling.structured_outputs
        self.rows[constraint] += 1
        problem = self.problem(constraint)
        return RowError(ErrorKind.BAD_CONSTRAINT, f"{where}: {problem}") if problem else None

    def summary(self) -> list[tuple[str, int, float | None]]:
        if self.grammars is None:
            return []
        seconds = self.grammars.compile_seconds
        out = [(c.describe(), rows, seconds.get(c)) for c, rows in self.rows.items()]
        self.grammars.close()
        return sorted(out, key=lambda item: -item[1])
