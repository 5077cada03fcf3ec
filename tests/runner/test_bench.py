"""`kvbatch bench` on the CPU with the tiny shape: the commands run and report what the engine did."""

import functools
import json

import pytest
from typer.testing import CliRunner

from kvbatch.bench.cli import engine_settings
from kvbatch.bench.workloads import make_workload
from kvbatch.cli import app


def _records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_throughput_counts_every_requested_token(tmp_path):
    out = tmp_path / "bench.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "throughput",
            "--shape",
            "tiny",
            "--workload",
            "chat",
            "--num-prompts",
            "6",
            "--device",
            "cpu",
            "--timing",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (record,) = _records(out.read_text())
    assert record["runner"] == "kvbatch" and record["device"] == "cpu" and record["attention"] == "cpu"
    assert record["rows"] == 6 and record["errors"] == 0
    assert record["out_tokens"] == 6 * 64  # EOS is off: every row runs to its length
    assert record["in_tokens"] == make_workload("chat", 1024, 6).num_prompt_tokens
    assert {"schedule", "prepare_inputs", "forward_eager", "sample", "postprocess"} <= set(record["phases"])
    assert "bound_s" not in record  # no roofline for a CPU
    assert 0 <= record["host_wait_share"] < 1


def test_capped_pool_finishes_every_row_with_preemptions(tmp_path):
    # The LoRAX case in small: rows whose sum is far beyond the pool all finish, by preemption, with no error.
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "throughput",
            "--shape",
            "tiny",
            "--workload",
            "chat",
            "--num-prompts",
            "6",
            "--device",
            "cpu",
            "--kv-pool-tokens",
            "256",
            "--set",
            "max_num_seqs=6",
        ],
    )
    assert result.exit_code == 0, result.output
    (record,) = _records(result.output)
    assert record["errors"] == 0 and record["out_tokens"] == 6 * 64
    assert record["preemptions"] > 0 and record["peak_kv_usage"] == 1.0


def test_a_runs_peak_kv_usage_is_its_own_not_the_warm_ups():
    """`peak_kv_usage` was the engine's peak over its whole life, the only figure of a run that was not taken as a
    difference: a timed run of fewer rows than the warm-up's 8 printed the warm-up's peak (`--workload prefix
    --num-prompts 3 --set prefix_cache=false` printed 0.009, its own rows holding a third of that)."""
    from kvbatch.bench.cli import run_engine
    from kvbatch.bench.models import random_model
    from kvbatch.runner.engine import Engine, EngineConfig

    loaded = random_model("tiny", "cpu", "float32", max_model_len=256)
    vocab = loaded.model.config.vocab_size
    small, warm_up = make_workload("chat", vocab, 2), make_workload("chat", vocab, 8, seed=1)

    def engine() -> Engine:
        return Engine(EngineConfig(device="cpu", num_blocks_override=64, prefix_cache=False), loaded)

    alone = run_engine(engine(), small)["peak_kv_usage"]
    warmed = engine()
    run_engine(warmed, warm_up)
    warm_up_peak = warmed.stats.peak_kv_usage
    assert 0 < alone < round(warm_up_peak, 3)
    assert run_engine(warmed, small)["peak_kv_usage"] == alone
    assert warmed.stats.peak_kv_usage == warm_up_peak  # the engine's own peak, over its life, stays


def test_check_compares_streams_against_the_reference():
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "check",
            "--shape",
            "tiny",
            "--attention-backend",
            "torch",
            "--num-prompts",
            "3",
            "--max-new-tokens",
            "6",
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    (record,) = _records(result.output)
    assert record["prompts"] == 3 and record["identical_streams"] == 3 and record["divergences"] == []
    assert record["reference_vs_itself_identical"] == 3 and record["float32_logits"] is True  # a float32 model
    assert record["fused_layers"] is True  # the engine default, on the CPU too (in torch ops)
    assert record["transformers_generate_vs_reference_identical"] == 3  # float32 on the CPU: exact


