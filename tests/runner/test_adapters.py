"""LoRA adapters per row: greedy tokens of a batch mixing four adapters and the base model equal PEFT's generate
with each row's adapter (float32, CPU), with the prefix cache on, under preemption and with fewer slots than
adapters; bad adapters fail their rows only."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import torch
from lora_fixtures import ADAPTER_CONFIGS, PeftOracle, peft_greedy, save_adapters
from safetensors.torch import load_file, save_file
from tiny_models import EOS_ID, VOCAB_SIZE, hf_reference, tiny_loaded, tiny_model

from kvbatch.errors import ErrorKind
from kvbatch.runner import fused_forward, fused_kernels
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.request import GenerationRequest, SamplingParams

MAX_NEW = 12
ADAPTERS = [None, *ADAPTER_CONFIGS]  # row i runs ADAPTERS[i % 5]


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory) -> dict[str, str]:
    return save_adapters(lambda: hf_reference("llama"), tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def rows() -> list[tuple[list[int], str | None]]:
    # A shared 12-token head (three blocks of 4) on every prompt: the prefix cache holds it once per adapter, and
    # an adapter handed another's K/V would diverge from PEFT.
    rng = random.Random(5)
    head = [rng.randrange(2, VOCAB_SIZE) for _ in range(12)]
    prompts = [head + [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(1, 20))] for _ in range(15)]
    return [(p, ADAPTERS[i % len(ADAPTERS)]) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def reference(adapter_paths, rows) -> list[list[int]]:
    return peft_greedy(hf_reference("llama"), adapter_paths, rows, MAX_NEW, EOS_ID, 0)


def on_the_gpu(loaded):
    return dataclasses.replace(loaded, model=loaded.model.to("cuda"), device=torch.device("cuda"))


def run(paths, rows, loaded=None, **settings) -> tuple[Engine, dict]:
    config = {"block_size": 4, "num_blocks_override": 256, "max_num_batched_tokens": 64, **settings}
    engine = Engine(EngineConfig(**config), loaded or tiny_loaded("llama"), adapters=paths)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    requests = [GenerationRequest(i, prompt, params, adapter=name) for i, (prompt, name) in enumerate(rows)]
    return engine, {r.request_id: r for r in engine.generate(requests)}


@pytest.mark.parametrize(
    "settings",
    [
        # The fused decoder (the default; on the CPU in torch ops): packed q/k/v and gate/up updates.
        {},  # every adapter in a slot, the prefix cache on
        {"num_blocks_override": 24, "max_num_seqs": 8},  # the pool holds a few rows: preemptions
        {"max_loras": 2, "max_cpu_loras": 2},  # four adapters through two slots: slots and host copies evicted
        {"fused_layers": False},  # transformers' layers: every adapted linear's own hook
        # Triton's fused kernels and LoRA kernels (on the CPU in Triton's interpreter).
        {"fused_layers": True, "max_loras": 3},
    ],
    ids=["plenty", "preempted", "two-slots", "layers", "fused-triton"],
)
def test_mixed_adapters_equal_peft_generate(adapter_paths, rows, reference, settings, monkeypatch) -> None:
    loaded = None
    if settings.get("fused_layers"):  # compiled on a GPU where there is one, else interpreted
        loaded = on_the_gpu(tiny_loaded("llama")) if torch.cuda.is_available() else None
        monkeypatch.setattr(fused_forward, "kernels_for", lambda device: fused_kernels)
    engine, results = run(adapter_paths, rows, loaded, **settings)
    assert (engine.fused is not None) == (settings.get("fused_layers") is not False)
    assert engine.adapters.use_triton == bool(settings.get("fused_layers"))
    if engine.fused is not None:
        assert len(engine.adapters.groups) == 4 * len(engine.fused.layers)  # qkv, o, gate_up, down per layer
    for i, (_, name) in enumerate(rows):
        assert results[i].error is None, results[i].error
        assert results[i].completions[0].token_ids == reference[i], f"row {i} ({name}) diverged from PEFT"
    assert engine.stats.num_cached_prompt_tokens > 0  # the shared head was reused (within each adapter)
    if "num_blocks_override" in settings:
        assert engine.stats.num_preemptions > 0
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("fused", [False, True, "triton"], ids=["layers", "fused", "fused-triton"])
def test_scoring_rows_with_adapters_equal_peft_logprobs(adapter_paths, rows, fused, monkeypatch) -> None:
    """Continuations scored under each row's adapter (prompt logprobs too): PEFT's float32 log_softmax over
    prompt + continuation, within 1e-4. The rows share a head, which the prefix cache must keep per adapter.
    Under the fused decoder too (in torch ops on the CPU; Triton's kernels, in its interpreter on the CPU),
    whose scoring steps keep every row."""
    rng = random.Random(8)
    if fused == "triton":
        monkeypatch.setattr(fused_forward, "kernels_for", lambda device: fused_kernels)
    fused = bool(fused)
    config = EngineConfig(block_size=4, num_blocks_override=256, max_num_batched_tokens=64, fused_layers=fused)
    loaded = on_the_gpu(tiny_loaded("llama")) if fused and torch.cuda.is_available() else tiny_loaded("llama")
    engine = Engine(config, loaded, adapters=adapter_paths)
    assert (engine.fused is not None) == fused
    requests = [
        GenerationRequest(
            i,
            prompt,
            SamplingParams(prompt_logprobs=i % 2 == 0),
            adapter=name,
            continuations=[[rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(1, 5))] for _ in range(3)],
        )
        for i, (prompt, name) in enumerate(rows)
    ]
    results = {r.request_id: r for r in engine.generate(requests)}
    oracle = PeftOracle(hf_reference("llama"), adapter_paths)
    for request in requests:
        result, prompt = results[request.request_id], request.prompt_token_ids
        assert result.error is None, result.error
        for continuation, score in zip(request.continuations, result.scores):
            rows_lp = oracle.logprobs(prompt + continuation, request.adapter)[len(prompt) - 1 : -1]
            want = rows_lp.gather(1, torch.tensor(continuation)[:, None])[:, 0]
            assert score.token_logprobs == pytest.approx(want.tolist(), abs=1e-4), request.adapter
        if request.sampling.prompt_logprobs:
            rows_lp = oracle.logprobs(prompt, request.adapter)[:-1]
            want = rows_lp.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
            assert result.prompt_logprobs == pytest.approx([None, *want.tolist()], abs=1e-4)
    assert engine.stats.num_cached_prompt_tokens > 0


def test_adapters_change_the_output(rows, reference) -> None:
    # The oracle comparison means something only if the adapters move the tokens away from the base model's.
    base_rows = [(prompt, None) for prompt, _ in rows]
    base = peft_greedy(hf_reference("llama"), {}, base_rows, MAX_NEW, EOS_ID, 0)
    changed = {name for i, (_, name) in enumerate(rows) if name and reference[i] != base[i]}
    assert changed == set(ADAPTER_CONFIGS)


def test_bad_adapters_fail_their_rows_only(adapter_paths, rows, reference, tmp_path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_paths["r2-qv"], pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    other_base = save_adapters(lambda: tiny_model("qwen3"), tmp_path / "qwen3", {"r2-qv": ADAPTER_CONFIGS["r2-qv"]})
    dora = tmp_path / "dora"
    shutil.copytree(adapter_paths["r2-qv"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    bad = {
        "missing": str(tmp_path / "nowhere"),
        "pickled": str(pickled),
        "other-base": other_base["r2-qv"],
        "dora": str(dora),
    }
    engine = Engine(
        EngineConfig(block_size=4, num_blocks_override=256), tiny_loaded("llama"), adapters={**adapter_paths, **bad}
    )
    params = SamplingParams(max_new_tokens=MAX_NEW)
    requests = [GenerationRequest(i, prompt, params, adapter=name) for i, (prompt, name) in enumerate(rows)]
    requests += [GenerationRequest(name, rows[0][0], params, adapter=name) for name in [*bad, "unregistered"]]
    results = {r.request_id: r for r in engine.generate(requests)}
    for i in range(len(rows)):
        assert results[i].completions[0].token_ids == reference[i]
    words = {
        "missing": "neither a folder",
        "pickled": "only pickled weights",
        "other-base": "does not fit this model",
        "dora": "DoRA",
        "unregistered": "not registered",
    }
    for name, phrase in words.items():
        result = results[name]
        assert (result.finish_reason, result.error_kind) == ("error", ErrorKind.BAD_ADAPTER)
        assert repr(name) in result.error and phrase in result.error, result.error


def _edited(source: str, folder, **config_fields) -> str:
    """A copy of adapter `source` with fields of its adapter_config.json replaced."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **config_fields}))
    return str(folder)


def test_bad_config_values_damaged_weights_and_replayed_inits_fail_their_rows_only(
    adapter_paths, rows, reference, tmp_path
) -> None:
    # Each is valid JSON or a file in the right place, so it gets past the first checks; each must end as its own
    # rows' bad_adapter, never as an exception out of the engine (which a job would take for a failed model).
    source = adapter_paths["r8-rslora"]
    damaged = _edited(source, tmp_path / "damaged")
    (tmp_path / "damaged" / "adapter_model.safetensors").unlink()
    (tmp_path / "damaged" / "adapter_model.bin").write_bytes(b"not a pickle")
    listed = _edited(source, tmp_path / "listed")
    (tmp_path / "listed" / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(2)], tmp_path / "listed" / "adapter_model.bin")
    zero = _edited(source, tmp_path / "zero")
    tensors = load_file(f"{zero}/adapter_model.safetensors")
    save_file(
        {k: v[:0] if ".lora_A." in k else v[:, :0] for k, v in tensors.items()}, f"{zero}/adapter_model.safetensors"
    )
    # Without r PEFT takes its default, 8, and refuses rank-2 weights (a size mismatch as it loads them).
    no_rank = _edited(adapter_paths["r2-qv"], tmp_path / "m")
    config = json.loads(open(f"{no_rank}/adapter_config.json").read())
    del config["r"]
    open(f"{no_rank}/adapter_config.json", "w").write(json.dumps(config))
    bad = {  # name: (folder, words of its error)
        "alpha-text": (_edited(source, tmp_path / "a", lora_alpha="16"), "lora_alpha is '16', not a number"),
        "alpha-huge": (_edited(source, tmp_path / "i", lora_alpha=10**400), "not a number"),
        # PEFT refuses a config whose rank is not its weights' (a size mismatch as it loads them)
        "rank-other": (_edited(source, tmp_path / "j", r=4), "gives model.layers.0.mlp.down_proj rank 4, its weights"),
        "rank-pattern": (_edited(source, tmp_path / "k", rank_pattern={"v_proj": 3}), "v_proj rank 3, its weights"),
        "rank-text": (_edited(source, tmp_path / "l", r="8"), "r is '8', not a whole number"),
        "rank-null": (_edited(source, tmp_path / "n", r=None), "r is None, not a whole number"),
        "rank-left-out": (no_rank, "gives model.layers.0.self_attn.q_proj rank 8, its weights have rank 2"),
        "rank-zero": (zero, "LoRA weights have rank 0"),
        "no-such-home": ("~no_such_user_of_kvbatch/adapter", "names a home folder this machine does not have"),
        "alpha-null": (_edited(source, tmp_path / "b", lora_alpha=None), "lora_alpha is None"),
        "pattern-list": (_edited(source, tmp_path / "c", alpha_pattern=["q_proj"]), "alpha_pattern is ['q_proj']"),
        "pattern-regex": (_edited(source, tmp_path / "d", alpha_pattern={"q_proj(": 2}), "a regular expression"),
        "rslora-text": (_edited(source, tmp_path / "e", use_rslora="false"), "use_rslora is 'false'"),
        "damaged-bin": (damaged, "cannot read"),
        "listed-bin": (listed, "mapping of names to tensors"),
        # PEFT subtracts the initial update from the base weights when it loads these: not W + BA.
        "pissa": (_edited(source, tmp_path / "f", init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa"),
        "olora": (_edited(source, tmp_path / "g", init_lora_weights="olora"), "replays on the base weights"),
        "velora": (_edited(source, tmp_path / "h", velora_config={"rank": 2}), "VeLoRA"),
    }
    engine = Engine(
        EngineConfig(block_size=4, num_blocks_override=256, allow_pickle=True),
        tiny_loaded("llama"),
        adapters={**adapter_paths, **{name: path for name, (path, _) in bad.items()}},
    )
    params = SamplingParams(max_new_tokens=MAX_NEW)
    requests = [GenerationRequest(i, prompt, params, adapter=name) for i, (prompt, name) in enumerate(rows)]
    requests += [GenerationRequest(name, rows[0][0], params, adapter=name) for name in bad]
    results = {r.request_id: r for r in engine.generate(requests)}
    for i in range(len(rows)):
        assert results[i].completions[0].token_ids == reference[i]
    for name, (_, words) in bad.items():
        result = results[name]
        assert (result.finish_reason, result.error_kind) == ("error", ErrorKind.BAD_ADAPTER)
        assert repr(name) in result.error and words in result.error, result.error


def test_weights_replaced_after_the_check_fail_their_rows(adapter_paths, rows, reference, tmp_path) -> None:
    # The slots were sized from the file's header when the engine was built; weights of another rank read later
    # would run under the old scaling, or past the slot: the rows are the adapter's error instead.
    folder = shutil.copytree(adapter_paths["r2-qv"], tmp_path / "live")
    engine = Engine(EngineConfig(block_size=4, num_blocks_override=256), tiny_loaded("llama"), adapters={"x": folder})
    shutil.copy(f"{adapter_paths['r8-rslora']}/adapter_model.safetensors", folder / "adapter_model.safetensors")
    params = SamplingParams(max_new_tokens=MAX_NEW)
    results = list(engine.generate([GenerationRequest(0, rows[0][0], params, adapter="x")]))
    assert results[0].error_kind == ErrorKind.BAD_ADAPTER and "changed since it was checked" in results[0].error


@pytest.mark.parametrize("replacement", ["r8-rslora", "r4-mlp", "same shapes"])  # another rank; other modules
def test_weights_replaced_before_a_reread_fail_their_rows_only(
    adapter_paths, rows, reference, tmp_path, replacement
) -> None:
    # With one slot and one host copy an adapter is read again each time it comes back. Replaced by weights of
    # another rank or of other modules, its rows fail there, as bad_adapter (they were engine errors, a KeyError
    # for the modules); the slot it was to take went with them, and every later step with an adapter failed (no
    # slot left to evict): the other adapter's rows were errors too. Weights of the same shapes ran, with K/V
    # cached from the old ones still served under the adapter's prefix-cache key.
    if replacement == "same shapes":
        other = save_adapters(lambda: tiny_model("llama"), tmp_path / "other", {"r2-qv": ADAPTER_CONFIGS["r2-qv"]}, 7)
        adapter_paths = {**adapter_paths, replacement: other["r2-qv"]}
    folder = shutil.copytree(adapter_paths["r2-qv"], tmp_path / "live")
    paths = {"live": str(folder), "r16-all": adapter_paths["r16-all"], "r4-mlp": adapter_paths["r4-mlp"]}
    config = EngineConfig(block_size=4, num_blocks_override=256, max_loras=1, max_cpu_loras=1)
    engine = Engine(config, tiny_loaded("llama"), adapters=paths)
    i, j, k = ADAPTERS.index("r2-qv"), ADAPTERS.index("r16-all"), ADAPTERS.index("r4-mlp")
    params = SamplingParams(max_new_tokens=MAX_NEW)
    for name, m in (("live", i), ("r16-all", j), ("r4-mlp", k)):  # live's slot and then its host copy go
        (result,) = engine.generate([GenerationRequest(0, rows[m][0], params, adapter=name)])
        assert result.completions[0].token_ids == reference[m]
    shutil.copy(f"{adapter_paths[replacement]}/adapter_model.safetensors", folder / "adapter_model.safetensors")
    (failed,) = engine.generate([GenerationRequest(0, rows[i][0], params, adapter="live")])
    assert (failed.finish_reason, failed.error_kind) == ("error", ErrorKind.BAD_ADAPTER), failed.error
    assert failed.error.startswith("adapter 'live': ") and "changed since it was checked" in failed.error
    (other,) = engine.generate([GenerationRequest(0, rows[j][0], params, adapter="r16-all")])
    assert other.error is None, other.error
    assert other.completions[0].token_ids == reference[j]


def test_host_copies_reserve_room_for_any_adapter_the_slots_take(tmp_path) -> None:
    # A CPU engine takes max_cpu_loras host copies out of its KV budget. Sized by the largest adapter registered
    # as it was built (q alone, v alone), the budget left out one registered later that fits every slot's rank (q
    # and v), whose copies then took twice the room set aside.
    one = dict(r=16, lora_alpha=8)
    paths = save_adapters(
        lambda: tiny_model("llama"),
        tmp_path,
        {"q": {**one, "target_modules": ["q_proj"]}, "v": {**one, "target_modules": ["v_proj"]}},
    )
    paths |= save_adapters(
        lambda: tiny_model("llama"), tmp_path, {"qv": {**one, "target_modules": ["q_proj", "v_proj"]}}
    )
    config = EngineConfig(block_size=4, num_blocks_override=256, max_loras=2, max_cpu_loras=2)
    engine = Engine(config, tiny_loaded("llama"), adapters={"q": paths["q"], "v": paths["v"]})
    engine.add_adapter("qv", paths["qv"])
    (result,) = engine.generate([GenerationRequest(0, [1, 2, 3], SamplingParams(max_new_tokens=2), adapter="qv")])
    assert result.error is None, result.error
    adapters = engine.adapters
    assert adapters.host_bytes == 2 * adapters.specs["qv"].num_bytes(adapters.dtype) > 0


def test_one_weights_file_under_two_configs_is_two_adapters(adapter_paths, rows, tmp_path) -> None:
    # A hub snapshot links each file to a blob: two revisions may share the weights and differ in lora_alpha. The
    # slot holds B scaled by its config, so one slot for both would run one row with the other's scaling.
    source = _edited(adapter_paths["r4-mlp"], tmp_path / "plain")
    louder = tmp_path / "louder"
    louder.mkdir()
    (louder / "adapter_model.safetensors").symlink_to(f"{source}/adapter_model.safetensors")
    config = json.loads(open(f"{source}/adapter_config.json").read())
    (louder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 64}))
    paths = {"plain": source, "louder": str(louder)}
    both = [(rows[0][0], "plain"), (rows[0][0], "louder")]
    want = peft_greedy(hf_reference("llama"), paths, both, MAX_NEW, EOS_ID, 0)
    assert want[0] != want[1]
    for settings in ({}, {"max_loras": 1}):
        engine, results = run(paths, both, **settings)
        assert [results[i].completions[0].token_ids for i in range(2)] == want
    # An adapter registered again after its config changed in place runs the new config.
    (tmp_path / "plain" / "adapter_config.json").write_text((louder / "adapter_config.json").read_text())
    engine.add_adapter("plain", source)
    (again,) = engine.generate([GenerationRequest(0, rows[0][0], SamplingParams(max_new_tokens=MAX_NEW), "plain")])
    assert again.completions[0].token_ids == want[1]


