"""Tensor parallel on the CPU (gloo, 2 processes): the same greedy rows as one process, and clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scaling_helpers import rows_of, tiny_engine, tiny_job, tiny_tp_loader, tiny_tp_loader_or_missing, write_input  # noqa: E402
from tiny_models import CONFIGS  # noqa: E402

from kvbatch.jobs.runners import run_jobs
from kvbatch.jobs.spec import output_path
from kvbatch.runner.parallel import tensor_parallel
from kvbatch.runner.parallel.shard import TensorParallelError, check_divisible


def test_split_must_divide_heads_kv_heads_and_mlp():
    check_divisible(CONFIGS["llama"](), 2)  # 4 heads, 2 KV heads, 128 intermediate
    with pytest.raises(TensorParallelError, match="KV heads 2 not divisible by 4"):
        check_divisible(CONFIGS["llama"](), 4)


class RecordingFactory(tensor_parallel.TensorParallelFactory):
    def __init__(self, loader) -> None:
        super().__init__(loader)
        self.engines: list = []

    def __call__(self, model, settings):
        self.engines.append(super().__call__(model, settings))
        return self.engines[-1]


def test_tensor_parallel_two_ranks_equal_one_process(tmp_path):
    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    [single] = run_jobs([whole], engine_factory=tiny_engine)
    assert single.error is None, single.error
    job = tiny_job(tmp_path, tensor=2)
    threads = torch.get_num_threads()
    try:
        factory = RecordingFactory(tiny_tp_loader)
        [outcome] = run_jobs([job], engine_factory=factory)
        assert outcome.error is None, outcome.error
        world = tensor_parallel._WORLD
        assert world is not None and world.size == 2 and [p.is_alive() for p in world.procs] == [True]
        [engine] = factory.engines  # rank 0 holds half the heads, and pages for half the KV heads
        assert (engine.kv_spec.num_kv_heads, engine.model.config.num_attention_heads) == (1, 2)
        assert engine.model.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    finally:
        tensor_parallel.shutdown()
    assert tensor_parallel._WORLD is None and torch.get_num_threads() == threads  # the test process is as it was
    assert rows_of(output_path(job)) == rows_of(output_path(whole))
    assert outcome.summary.output_tokens == single.summary.output_tokens


def test_a_step_failing_on_rank_0_only_stops_the_run_and_a_rerun_resumes(tmp_path, monkeypatch):
    """The worker already ran the step and waits in its collectives, so rank 0 may not retry it (its all-reduces
    would pair with the worker's): the run stops with TensorParallelLost, finished rows stay, a rerun completes."""
    from kvbatch.runner.model_runner import ModelRunner

    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    run_jobs([whole], engine_factory=tiny_engine)
    real, calls = ModelRunner.forward_eager, [0]

    def fails_once(self, inputs):  # in this process (rank 0) only: the spawned worker imports the original
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("simulated CUDA out of memory on rank 0")
        return real(self, inputs)

    monkeypatch.setattr(ModelRunner, "forward_eager", fails_once)
    job = tiny_job(tmp_path, tensor=2)
    try:
        [outcome] = run_jobs([job], engine_factory=tensor_parallel.TensorParallelFactory(tiny_tp_loader))
    finally:
        tensor_parallel.shutdown()
    assert type(outcome.error).__name__ == "TensorParallelLost"
    assert "failed on rank 0 (RuntimeError: simulated CUDA out of memory on rank 0)" in str(outcome.error)
    monkeypatch.setattr(ModelRunner, "forward_eager", real)
    try:
        [again] = run_jobs([job], engine_factory=tensor_parallel.TensorParallelFactory(tiny_tp_loader))
    finally:
        tensor_parallel.shutdown()
    assert again.error is None and rows_of(output_path(job)) == rows_of(output_path(whole))


def test_a_model_that_cannot_load_fails_its_job_and_the_next_job_runs(tmp_path):
    """Every rank meets the same load error before any collective: the worker keeps serving, rank 0 reports it."""
    import dataclasses

    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    run_jobs([whole], engine_factory=tiny_engine)
    bad = dataclasses.replace(tiny_job(tmp_path, "bad", tensor=2), model="missing-model")
    good = tiny_job(tmp_path, "good", tensor=2)
    try:
        failed, ok = run_jobs(
            [bad, good], engine_factory=tensor_parallel.TensorParallelFactory(tiny_tp_loader_or_missing)
        )
    finally:
        tensor_parallel.shutdown()
    assert "cannot load model 'missing-model'" in str(failed.error)
    assert ok.error is None and rows_of(output_path(good)) == rows_of(output_path(whole))


def test_the_ranks_log_as_the_command_does(tmp_path, capfd, monkeypatch):
    """-q: the spawned rank showed its warning (and transformers' loading bars) in the run's log all the same."""
    import logging

    from transformers.utils import logging as hf_logging

    from kvbatch import cli

    for logger in (logging.root, logging.getLogger("kvbatch")):  # put back after the test
        monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logger, "handlers", [])
    bars = hf_logging.is_progress_bar_enabled()
    write_input(tmp_path / "in.jsonl")
    bad = dataclasses.replace(tiny_job(tmp_path, "bad", tensor=2), model="missing-model")
    try:
        cli._logging(verbose=False, quiet=True)
        cli._quiet_model_loading(verbose=False)
        [failed] = run_jobs([bad], engine_factory=tensor_parallel.TensorParallelFactory(tiny_tp_loader_or_missing))
    finally:
        tensor_parallel.shutdown()
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    assert "cannot load model 'missing-model'" in str(failed.error)
    assert "rank 1: cannot load" not in capfd.readouterr().err


