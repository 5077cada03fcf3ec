"""Stop a job cleanly on SIGTERM, SIGINT or SIGUSR1 (Slurm's `--signal`), and at once on a second signal.

    signal 1 ──> admission stops; rows in flight keep generating ──> all done: commit, exit 3
                                                │
                 signal 2, or the grace period ends (KVBATCH_STOP_GRACE_S, default 60 s)
                                                └──> StopNow: rows in flight dropped, finished rows committed, exit 3

Exit code 3 (INTERRUPTED) tells a `--requeue` script to run the job again, which resumes. Rows are committed in
atomic parts, so stopping at any moment (even kill -9) never damages rows already committed; dropped rows are
simply done again by the next run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from kvbatch.errors import ExitCode, InterruptedJob

log = logging.getLogger(__name__)
SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)
GRACE_ENV = "KVBATCH_STOP_GRACE_S"
DEFAULT_GRACE_S = 60.0
# The longest timer setitimer takes is about 292 years (nanoseconds in an int64); past it, it raises inside the signal
# handler. A grace period that long (`inf`, `1e10`) asks to wait for the rows however long they take: what 0 does.
MAX_GRACE_S = 1e9


class StopNow(KeyboardInterrupt):
    """Raised in the main thread by a second signal or the end of the grace period; unwinds like Ctrl-C. Its
    message says which ("second SIGTERM"); the job it stops ends as an InterruptedJob (jobs/runners.py).

    A KeyboardInterrupt (not an Exception) so that no `except Exception` on the way can swallow it.
    """


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.loading = False

    @contextlib.contextmanager
    def while_loading(self) -> Iterator[None]:
        """Mark a model load: stopping at once then exits the process (exit 3). Nothing of the job is in flight
        yet, and a StopNow raised in the middle of transformers' loading can land in an object's __del__, where
        Python prints it and drops it, and the load would go on for as long as it takes."""
        self.loading = True
        try:
            yield
        finally:
            self.loading = False

    @property
    def stopped(self) -> bool:
        return self.signal_name is not None

    def stop(self, name: str) -> None:
        self.signal_name = name


@contextlib.contextmanager
def hard_stop_named(job: str, committed: Callable[[], int] | None = None) -> Iterator[None]:
    """A StopNow inside becomes the job's InterruptedJob, naming the rows `committed` says are (counted once the
    writer inside has committed what finished), as a graceful stop names them: the same exit code 3."""
    try:
        yield
    except StopNow as exc:
        rows = "committed rows are kept" if committed is None else f"{committed()} rows committed"
        raise InterruptedJob(
            f"stopped at once ({exc}); rows in flight dropped, {rows}, rerun to resume", job=job
        ) from None


def exit_now() -> None:
    # Each flush on its own, and none may raise: a stream closed at start (`>&-`: None) or a pipe whose reader the
    # same signal ended (`| tee` in the job step) must not turn exit 3 into a traceback and exit 1.
    for stream in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: a closed file
                stream.flush()
    os._exit(ExitCode.INTERRUPTED)  # the OS releases the output lock; committed parts are already whole on disk


@contextlib.contextmanager
def exit_on_signal(message: str) -> Iterator[None]:
    """For a command with nothing to finish before it stops (`kvbatch plan`, `inspect`, `bench`; `merge` writes each
    output whole or not at all): SIGTERM, SIGINT or SIGUSR1 prints `message` (`{signal}`: the signal's name) and exits
    3 at once, in place of the start-up handler, whose message says no job ran."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread (tests, embedding)
        return

    def on_signal(signum: int, frame: object) -> None:
        if sys.stderr is not None:  # no stderr (`2>&-`), or a pipe with no reader: exit 3 all the same
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"kvbatch: {message.format(signal=signal.Signals(signum).name)}\n")
        exit_now()

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def grace_seconds() -> float:
    """The grace period from $KVBATCH_STOP_GRACE_S (0 = wait for rows in flight however long they take)."""
    raw = os.environ.get(GRACE_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        log.warning("%s=%r is not a number of seconds; using %.0f", GRACE_ENV, raw, DEFAULT_GRACE_S)
        return DEFAULT_GRACE_S
    return 0.0 if value > MAX_GRACE_S else max(value, 0.0)


@contextlib.contextmanager
def graceful_stop(grace_s: float | None = None) -> Iterator[StopFlag]:
    """Install the handlers for the duration of a run; `grace_s` None reads $KVBATCH_STOP_GRACE_S."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # handlers can only be installed from the main thread (tests, embedding)
        return
    grace = grace_seconds() if grace_s is None else grace_s

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if flag.stopped:
            if flag.loading:
                log.warning("second signal (%s) while loading the model: exiting now; committed rows are kept", name)
                exit_now()
            log.warning("second signal (%s): stopping now; rows in flight are dropped, committed rows are kept", name)
            raise StopNow(f"second {name}")
        if grace > 0:
            log.warning(
                "%s: no new rows are admitted; finishing the rows in flight for up to %.0f s, then committing "
                "(signal again to stop at once)",
                name,
                grace,
            )
            signal.setitimer(signal.ITIMER_REAL, grace)
        else:
            log.warning("%s: no new rows are admitted; finishing the rows in flight, then committing", name)
        flag.stop(name)

    def on_alarm(signum: int, frame: object) -> None:
        if flag.stopped:
            log.warning(
                "the grace period of %.0f s after %s is over: stopping now; rows in flight are dropped",
                grace,
                flag.signal_name,
            )
            if flag.loading:
                exit_now()
            raise StopNow(f"grace period after {flag.signal_name} ended")

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield flag
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h)
