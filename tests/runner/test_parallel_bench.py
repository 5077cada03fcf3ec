"""`python -m kvbatch.bench.parallel` on the CPU (gloo) with the tiny shape: the commands the multi-GPU
machine will run, checked here first."""

import json

from typer.testing import CliRunner

from kvbatch.bench.parallel import app
from kvbatch.runner.parallel import tensor_parallel


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_check_finds_tensor_parallel_rows_identical(tmp_path):
    out = tmp_path / "p.jsonl"
    try:
        result = CliRunner().invoke(
            app,
            [
                "check",
                "--shape",
                "tiny",
                "--tensor-parallel",
                "2",
                "--num-prompts",
                "3",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--json",
                str(out),
            ],
        )
    finally:
        tensor_parallel.shutdown()
    assert result.exit_code == 0, result.output
    (record,) = _records(out.read_text())
    assert (record["rows"], record["rows_identical"], record["tensor_parallel"]) == (3, 3, 2)


def test_throughput_of_two_data_parallel_processes_counts_every_token(tmp_path):
    out = tmp_path / "p.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "throughput",
            "--shape",
            "tiny",
            "--workload",
            "chat",
            "--num-prompts",
            "4",
            "--data-parallel",
            "2",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (record,) = _records(out.read_text())
    assert (record["data_parallel"], record["out_tokens"], record["device"]) == (2, 4 * 64, "cpu")


def test_a_process_that_fails_stops_the_run_instead_of_hanging():
    # Before, the parent waited on the queue for ever and the healthy process at the barrier.
    result = CliRunner().invoke(
        app,
        [
            "throughput",
            "--shape",
            "tiny",
            "--workload",
            "chat",
            "--num-prompts",
            "4",
            "--data-parallel",
            "2",
            "--dtype",
            "foo",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code != 0
    assert "exited with code 1" in str(result.exception) or "exited with code 1" in result.output


def test_a_shape_or_workload_it_cannot_run_is_a_usage_error():
    """The parallel bench took any --shape and --workload: an unknown one ended in a KeyError or ValueError
    traceback, and `--workload lora` (whose rows need adapters this bench does not load) printed 0 output tokens
    and 4 million total tokens/s as a result. Each is refused, exit 2, naming the choices."""
    cases = [
        (["throughput", "--shape", "xyz"], "'xyz' is none of llama-1b, llama-8b"),
        (["check", "--shape", "xyz"], "'xyz' is none of llama-1b, llama-8b"),
        (["throughput", "--shape", "tiny", "--workload", "lora"], "'lora' is none of a, b, c, prefix, chat"),
        (["throughput", "--shape", "tiny", "--workload", "score"], "'score' is none of a, b, c, prefix, chat"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(app, [*args, "--num-prompts", "2", "--device", "cpu"])
        flat = " ".join(result.output.replace("│", " ").split())  # the message as typer wraps it in a box
        assert result.exit_code == 2 and words in flat, (args, result.output, result.exception)
        assert not _records(result.output), args
