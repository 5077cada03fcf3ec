"""Crash-safe file commits: write under a temporary name, flush, fsync, rename, fsync the folder.

After `commit` returns, the file is whole under its final name even if the machine dies; before, only a
`*.incomplete` temporary exists, which readers never look at and the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

INCOMPLETE = ".incomplete"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Open `path.incomplete` for binary writing; on a clean exit fsync it and rename it to `path`."""
    tmp = path.with_name(path.name + INCOMPLETE)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a stale temporary, or a link planted where it will be: never write through it
    # O_EXCL: created by us, right now; a link or file that appeared since the unlink makes this fail instead.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())
        f.write(b"\n")


def fsync_file(path: Path) -> None:
    """Make a file another library wrote with a plain write durable, as atomic_file makes its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (POSIX); not possible on some systems.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
