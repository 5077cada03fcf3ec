"""What the `kvbatch` console process does that an in-process call (tests, library use) must not.

1. glibc's allocator, tuned for a batch job before anything runs (unless MALLOC_* variables are set): by
default every tensor over its mmap threshold gets fresh pages from the kernel and gives them back when freed, so
a step's large activations are page-faulted again at every step (the 2,736-row prefill step of the chat example
took 2.3-2.5 s, 1.9-2.1 s with the tuning). The console process keeps up to 1 GiB of freed memory for reuse.

2. Leaving without tearing the interpreter down. After a job, a normal interpreter exit unloads every module
of torch and transformers and frees every tensor one by one: about a second on the CPU machine, after the
output is already written. The console command therefore runs the exit handlers (logging, tqdm, Ray, weakref
finalizers: everything registered with atexit), flushes stdout and stderr, and ends the process with os._exit.
It does so only when no non-daemon thread is still running (a normal exit would wait for it); otherwise it
exits normally.

Only the console entry point goes through here: Typer's test runner calls the command itself, not the
app object, so tests keep the default allocator and exit as usual.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
from typing import Any

import typer

from kvbatch.early_signals import exit_on_early_signals

# mallopt parameters (malloc.h) and the values set: big buffers come from the heap and stay there for reuse.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 2**30), (_M_TOP_PAD, 256 * 2**20))


class ConsoleTyper(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tune_malloc()
        exit_on_early_signals()
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            quick_exit(exc)
            raise


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for a batch job; False where not glibc or the user set MALLOC_*."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl and others have no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT)


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
        if stream is None:  # started with the descriptor closed (`>&-`): Python made no stream for it
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be shown anyway
            pass
    os._exit(status)
