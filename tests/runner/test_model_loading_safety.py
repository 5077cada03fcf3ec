"""Models load safely: safetensors by default; pickled weights and a model's own Python code only when the job says so,
with a warning in the log and in the output's metadata; a hub name missing from the local cache fails fast with a
clear message and never touches the network here (socket connections are made to fail).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_helpers import write_jsonl  # noqa: E402
from tiny_models import tiny_model, word_tokenizer

from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import job_from_dict
from kvbatch.runner import model_loader
from kvbatch.runner.model_loader import ModelLoadError, load_model


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every attempt to open a connection or resolve a name is recorded and fails at once."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture(scope="module")
def pickled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pickled")
    model = tiny_model("llama", 0, attn="sdpa")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def remote_code_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh folder per test: its code, once imported, stays imported, so each test needs code never seen before.
    folder = tmp_path_factory.mktemp("remote_code")
    tiny_model("llama", 0, attn="sdpa").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_marker.MarkerConfig",
        "AutoModelForCausalLM": "modeling_marker.MarkerModel",
    }
    config["model_type"] = "marker_llama"
    (folder / "config.json").write_text(json.dumps(config))
    marker = folder / "CODE_RAN"
    (folder / "configuration_marker.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\nclass MarkerConfig(LlamaConfig):\n    model_type = 'marker_llama'\n"
    )
    (folder / "modeling_marker.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_marker import MarkerConfig\n\n"
        "class MarkerModel(LlamaForCausalLM):\n    config_class = MarkerConfig\n"
    )
    return folder


def test_pickled_weights_are_refused_by_default(pickled_folder: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=r"has only pickled weights \(pytorch_model.bin\).*set engine.allow_pickle: true"
    ):
        load_model(str(pickled_folder), device="cpu")


def run_unsafe_job(model: Path, option: str, tmp_path: Path, caplog) -> list[str]:
    """Run a two-row job on `model` with the engine option `option` on; return kvbatch.unsafe from the output."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "w5 w6"}, {"prompt": "w7"}])
    spec = job_from_dict(
        {
            "name": "p",
            "model": str(model),
            "input": {"path": "in.jsonl"},
            "sampling": {"max_new_tokens": 2},
            "engine": {"device": "cpu", option: True, "num_blocks_override": 16},
        },
        base_dir=str(tmp_path),
    )
    with caplog.at_level(logging.WARNING):
        outcome = run_jobs([spec])[0]
    assert outcome.error is None, outcome.error
    metadata = read_arrow(Path(tmp_path / "out" / "p.arrow")).schema.metadata
    return json.loads(metadata[b"kvbatch.unsafe"])


def test_pickled_weights_load_when_allowed_with_a_warning_in_log_and_metadata(
    pickled_folder: Path, tmp_path: Path, caplog
) -> None:
    assert run_unsafe_job(pickled_folder, "allow_pickle", tmp_path, caplog) == ["allow_pickle"]
    assert "pickled weights are allowed" in caplog.text


def test_trusted_remote_code_is_recorded_in_log_and_metadata(remote_code_folder: Path, tmp_path: Path, caplog) -> None:
    assert run_unsafe_job(remote_code_folder, "trust_remote_code", tmp_path, caplog) == ["trust_remote_code"]
    assert "trust_remote_code is on" in caplog.text


def test_remote_code_is_refused_by_default_and_never_runs(remote_code_folder: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=r"ships its own Python code \(auto_map in config.json\).*engine.trust_remote_code: true"
    ):
        load_model(str(remote_code_folder), device="cpu")
    assert not (remote_code_folder / "CODE_RAN").exists()


