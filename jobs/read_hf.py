"""Hugging Face `datasets` input: a `save_to_disk` folder, or a dataset name found in the local HF cache.

`datasets` is an optional dependency (`pip install kvbatch[datasets]`). Names resolve offline only: a job never
starts a download (docs/security.md). Rows stream from the memory-mapped Arrow files in batches.
"""

from __future__ import annotations

from pathlib import Path

from kvbatch.errors import InputError, SpecError

from .read_parquet import rows_of_batches
from .rows import Reader


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise InputError(
            "reading a Hugging Face dataset needs the `datasets` package: pip install 'kvbatch[datasets]'"
        ) from None
    return datasets


def open_hf(name: str, path: Path, split: str | None, columns: list[str], batch_rows: int) -> Reader:
    if path.is_file():
        raise SpecError(
            f"input.format hf reads a datasets folder or a dataset name, and {path} is a file; leave input.format "
            "to auto, or name the file's own format (arrow, parquet, jsonl)",
            field="input.format",
        )
    datasets = _import_datasets()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as exc:  # OSError: a truncated or damaged Arrow file in the folder
            raise InputError(f"{path} is not a dataset saved with save_to_disk, or is damaged: {exc}") from None
    else:
        loaded = _load_cached(datasets, name, split)
    dataset = _pick_split(datasets, loaded, split, name)
    available = list(dataset.column_names)
    wanted = [c for c in dict.fromkeys(columns) if c in available]

    batches = iter(dataset.select_columns(wanted).with_format("arrow").iter(batch_size=batch_rows))
    return Reader(rows_of_batches(batches, path.name), len(dataset), available, dataset.features.arrow_schema)


def _load_cached(datasets, name: str, split: str | None):
    # Offline for this lookup only: a name must already be in the local cache.
    previous = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError...)
        raise InputError(
            f"input {name!r} is neither a local file or folder nor a dataset in the local Hugging Face cache "
            f"(kvbatch never downloads inputs): {type(exc).__name__}: {exc}"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = previous


def _pick_split(datasets, loaded, split: str | None, name: str):
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) == 1:
                return next(iter(loaded.values()))
            raise SpecError(
                f"{name} has splits {', '.join(loaded)}; choose one with input.split (--split on the command line)",
                field="input.split",
            )
        if split not in loaded:
            raise SpecError(f"{name} has no split {split!r} (splits: {', '.join(loaded)})", field="input.split")
        return loaded[split]
    own = getattr(loaded, "split", None)  # a saved Dataset may still know which split it was
    if split is not None and own is not None and str(own) != split:
        raise SpecError(
            f"{name} is one dataset (split {str(own)!r}), not split {split!r}; leave input.split out",
            field="input.split",
        )
    return loaded
