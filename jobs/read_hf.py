"""Hugging Face `datasets` input: a `save_to_disk` folder, a folder of data files as a dataset repository lays
them out (`data/train-00000-of-00002.parquet`, `test/part.jsonl`: what `datasets` reads from a cloned or downloaded
repository, splits from the file names), or a dataset name found in the local HF cache.

`datasets` is an optional dependency (`pip install kvbatch[datasets]`). Names resolve offline only: a job never
starts a download (docs/security.md). Rows stream from the memory-mapped Arrow files in batches. A folder's split of
JSON lines files alone that `datasets` cannot convert (one bad line fails it whole) is read by the JSONL reader
instead, its files as `datasets` resolves them, so a bad line is its row's error (docs/bad-input.md).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from kvbatch.errors import InputError, SpecError

from .compressed import data_suffix
from .read_jsonl import open_jsonl_files
from .read_parquet import rows_of_batches
from .rows import Reader
from .spec import INPUT_EXTENSIONS, OTHER_DATA_FILES


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise InputError(
            "reading a Hugging Face dataset needs the `datasets` package: pip install 'kvbatch[datasets]'"
        ) from None
    return datasets


def open_hf(
    name: str,
    path: Path,
    split: str | None,
    columns: list[str],
    batch_rows: int,
    max_line_bytes: int,
    config: str | None = None,
) -> Reader:
    if path.is_file():
        raise SpecError(
            f"input.format hf reads a datasets folder or a dataset name, and {path} is a file; leave input.format "
            f"to auto, or name the file's own format (arrow, parquet, jsonl); {OTHER_DATA_FILES}",
            field="input.format",
        )
    datasets = _import_datasets()
    if path.is_dir() and saved_to_disk(path):
        if config is not None:  # else it would be ignored without a word
            raise SpecError(
                f"{path} is a dataset saved with save_to_disk, which holds one configuration; leave input.config out",
                field="input.config",
            )
        try:
            loaded = _load_from_disk(datasets, path)
        except (OSError, ValueError) as exc:  # OSError: a truncated or damaged Arrow file in the folder
            raise InputError(f"{path} is a dataset saved with save_to_disk, but cannot be read: {exc}") from None
    elif path.is_dir():
        split = _folder_split(datasets, path, split, config)
        try:
            loaded = _load_data_files(datasets, path, split, config)
        except InputError:
            # `datasets` fails a whole split on one bad line: a split of JSON lines alone is then read line by line,
            # as a JSONL file is, each bad line its row's error.
            reader = _json_lines_reader(datasets, path, split, config, max_line_bytes)
            if reader is None:
                raise
            return reader
    else:
        loaded = _load_cached(datasets, name, config)
    dataset = _pick_split(datasets, loaded, split, name)
    available = list(dataset.column_names)
    wanted = [c for c in dict.fromkeys(columns) if c in available]

    batches = iter(dataset.select_columns(wanted).with_format("arrow").iter(batch_size=batch_rows))
    return Reader(rows_of_batches(batches, path.name), len(dataset), available, dataset.features.arrow_schema)


def saved_to_disk(path: Path) -> bool:
    """Whether the folder is a `save_to_disk` Dataset (state.json) or DatasetDict (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_from_disk(datasets, path: Path):
    """datasets.load_from_disk, where a dataset of no rows, alone or as a DatasetDict's split, is one too:
    save_to_disk writes no data file for it, and load_from_disk fails on that with an IndexError."""
    splits = _saved_state(path / "dataset_dict.json").get("splits")
    if isinstance(splits, list) and any(_no_data_files(path / str(split)) for split in splits):
        return datasets.DatasetDict({split: _load_from_disk(datasets, path / split) for split in splits})
    if _no_data_files(path):
        info = datasets.DatasetInfo.from_directory(str(path))
        if info.features is None:
            raise ValueError(f"{path / 'dataset_info.json'} has no features")
        table = info.features.arrow_schema.empty_table()
        return datasets.Dataset(table, info=info, split=_saved_state(path / "state.json").get("_split"))
    return datasets.load_from_disk(str(path))


def _no_data_files(path: Path) -> bool:
    """Whether a save_to_disk Dataset folder lists no data files (a dataset of no rows)."""
    return _saved_state(path / "state.json").get("_data_files") == []


def _saved_state(file: Path) -> dict:
    """A save_to_disk folder's JSON file, or {} where it is missing or damaged (load_from_disk says why)."""
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _folder_split(datasets, path: Path, split: str | None, config: str | None) -> str:
    """The split of a folder of data files to read, as `datasets.load_dataset(folder)` reads it. Without
    input.split a folder of one split reads it, and one of several, or a split it does not have, is refused before
    any is converted (load_dataset copies a split into its Arrow cache)."""
    try:
        with _offline(datasets):
            # A folder whose README lists several configurations: get_dataset_split_names refuses to choose one,
            # in words that name load_dataset's argument, not the job's field.
            configs = datasets.get_dataset_config_names(str(path))
            if config is None and len(configs) > 1:
                raise _no_config_chosen(path.name, configs)
            if config is not None and config not in configs:
                raise SpecError(
                    f"{path.name} has no configuration {config!r} (configurations: {', '.join(configs)})",
                    field="input.config",
                )
            names = _split_names(datasets, path, config)
            if split is None and len(names) > 1:
                raise _no_split_chosen(path.name, names)
            if split is not None and split not in names:
                raise SpecError(f"{path.name} has no split {split!r} (splits: {', '.join(names)})", field="input.split")
            return split or names[0]
    except (SpecError, InputError):
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ValueError...)
        raise InputError(
            f"{path} is neither a dataset saved with save_to_disk nor a folder of data files `datasets` reads: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _split_names(datasets, path: Path, config: str | None) -> list[str]:
    """The splits `datasets.load_dataset(folder, config)` makes, from the names of its data files alone: for a folder
    whose file names say no split, `get_dataset_split_names` reads the first JSON file to infer its features, and a
    bad line there failed the job as "split names could not be parsed", where it is that row's error."""
    with tempfile.TemporaryDirectory() as cache:  # as in _json_lines_reader: no cached info of an earlier conversion
        builder = datasets.load_dataset_builder(str(path), config, cache_dir=cache)
    return [str(split) for split in builder.config.data_files or {}]


def _json_lines_reader(datasets, path: Path, split: str, config: str | None, max_line_bytes: int) -> Reader | None:
    """The split's files read by the JSONL reader, where `datasets` reads them all as JSON lines (see _json_files),
    in its order; else None."""
    try:
        with _offline(datasets), tempfile.TemporaryDirectory() as cache:
            # The builder load_dataset used, with the data files it resolved: nothing is read or converted. In a
            # cache of its own: an earlier conversion's cached info would give it the features found then.
            files = _json_files(datasets.load_dataset_builder(str(path), config, cache_dir=cache), split)
    except Exception:  # datasets raises many types; the conversion's error says what is wrong
        return None
    return open_jsonl_files(files, path, max_line_bytes) if files is not None else None


# What a builder config holds besides its reading options: its name and files.
_NOT_OPTIONS = frozenset({"name", "version", "data_dir", "data_files", "description"})


def _json_files(builder, split: str) -> list[Path] | None:
    """The split's files where `datasets` reads them with its JSON builder as they are: JSON lines files (compressed
    ones too: train.jsonl.gz), and no reading option (a README's `field`, `encoding` or `features`) that the JSONL
    reader would not follow; else None."""
    config = builder.config
    if builder.name != "json" or builder.info.features is not None:
        return None
    default = type(config)()
    if any(getattr(config, f.name) != getattr(default, f.name) for f in fields(config) if f.name not in _NOT_OPTIONS):
        return None
    files = [Path(file) for file in config.data_files[split]]
    return files if all(INPUT_EXTENSIONS.get(data_suffix(file)) == "jsonl" for file in files) else None


def _load_data_files(datasets, path: Path, split: str, config: str | None):
    """The split of a folder of data files, converted by `datasets.load_dataset(folder)`."""
    try:
        with _offline(datasets):
            return datasets.load_dataset(str(path), config, split=split)
    except Exception as exc:  # a data file that does not convert: a type that changes between files
        raise InputError(
            f"{path} is a folder of data files, but `datasets` cannot read its split {split!r}: {_reason(exc)}"
        ) from None


def folder_configs(path: Path) -> list[str]:
    """The configurations a folder of data files lists in its README (`configs:`), as `datasets.load_dataset(folder,
    config)` takes them (nothing is read or converted); [] where `datasets` is not installed or finds none."""
    return _folder_names(path, lambda datasets: datasets.get_dataset_config_names(str(path)))


def folder_splits(path: Path) -> list[str]:
    """The splits `datasets.load_dataset(folder)` finds in a folder of data files, from their names (nothing is
    read or converted); [] where `datasets` is not installed or finds no data files there."""
    return _folder_names(path, lambda datasets: _split_names(datasets, path, None))


def _folder_names(path: Path, lister: Callable[[Any], list[str]]) -> list[str]:
    """What `lister(datasets)` lists, offline; [] where `datasets` is not installed or lists nothing."""
    try:
        import datasets
    except ImportError:
        return []
    try:
        with _offline(datasets):
            return list(lister(datasets))
    except Exception:  # datasets raises many types; the reader that follows says what is wrong with the files
        return []


def _reason(exc: BaseException) -> str:
    """The exception and the one it was raised from: `datasets` wraps a data file's own error (pyarrow's, naming
    the row) in a DatasetGenerationError that says only that one occurred."""
    cause = exc.__cause__
    return f"{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")


