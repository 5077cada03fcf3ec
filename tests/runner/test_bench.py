"""`kvbatch bench` on the CPU with the tiny shape: the commands run and report what the engine did."""

import json

from typer.testing import CliRunner

from kvbatch.runner.bench_workloads import make_workload
from kvbatch.runner.cli import app


def _records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_throughput_counts_every_requested_token(tmp_path):
    out = tmp_path / "bench.jsonl"
    result = CliRunner().invoke(app, ["bench", "throughput", "--shape", "tiny", "--workload", "chat", "--num-prompts", "6",
                                      "--device", "cpu", "--timing", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (record,) = _records(out.read_text())
    assert record["runner"] == "kvbatch" and record["device"] == "cpu" and record["attention"] == "torch"
    assert record["rows"] == 6 and record["errors"] == 0
    assert record["out_tokens"] == 6 * 64  # EOS is off: every row runs to its length
    assert record["in_tokens"] == make_workload("chat", 1024, 6).num_prompt_tokens
    assert {"schedule", "prepare_inputs", "forward_eager", "sample", "postprocess"} <= set(record["phases"])
    assert "bound_s" not in record  # no roofline for a CPU


def test_capped_pool_finishes_every_row_with_preemptions(tmp_path):
    # The LoRAX case in small: rows whose sum is far beyond the pool all finish, by preemption, with no error.
    result = CliRunner().invoke(app, ["bench", "throughput", "--shape", "tiny", "--workload", "chat", "--num-prompts", "6",
                                      "--device", "cpu", "--kv-pool-tokens", "256", "--max-num-seqs", "6"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (record,) = _records(result.output)
    assert record["errors"] == 0 and record["out_tokens"] == 6 * 64
    assert record["preemptions"] > 0 and record["peak_kv_usage"] == 1.0


def test_check_compares_streams_against_the_reference():
    result = CliRunner().invoke(app, ["bench", "check", "--shape", "tiny", "--attention-backend", "torch",
                                      "--num-prompts", "3", "--max-new-tokens", "6", "--dtype", "float32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (record,) = _records(result.output)
    assert record["prompts"] == 3 and record["identical_streams"] == 3 and record["divergences"] == []
