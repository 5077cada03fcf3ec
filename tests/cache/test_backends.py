"""Choosing the attention backend: automatic order, forced choices, and flash-attn's page-size rule."""

import importlib.util

import pytest
import torch

from kvbatch.cache import backends
from kvbatch.cache.backends import select_backend


def test_cpu_gets_its_own_backend_and_the_reference_by_name():
    assert select_backend("auto", "cpu").name == "cpu"
    assert select_backend("torch", "cpu").name == "torch"


def test_the_cpu_backend_on_a_gpu_says_why():
    with pytest.raises(ValueError, match="the cpu backend runs on the CPU, the model runs on cuda"):
        select_backend("cpu", torch.device("cuda"))


def test_forcing_a_gpu_backend_on_the_cpu_says_why():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("triton", "cpu")


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("xformers", "cpu")


@pytest.fixture
def gpu_packages_present(monkeypatch):
    """Pretend flash-attn and triton are importable (the checks run before anything is imported from them)."""
    real = importlib.util.find_spec
    fake = lambda name, *args: object() if name in ("flash_attn", "triton") else real(name, *args)  # noqa: E731
    monkeypatch.setattr(backends.importlib.util, "find_spec", fake)


def test_auto_passes_over_flash_attn_when_pages_are_too_small(gpu_packages_present):
    # flash-attn reads pages of multiples of 256 tokens only; with 16-token pages every step would fail.
    assert select_backend("auto", torch.device("cuda"), block_size=16).name == "triton"


def test_forcing_flash_attn_with_small_pages_names_the_rule(gpu_packages_present):
    with pytest.raises(ValueError, match="multiple of 256, the engine's is 16"):
        select_backend("flash-attn", torch.device("cuda"), block_size=16)


def test_auto_passes_over_flash_attn_for_layers_it_does_not_compute(gpu_packages_present):
    """flash-attn runs plain causal attention only: a model with soft-capping, a sliding window or sinks (Gemma 2,
    Mistral, gpt-oss) got it from `auto` with 256-token pages, and every step of every row failed on it."""
    cuda = torch.device("cuda")
    assert select_backend("auto", cuda, block_size=256, plain_layers=lambda: False).name == "triton"
    assert select_backend("auto", cuda, block_size=256, plain_layers=lambda: True).name == "flash-attn"
    with pytest.raises(ValueError, match="flash-attn backend runs plain causal attention only.*use the triton backend"):
        select_backend("flash-attn", cuda, block_size=256, plain_layers=lambda: False)


def test_the_layers_are_probed_only_where_flash_attn_could_run(gpu_packages_present):
    def probe() -> bool:
        raise AssertionError("probed the layers for a backend that cannot run here anyway")

    assert select_backend("auto", "cpu", block_size=256, plain_layers=probe).name == "cpu"
    assert select_backend("auto", torch.device("cuda"), block_size=16, plain_layers=probe).name == "triton"