def test_check_reports_the_streams_that_differ(monkeypatch):
    """On the CPU both sides of the check run the torch reference, so the test above cannot see a divergence: here
    the kernels' run and transformers' are made to differ at known tokens, and the report must name them."""
    from tiny_models import tiny_loaded

    from kvbatch.bench import check as bench_check

    real_run, real_hf = bench_check._run, bench_check.hf_greedy_tokens

    def run(loaded, config, requests):
        completions, f32, fused = real_run(loaded, config, requests)
        if config.max_num_seqs == 64:  # the kernels' run (the reference runs with the default and with 5)
            stream = completions[1]
            stream.token_ids[2] += 1
            stream.logprobs[2] = -9.0
        return completions, f32, fused

    def hf(model, prompts, max_new_tokens):
        streams = real_hf(model, prompts, max_new_tokens)
        streams[0][0] += 1
        streams[2][5] += 1
        return streams

    monkeypatch.setattr(bench_check, "_run", run)
    monkeypatch.setattr(bench_check, "hf_greedy_tokens", hf)
    loaded = tiny_loaded("llama")
    prompts = bench_check.random_prompts(loaded.model.config.vocab_size, 3)
    result = bench_check.compare_streams(loaded, "torch", prompts, 6)
    assert (
        result.num_prompts,
        result.num_identical,
        result.num_identical_floor,
        result.num_identical_transformers,
    ) == (3, 2, 3, 1)
    (divergence,) = result.divergences
    assert divergence["prompt"] == 1 and divergence["position"] == 2 and divergence["kernel_logprob"] == -9.0
    assert divergence["prompt_tokens"] == len(prompts[1]) and divergence["reference_logprob"] != -9.0


def test_check_runs_the_kernels_with_fused_layers_when_asked():
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "check",
            "--shape",
            "tiny",
            "--attention-backend",
            "torch",
            "--fused-layers",
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "4",
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    (record,) = _records(result.output)
    assert record["fused_layers"] is True and record["prompts"] == 2