@contextlib.contextmanager
def _offline(datasets) -> Iterator[None]:
    """`datasets` offline for the calls inside: a job never starts a download."""
    previous = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = previous


def _load_cached(datasets, name: str, config: str | None):
    # Offline for this lookup only: a name must already be in the local cache. Every split is opened (memory-mapped,
    # already prepared), so _pick_split names a split the dataset lacks as such.
    try:
        with _offline(datasets):
            return datasets.load_dataset(name, config)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError...)
        which = f"configuration {config!r} of " if config is not None else ""
        raise InputError(
            f"input {name!r} is neither a local file or folder nor {which}a dataset in the local Hugging Face cache "
            f"(kvbatch never downloads inputs; input.config chooses one of a dataset's configurations): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _no_split_chosen(name: str, splits: list[str]) -> SpecError:
    # `kvbatch run` has no --split option: its jobs take one through --set, as every field.
    return SpecError(
        f"{name} has splits {', '.join(splits)}; choose one with input.split (on the command line: --set "
        f"input.split={splits[0]}, or kvbatch generate's --split {splits[0]})",
        field="input.split",
    )


def _no_config_chosen(name: str, configs: list[str]) -> SpecError:
    return SpecError(
        f"{name} has configurations {', '.join(configs)}; choose one with input.config (on the command line: --set "
        f"input.config={configs[0]}, or kvbatch generate's --config {configs[0]})",
        field="input.config",
    )


def _pick_split(datasets, loaded, split: str | None, name: str):
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) == 1:
                return next(iter(loaded.values()))
            raise _no_split_chosen(name, list(loaded))
        if split not in loaded:
            raise SpecError(f"{name} has no split {split!r} (splits: {', '.join(loaded)})", field="input.split")
        return loaded[split]
    own = getattr(loaded, "split", None)  # a saved Dataset may still know which split it was
    if split is not None and own is None:  # else input.split would be ignored without a word
        raise SpecError(
            f"{name} is one dataset, not a DatasetDict, and names no split; leave input.split out",
            field="input.split",
        )
    if split is not None and str(own) != split:
        raise SpecError(
            f"{name} is one dataset (split {str(own)!r}), not split {split!r}; leave input.split out",
            field="input.split",
        )
    return loaded