def test_more_ranks_than_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TensorParallelError, match="--tensor-parallel 4 needs 4 GPUs; this process sees 2"):
        tensor_parallel._start_world(4, True, tiny_tp_loader)
    assert tensor_parallel._WORLD is None


def test_data_parallel_of_tensor_parallel_engines(tmp_path):
    """2 x TP2 on the CPU: two data-parallel processes, each the rank 0 of its own two-rank engine."""
    write_input(tmp_path / "in.jsonl")
    whole = tiny_job(tmp_path, "whole")
    [single] = run_jobs([whole], engine_factory=tiny_engine)
    job = tiny_job(tmp_path, data=2, tensor=2)
    [outcome] = run_jobs([job], engine_factory=tensor_parallel.TensorParallelFactory(tiny_tp_loader))
    assert outcome.error is None, outcome.error
    assert rows_of(output_path(job)) == rows_of(output_path(whole))
    assert tensor_parallel._WORLD is None  # the engines lived in the children


def test_random_shards_are_slices_of_the_whole_random_model():
    """Benchmark models are made per rank on the meta device, yet hold exactly their share of the whole model."""
    from kvbatch.bench.random_weights import RandomLoader
    from kvbatch.runner.parallel.shard import shard_model

    loader, cpu = RandomLoader(std=0.05, seed=3), torch.device("cpu")
    whole = loader("random:tiny", {"dtype": "float32"}, cpu).model
    loader.materialize(whole, cpu, 0, 1)
    layer = whole.model.layers[1]
    for rank in range(2):
        part = loader("random:tiny", {"dtype": "float32"}, cpu).model
        shard_model(part, rank, 2)
        loader.materialize(part, cpu, rank, 2)
        mine = part.model.layers[1]
        assert torch.equal(mine.self_attn.k_proj.weight, layer.self_attn.k_proj.weight.chunk(2, dim=0)[rank])
        assert torch.equal(mine.self_attn.o_proj.weight, layer.self_attn.o_proj.weight.chunk(2, dim=1)[rank])
        assert torch.equal(mine.mlp.up_proj.weight, layer.mlp.up_proj.weight.chunk(2, dim=0)[rank])
        assert torch.equal(mine.mlp.down_proj.weight, layer.mlp.down_proj.weight.chunk(2, dim=1)[rank])
        assert torch.equal(part.model.embed_tokens.weight, whole.model.embed_tokens.weight)
        assert torch.equal(part.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq)
        assert torch.equal(mine.input_layernorm.weight, torch.ones(128))
