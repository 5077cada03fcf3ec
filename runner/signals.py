"""Stop a job cleanly on SIGTERM, SIGINT or SIGUSR1 (Slurm's `--signal`), and at once on a second signal.

First signal: admission stops, rows already in the engine finish and are committed, the job exits with code 3
(INTERRUPTED) so a `--requeue` script can rerun it, which resumes. Second signal: KeyboardInterrupt right away;
finished rows already committed stay whole (parts are written atomically).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)
SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def stopped(self) -> bool:
        return self.signal_name is not None

    def stop(self, name: str) -> None:
        self.signal_name = name


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # handlers can only be installed from the main thread (tests, embedding)
        return

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if flag.stopped:
            log.warning("second signal (%s): stopping now; committed rows are kept", name)
            raise KeyboardInterrupt(name)
        log.warning("%s: no new rows are admitted; finishing the rows in flight, then committing (again to stop at once)", name)
        flag.stop(name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