def test_pickled_adapter_runs_with_allow_pickle(adapter_paths, rows, reference, tmp_path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_paths["r8-rslora"], pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    engine = Engine(
        EngineConfig(block_size=4, num_blocks_override=256, allow_pickle=True),
        tiny_loaded("llama"),
        adapters={"r8-rslora": str(pickled)},
    )
    i = ADAPTERS.index("r8-rslora")
    (result,) = engine.generate([GenerationRequest(0, rows[i][0], SamplingParams(max_new_tokens=MAX_NEW), "r8-rslora")])
    assert result.completions[0].token_ids == reference[i]


def test_same_name_another_folder_is_another_cache_key(adapter_paths, rows, reference) -> None:
    # An engine serving job after job: a name given a new folder must not find the old weights' K/V cached.
    engine = Engine(EngineConfig(block_size=4, num_blocks_override=256), tiny_loaded("llama"), adapters=adapter_paths)
    i, j = ADAPTERS.index("r16-all"), ADAPTERS.index("r8-rslora")
    params = SamplingParams(max_new_tokens=MAX_NEW)
    (first,) = engine.generate([GenerationRequest(0, rows[j][0], params, adapter="x")])
    assert first.error_kind == ErrorKind.BAD_ADAPTER  # not registered yet
    engine.add_adapter("x", adapter_paths["r16-all"])
    (first,) = engine.generate([GenerationRequest(0, rows[i][0], params, adapter="x")])
    engine.add_adapter("x", adapter_paths["r8-rslora"])
    (second,) = engine.generate([GenerationRequest(0, rows[i][0], params, adapter="x")])
    assert first.completions[0].token_ids == reference[i]
    rslora_on_i = peft_greedy(hf_reference("llama"), adapter_paths, [(rows[i][0], "r8-rslora")], MAX_NEW, EOS_ID, 0)
    assert second.completions[0].token_ids == rslora_on_i[0]


def test_the_bench_lora_workload_spreads_rows_over_its_random_adapters(tmp_path) -> None:
    from kvbatch.bench.lora import random_adapters
    from kvbatch.bench.workloads import LORA_COUNT, make_workload

    work = make_workload("lora", VOCAB_SIZE, num_prompts=16)
    assert [r.adapter for r in work.requests[: LORA_COUNT + 1]] == [f"lora{i}" for i in range(LORA_COUNT)] + ["lora0"]
    loaded = tiny_loaded("llama")
    paths = random_adapters(loaded.model, tmp_path, 2, rank=4)
    engine = Engine(EngineConfig(block_size=4, num_blocks_override=256), loaded, adapters=paths)
    requests = [r for r in work.requests if r.adapter in paths][:4]
    results = list(engine.generate(dataclasses.replace(r, sampling=SamplingParams(max_new_tokens=2)) for r in requests))
    assert len(results) == 4 and all(r.error is None for r in results)
    assert len(engine.adapters.modules) == 14  # seven projections in each of two layers


def test_two_names_of_one_folder_share_a_slot(adapter_paths, rows, reference) -> None:
    i = ADAPTERS.index("r8-rslora")
    paths = {"one": adapter_paths["r8-rslora"], "same": adapter_paths["r8-rslora"]}
    engine = Engine(EngineConfig(block_size=4, num_blocks_override=256, max_loras=1), tiny_loaded("llama"), paths)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    results = list(engine.generate(GenerationRequest(name, rows[i][0], params, adapter=name) for name in paths))
    assert [r.completions[0].token_ids for r in results] == [reference[i]] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the compiled LoRA kernels need a GPU")
def test_adapter_decodes_replay_cuda_graphs_and_equal_peft(adapter_paths, rows, reference, monkeypatch) -> None:
    """On a GPU, decode steps with adapter rows replay a CUDA graph that runs the Triton LoRA kernels, with the
    step's tiles in the graph's buffer; their greedy tokens still equal PEFT's."""
    from kvbatch.runner.cuda_graphs import DecodeGraphs

    replayed: list[bool] = []  # per replayed step: whether it ran adapter rows
    forward = DecodeGraphs.forward

    def recording(self, inputs):
        replayed.append(inputs.lora is not None)
        return forward(self, inputs)

    monkeypatch.setattr(DecodeGraphs, "forward", recording)
    engine, results = run(adapter_paths, rows, on_the_gpu(tiny_loaded("llama")))
    assert engine.uses_cuda_graphs
    for i, (_, name) in enumerate(rows):
        assert results[i].error is None, results[i].error
        assert results[i].completions[0].token_ids == reference[i], f"row {i} ({name}) diverged from PEFT"
    assert any(replayed) and sum(replayed) >= MAX_NEW // 2, replayed


def test_weights_the_config_does_not_target_fail_their_rows(adapter_paths, rows, reference, tmp_path) -> None:
    """PEFT gives LoRA layers only to the modules its config targets (target_modules, layers_to_transform,
    exclude_modules) and drops the file's other weights as it loads it. Applied anyway, every row of such an
    adapter gave other tokens than PEFT's from its first one: the rows are the adapter's error instead. Configs
    that target every module of the weights (a regular expression, 'all-linear', every layer) still run. A config
    without target_modules ran every weight, where PEFT adapted only q_proj and v_proj."""
    source = adapter_paths["r8-rslora"]  # every projection of both layers
    bad = {  # name: (folder, words of its error)
        "fewer-targets": (
            _edited(source, tmp_path / "a", target_modules=["q_proj", "v_proj"]),
            "target_modules ['q_proj', 'v_proj'] do not name it",
        ),
        "fewer-layers": (
            _edited(source, tmp_path / "b", layers_to_transform=[1], layers_pattern="layers"),
            "model.layers.0.mlp.down_proj, but its layers_to_transform [1] leaves its layer out",
        ),
        "excluded": (_edited(source, tmp_path / "c", exclude_modules=["down_proj"]), "exclude_modules names it"),
        "attention-regex": (_edited(source, tmp_path / "d", target_modules=r".*\.self_attn\..*"), "does not match"),
        "targets-text": (_edited(source, tmp_path / "e", target_modules=3), "target_modules is 3"),
        # PEFT adapts its defaults for the model type (q_proj and v_proj for Llama) and drops the other weights.
        "no-targets": (_edited(source, tmp_path / "i", target_modules=None), "names no target_modules"),
    }
    good = {
        "regex": _edited(source, tmp_path / "f", target_modules=r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj"),
        "all-linear": _edited(source, tmp_path / "g", target_modules="all-linear"),
        "every-layer": _edited(source, tmp_path / "h", layers_to_transform=[0, 1], layers_pattern=["layers"]),
        # PEFT reads an empty layers_pattern as any: refused as leaving every layer out before.
        "empty-pattern": _edited(source, tmp_path / "j", layers_to_transform=[0, 1], layers_pattern=""),
    }
    engine = Engine(
        EngineConfig(block_size=4, num_blocks_override=256),
        tiny_loaded("llama"),
        adapters={**good, **{name: path for name, (path, _) in bad.items()}},
    )
    i = ADAPTERS.index("r8-rslora")
    params = SamplingParams(max_new_tokens=MAX_NEW)
    results = {
        r.request_id: r for r in engine.generate(GenerationRequest(n, rows[i][0], params, n) for n in [*good, *bad])
    }
    for name in good:
        assert results[name].error is None, results[name].error
        assert results[name].completions[0].token_ids == reference[i], name
    for name, (_, words) in bad.items():
        result = results[name]
        assert (result.finish_reason, result.error_kind) == ("error", ErrorKind.BAD_ADAPTER)
        assert repr(name) in result.error and words in result.error, result.error


@pytest.mark.parametrize(
    "left_out",
    ["model.layers.0.self_attn.q_proj", "lm_head", "model.embed_tokens"],
    ids=["projection", "lm_head", "embedding"],
)
def test_a_targeted_layer_the_weights_leave_out_runs_as_peft_loads_it(adapter_paths, rows, tmp_path, left_out) -> None:
    """PEFT gives every layer its config targets a LoRA layer, drawn by init_lora_weights, and loads the file into
    them: a layer the file leaves out keeps its initial A and B. Under PEFT's default init (B zero) that is no
    update, and the adapter runs as PEFT's; saved with init_lora_weights=false (as these tests' adapters are), it
    is a random update, which kvbatch ran as none, off PEFT's tokens: refused instead. So for the layers kvbatch
    does not adapt (lm_head, embeddings), named in target_modules without weights."""
    source = adapter_paths["r8-rslora"]  # every projection of both layers
    targets = [*json.loads(open(f"{source}/adapter_config.json").read())["target_modules"], left_out.split(".")[-1]]
    trimmed = _edited(source, tmp_path / "trimmed", target_modules=targets)
    tensors = load_file(f"{trimmed}/adapter_model.safetensors")
    kept = {k: v for k, v in tensors.items() if f".{left_out}." not in k}
    save_file(kept, f"{trimmed}/adapter_model.safetensors")
    zero_b = _edited(trimmed, tmp_path / "zero-b", init_lora_weights=True)
    # PEFT draws A and B at random for a null init_lora_weights too: it ran as init true.
    null = _edited(trimmed, tmp_path / "null", init_lora_weights=None)
    prompt = rows[ADAPTERS.index("r8-rslora")][0]
    want = peft_greedy(hf_reference("llama"), {"zero-b": zero_b}, [(prompt, "zero-b")], MAX_NEW, EOS_ID, 0)[0]
    _, results = run(
        {"random": trimmed, "zero-b": zero_b, "null": null}, [(prompt, "random"), (prompt, "zero-b"), (prompt, "null")]
    )
    for i, name in ((0, "random"), (2, "null")):
        assert (results[i].finish_reason, results[i].error_kind) == ("error", ErrorKind.BAD_ADAPTER)
        assert f"{name!r} holds no LoRA weights for {left_out}, which its config targets" in results[i].error
    assert results[1].error is None, results[1].error
    assert results[1].completions[0].token_ids == want


def test_weights_named_without_peft_prefix_are_refused(adapter_paths, rows, tmp_path) -> None:
    """PEFT loads only weights named under base_model.model. and drops any other name as an unexpected key: an
    adapter whose file names its A and B without the prefix runs in PEFT as the base model. kvbatch read such
    names as the prefixed ones and applied them: refused instead."""
    from peft import PeftModel

    unprefixed = _edited(adapter_paths["r8-rslora"], tmp_path / "unprefixed", init_lora_weights=True)
    tensors = load_file(f"{unprefixed}/adapter_model.safetensors")
    save_file(
        {k.removeprefix("base_model.model."): v for k, v in tensors.items()}, f"{unprefixed}/adapter_model.safetensors"
    )
    prompt = torch.tensor([rows[0][0]])
    with torch.no_grad():
        base = hf_reference("llama")(input_ids=prompt).logits
        peft = PeftModel.from_pretrained(hf_reference("llama"), unprefixed)(input_ids=prompt).logits
    assert torch.equal(peft, base)  # PEFT ran none of it
    _, results = run({"unprefixed": unprefixed}, [(rows[0][0], "unprefixed")])
    assert (results[0].finish_reason, results[0].error_kind) == ("error", ErrorKind.BAD_ADAPTER)
    assert "named without PEFT's prefix 'base_model.model.'" in results[0].error, results[0].error


def test_an_all_linear_adapter_of_a_moe_model_names_the_routed_experts(tmp_path) -> None:
    """PEFT adds target_parameters for a MoE model's routed experts (3-D parameters, not linears) under
    all-linear: the refusal says so, where it named a field the user never wrote."""
    import transformers as tf

    from kvbatch.runner.lora.weights import AdapterError, adaptable_linears, inspect_adapter

    def make_base():
        config = tf.Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
        return tf.AutoModelForCausalLM.from_config(config)

    path = save_adapters(make_base, tmp_path, {"moe": dict(r=2, target_modules="all-linear")})["moe"]
    assert json.loads(open(f"{path}/adapter_config.json").read())["target_parameters"]  # PEFT's own doing
    with pytest.raises(AdapterError, match=r"target_parameters, which PEFT adds for a MoE model's routed experts"):
        inspect_adapter("moe", path, adaptable_linears(make_base()))


def test_configs_of_peft_0_22_run_as_peft_loads_them_and_unknown_fields_are_refused(
    adapter_paths, rows, tmp_path
) -> None:
    """Each field of PEFT 0.22's LoraConfig is read, refused or leaves the forward plain LoRA: 'nora' draws B = 0
    (the file's weights then replace it), 'astra' rewrites the base weights as it loads. A field kvbatch does not
    know, set, is refused: a newer PEFT's variant ran as plain LoRA."""
    from peft import LoraConfig

    source = adapter_paths["r2-qv"]
    nora = _edited(source, tmp_path / "nora", init_lora_weights="nora")
    # Every field PEFT saves, at PEFT's defaults, beside the adapter's own values: none may be refused.
    defaults = LoraConfig().to_dict()
    saved = json.loads(open(f"{source}/adapter_config.json").read())
    every_field = _edited(source, tmp_path / "every", **{**defaults, **saved})
    astra = _edited(source, tmp_path / "astra", init_lora_weights="astra")
    future = _edited(source, tmp_path / "future", spectral_config={"rank": 2}, dora_v2=False)
    prompt = rows[ADAPTERS.index("r2-qv")][0]
    want = peft_greedy(hf_reference("llama"), {"nora": nora}, [(prompt, "nora")], MAX_NEW, EOS_ID, 0)[0]
    paths = {"nora": nora, "every": every_field, "astra": astra, "future": future}
    _, results = run(paths, [(prompt, name) for name in paths])
    assert results[0].error is None and results[0].completions[0].token_ids == want
    assert results[1].error is None and results[1].completions[0].token_ids == want
    for i, words in ((2, "init_lora_weights='astra'"), (3, "sets spectral_config, which kvbatch does not know")):
        assert (results[i].finish_reason, results[i].error_kind) == ("error", ErrorKind.BAD_ADAPTER)
        assert words in results[i].error, results[i].error


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(target_modules="all-linear", layers_to_transform=[0]), "beside target_modules 'all-linear', a string"),
        (dict(target_modules=r".*_proj", layers_pattern="layers"), "layers_pattern beside target_modules"),
        (dict(layers_pattern="layers"), "layers_pattern without layers_to_transform"),
    ],
    ids=["all-linear-layers", "regex-pattern", "pattern-alone"],
)
def test_layer_choices_peft_refuses_to_load_are_refused(adapter_paths, tmp_path, fields, words) -> None:
    """PEFT's LoraConfig refuses layers_to_transform or layers_pattern beside a target_modules string, and
    layers_pattern without layers_to_transform; kvbatch ran such an adapter on every layer its weights hold."""
    from peft import PeftModel

    from kvbatch.runner.lora.weights import AdapterError, adaptable_linears, inspect_adapter

    path = _edited(adapter_paths["r8-rslora"], tmp_path / "edited", **fields)
    with pytest.raises(ValueError, match="layers_"):
        PeftModel.from_pretrained(hf_reference("llama"), path)
    with pytest.raises(AdapterError, match=words):
        inspect_adapter("x", path, adaptable_linears(tiny_model("llama")))


