"""The `kvbatch` command and `python -m kvbatch`. The early signal handlers go in before the CLI is imported: its
imports (torch, transformers, pyarrow, pandas) take a second or more, and a signal landing in them must still end
kvbatch with exit code 3, which a Slurm script requeues on, not with 130 or 143."""

import os
import sys

from kvbatch.early_signals import exit_on_early_signals


def main() -> None:
    exit_on_early_signals()
    try:
        os.getcwd()
    except FileNotFoundError:  # transformers resolves a path against it as it imports: a traceback, exit 1
        from kvbatch.errors import ExitCode

        sys.stderr.write("kvbatch: error: the working folder was removed; cd to a folder that exists and rerun\n")
        sys.exit(ExitCode.USAGE)
    from kvbatch.cli import app  # after the handlers, on purpose

    app(prog_name="kvbatch")


if __name__ == "__main__":
    main()
