"""The logging a spawned process takes from the one that spawned it: a data-parallel child (jobs/data_parallel.py)
or a tensor-parallel rank (tensor_parallel.py). A spawned process is a fresh interpreter, so without this
it logs with Python's and transformers' defaults, whatever -q or -v set in the command."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class LogSettings:
    """The parent's logging, for its children: a spawned child is a fresh interpreter, with Python's defaults
    (warnings shown, debug hidden) and transformers' (its weight-loading bars on), whatever -q or -v set here."""

    root_level: int
    kvbatch_level: int
    log_format: str | None  # the root handler's format; None: no handler (Python's last resort prints)
    transformers_level: int | None  # None: the parent never set up transformers' logging, nor turned bars off
    progress_bars: bool  # transformers' (and the hub's) progress bars

    @classmethod
    def of_this_process(cls) -> LogSettings:
        root = logging.getLogger()
        # The format as text: a handler, or its formatter (pytest's), may not pickle.
        log_format = getattr(root.handlers[0].formatter, "_fmt", None) if root.handlers else None
        hf_logging = sys.modules.get("transformers.utils.logging")  # read, never imported here
        return cls(
            root.level,
            logging.getLogger("kvbatch").level,
            log_format,
            hf_logging.get_verbosity() if hf_logging is not None else None,
            hf_logging.is_progress_bar_enabled() if hf_logging is not None else True,
        )

    def apply(self) -> None:
        if self.log_format is not None:
            logging.basicConfig(format=self.log_format)
        logging.getLogger().setLevel(self.root_level)
        logging.getLogger("kvbatch").setLevel(self.kvbatch_level)
        if self.transformers_level is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(self.transformers_level)
            if not self.progress_bars:
                hf_logging.disable_progress_bar()
