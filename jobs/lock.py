"""One process per output: an OS file lock (flock) held for the whole run.

The kernel drops the lock when the process dies, even by kill -9, so there is never a stale lock to clean by
hand; the lock file itself stays and is harmless. It goes with its output's work folder where a run of another
layout removes that output (output.mode overwrite): a run that waited on it then takes the lock again on the file
now at its path, which a run started after the removal locks too, so that each output has one holder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from kvbatch.errors import InterruptedJob, OutputError, OutputLockedError

_POLL_S = 0.2  # how often a waiting run retries the lock (and looks for a signal)
log = logging.getLogger(__name__)


class OutputLock:
    def __init__(self, path: Path, advice: str = "wait for it, or pass --wait") -> None:
        self.path = path
        self.advice = advice  # what a refused caller can do; `kvbatch merge` has no --wait
        self._fd: int | None = None

    def acquire(self, wait: bool = False, stop_waiting: Callable[[], bool] | None = None) -> None:
        """Take the lock, or raise OutputLockedError; with `wait`, wait for the holder to finish. `stop_waiting`
        (a signal arrived) ends the wait with InterruptedJob: the signal handler only sets a flag, so a plain
        blocking flock would sleep through it."""
        while True:
            fd = self._lock_once(wait, stop_waiting)
            if fd is not None and self._still_at_path(fd):
                break
            # A run of another layout removed the output's work folder (output.mode overwrite): before this run
            # opened the lock, or while it waited on it, so that the lock taken is on a file no other run can open.
            # Take the one at the path, in the folder made again.
            if fd is not None:
                os.close(fd)
            make_work_folder(self.path.parent)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _lock_once(self, wait: bool, stop_waiting: Callable[[], bool] | None) -> int | None:
        """The open lock file, locked (see acquire), or None where its folder is gone."""
        try:  # O_NOFOLLOW: a link planted at the lock's name must not make us open (and truncate) its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise OutputError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise OutputLockedError(
                        f"another kvbatch run{self._holder()} is writing this output (lock {self.path}); {self.advice}"
                    ) from None
                log.warning(
                    "another kvbatch run%s is writing this output; waiting for it (lock %s)", self._holder(), self.path
                )
                self._wait(fd, stop_waiting or (lambda: False))
            except OSError as exc:  # e.g. Lustre mounted without -o flock: ENOSYS
                raise OutputError(
                    f"cannot lock {self.path}: {exc.strerror or exc}; the output's file system does not take flock "
                    "locks, so set output_dir to a folder on one that does (a local disk, or Lustre mounted with "
                    "-o flock)"
                ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _still_at_path(self, fd: int) -> bool:
        """Whether the locked file `fd` is still the one at the lock's path."""
        try:
            at_path = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def _wait(self, fd: int, stop_waiting: Callable[[], bool]) -> None:
        while True:
            if stop_waiting():
                raise InterruptedJob(
                    f"stopped while waiting for another run's lock on this output ({self.path}); nothing was written"
                )
            time.sleep(_POLL_S)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                continue

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid else ""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_work_folder(folder: Path) -> Path:
    """An output's work folder (its lock, manifest and parts), created; refused where it is a symbolic link, as what
    is written there would land wherever the link points, outside output_dir. Beside the lock: a run whose folder an
    overwrite removed makes it again here (OutputLock.acquire)."""
    if folder.is_symlink():
        raise OutputError(f"{folder} is a symbolic link; kvbatch keeps its parts inside output_dir, remove the link")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder.parent}: {exc}") from None
    return folder
