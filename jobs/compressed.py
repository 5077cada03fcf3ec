"""Compressed JSON lines files (`data.jsonl.gz`, `.zst`, `.bz2`, `.lz4`), decompressed as they are read.

Dataset dumps often come compressed, and `datasets`, pandas and Spark read them as they are. A JSON lines or OpenAI
Batch file is read through pyarrow's decompressing stream, line by line as a plain file is (bounded memory, each bad
line its row's error). The codec is the file's last suffix, or, under a plain name (a download saved as
`in.jsonl`), its first bytes. Parquet and Arrow files compress inside themselves, and archives (.zip, .7z) hold
files rather than one stream: those are refused, saying what to do. A Ray run opens its files through pyarrow's
filesystem, which decompresses by the suffix alone.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

# A suffix's codec, as pyarrow names it: the codecs kvbatch decompresses.
STREAM_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
# Compressed or archived files kvbatch does not open: their bytes taken as text are at best one junk row.
OTHER_COMPRESSIONS = {".xz": "xz", ".zip": "zip", ".7z": "7z"}
# First bytes of each, for a compressed file under a plain name: JSON lines are text, and Parquet and Arrow files
# start with their own magic, so none of these begins a file kvbatch reads as it is.
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bz2",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
    b"\xfd7zXZ\x00": "xz",
    b"PK\x03\x04": "zip",
    b"7z\xbc\xaf\x27\x1c": "7z",
}
_READ_BUFFER = 1 << 20


def compression(path: Path) -> str | None:
    """The codec `path` is compressed with (by its suffix, else its first bytes), or None: a plain file, a folder,
    or a file that cannot be opened (its reader says why)."""
    suffix = path.suffix.lower()
    if suffix in STREAM_CODECS or suffix in OTHER_COMPRESSIONS:
        return STREAM_CODECS.get(suffix) or OTHER_COMPRESSIONS[suffix]
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def data_suffix(path: Path | str) -> str:
    """The suffix that names a file's data format, under a compression suffix: `.jsonl` for `train.jsonl.gz`."""
    path = Path(path)
    if path.suffix.lower() in STREAM_CODECS or path.suffix.lower() in OTHER_COMPRESSIONS:
        return Path(path.stem).suffix.lower()
    return path.suffix.lower()


def open_bytes(path: Path) -> BinaryIO:
    """`path` opened for reading its bytes, decompressed where it is compressed with a codec of STREAM_CODECS
    (the caller refuses the others: see `compression`)."""
    codec = compression(path)
    if codec is None or codec not in STREAM_CODECS.values():
        return open(path, "rb")
    return io.BufferedReader(pa.input_stream(str(path), compression=codec), _READ_BUFFER)  # type: ignore[arg-type]