def test_check_refuses_kernels_that_cannot_run_here_before_any_work(monkeypatch):
    """`kvbatch bench check` (the Triton kernels by default) on a machine without a CUDA GPU built the model, ran
    the reference twice and transformers' generate, and only then found that the kernels' engine cannot start: on
    a real shape, most of an hour of CPU for an error. It is refused first, a usage error (exit 2) that names the
    backends that can run here; so is an attention backend that does not exist."""
    import torch

    from kvbatch.bench import models

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the backend was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "random_model", never)
    cases = [
        ([], "the triton backend needs a CUDA device, the model runs on cpu (here: torch, cpu)"),
        (["--attention-backend", "xyz"], "unknown attention backend 'xyz'"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(app, ["bench", "check", "--shape", "tiny", *args])
        flat = " ".join(result.output.replace("│", " ").split())  # the message as typer wraps it in a box
        assert result.exit_code == 2 and words in flat, (args, result.output, result.exception)


@pytest.mark.slow
def test_check_on_the_real_model_reads_chat_prompts(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a primary colour."}\n\n{"prompt": "What is 2 + 2?"}\n{"prompt": "unused"}\n')
    out = tmp_path / "check.jsonl"  # the output also holds transformers' loading bar
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "check",
            "--model",
            "default",
            "--prompts",
            str(prompts),
            "--num-prompts",
            "2",
            "--attention-backend",
            "torch",
            "--max-new-tokens",
            "5",
            "--dtype",
            "float32",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (record,) = _records(out.read_text())
    assert record["check"] == "default" and record["prompts"] == 2 and record["identical_streams"] == 2
    assert record["transformers_generate_vs_reference_identical"] == 2 and record["divergences"] == []


def test_check_wants_prompts_with_a_real_model():
    result = CliRunner().invoke(app, ["bench", "check", "--model", "default"])
    assert result.exit_code != 0 and "--prompts" in result.output


def test_chat_prompts_name_the_bad_line(tmp_path):
    from kvbatch.bench.check import chat_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="line 2"):
        chat_prompts(None, path, 5)


def test_check_stops_on_a_bad_prompts_file_with_a_message_not_a_traceback(tmp_path, monkeypatch):
    """chat_prompts refused a line without a prompt, or a file without one, with a ValueError that `kvbatch bench
    check --model M --prompts FILE` let through as a traceback (examples/data/questions.jsonl, whose line 13 is
    malformed on purpose, ended that way)."""
    from tiny_models import tiny_loaded

    from kvbatch.runner import model_loader

    monkeypatch.setattr(model_loader, "load_model", lambda *args, **kwargs: tiny_loaded("llama"))
    bad, empty = tmp_path / "bad.jsonl", tmp_path / "empty.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    empty.write_text("\n")
    for path, words in ((bad, f"{bad} line 2: expected a JSON object with a 'prompt' field"), (empty, "no prompts")):
        args = ["--model", "m", "--prompts", str(path), "--attention-backend", "torch"]
        result = CliRunner().invoke(app, ["bench", "check", *args])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
        assert result.output.startswith("kvbatch: error: ") and words in result.output, result.output


def test_kernel_sweeps_report_every_variant_and_restore_the_defaults(monkeypatch, capsys):
    """`kvbatch bench kernels --sweep` on interpreted kernels: one line per variant, each variant's output equal to
    the default's, and the launch parameters put back (the timing is stubbed: speed is not what this checks)."""
    import torch

    from kvbatch.bench import kernels as bench_kernels
    from kvbatch.cache import attention_triton

    monkeypatch.setattr(bench_kernels, "DEVICE", "cpu")
    monkeypatch.setattr(bench_kernels, "time_decode", lambda step, scale: 1.0)
    step = bench_kernels.make_step([(20, 1), (9, 1)], (4, 2, 16), 8, torch.float32)
    defaults = (attention_triton._decode_config, attention_triton._decode_num_splits)
    bench_kernels.decode_sweep(step, "tiny", 20, 2, 1e6, 16)
    assert (attention_triton._decode_config, attention_triton._decode_num_splits) == defaults
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["kind"] for line in lines] == ["decode_sweep"] * 13
    assert [line["num_splits"] for line in lines[8:]] == [1, 2, 4, 8, 16]
    assert all(line["max_diff_vs_default"] < 1e-4 and line["kv_gb_per_s"] == 1.0 for line in lines)


def test_prefill_sweep_times_every_tile_variant_and_restores_the_default(monkeypatch, capsys):
    """The prefill kernel's tile variants on interpreted kernels (do_bench stubbed): each gives the default's output
    to float32 rounding, and the default launch parameters are put back."""
    import torch

    from kvbatch.bench import kernels as bench_kernels
    from kvbatch.cache import attention_triton

    monkeypatch.setattr(bench_kernels, "DEVICE", "cpu")
    monkeypatch.setattr(bench_kernels, "do_bench", lambda fn, **kwargs: fn() is not None and 1.0)
    step = bench_kernels.make_step([(0, 9), (12, 3)], (4, 2, 16), 8, torch.float32)
    fn = functools.partial(attention_triton.paged_attention, *step, 0.25)
    default = attention_triton._prefill_config
    bench_kernels.prefill_sweep(step, "tiny", "mix", fn, 1e6)
    assert attention_triton._prefill_config is default
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 15 and {line["case"] for line in lines} == {"mix"}
    assert all(line["max_diff_vs_default"] < 1e-5 and line["ms"] == 1.0 for line in lines), lines


def test_kernels_without_a_gpu_exit_2_not_as_a_failed_case(monkeypatch):
    """`kvbatch bench kernels` exits 1 when a kernel is out of tolerance (docs/cli.md). On a machine without a CUDA
    GPU it exited 1 too, so a script could not tell a wrong kernel from a run that checked none: it is a usage
    error, exit 2, with the message."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", "kernels"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert (
        result.output == "kvbatch: error: bench kernels times the Triton kernels on a CUDA GPU, and none is visible\n"
    )


def test_kernels_continuations_share_their_prompt_pages_in_fours(monkeypatch):
    """`kvbatch bench kernels`' continuations case: each run of four sequences reads its first blocks from the
    first one's pages, and the kernel's output is the reference's on that sharing (interpreted kernels)."""
    import torch

    from kvbatch.bench import kernels as bench_kernels
    from kvbatch.cache import attention_torch, attention_triton

    monkeypatch.setattr(bench_kernels, "DEVICE", "cpu")
    seqs = [(16, n) for n in (2, 5, 3, 7, 4, 2, 6, 3)]
    plain = bench_kernels.make_step(seqs, (4, 2, 16), 8, torch.float32)
    query, key_cache, value_cache, meta = bench_kernels.sharing_prompts(plain, 4, 16)
    tables = meta.block_tables
    for first in (0, 4):
        assert (tables[first + 1 : first + 4, :2] == tables[first, :2]).all()  # the 16-token prompt's two blocks
        assert len({int(t) for t in tables[first : first + 4, 2]}) == 4  # each its own block after them
    assert torch.equal(tables[:, 2:], plain[3].block_tables[:, 2:]) and not torch.equal(tables, plain[3].block_tables)
    got = attention_triton.paged_attention(query, key_cache, value_cache, meta, 0.25)
    want = attention_torch.paged_attention(query, key_cache, value_cache, meta, 0.25)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_throughput_engine_settings_are_checked_against_the_engine_config():
    for value, words in (("max_num_seq=4", "did you mean max_num_seqs"), ("max_num_seqs=0", "must be >= 1, got 0")):
        result = CliRunner().invoke(app, ["bench", "throughput", "--shape", "tiny", "--set", value])
        assert result.exit_code == 2 and words in result.output, result.output
    # An unknown shape or workload is a usage error naming the choices, not a traceback.
    bad = (("--shape", "nope", "'nope' is none of llama-1b"), ("--workload", "zz", "json, score"))
    for option, value, words in bad:
        result = CliRunner().invoke(app, ["bench", "throughput", "--shape", "tiny", option, value])
        assert result.exit_code == 2 and words in result.output, result.output
    assert engine_settings(["policy=reserve", "kv_cache_gib=1", "cuda_graphs=false"]) == {
        "policy": "reserve", "kv_cache_gib": 1.0, "cuda_graphs": False,
    }  # fmt: skip


def test_a_result_file_that_cannot_be_written_is_refused_before_the_run(tmp_path):
    """`--json results/x.jsonl` in a folder that did not exist ran the whole benchmark (hours of GPU time), then
    failed writing the record: exit 1 and a bare errno message. --trace, written after the profiled run, too."""
    args = ["bench", "throughput", "--shape", "tiny", "--num-prompts", "2", "--device", "cpu"]
    for option, value, words in (
        ("--json", tmp_path / "results" / "x.jsonl", "does not exist"),
        ("--json", tmp_path, "is a folder"),
        ("--trace", tmp_path / "traces" / "t.json.gz", "does not exist"),
    ):
        result = CliRunner().invoke(app, [*args, "--profile", option, str(value)])
        assert result.exit_code == 2, result.output
        flat = "".join(c for c in result.output if not c.isspace() and c != "│")  # the error box wraps long paths
        assert f"Invalidvaluefor'{option}'" in flat and "".join(words.split()) in flat, result.output
        assert '"runner": "kvbatch"' not in result.output  # nothing ran


def _kernel(name: str, ts: float, dur: float, correlation: int) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def _launch(name: str, ts: float, correlation: int) -> dict:
    return {"cat": "cuda_runtime", "name": name, "ts": ts, "dur": 1, "args": {"correlation": correlation}}


def _phase(name: str, ts: float, dur: float) -> dict:
    return {"cat": "user_annotation", "name": f"kvbatch.{name}", "ts": ts, "dur": dur}


def test_breakdown_attributes_each_kernel_to_the_phase_that_launched_it():
    from kvbatch.bench.breakdown import breakdown, device_time

    events = [
        _phase("forward_eager", 0, 10),
        _launch("cudaLaunchKernel", 1, 1),
        _launch("cuLaunchKernelEx", 2, 2),
        _phase("sample", 10, 5),
        _launch("cudaLaunchKernel", 11, 3),
        _phase("forward_decode_graph", 20, 5),
        _launch("cudaGraphLaunch", 21, 4),
        _launch("cudaLaunchKernel", 40, 5),  # outside every phase
        _kernel("nvjet_hsh_128x256_2cta", 100, 300, 1),
        _kernel("_prefill_kernel", 400, 200, 2),
        _kernel("at::native::argmax_kernel", 650, 50, 3),  # a gap of 50 us before it
        _kernel("_decode_kernel", 700, 100, 4),  # the graph's kernels share its launch's correlation
        _kernel("_add_rms_norm_kernel", 800, 20, 4),
        _kernel("_write_kv_kernel", 820, 10, 4),
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 850, "dur": 30, "args": {"correlation": 5}},
    ]
    table = breakdown(events)
    assert table.span_ms == pytest.approx(0.78) and table.busy_ms == pytest.approx(0.71)
    assert table.idle_ms == pytest.approx(0.07)  # 600-650 and 830-850
    device = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["cat"] in ("kernel", "gpu_memcpy")]
    assert device_time(device, min_gap_us=10) == (780, 710, [(50, 500), (20, 730)])  # (length, offset), longest first
    assert table.phase_calls == {"forward_eager": 1, "sample": 1, "forward_decode_graph": 1}
    assert table.ms["forward_eager"]["gemm"] == pytest.approx(0.3)
    assert table.ms["forward_eager"]["attention"] == pytest.approx(0.2)
    assert table.ms["sample"]["other"] == pytest.approx(0.05)
    graph = table.ms["forward_decode_graph"]
    assert (graph["attention"], graph["norm_rope_act"], graph["kv_write"]) == pytest.approx((0.1, 0.02, 0.01))
    assert table.ms["outside"]["copy"] == pytest.approx(0.03)
    assert table.top_other == [("at::native::argmax_kernel", 0.05)]
    assert "| forward_eager | 1 | 0.3 | 0.2 |" in table.table()


