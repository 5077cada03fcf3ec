"""Shared by the scaling tests (shards, data parallel, Ray, tensor parallel): a tiny engine factory, an input, a job.

Module level and importable by name, so processes started with `spawn` (and Ray workers) can import them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tiny_models import tiny_loaded

from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.manifest import Manifest
from kvbatch.jobs.signals import StopFlag
from kvbatch.jobs.spec import JobSpec, job_from_dict
from kvbatch.jobs.writer import work_dir
from kvbatch.runner.engine import Engine, EngineConfig


def tiny_engine(model: str, settings: dict) -> Engine:
    """EngineFactory for the tiny random Llama (4 heads, 2 KV heads), whatever the model name."""
    return Engine.from_loaded(tiny_loaded("llama"), EngineConfig(model=model, **settings))


def write_input(path: Path, num_rows: int = 13, seed: int = 7) -> Path:
    """Word prompts of varied length, one unreadable line (row 5), and row 9 repeating row 2's id."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_rows):
        words = " ".join(f"w{rng.randrange(2, 500)}" for _ in range(rng.randrange(3, 40)))
        lines.append(json.dumps({"id": 2 if i == 9 else i, "prompt": words}))
    lines[5] = '{"id": 5, "prompt": '
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_job(tmp_path: Path, name: str = "answers", runner: str = "local", **parallel) -> JobSpec:
    return job_from_dict(
        {
            "name": name,
            "model": "tiny-llama",
            "input": {"path": str(tmp_path / "in.jsonl")},
            "prompt": {"chat_template": False},
            "id_column": "id",
            "sampling": {"max_new_tokens": 6},
            "output": {"path": f"{name}.arrow", "part_rows": 2},
            "output_dir": str(tmp_path / "out"),
            "engine": {"device": "cpu", "num_blocks_override": 64, "max_num_seqs": 3},
            "sort_window": 4,
            "runner": runner,
            "parallel": parallel,
        }
    )


def rows_of(path: Path) -> list[dict]:
    return read_arrow(Path(path)).to_pylist()


def tiny_tp_loader(model: str, settings: dict, device) -> object:
    """tensor_parallel.Loader for the same tiny Llama (seeded: every rank builds the same weights)."""
    return tiny_loaded("llama")


def tiny_tp_loader_or_missing(model: str, settings: dict, device) -> object:
    """tiny_tp_loader, except that model "missing-model" fails on every rank, as a real loader's would."""
    if model == "missing-model":
        from kvbatch.runner.model_loader import ModelLoadError

        raise ModelLoadError(f"cannot load model {model!r}: not found")
    return tiny_tp_loader(model, settings, device)


class FailingEngineFactory:
    """EngineFactory for the tiny engine, whose `generate` fails (after a pause, so that earlier blocks get written)
    on any batch holding a row at or past `row`, while the file `marker` exists: a run that dies half way."""

    def __init__(self, marker: Path, row: int, pause_s: float = 3.0) -> None:
        self.marker, self.row, self.pause_s = str(marker), row, pause_s

    def __call__(self, model: str, settings: dict) -> object:
        return _HookedEngine(tiny_engine(model, settings), self.before_generate)

    def before_generate(self, requests: list) -> None:
        if Path(self.marker).exists() and any(r.request_id >= self.row for r in requests):
            time.sleep(self.pause_s)
            raise RuntimeError(f"engine stopped at row {self.row} (test)")


class SignallingEngineFactory:
    """EngineFactory for the tiny engine that sends SIGINT to the process `pid` (a Ray run's driver) once, from the
    first batch holding a row at or past `row`, and then pauses before generating: the signal comes while the Ray
    Data write is in flight. `marker` is the once: whichever actor removes it sends the signal."""

    def __init__(self, pid: int, marker: Path, row: int, pause_s: float = 5.0) -> None:
        self.pid, self.marker, self.row, self.pause_s = pid, str(marker), row, pause_s

    def __call__(self, model: str, settings: dict) -> object:
        return _HookedEngine(tiny_engine(model, settings), self.before_generate)

    def before_generate(self, requests: list) -> None:
        if any(r.request_id >= self.row for r in requests):
            try:
                os.unlink(self.marker)
            except FileNotFoundError:
                return
            os.kill(self.pid, signal.SIGINT)
            time.sleep(self.pause_s)


class _HookedEngine:
    """The tiny engine, with `before(requests)` called on each batch before it generates."""

    def __init__(self, engine: Engine, before: Callable[[list], None]) -> None:
        self.engine, self.before = engine, before

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def generate(self, requests, **kwargs):
        requests = list(requests)
        self.before(requests)
        return self.engine.generate(requests, **kwargs)


class StopAfter(StopFlag):
    """A signal once the run has asked `calls` times: it stops part way, as a SIGTERM would, with rows committed."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    @property
    def stopped(self) -> bool:
        self.calls -= 1
        if self.calls < 0 and self.signal_name is None:
            self.signal_name = "SIGTERM"
        return self.signal_name is not None


def committed_rows(out: Path) -> int:
    """The rows committed in the parts of output `out`, as its manifest names them."""
    return len(Manifest.load(work_dir(out) / "manifest.json").done_rows())
