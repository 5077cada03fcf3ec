"""The typed errors of the job layer; the CLI maps each to a message and an exit code in one place.

Per-row problems are not exceptions: they become `RowError`s on result rows (see rows.py) and the job goes on.
These exceptions are for things that stop a whole job or a whole command; `shown_path` is how their messages
show a path.
"""

from __future__ import annotations

from pathlib import Path


class JobError(Exception):
    """A job could not run or finish (exit code 1)."""


class SpecError(ValueError):
    """A job file or a command line is wrong (exit code 2).

    `where` is `file:line` when known, `field` the dotted path (`jobs[0].sampling.temperature`).
    """

    def __init__(self, message: str, *, field: str | None = None, where: str | None = None) -> None:
        self.message = message
        self.field = field
        self.where = where
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.where, self.field) if p]
        return ": ".join([*parts, self.message])


class InputError(JobError):
    """The input as a whole cannot be read (missing file, unknown format, unreadable Parquet footer)."""


class OutputError(JobError):
    """The output cannot be written, or belongs to another job."""


class OutputLockedError(OutputError):
    """Another kvbatch process holds the lock on this output (exit code 4)."""


class InterruptedJob(JobError):
    """A signal stopped the job after committing what was finished (exit code 3: rerun to resume)."""


def shown_path(path: Path | str) -> str:
    """A path as messages show it: relative to the working folder when it lies inside it (as it was most likely
    typed, e.g. examples/out/questions.arrow), else absolute."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
