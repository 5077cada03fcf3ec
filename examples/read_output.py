"""Read a kvbatch Arrow output the two usual ways: `python examples/read_output.py examples/out/questions.arrow`.

The file is an Arrow IPC stream, the format Hugging Face `datasets` writes: pyarrow memory-maps it, and
`datasets.Dataset.from_file` opens it as a dataset. (Older kvbatch outputs were IPC files;
`kvbatch.jobs.arrow_io.read_arrow` reads both.)
"""

import json
import sys

import pyarrow as pa


def main(path: str) -> None:
    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    job = json.loads(table.schema.metadata[b"kvbatch.job"])
    print(f"pyarrow:  {table.num_rows} rows, columns {table.column_names}, job {job['name']!r}")
    import datasets  # pip install 'kvbatch[datasets]'

    dataset = datasets.Dataset.from_file(path)
    first = dataset[0]
    print(f"datasets: {dataset.num_rows} rows; row 0 -> {first['text']!r} ({first['finish_reason']})")


if __name__ == "__main__":
    main(sys.argv[1])