def test_throughput_profile_prints_the_breakdown(tmp_path):
    out = tmp_path / "bench.jsonl"
    args = ["bench", "throughput", "--shape", "tiny", "--workload", "chat", "--num-prompts", "3", "--device", "cpu"]
    trace = tmp_path / "run.trace.json.gz"
    result = CliRunner().invoke(app, [*args, "--profile", "--trace", str(trace), "--json", str(out)])
    assert result.exit_code == 0, result.output
    timed, profiled = _records(out.read_text())
    assert timed["runner"] == "kvbatch" and profiled["runner"] == "kvbatch-profiled"
    assert profiled["out_tokens"] == 3 * 64 and profiled["errors"] == 0
    assert {"forward_eager", "sample", "prepare_inputs"} <= set(profiled["breakdown"]["phase_calls"])
    assert "| phase | calls | gemm |" in result.output
    assert "Self CPU" in result.output and "aten::" in result.output  # the CPU's time, which has no kernels
    assert trace.stat().st_size > 0


def test_the_profiled_run_is_the_workload_again_in_other_tokens(tmp_path, monkeypatch):
    """`--profile` is documented to run the workload again in other prompts of the same lengths. It drew a new
    workload from another seed, lengths included, so the profiled record counted other tokens under the timed
    run's workload line and bound, and kept the timed run's share of the bound beside its own seconds."""
    from kvbatch.bench import bound

    monkeypatch.setattr(bound, "device_peaks", lambda device: ("H200", 1e12, 1e6))  # a bound on the CPU too
    out = tmp_path / "bench.jsonl"
    args = ["bench", "throughput", "--shape", "tiny", "--workload", "chat", "--num-prompts", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--profile", "--json", str(out)])
    assert result.exit_code == 0, result.output
    timed, profiled = _records(out.read_text())
    same = ("workload", "rows", "in_tokens", "out_tokens", "errors", "prefix_hit_rate", "bound_s")
    assert {k: profiled[k] for k in same} == {k: timed[k] for k in same}
    assert profiled["share_of_bound"] == pytest.approx(profiled["bound_s"] / profiled["seconds"], rel=1e-3)


def test_a_relabelled_workload_keeps_its_shape_in_other_tokens():
    """What the profiled run takes (the test above): each prompt and continuation of the same length, the rows
    that shared a system prompt sharing another, and no prompt beginning as it did (a prefix cache hit)."""
    from kvbatch.bench.workloads import relabelled

    for name in ("prefix", "score"):
        work = make_workload(name, 1024, 3)
        again = relabelled(work, 1024, seed=2)
        shape = [(len(r.prompt_token_ids), [len(c) for c in r.continuations or ()]) for r in work.requests]
        assert [(len(r.prompt_token_ids), [len(c) for c in r.continuations or ()]) for r in again.requests] == shape
        assert again.describe() == work.describe()
        assert all(a.prompt_token_ids[:16] != r.prompt_token_ids[:16] for a, r in zip(again.requests, work.requests))
        assert all(10 <= t < 1014 for r in again.requests for t in r.prompt_token_ids)
    prefix = relabelled(make_workload("prefix", 1024, 3), 1024, seed=2).requests
    assert prefix[0].prompt_token_ids[:2000] == prefix[2].prompt_token_ids[:2000]  # still one shared system prompt


def test_json_workload_is_workload_a_under_one_schema():
    from kvbatch.bench.workloads import JSON_SCHEMA

    plain, constrained = make_workload("a", 1024, 5), make_workload("json", 1024, 5)
    assert [r.prompt_token_ids for r in constrained.requests] == [r.prompt_token_ids for r in plain.requests]
    for request in constrained.requests:
        assert json.loads(request.sampling.structured_outputs.json) == json.loads(JSON_SCHEMA)
        assert request.sampling.max_new_tokens == 256 and not request.sampling.ignore_eos


def _char_tokenizer(folder, vocab_size: int) -> None:
    """A tokenizer of single printable characters (JSON can be spelled with it), padded to vocab_size."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"</s>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    vocab |= {f"<pad{i}>": i for i in range(len(vocab), vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="</s>")))
    tokenizer.eos_token = "</s>"
    tokenizer.save_pretrained(folder)


def test_json_workload_runs_every_row_to_its_length_under_the_grammar(tmp_path):
    _char_tokenizer(tmp_path / "tok", 1024)
    out = tmp_path / "bench.jsonl"
    args = ["bench", "throughput", "--shape", "tiny", "--workload", "json", "--num-prompts", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--tokenizer", str(tmp_path / "tok"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = _records(out.read_text())
    assert record["errors"] == 0 and record["out_tokens"] == 2 * 256  # the string outlasts every row


def test_a_tokenizer_larger_than_the_shape_is_refused(tmp_path):
    """Refused with a ValueError, which `kvbatch bench throughput` let through as a traceback: `--workload json`
    on the tiny shape (its tokenizer the default model's, 49,152 tokens) ended that way. It is a usage error."""
    from kvbatch.bench.models import random_model

    _char_tokenizer(tmp_path / "tok", 2048)
    with pytest.raises(ValueError, match="has 2048 tokens; tiny has 1024"):
        random_model("tiny", "cpu", "float32", max_model_len=64, tokenizer=str(tmp_path / "tok"))
    args = ["--shape", "tiny", "--workload", "json", "--num-prompts", "2", "--tokenizer", str(tmp_path / "tok")]
    result = CliRunner().invoke(app, ["bench", "throughput", *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert f"kvbatch: error: tokenizer: the tokenizer in {tmp_path / 'tok'} has 2048 tokens; tiny has 1024" in (
        result.output
    )


def test_score_workload_reads_every_prompt_once_and_each_continuation(tmp_path):
    work = make_workload("score", 1024, 3)
    assert all(len(r.prompt_token_ids) == 256 and len(r.continuations) == 4 for r in work.requests)
    assert work.num_output_tokens == 0
    assert work.num_prompt_tokens == sum(256 + sum(map(len, r.continuations)) for r in work.requests)
    out = tmp_path / "bench.jsonl"
    args = ["bench", "throughput", "--shape", "tiny", "--workload", "score", "--num-prompts", "3", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = _records(out.read_text())
    assert record["errors"] == 0 and record["out_tokens"] == 0 and record["in_tokens"] == work.num_prompt_tokens
    assert record["prefix_hit_rate"] > 0.5  # the choices read their prompt's full blocks from the cache


def _bound_terms(model) -> tuple[int, int, int]:
    """By hand, as bench/bound.py's docstring defines them: the embedding's parameters, the layers' (without the
    embedding and head), and the FLOPs of one query-key pair over all layers and heads."""
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    body = sum(p.numel() for p in model.parameters()) - embedding * (1 if config.tie_word_embeddings else 2)
    head_dim = config.hidden_size // config.num_attention_heads
    return embedding, body, 4 * config.num_hidden_layers * config.num_attention_heads * head_dim


def test_the_bound_of_a_scoring_request_counts_its_prompt_once():
    from unittest import mock

    import torch

    from kvbatch.bench import bound
    from kvbatch.bench.models import random_model
    from kvbatch.bench.workloads import Workload
    from kvbatch.runner.request import GenerationRequest

    model = random_model("tiny", "cpu", "float32", max_model_len=64).model
    work = Workload("score", [GenerationRequest(0, list(range(10, 30)), continuations=[[5, 6], [7, 8, 9]])])
    with mock.patch.object(bound, "device_peaks", return_value=("H200", 1e12, 1e12)):
        got = bound.workload_bound(model, torch.float32, work, torch.device("cuda"))
    embedding, body, per_pair = _bound_terms(model)
    want = 2 * body * 20 + per_pair * 20 * 21 / 2
    # Each continuation: its tokens but the last as input (never the last: nothing reads its K/V or logits), each
    # attending to the prompt and itself, and a logits row per token (the first from the prompt's last row).
    for c in (2, 3):
        want += 2 * body * (c - 1) + 2 * embedding * c + per_pair * ((c - 1) * 20 + (c - 1) * c / 2)
    assert got.prefill_s == pytest.approx(want / 1e12) and got.decode_s == 0


def test_the_bound_of_a_generated_row_reads_each_decode_steps_context_once():
    """A row of P prompt tokens and N output tokens runs N - 1 decode steps (its first token comes from the
    prefill's last row, counted there), step k attending to P + k tokens. The bound counted N steps of weights and
    N contexts from P to P + N - 1: the prefill's last row twice and one weight read too many, so it was higher
    than the workload's least time and a share of it read high."""
    from unittest import mock

    import torch

    from kvbatch.bench import bound
    from kvbatch.bench.models import random_model
    from kvbatch.bench.workloads import Workload
    from kvbatch.runner.config import SamplingParams
    from kvbatch.runner.request import GenerationRequest

    model = random_model("tiny", "cpu", "float32", max_model_len=64).model
    config = model.config
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 1)]
    work = Workload("gen", [GenerationRequest(i, list(range(10, 30)), p) for i, p in enumerate(params)])
    with mock.patch.object(bound, "device_peaks", return_value=("H200", 1e12, 1e9)):
        got = bound.workload_bound(model, torch.float32, work, torch.device("cuda"))
    embedding, body, per_pair = _bound_terms(model)
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    # Each row's prompt once, with one logits row; the row of 1 output token is done there.
    assert got.prefill_s == pytest.approx(2 * (2 * body * 20 + 2 * embedding + per_pair * 20 * 21 / 2) / 1e12)
    # The row of 3: two decode steps, attending to 21 and 22 tokens, each reading the weights and the head.
    flops = 2 * (2 * body + 2 * embedding) + per_pair * (21 + 22)
    read = 2 * (body + embedding) * 4 + kv_per_token * (21 + 22)
    assert got.decode_s == pytest.approx(max(flops / 1e12, read / 1e9)) and read / 1e9 > flops / 1e12


def test_what_the_bench_cannot_use_ends_it_with_a_message_not_a_traceback(tmp_path):
    # A device or dtype the engine refuses, a tokenizer folder that does not exist, a --json path that is a folder,
    # a --set value YAML cannot read and an unknown --compare each ended `kvbatch bench throughput` with a traceback
    # (or, for --compare, ran without a word).
    cases = [
        (["--device", "tpu"], "kvbatch: error: "),
        (["--tokenizer", str(tmp_path / "nope")], "kvbatch: error: "),
        (["--json", str(tmp_path)], "Invalid value for '--json'"),  # before the run, as a usage error
        (["--set", "seed=2001-02-30"], "is not a YAML value"),
        (["--compare", "xyz"], "'xyz' is none of hf"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(app, ["bench", "throughput", "--shape", "tiny", "--num-prompts", "2", *args])
        exited = result.exception is None or isinstance(result.exception, SystemExit)
        assert result.exit_code in (1, 2) and exited, (args, result.exception)
        assert words in result.output, (args, result.output)
        assert "Traceback" not in result.output, args


def test_the_ctranslate2_peer_without_ctranslate2_says_so(monkeypatch, capsys):
    """scripts/ct2_generate_baseline.py, the CPU peer docs/benchmarks.md times, imported ctranslate2 (not a
    dependency of kvbatch) before anything else: run where it is not installed, it ended in a traceback."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "ct2_generate_baseline.py"
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # an import of it raises ImportError, installed or not
    monkeypatch.setattr(sys, "argv", [script.name, "in.jsonl", "out.jsonl"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "ct2_generate_baseline.py: error: ctranslate2 is not installed (pip install ctranslate2)\n"
    )


def test_options_that_apply_to_another_are_refused_without_it(tmp_path):
    """`--trace F` keeps the trace of `--profile`'s run and `--hf-num-prompts N` picks the peers' rows of
    `--compare hf`: without those, the run went on (the model built, the workload timed) and dropped them without
    a word, no trace written. Each is a usage error, before the model loads."""
    cases = [
        (["--trace", str(tmp_path / "t.json.gz")], "--trace keeps the trace of --profile's run: add --profile"),
        (["--hf-num-prompts", "2"], "--hf-num-prompts picks the rows of --compare hf's peers: add --compare hf"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(app, ["bench", "throughput", "--shape", "tiny", "--num-prompts", "2", *args])
        flat = " ".join(result.output.replace("│", " ").split())  # the message as typer wraps it in a box
        assert result.exit_code == 2 and words in flat, (args, result.output)
        assert not _records(result.output), args  # refused before anything ran
    assert not (tmp_path / "t.json.gz").exists()


def test_the_soak_runs_its_rows_as_a_job(monkeypatch, capsys):
    """`python scripts/soak.py --job` (docs/benchmarks.md) counts each result by wrapping engine.generate, and the
    wrapper took the stream alone: once the job path passed generate an on_step callback, every soak job failed on
    its first call (TypeError), with no row run."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
    monkeypatch.setattr(sys, "argv", [script.name, "--job", "--rows", "12", "--every", "6"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert stopped.value.code == 0, out
    assert "done: 12 rows (0 errors)" in out and "blocks free (whole); each row once, in order" in out


def test_a_random_float32_cpu_model_runs_the_linears_load_model_gives_it(monkeypatch):
    """`kvbatch bench throughput --device cpu` built its random model without load_model's oneDNN linears, so it
    timed torch's MKL GEMMs (AVX2 code on AMD, about half the speed) and none of the oneDNN kernel caches, not the
    path every CPU job runs."""
    import torch

    from kvbatch.bench.models import random_model
    from kvbatch.runner import cpu_linear

    monkeypatch.delenv(cpu_linear.ENV_VAR, raising=False)
    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    expected = cpu_linear.OneDNNLinear if has_onednn else torch.nn.Linear
    linears = [m for m in random_model("tiny", "cpu", "float32", max_model_len=64).model.modules()]
    linears = [m for m in linears if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is expected for m in linears)
    monkeypatch.setenv(cpu_linear.ENV_VAR, "aten")
    plain = random_model("tiny", "cpu", "float32", max_model_len=64).model.modules()
    assert not any(isinstance(m, cpu_linear.OneDNNLinear) for m in plain)


def test_the_soaks_model_runs_the_linears_load_model_gives_it(monkeypatch):
    """scripts/soak.py watches a long run's memory, but built its model without load_model's oneDNN linears: it ran
    torch's MKL GEMMs and never met oneDNN's kernel per row count, whose caches grew a real job's RSS from 308 to
    1,020 MB while the soak's stayed flat."""
    import runpy
    from pathlib import Path

    import torch

    from kvbatch.runner import cpu_linear

    monkeypatch.delenv(cpu_linear.ENV_VAR, raising=False)
    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    script = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
    model = runpy.run_path(str(script), run_name="soak")["tiny_llama"](0).model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    expected = cpu_linear.OneDNNLinear if has_onednn else torch.nn.Linear
    assert len(linears) == 2 * 7 + 1 and all(type(m) is expected for m in linears)
