"""The end-of-job summary: printed, and written as JSON beside the output (`NAME.summary.json`).

One builder for every runner: the rows come from what the output file holds (`WriteReport`), the tokens and
timings from what this run did (`RunCounts`). Data parallel and `kvbatch merge` add the counts of their shards'
summaries (`RunCounts.of`) with the same `+`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvbatch.errors import InputError, OutputError, shown_path

from .atomic import write_json
from .inspect import inspect_output

log = logging.getLogger(__name__)


def _shown(name: str) -> str:
    """An adapter name as the terminal shows it: a row's adapter column may name anything, escape sequences
    included, which would reach the terminal as commands."""
    return name if name.isprintable() else ascii(name)


@dataclass
class Summary:
    job: str
    output: str
    status: str = "done"  # done | already complete | interrupted | failed
    rows: int = 0  # rows in the output (all runs)
    rows_ok: int = 0
    rows_error: int = 0
    rows_this_run: int = 0  # rows finished by this run (the rest were resumed from earlier runs)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # this run
    output_tokens: int = 0  # this run
    # None below: not measured (ENGINE_FIELDS of a Ray run, whose engines run in its actors), not a zero
    elapsed_s: float = 0.0  # this run, from start to the written output
    load_s: float | None = 0.0  # of which loading the model (0 when an earlier job of the run loaded it)
    output_tokens_per_s: float = 0.0  # over the time after the load (over all of it where load_s is None)
    peak_kv_usage: float | None = 0.0  # 0..1 share of KV blocks held at the busiest moment
    preemptions: int | None = 0
    cached_prompt_tokens: int | None = 0  # this run: prompt tokens whose K/V came from the prefix cache
    prefix_cache_hit_rate: float | None = 0.0  # 0..1 share of the prompt tokens looked up that the cache held
    # this run: prompt tokens looked up in the prefix cache (the rate's denominator)
    queried_prompt_tokens: int | None = 0
    output_bytes: int = 0
    adapters: dict[str, int] = field(default_factory=dict)  # this run's rows on each LoRA adapter, by name
    model: str = ""
    spec_hash: str = ""
    kvbatch_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        try:
            write_json(path, self.to_dict())
        except OSError as exc:  # a full disk, after the output itself was written: not a bug, and nothing is lost
            raise OutputError(
                f"{shown_path(self.output)} is complete, but its summary {shown_path(path)} could not be written: "
                f"{exc.strerror or exc}",
                job=self.job,
            ) from exc

    def format(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        if self.load_s is None:
            rate = f"{self.output_tokens_per_s:.1f} output tok/s; loading not measured"
        else:
            rate = f"{self.load_s:.1f} s loading; {self.output_tokens_per_s:.1f} output tok/s after it"
        if self.peak_kv_usage is None or self.preemptions is None or self.prefix_cache_hit_rate is None:
            kv_cache = "not measured"
        else:
            kv_cache = (
                f"peak {self.peak_kv_usage:.0%} of blocks, {_count(self.preemptions, 'preemption')}, "
                f"prefix cache hit {self.prefix_cache_hit_rate:.0%} ({self.cached_prompt_tokens} prompt tokens reused)"
            )
        return "\n".join(
            [
                f"job {self.job}: {self.status} -> {shown_path(self.output)}",
                f"  rows        {self.rows} ({self.rows_ok} ok, {_count(self.rows_error, 'error')}; "
                f"{self.rows_this_run} this run)",
                f"  tokens      {self.prompt_tokens} prompt, {self.output_tokens} output in {self.elapsed_s:.1f} s "
                f"({rate})",
                f"  KV cache    {kv_cache}",
                f"  errors      {errors}",
            ]
            + (
                [f"  adapters    {', '.join(f'{_shown(k)} {v}' for k, v in self.adapters.items())}"]
                if self.adapters
                else []
            )
        )


# What only the engines measure (their load, KV use, preemptions, prefix cache): None in the summary of a run
# whose engines run elsewhere (Ray actors), which would otherwise report zeros it never measured.
ENGINE_FIELDS = (
    "load_s",
    "peak_kv_usage",
    "preemptions",
    "cached_prompt_tokens",
    "queried_prompt_tokens",
    "prefix_cache_hit_rate",
)


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


@dataclass
class RunCounts:
    """What one run did (not what the output holds): its rows, tokens, KV use and prefix-cache reuse."""

    rows: int = 0  # rows finished by this run
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    peak_kv_usage: float = 0.0
    cached_prompt_tokens: int = 0
    queried_prompt_tokens: int = 0
    # rows on each LoRA adapter, by name: a count of the run like the rest, so data parallel and `kvbatch merge`
    # add their shards' up as they add the tokens (kept apart, the merged summary named no adapter)
    adapters: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: RunCounts) -> RunCounts:
        numbers = [f.name for f in fields(self) if f.name != "adapters"]
        summed = {name: getattr(self, name) + getattr(other, name) for name in numbers}
        adapters = dict(self.adapters)
        for name, rows in other.adapters.items():
            adapters[name] = adapters.get(name, 0) + rows
        return RunCounts(
            **{**summed, "peak_kv_usage": max(self.peak_kv_usage, other.peak_kv_usage)},
            adapters=dict(sorted(adapters.items())),
        )

    @classmethod
    def of(cls, summary: Summary | dict[str, Any]) -> RunCounts:
        """The counts a summary (or its JSON) reports; an older summary's missing fields count 0."""
        data = summary.to_dict() if isinstance(summary, Summary) else summary
        rows = data.get("rows_this_run", 0)
        numbers = [f for f in fields(cls)[1:] if f.name != "adapters"]
        adapters = {str(name): int(n) for name, n in (data.get("adapters") or {}).items()}
        return cls(rows, *(type(f.default)(data.get(f.name, 0)) for f in numbers), adapters=adapters)


