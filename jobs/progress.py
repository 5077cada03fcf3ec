"""A job's progress: rows done of the total, rows/s, prompt and output tokens/s, ETA, KV use, prefix hits, errors.

Shown as a live bar on a terminal, as a plain line every `progress_seconds` elsewhere (a Slurm log, cron, CI: no
carriage returns), or not at all (`progress: "off"`, quoted in YAML; `--quiet`). Both refresh from the engine's
`on_step` callback as well as when a row finishes, so a long prefill shows its prompt tokens/s before any row is done.

Rates count this run's work only. Rows an earlier run finished (a resume) are in "done" but not in any rate; error
rows cost the engine nothing, so they shorten what is left but do not count as work done. The token rates come
from the engine's counters, which move every step:

    ETA = work left / work per second          work = prompt tokens computed + output tokens, this run
    work left = rows left x work per finished row of this run - work already done for the rows in flight

Where that leaves no work while rows are left, the rows still running have already done more than the finished
ones did in all (the short rows finish first), and the rows' own rate is the better guide: ETA = rows left / rows
per second. An ETA of 0 means the job is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kvbatch.runner.request import GenerationEngine

BAR_REFRESH_S = 0.5  # a terminal's bar; a log gets a line every progress_seconds


@dataclass(frozen=True)
class Snapshot:
    """What one refresh shows."""

    rows_done: int  # all runs
    total: int | None
    errors: int  # this run
    rows_per_s: float  # this run's finished rows that did work
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    eta_s: float | None  # None until a row of this run finished
    kv_usage: float
    prefix_hit_rate: float | None  # None while nothing was looked up

    def postfix(self) -> str:
        prefix = f", prefix hit {self.prefix_hit_rate:.0%}" if self.prefix_hit_rate is not None else ""
        return (
            f"ETA {format_seconds(self.eta_s)}, prompt {self.prompt_tokens_per_s:.0f} tok/s, "
            f"output {self.output_tokens_per_s:.1f} tok/s, KV {self.kv_usage:.0%}{prefix}, {self.errors} errors"
        )

    def line(self, name: str) -> str:
        total = f"/{self.total} rows" if self.total is not None else " rows"
        share = f" ({self.rows_done / self.total:.0%})" if self.total else ""
        return f"{name}: {self.rows_done}{total}{share}, {self.rows_per_s:.2f} rows/s, {self.postfix()}"


def announce_load(name: str, model: str, mode: str, stream: TextIO | None = None) -> None:
    """In a log (line mode), say that the job's model is loading: a load of minutes otherwise leaves a Slurm or
    cron log empty until the first progress line. A terminal's bar starts once the model is loaded; a line printed
    there could land on another process's live bar (--data-parallel), so it gets none."""
    stream = stream if stream is not None else sys.stderr
    if display_mode(mode, stream) == "lines":
        write_line(stream, f"{name}: loading model {model}")


