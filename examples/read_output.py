"""Read a kvbatch Arrow output the two usual ways: `python examples/read_output.py examples/out/questions.arrow`.

Shows that the file is plain Arrow IPC: pyarrow memory-maps it, and Hugging Face `datasets` loads it as a dataset.
"""

import json
import sys

import pyarrow as pa


def main(path: str) -> None:
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    job = json.loads(table.schema.metadata[b"kvbatch.job"])
    print(f"pyarrow:  {table.num_rows} rows, columns {table.column_names}, job {job['name']!r}")
    import datasets  # pip install 'kvbatch[datasets]'

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("arrow", data_files=path, split="train")
    first = dataset[0]
    print(f"datasets: {dataset.num_rows} rows; row 0 -> {first['text']!r} ({first['finish_reason']})")


if __name__ == "__main__":
    main(sys.argv[1])