def test_remote_code_runs_only_when_trusted_with_a_warning(remote_code_folder: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = load_model(str(remote_code_folder), device="cpu", trust_remote_code=True)
    assert type(loaded.model).__name__ == "MarkerModel" and (remote_code_folder / "CODE_RAN").exists()
    assert "trust_remote_code is on" in caplog.text


def test_safe_defaults_leave_no_unsafe_metadata(tmp_path: Path) -> None:
    from job_fakes import fake_factory

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    outcome = run_jobs(
        [job_from_dict({"name": "s", "input": {"path": "in.jsonl"}}, base_dir=str(tmp_path))],
        engine_factory=fake_factory(),
    )[0]
    assert outcome.error is None
    metadata = read_arrow(Path(tmp_path / "out" / "s.arrow")).schema.metadata
    assert json.loads(metadata[b"kvbatch.unsafe"]) == []


def test_hub_name_not_in_cache_fails_fast_without_network(no_network: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache, and downloads are off"):
        load_model("someorg/not-a-model", device="cpu")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 forbids downloading it"):
        load_model("someorg/not-a-model", device="cpu", allow_download=True)
    assert no_network == [], "no connection was even tried"


def test_download_allowed_but_hub_unreachable_fails_fast(no_network: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(
        ModelLoadError,
        match=r"cannot be downloaded: https://huggingface.co cannot be reached \(network disabled in tests\)",
    ):
        load_model("someorg/not-a-model", device="cpu", allow_download=True)
    assert len(no_network) == 1, "one quick probe, no retries"


def test_offline_reads_the_environment_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_loader.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not model_loader.offline()


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"model folder {tmp_path / 'nope'} does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")


LOAD_BY_NAME = """
from kvbatch.runner.model_loader import ModelLoadError, load_model
loaded = load_model("me/tiny", device="cpu")
print("LOADED", loaded.source, loaded.model.config.num_hidden_layers, loaded.tokenizer.encode("w5 w6"))
try:
    load_model("me/pickled", device="cpu")
except ModelLoadError as exc:
    print("REFUSED", exc)
"""


def test_a_hub_name_loads_from_the_local_cache_and_keeps_the_safety_rules(tmp_path: Path) -> None:
    # The layout an earlier download leaves: <hub cache>/models--ORG--NAME/{refs/main, snapshots/<commit>/}. A
    # subprocess, because huggingface_hub reads HF_HUB_CACHE when it is imported.
    commit = "0" * 40
    for name in ("tiny", "pickled"):
        repo = tmp_path / "hub" / f"models--me--{name}"
        snapshot = repo / "snapshots" / commit
        model = tiny_model("llama")
        if name == "pickled":  # transformers 5 writes safetensors only
            snapshot.mkdir(parents=True)
            model.config.save_pretrained(snapshot)
            torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
        else:
            model.save_pretrained(snapshot)
        word_tokenizer().save_pretrained(snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_BY_NAME], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED me/tiny 2 [5, 6]" in proc.stdout
    assert "models--me--pickled/snapshots/" in proc.stdout  # named as the folder it is, not "not in the cache"
    assert "has only pickled weights (pytorch_model.bin)" in proc.stdout and "engine.allow_pickle: true" in proc.stdout


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    tiny_model("llama", 0, attn="sdpa").save_pretrained(tmp_path / "tiny")
    word_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_a_checkpoint_missing_a_weight_is_refused(tiny_folder: Path) -> None:
    """transformers would fill it at random, and every run (every resume) would generate from other weights."""
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tiny_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError,
        match="lacks weights its config needs, or has them in another shape \\(model.layers.1.mlp.down_proj.weight\\)",
    ):
        load_model(str(tiny_folder), "cpu")


def test_a_truncated_weights_file_is_named(tiny_folder: Path) -> None:
    data = (tiny_folder / "model.safetensors").read_bytes()
    (tiny_folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="its weights are damaged or do not fit its config"):
        load_model(str(tiny_folder), "cpu")


def test_an_architecture_that_computes_its_own_attention_is_refused(tmp_path: Path) -> None:
    """BLOOM ignores the attention interface: it would run, ignoring the paged cache, and write wrong text."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=word_tokenizer().vocab_size, hidden_size=32, n_layer=2, n_head=2)
    BloomForCausalLM(config).save_pretrained(tmp_path / "bloom")
    word_tokenizer().save_pretrained(tmp_path / "bloom")
    with pytest.raises(
        ModelLoadError, match="cannot run on kvbatch's paged attention: bloom does not send its attention"
    ):
        load_model(str(tmp_path / "bloom"), "cpu")


def test_a_kv_pool_over_the_machines_memory_is_refused_before_allocating(tiny_folder: Path) -> None:
    from kvbatch.errors import KVBudgetError
    from kvbatch.runner.engine import Engine, EngineConfig

    with pytest.raises(KVBudgetError, match="engine.kv_cache_gib 100000 is more than this machine's .* GiB of memory"):
        Engine(EngineConfig(model=str(tiny_folder), device="cpu", kv_cache_gib=100_000))


def test_a_preloaded_model_keeps_a_smaller_max_model_len(tiny_folder: Path) -> None:
    from kvbatch.runner.engine import Engine, EngineConfig

    loaded = load_model(str(tiny_folder), "cpu")
    assert Engine.from_loaded(loaded, EngineConfig(max_model_len=40, num_blocks_override=64)).max_model_len == 40


def test_a_context_over_the_models_is_a_configuration_error_exit_2() -> None:
    from types import SimpleNamespace

    from kvbatch.errors import exit_code_of
    from kvbatch.runner.model_loader import ContextLengthError, context_length

    with pytest.raises(
        ContextLengthError, match="max_model_len 4096 exceeds the model's context of 2048 tokens"
    ) as raised:
        context_length(SimpleNamespace(max_position_embeddings=2048), 4096)
    assert exit_code_of(raised.value) == 2


@pytest.mark.parametrize("shard", ["pytorch_model-00001-of-00001.bin", "model-00001-of-00001.weights"])
def test_a_safetensors_index_naming_pickled_shards_is_refused(tmp_path: Path, shard: str, monkeypatch) -> None:
    """transformers unpickles each shard an index names that is not .safetensors: a decoy .safetensors file beside
    it, or a shard named with no pickle suffix, must not let one through."""
    from safetensors.torch import save_file

    model = tiny_model("llama", 0, attn="sdpa")
    model.config.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / shard)
    index = {"metadata": {}, "weight_map": {name: shard for name in model.state_dict()}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"decoy": torch.zeros(1)}, tmp_path / "decoy.safetensors")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a pickle was loaded"))
    with pytest.raises(ModelLoadError, match=rf"safetensors index naming .*\({shard}\).*engine.allow_pickle: true"):
        load_model(str(tmp_path), device="cpu")


def test_a_download_is_checked_before_weights_come(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With allow_download, the hub's JSON (its safetensors index) is fetched and checked first: transformers would
    otherwise download and unpickle the shards an index names."""
    from huggingface_hub import constants

    fetched: list = []

    def snapshot_download(name: str, local_files_only: bool = False, allow_patterns=None, **kwargs):
        if local_files_only or constants.HF_HUB_OFFLINE:
            raise OSError("not in the cache")
        fetched.append(allow_patterns)
        (tmp_path / "config.json").write_text("{}")
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001.bin"}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        return str(tmp_path)

    def from_pretrained(*args, **kwargs):
        if not kwargs.get("local_files_only", True):
            pytest.fail("weights were downloaded before the index was checked")
        raise OSError("not in the cache")

    import huggingface_hub
    import transformers

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(model_loader, "download_allowed", lambda name, allow: None)
    with pytest.raises(ModelLoadError, match=r"safetensors index naming .*pytorch_model-00001-of-00001.bin"):
        load_model("someorg/pickled-shards", device="cpu", allow_download=True)
    assert fetched == [["*.json"]]


@pytest.mark.skipif(
    model_loader.has_sentencepiece(),
    reason="with sentencepiece installed transformers reads tokenizer.model itself: the case is a machine without it",
)
def test_a_sentencepiece_only_tokenizer_without_the_package_names_it(tmp_path: Path) -> None:
    """A folder whose tokenizer is only a SentencePiece tokenizer.model (Llama 2 era), loaded where the sentencepiece
    package is not installed: transformers falls back to reading it as a tiktoken file, and the only advice in the
    error was to install tiktoken, which cannot read it either. The error now names sentencepiece."""
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x07\n\x05<unk>")  # a ModelProto's first piece
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"only tokenizer.model, which is read with the sentencepiece package, "):
        load_model(str(tmp_path), device="cpu")
