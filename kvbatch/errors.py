"""Every error kvbatch reports, in one leaf module: the exceptions that stop a job or a command, each carrying its
exit code, and the kinds of the per-row errors that do not.

A bad row is never an exception: it becomes one output row with an `ErrorKind` and a message, and the job goes on.
The exceptions below are for what stops a whole job or command. The CLI turns any `KvbatchError` into its message
and `exit_code`; anything else is a bug and keeps its traceback.

This module imports nothing of kvbatch, so every layer (the CLI, jobs/, runner/) may raise these; cache/ imports
nothing outside itself and reports a full budget or a missing backend as a value that runner/ turns into one.
"""

from __future__ import annotations

import enum
from pathlib import Path


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # a job failed; its message says why
    USAGE = 2  # the job file, the command line or the configuration is wrong: change it and rerun
    INTERRUPTED = 3  # a signal stopped the run after committing what was finished: rerun to resume
    LOCKED = 4  # another kvbatch process holds the output


class ErrorKind(str, enum.Enum):
    """Why a row failed: the output's `error_kind` column and the summary's `errors_by_kind` keys."""

    BAD_JSON = "bad_json"  # a JSONL line that is not JSON
    INVALID_UTF8 = "invalid_utf8"
    LINE_TOO_LONG = "line_too_long"
    NOT_AN_OBJECT = "not_an_object"  # a JSONL line that is JSON but not an object
    MISSING_COLUMN = "missing_column"
    WRONG_TYPE = "wrong_type"  # a value of the wrong type for what the job reads from it
    BAD_ROLE = "bad_role"  # a chat message whose role is neither OpenAI's nor one the chat template names
    EMPTY_PROMPT = "empty_prompt"
    DUPLICATE_ID = "duplicate_id"
    BAD_REQUEST = "bad_request"  # an OpenAI Batch line or a row's own settings without what a request needs
    CHAT_TEMPLATE = "chat_template"  # the chat template refused the row's messages
    TOKENIZE = "tokenize"  # the tokenizer raised on this row's prompt
    PROMPT_TOO_LONG = "prompt_too_long"  # the prompt leaves no room for one new token in the context or the pool
    ENGINE = "engine"  # a model step failed for this row alone, twice
    BAD_CONSTRAINT = "bad_constraint"  # a structured-output constraint that is malformed or does not compile
    BAD_ADAPTER = "bad_adapter"  # the row's LoRA adapter is missing, unreadable, of another model or unsupported

    def __str__(self) -> str:
        return self.value


class KvbatchError(Exception):
    """An error whose message tells the user what to change; the CLI prints it and exits with `exit_code`."""

    exit_code: ExitCode = ExitCode.FAILED


# ---- configuration: exit code 2 -----------------------------------------------------------------------------


class SpecError(KvbatchError, ValueError):
    """A job file, a command line or a setting is wrong.

    `where` is `file:line` when known, `field` the dotted path (`jobs[0].sampling.temperature`).
    """

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, field: str | None = None, where: str | None = None) -> None:
        self.message = message
        self.field = field
        self.where = where
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.where, self.field) if p]
        return ": ".join([*parts, self.message])


class KVBudgetError(KvbatchError, ValueError):
    """The memory left for KV pages cannot hold a single block, or the asked pool cannot be allocated."""

    exit_code = ExitCode.USAGE


# ---- the model and the machine: exit code 1 ----------------------------------------------------------------


class ModelLoadError(KvbatchError, RuntimeError):
    """The model cannot be found, trusted, loaded or run by kvbatch's engine."""


class ContextLengthError(ModelLoadError):
    """max_model_len asks for more context than the model has."""

    exit_code = ExitCode.USAGE


class DefaultModelError(KvbatchError, RuntimeError):
    """The embedded default model is not installed, or its conversion failed."""


class BackendUnavailableError(KvbatchError, RuntimeError):
    """An attention backend was asked for by name and cannot run here."""


class FusedLayersError(KvbatchError, ValueError):
    """fused_layers was asked for and the model's layers are not ones the fused path implements."""


class TensorParallelError(KvbatchError, ValueError):
    """The model cannot be split over the asked number of ranks, or the ranks cannot start."""


class TensorParallelLost(BaseException):
    """A tensor-parallel rank died or fell out of step: no job of this run can go on. A BaseException, so that no
    per-row or per-job handler takes it for a row's or a job's failure."""

    exit_code = ExitCode.FAILED


# ---- jobs: exit code 1, 3 or 4 ------------------------------------------------------------------------------


class JobError(KvbatchError):
    """A job could not run or finish. Raised with `job`, its message leads with "job NAME: " and `detail` is the
    message without it: the CLI, which names the failed job itself, prints the detail."""

    def __init__(self, detail: str, *, job: str | None = None) -> None:
        super().__init__(detail if job is None else f"job {job}: {detail}")
        self.job = job
        self.detail = detail


class InputError(JobError):
    """The input as a whole cannot be read (missing file, unknown format, unreadable Parquet footer)."""


class MissingOutputError(InputError):
    """An output named on the command line (`kvbatch inspect OUTPUT`) does not exist: a usage error, as a job file
    not found is. An output whose run has not finished is not this one: its message says to rerun the job."""

    exit_code = ExitCode.USAGE


class OutputError(JobError):
    """The output cannot be written, or belongs to another job."""


class OutputLockedError(OutputError):
    """Another kvbatch process holds the lock on this output."""

    exit_code = ExitCode.LOCKED


class MergeError(JobError):
    """Shards cannot be merged: missing, unfinished, of another spec or input, or with rows missing or twice."""


class MergeTargetError(MergeError):
    """`kvbatch merge` was given a target that no merge writes (a shard's own output): a usage error, as a job file
    not found is; the message names the target meant."""

    exit_code = ExitCode.USAGE


class InterruptedJob(JobError):
    """A signal stopped the job after committing what was finished."""

    exit_code = ExitCode.INTERRUPTED


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit code a run ends with because of `exc` (a KeyboardInterrupt is a stop: rerun to resume)."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, (KvbatchError, TensorParallelLost)):
        return exc.exit_code
    return ExitCode.FAILED


def shown_path(path: Path | str) -> str:
    """A path as messages show it: relative to the working folder when it lies inside it (as it was most likely
    typed, e.g. examples/out/questions.arrow), else absolute."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
