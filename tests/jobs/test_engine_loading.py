"""Loading an engine for a job: no automatic cyclic collection while torch, transformers and the model load, and
the collector as it was afterwards; on a GPU, one engine's memory given back before the next sizes its pool."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from tiny_models import hf_reference, word_tokenizer

from kvbatch.jobs import run
from kvbatch.jobs.spec import job_from_dict
from kvbatch.runner import engine as engine_module


class Probe:
    """Stands in for the Engine: notes whether the collector ran automatically while it was built."""

    def __init__(self, config: object, adapters: object = None) -> None:
        self.collector_on = gc.isenabled()


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_collector_pauses_while_the_engine_loads(monkeypatch: pytest.MonkeyPatch, enabled_before: bool) -> None:
    monkeypatch.setattr(engine_module, "Engine", Probe)
    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        built = run.default_engine_factory("some/model", {})
        assert isinstance(built, Probe) and built.collector_on is False
        assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()


def test_the_collector_comes_back_when_loading_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(config: object, adapters: object = None) -> None:
        raise OSError("no such model")

    monkeypatch.setattr(engine_module, "Engine", broken)
    assert gc.isenabled()
    with pytest.raises(OSError, match="no such model"):
        run.default_engine_factory("missing", {})
    assert gc.isenabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="only a GPU engine sizes its pool from the card's memory")
def test_engines_one_after_another_on_a_gpu_each_get_the_cards_memory(tmp_path: Path) -> None:
    """A GPU engine's KV pool takes gpu_memory_utilization of the card less what the process holds: built beside an
    earlier engine, a second found no memory for its pages. Jobs asking for two engines in turn (here, two
    max_num_seqs) get pools of one size, and releasing the last gives its memory back to the device, for a
    data-parallel job's processes to find free."""
    folder = tmp_path / "model"
    hf_reference("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    jobs = [
        job_from_dict(
            {"name": f"j{seqs}", "input": {"path": "in.jsonl"}, "model": str(folder), "engine": {"max_num_seqs": seqs}},
            base_dir=str(tmp_path),
        )
        for seqs in (32, 64)
    ]
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    engines = run.EngineCache()
    first, _ = engines.get(jobs[0])
    first_blocks = first.pool.num_blocks
    assert free_before - torch.cuda.mem_get_info()[0] > total // 2  # the pool took most of the card
    second, created = engines.get(jobs[1])
    assert created and second is not first
    assert second.pool.num_blocks >= first_blocks * 0.99  # its step's activations may take a few pages more
    del first, second
    engines.release()
    assert torch.cuda.mem_get_info()[0] >= free_before - 256 * 2**20  # the CUDA libraries' workspaces at most
