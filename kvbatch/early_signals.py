"""The first thing the `kvbatch` command does: signal handlers that end it with exit code 3 while it starts.

It imports only what the handlers need (a few standard modules and kvbatch.errors), so that they are in before
Typer, torch, transformers or pyarrow start to import: the console module's Typer import alone took up to half a
second on a busy machine, and a Ctrl-C then ended kvbatch with a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def exit_on_early_signals() -> None:
    """SIGINT, SIGTERM or SIGUSR1 while kvbatch starts (torch and transformers import for a second or more) ends it
    with exit code 3, as a signal during a job does, not 130, 143 or 138 (nor a KeyboardInterrupt's traceback): a
    Slurm script requeues on 3. A job's own handlers (signals.graceful_stop) take over once it starts, and a command
    that runs no job (plan, inspect, merge, bench) says that it stopped (cli.STOPPED_BY_SIGNAL)."""
    from kvbatch.errors import ExitCode

    def stop(signum: int, frame: object) -> None:
        # stderr closed at start (None) or a pipe whose reader the same signal ended: exit 3 all the same
        if sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(
                    f"kvbatch: stopped by {signal.Signals(signum).name} before any job ran; rerun to run it\n"
                )
                sys.stderr.flush()
        os._exit(ExitCode.INTERRUPTED)

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, stop)