def build_summary(
    job: str,
    output: Path,
    report: Any,
    counts: RunCounts,
    elapsed_s: float,
    load_s: float = 0.0,
    engines_measured: bool = True,
    **about: str,
) -> Summary:
    """The summary of a run that wrote `output`: rows from the file (`report`, a WriteReport), the rest from
    `counts`; `engines_measured` False: ENGINE_FIELDS are not measured (None); `about`: model, spec_hash,
    kvbatch_version."""
    num_errors = report.finish_reasons.get("error", 0)
    queried = counts.queried_prompt_tokens
    generating_s = elapsed_s - load_s
    summary = Summary(
        job,
        str(Path(output).absolute()),  # read from any folder (a merge is given the path as typed); shown relative
        rows=report.num_rows,
        rows_ok=report.num_rows - num_errors,
        rows_error=num_errors,
        rows_this_run=counts.rows,
        finish_reasons=dict(report.finish_reasons),
        errors_by_kind={str(k): v for k, v in report.error_kinds.items()},
        prompt_tokens=counts.prompt_tokens,
        output_tokens=counts.output_tokens,
        elapsed_s=round(elapsed_s, 3),
        load_s=round(load_s, 3),
        output_tokens_per_s=round(counts.output_tokens / generating_s, 2) if generating_s > 0 else 0.0,
        peak_kv_usage=round(counts.peak_kv_usage, 4),
        preemptions=counts.preemptions,
        cached_prompt_tokens=counts.cached_prompt_tokens,
        queried_prompt_tokens=queried,
        prefix_cache_hit_rate=round(counts.cached_prompt_tokens / queried, 4) if queried else 0.0,
        output_bytes=report.num_bytes,
        adapters=dict(sorted(counts.adapters.items())),
        **about,
    )
    if not engines_measured:
        for name in ENGINE_FIELDS:
            setattr(summary, name, None)
    return summary


def already_complete(output: Path, fallback: Summary) -> Summary:
    """The summary of an output an earlier run finished: what the file holds (from that run's summary), and zero
    for this run, which did nothing (its tokens and timing would otherwise read as this run's)."""
    summary = None
    path = summary_path(output)
    if path.exists():
        try:
            data = json.loads(path.read_text())
            summary = Summary(**{k: v for k, v in data.items() if k in Summary.__dataclass_fields__})
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # edited by hand: the output is still whole
            log.warning("cannot read %s (%s); the summary leaves out the earlier run's counts", path, exc)
    if summary is None:
        summary = _counted(output, fallback)
    run_fields = (*(f.name for f in fields(RunCounts)[1:]), "rows_this_run", "elapsed_s", "load_s")
    for name in (*run_fields, "output_tokens_per_s", "prefix_cache_hit_rate"):
        setattr(summary, name, _default(name))  # the file's value may be of any type
    summary.status = "already complete"
    return summary


def _counted(output: Path, fallback: Summary) -> Summary:
    """`fallback` with the rows `output` holds, counted from the file itself: its summary is gone."""
    try:
        report = inspect_output(output, num_samples=0)
    except InputError as exc:
        log.warning("cannot count the rows of %s (%s)", output, exc)
        return fallback
    num_errors = report.finish_reasons.get("error", 0)
    return replace(
        fallback,
        rows=report.num_rows,
        rows_ok=report.num_rows - num_errors,
        rows_error=num_errors,
        finish_reasons=dict(report.finish_reasons),
        errors_by_kind=dict(report.error_kinds),
    )


def _default(name: str) -> Any:
    """A Summary field's default, made afresh for a mapping (`adapters`)."""
    f = Summary.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