def write_line(stream: TextIO, line: str) -> bool:
    """Write a line to the log or console; False where it is gone: a pipe whose reader exited (`| tee` killed), a
    full disk under the Slurm log, a hung-up terminal. Progress is for a reader; one gone must not fail the job."""
    try:
        stream.write(line + "\n")
        stream.flush()
    except OSError:
        return False
    return True


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal the bar is on (logging.basicConfig's), not to a file."""
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


def display_mode(progress: str, stream: TextIO) -> str:
    """bar, lines or off: `auto` is a bar on a terminal and lines anywhere else, a dumb terminal included (TERM=dumb:
    Emacs' shell, some CI consoles), which cannot move its cursor back over a bar."""
    if progress != "auto":
        return progress
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty() or os.environ.get("TERM") == "dumb":
        return "lines"
    return "lines" if _terminal_columns(stream) == 0 else "bar"


def _terminal_columns(stream: TextIO) -> int | None:
    """The terminal's width; 0 for a pty whose size was never set (`script`, `docker exec -t` in a script), where
    tqdm draws nothing at all; None where it cannot be told (a stand-in stream), which tqdm sizes itself."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return None


class JobProgress:
    def __init__(
        self,
        name: str,
        total: int | None,
        engine: GenerationEngine | None,
        initial: int = 0,
        *,
        mode: str = "auto",
        every_s: float = 30.0,
        position: int | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.total = total
        self.engine = engine  # None for a Ray run: its engines are in its actors
        self.stream = stream if stream is not None else sys.stderr
        self.mode = display_mode(mode, self.stream)
        self.every_s = every_s
        self.clock = clock
        self.start = clock()
        self.rows_done = initial
        self.errors = 0
        self.rows_worked = 0  # this run's rows that were not errors
        self.prompt_tokens = 0  # of those rows
        self.output_tokens = 0
        self.peak_kv_usage = 0.0
        self._before = self._counters()
        self._last_refresh = self.start
        self.bar: Any = None
        self._logs = contextlib.ExitStack()
        if self.mode == "bar":
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=name,
                # One bar of several processes' (--data-parallel) takes a line of its own and is cleared at the
                # end: a bar left behind writes a newline that shifts the lines of the bars still running.
                position=position or 0,
                leave=position is None,
                unit="row",
                file=self.stream,
                dynamic_ncols=True,
                mininterval=BAR_REFRESH_S,
                # tqdm's {postfix} brings its own leading ", " (and is empty until the first refresh)
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}{postfix}]",
            )
            if any(_is_console(handler) for handler in logging.getLogger().handlers):
                # A warning while the bar is live (a signal, a slow step) goes above the bar, not onto its line.
                self._logs.enter_context(logging_redirect_tqdm())

    # -- what the engine counted since the job started ------------------------------------------------------
    def _counters(self) -> tuple[int, int, int, int]:
        """prefill, output, queried and cached prompt tokens; the engine outlives the job, so they are deltas."""
        if self.engine is None:
            return 0, 0, 0, 0
        s = self.engine.stats
        return s.num_prefill_tokens, s.num_output_tokens, s.num_queried_prompt_tokens, s.num_cached_prompt_tokens

    def _deltas(self) -> tuple[int, int, int, int]:
        if self.engine is None:  # only finished rows are known
            return self.prompt_tokens, self.output_tokens, 0, 0
        prefill, output, queried, cached = (now - then for now, then in zip(self._counters(), self._before))
        return prefill, output, queried, cached

    def kv_usage(self) -> float:
        return self.engine.kv_usage() if self.engine is not None else 0.0

    def prefix_hit_rate(self) -> float | None:
        """Share of this job's looked-up prompt tokens the prefix cache held; None while nothing was looked up."""
        _, _, queried, cached = self._deltas()
        return cached / queried if queried else None

    def snapshot(self) -> Snapshot:
        elapsed = max(self.clock() - self.start, 1e-9)
        prefill, output, _, _ = self._deltas()
        hit_rate = self.prefix_hit_rate()
        usage = self.kv_usage()
        self.peak_kv_usage = max(self.peak_kv_usage, usage)
        return Snapshot(
            rows_done=self.rows_done,
            total=self.total,
            errors=self.errors,
            rows_per_s=self.rows_worked / elapsed,
            prompt_tokens_per_s=prefill / elapsed,
            output_tokens_per_s=output / elapsed,
            eta_s=self._eta(prefill + output, elapsed, hit_rate or 0.0),
            kv_usage=usage,
            prefix_hit_rate=hit_rate,
        )

    def _eta(self, work: int, elapsed: float, hit_rate: float) -> float | None:
        if self.total is not None and self.rows_done >= self.total:
            return 0.0
        if self.total is None or self.rows_worked == 0 or work <= 0:
            return None
        # A finished row's work in the engine's units: the prompt tokens the prefix cache held were not computed.
        finished = self.prompt_tokens * (1.0 - hit_rate) + self.output_tokens
        per_row = finished / self.rows_worked
        in_flight = max(0.0, work - finished)
        rows_left = self.total - self.rows_done
        left = rows_left * per_row - in_flight
        if left <= 0:  # the running rows outgrew the finished rows' average: they are the long ones
            return rows_left * elapsed / self.rows_worked
        return left / (work / elapsed)

    # -- events ------------------------------------------------------------------------------------------
    def update(self, prompt_tokens: int | None, output_tokens: int, error: bool) -> None:
        """A row was written: a result (work done) or an error row (none)."""
        self.rows_done += 1
        if error:
            self.errors += 1
        else:
            self.rows_worked += 1
            self.prompt_tokens += prompt_tokens or 0
            self.output_tokens += output_tokens
        if self.bar is not None:
            self.bar.update(1)
        self.tick()

    def tick(self) -> None:
        """Refresh if due: after every engine step (a long prefill finishes no row) and every row."""
        now = self.clock()
        due = BAR_REFRESH_S if self.mode == "bar" else self.every_s
        if self.mode == "off" or now - self._last_refresh < due:
            self.peak_kv_usage = max(self.peak_kv_usage, self.kv_usage())
            return
        self._last_refresh = now
        self._show(self.snapshot())

    def _show(self, snapshot: Snapshot) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(snapshot.postfix(), refresh=True)
        elif self.mode == "lines" and not write_line(self.stream, snapshot.line(self.name)):
            self.mode = "off"  # nobody reads it any more: stop trying at every refresh

    def close(self) -> None:
        snapshot = self.snapshot()
        if self.bar is not None:
            self.bar.set_postfix_str(snapshot.postfix(), refresh=False)
            self.bar.close()
            self._logs.close()
        elif self.mode == "lines":
            self._show(snapshot)  # the last state, also for a job shorter than one interval
