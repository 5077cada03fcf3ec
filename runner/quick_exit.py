"""Leaving the `kvbatch` process without tearing the interpreter down.

After a job, a normal interpreter exit unloads every module of torch and transformers and frees every
tensor one by one: about a second on the CPU machine, after the output is already written. The console
command therefore runs the exit handlers (logging, tqdm, Ray, weakref finalizers: everything registered
with atexit), flushes stdout and stderr, and ends the process with os._exit. It does so only when no
non-daemon thread is still running (a normal exit would wait for it); otherwise it exits normally.

Only the console entry point goes through here: Typer's test runner calls the command itself, not the
app object, so tests exit as usual.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any

import typer


class QuickExitTyper(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            quick_exit(exc)
            raise


def quick_exit(exc: SystemExit) -> None:
    """End the process with exc's status, skipping interpreter teardown; returns if that is not safe now."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    code = exc.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be shown anyway
            pass
    os._exit(status)
