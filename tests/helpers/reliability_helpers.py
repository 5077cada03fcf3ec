"""Shared pieces for the reliability and safety tests: a tiny real model folder, job files, output readers.

The tiny model is a random 2-layer Llama with a word-level tokenizer and a one-line chat template, saved with
save_pretrained, so `kvbatch run` goes through the real loader, tokenizer, engine and writer on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from kvbatch.jobs.arrow_io import read_arrow

REPO = Path(__file__).resolve().parents[2]
# One id per word ("w5 w17"); the template joins message contents, so the placeholder path is exercised.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    from tiny_models import tiny_model, word_tokenizer

    model = tiny_model("llama", seed, attn="sdpa")
    model.save_pretrained(folder)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def word_prompts(num_rows: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(2, 500)}" for _ in range(rng.randrange(2, 12))) for _ in range(num_rows)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_job_file(path: Path, **job: Any) -> Path:
    path.write_text(yaml.safe_dump({"jobs": [job]}, sort_keys=False))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return read_arrow(Path(path)).to_pylist()


def kvbatch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvbatch", *args]


def cli_env() -> dict[str, str]:
    # Never reach a hub from a test; keep thread counts small on the shared 2-core CI box.
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        kvbatch_command(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
