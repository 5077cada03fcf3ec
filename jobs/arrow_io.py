"""Arrow outputs on disk: the IPC stream format that Hugging Face `datasets` reads and writes, and its
`save_to_disk` folder.

    answers.arrow     one IPC stream (what `datasets.Dataset.from_file` opens; `pa.ipc.open_stream` reads it)
    answers.hf/       data-00000-of-00001.arrow (a stream), dataset_info.json (the features), state.json
                      (what `datasets.load_from_disk` opens)

Outputs written before kvbatch switched to the stream format are IPC *files* (they start with the magic bytes
"ARROW1"); `read_arrow` tells the two apart by those bytes, so inspect, merge and resume read old and new alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from kvbatch.errors import OutputError

from .atomic import INCOMPLETE, atomic_file, fsync_dir, fsync_file, write_json

FILE_MAGIC = b"ARROW1"
HF_DATA_FILE = "data-00000-of-00001.arrow"


def is_ipc_file(path: Path) -> bool:
    """True for the IPC file format (magic "ARROW1" first), False for the stream format."""
    with open(path, "rb") as f:
        return f.read(len(FILE_MAGIC)) == FILE_MAGIC


def read_arrow(path: str | os.PathLike[str]) -> pa.Table:
    """An Arrow output, memory-mapped: a stream, an IPC file (older outputs), or a `save_to_disk` folder."""
    path = Path(path)
    if path.is_dir():
        return pa.concat_tables([read_arrow(p) for p in hf_data_files(path)])
    source = pa.memory_map(str(path))
    reader = pa.ipc.open_file(source) if is_ipc_file(path) else pa.ipc.open_stream(source)
    return reader.read_all()


def write_stream(f: BinaryIO, schema: pa.Schema, chunks: Iterable[pa.Table]) -> None:
    with pa.ipc.new_stream(f, schema) as writer:
        for chunk in chunks:
            writer.write_table(chunk.replace_schema_metadata(schema.metadata))


def hf_data_files(folder: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder, in order, as its state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text())
        return [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{folder} is not a datasets save_to_disk folder ({exc})") from None


def write_hf_folder(folder: Path, schema: pa.Schema, chunks: Iterable[pa.Table]) -> int:
    """Write a `save_to_disk` folder atomically (a `.incomplete` folder renamed into place); return its bytes.

    The data file carries the kvbatch metadata and, as datasets writes it, the features under `huggingface`."""
    try:
        import datasets
    except ImportError:
        raise OutputError("output.format hf needs the datasets package: pip install 'kvbatch[datasets]'") from None
    features = datasets.Features.from_arrow_schema(schema)
    hf_meta = json.dumps({"info": {"features": features.to_dict()}}).encode()
    schema = schema.with_metadata({**(schema.metadata or {}), b"huggingface": hf_meta})
    tmp = folder.with_name(folder.name + INCOMPLETE)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with atomic_file(tmp / HF_DATA_FILE) as f:
        write_stream(f, schema, chunks)
        num_bytes = f.tell()
    datasets.DatasetInfo(features=features).write_to_directory(str(tmp))
    fsync_file(tmp / "dataset_info.json")  # the folder is renamed into place whole: each of its files on disk first
    state = {
        "_data_files": [{"filename": HF_DATA_FILE}],
        "_fingerprint": os.urandom(8).hex(),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    write_json(tmp / "state.json", state)  # fsynced, with the folder's entries (the last file written)
    _replace_folder(tmp, folder)
    return num_bytes


def _replace_folder(new: Path, target: Path) -> None:
    """Put `new` in place of `target`: a rename, after moving an older `target` aside (a folder cannot be
    replaced by one rename)."""
    old = target.with_name(target.name + ".old" + INCOMPLETE)
    shutil.rmtree(old, ignore_errors=True)
    if target.is_dir() and not target.is_symlink():
        target.rename(old)
    elif target.exists() or target.is_symlink():
        target.unlink()
    new.rename(target)
    fsync_dir(target.parent)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)


def remove_path(path: Path) -> None:
    """Remove an output, a file or a `save_to_disk` folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