@pytest.mark.parametrize("init", ["false", "True", "EVA", 1], ids=["false-text", "true-text", "upper-eva", "one"])
def test_an_init_peft_refuses_to_load_is_refused(adapter_paths, tmp_path, init) -> None:
    """PEFT loads an adapter under init_lora_weights true, false or one of its named initialisations, spelt as it
    spells them, and refuses any other value as it builds the layers; kvbatch ran such an adapter as plain LoRA."""
    from peft import PeftModel

    from kvbatch.runner.lora.weights import AdapterError, adaptable_linears, inspect_adapter

    path = _edited(adapter_paths["r2-qv"], tmp_path / "edited", init_lora_weights=init)
    with pytest.raises((ValueError, AttributeError)):
        PeftModel.from_pretrained(hf_reference("llama"), path)
    with pytest.raises(AdapterError, match=f"init_lora_weights is {init!r}, not true, false or one of PEFT's"):
        inspect_adapter("x", path, adaptable_linears(tiny_model("llama")))


@pytest.mark.parametrize(
    "arch, config, words",
    [
        # PEFT saves lora_embedding_A/B for an embedding, and the embedding's own weights beside them.
        ("llama", dict(target_modules=["embed_tokens", "q_proj"]), "targets the embedding model.embed_tokens"),
        # LoRA on lm_head: PEFT saves lm_head.base_layer.weight beside its A and B.
        ("llama", dict(target_modules=["lm_head", "q_proj"]), r"targets lm_head and saved its base weights"),
        # Qwen2's q/k/v have biases: bias="all" (or "lora_only") saves them, trained.
        ("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="all"), r"trained biases \(model.layers.0"),
    ],
    ids=["embedding", "lm_head", "biases"],
)
def test_what_peft_saves_beyond_lora_is_named_in_the_error(tmp_path, arch, config, words) -> None:
    """Each was refused as `holds model.embed_tokens.base_layer.weight, which is not a LoRA A/B weight`: the
    weight PEFT saved alongside, not the reason (an embedding or lm_head as a target, trained biases)."""
    from kvbatch.runner.lora.weights import AdapterError, adaptable_linears, inspect_adapter

    paths = save_adapters(lambda: tiny_model(arch), tmp_path, {"x": dict(r=2, lora_alpha=4, **config)})
    with pytest.raises(AdapterError, match=words):
        inspect_adapter("x", paths["x"], adaptable_linears(tiny_model(arch)))


@pytest.mark.parametrize(
    ("trained_on", "engine_model", "same"),
    [
        ("unsloth/llama-3-8b-Instruct-bnb-4bit", "meta-llama/Meta-Llama-3-8B-Instruct", True),  # a 4-bit copy
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", True),  # renamed by Meta
        ("TheBloke/Llama-2-7B-GPTQ", "meta-llama/Llama-2-7b", True),
        ("meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M", False),
        ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct", False),  # base and chat differ
    ],
)
def test_an_adapter_trained_on_a_copy_of_the_model_fits_it(trained_on, engine_model, same) -> None:
    # The base-model check compared the names' last parts as they were: an adapter trained on unsloth's 4-bit copy
    # of Llama-3-8B-Instruct, whose shapes fit and which PEFT loads on the original, was refused.
    from kvbatch.runner.lora.weights import _model_of

    assert (_model_of(trained_on) == _model_of(engine_model)) is same
