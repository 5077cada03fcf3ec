"""The driver's peak memory in a `runner: ray` job, for a given input size (docs/scaling.md has the figures).

    .venv/bin/python scripts/ray_driver_rss.py --rows 20000
    .venv/bin/python scripts/ray_driver_rss.py --rows 200000

Writes ROWS short prompts as Parquet files of 10,000 rows in a temporary folder, starts a local Ray (2 engine actors
of the tiny random Llama of tests/helpers, 1 output token per row), runs the job and prints one JSON line: rows, the
driver's peak RSS (this process; Ray's own processes and the actors are others) before and after the run, and the
time. Each size runs in a fresh process, so the peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--file-rows", type=int, default=10_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    from scaling_helpers import tiny_engine

    from kvbatch.jobs.runners import run_jobs
    from kvbatch.jobs.spec import job_from_dict

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for start in range(0, args.rows, args.file_rows):
            ids = list(range(start, min(start + args.file_rows, args.rows)))
            table = pa.table({"id": ids, "prompt": [f"w{i % 97} w{i % 89} w{i % 83}" for i in ids]})
            pq.write_table(table, folder / f"part-{start:09d}.parquet", row_group_size=2048)
        job = job_from_dict(
            {
                "name": "rss",
                "model": "tiny-llama",
                "input": {"path": str(folder)},
                "prompt": {"chat_template": False},
                "id_column": "id",
                "sampling": {"max_new_tokens": 1},
                "output": {"path": "rss.parquet"},
                "output_dir": str(Path(tmp) / "out"),
                "engine": {"device": "cpu", "num_blocks_override": 512, "max_num_seqs": 64},
                "runner": "ray",
                "parallel": {"ray_actors": args.actors, "ray_batch_rows": 512},
            }
        )
        ray.init(
            num_cpus=args.actors + 2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(HELPERS)}},
        )
        before = peak_rss_mib()
        started = time.monotonic()
        [outcome] = run_jobs([job], engine_factory=tiny_engine)
        elapsed = time.monotonic() - started
        if outcome.error is not None:
            raise SystemExit(f"the run failed: {outcome.error}")
        print(
            json.dumps(
                {
                    "rows": outcome.summary.rows,
                    "driver_peak_rss_mib_before_run": round(before, 1),
                    "driver_peak_rss_mib": round(peak_rss_mib(), 1),
                    "elapsed_s": round(elapsed, 1),
                }
            )
        )
        ray.shutdown()


if __name__ == "__main__":
    main()
