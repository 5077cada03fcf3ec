"""The default model's cache as Slurm arrays and shared team caches meet it: a cache folder that cannot be made is a
message naming KVBATCH_CACHE; a killed conversion's staging folder is removed by the next one; converted files are
readable by everyone the umask allows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbatch.runner import default_model
from kvbatch.runner.default_model import DefaultModelError, default_model_path


def test_a_cache_folder_that_cannot_be_made_names_kvbatch_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("KVBATCH_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(
        DefaultModelError, match="cannot convert the default model into .*; set KVBATCH_CACHE to a writable folder"
    ):
        default_model_path()


def test_staging_folders_of_dead_conversions_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale, live = target.with_name(f"{target.name}.tmp-{dead}"), target.with_name(f"{target.name}.tmp-{os.getpid()}")
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half written")
    default_model._remove_stale_staging(target)
    assert not stale.exists() and live.exists()


def test_converted_files_follow_the_umask(tmp_path: Path) -> None:
    private = tmp_path / "model.safetensors"
    private.write_bytes(b"weights")
    private.chmod(0o600)  # what transformers' temporary-file-then-rename leaves
    umask = os.umask(0o022)
    try:
        default_model._readable_by_all(tmp_path)
    finally:
        os.umask(umask)
    assert private.stat().st_mode & 0o777 == 0o644


def test_no_home_folder_names_kvbatch_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HOME unset and a uid the password database does not know (cron or a container's bare user), the cache
    folder under ~/.cache could not be found: Path.home()'s RuntimeError failed the job as a bug, with a traceback."""
    import pwd

    for name in ("KVBATCH_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)

    def unknown_user(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown_user)
    with pytest.raises(
        DefaultModelError,
        match=r"^no home folder to keep the converted default model in \(HOME is unset\); set KVBATCH_CACHE to a "
        "writable folder",
    ):
        default_model_path()


class _Routed(Exception):
    """Raised where a GGUF load routes transformers' GGUF bar, to stop it before it reads the file."""


def test_reading_a_gguf_file_draws_no_bar_while_transformers_bars_are_off(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """transformers' GGUF reader drew its "Converting and de-quantizing GGUF tensors" bar with tqdm itself, past the
    switch that kvbatch turns transformers' loading bars off with outside -v: the default model's first conversion
    and every run of a .gguf model wrote it into logs and under --quiet. The reader's bar follows that switch now,
    both ways, and both loads route it before reading the file."""
    from transformers import modeling_gguf_pytorch_utils
    from transformers.utils import logging as hf_logging

    from kvbatch.runner import model_loader

    bar = "Converting and de-quantizing GGUF tensors"
    monkeypatch.setattr(modeling_gguf_pytorch_utils, "tqdm", modeling_gguf_pytorch_utils.tqdm)  # restored after
    default_model.gguf_bars_follow_transformers()
    was_on = hf_logging.is_progress_bar_enabled()
    try:
        for enabled in (False, True):  # outside -v, then -v
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            capfd.readouterr()
            assert list(modeling_gguf_pytorch_utils.tqdm(range(3), desc=bar)) == [0, 1, 2]
            assert (bar in capfd.readouterr().err) is enabled
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()

    def routed() -> None:
        raise _Routed

    monkeypatch.setattr(model_loader, "gguf_bars_follow_transformers", routed)
    monkeypatch.setattr(default_model, "gguf_bars_follow_transformers", routed)
    for load in (
        lambda: model_loader.load_model(str(default_model.gguf_path()), device="cpu"),
        lambda: default_model._convert(default_model.gguf_path(), Path("unused")),
    ):
        with pytest.raises(_Routed):
            load()
