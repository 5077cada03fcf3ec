"""docs/job-file.md is what the settings' own declarations say: one definition per setting, no page kept by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvbatch.jobs.reference import job_file_reference
from kvbatch.jobs.spec import EngineSpec
from kvbatch.runner.config import EngineConfig, SamplingParams

PAGE = Path(__file__).resolve().parents[2] / "docs" / "job-file.md"


def test_the_checked_in_page_is_the_generated_one() -> None:
    assert PAGE.read_text() == job_file_reference(), (
        "docs/job-file.md is stale: run `python -m kvbatch.jobs.reference > docs/job-file.md`"
    )


def test_every_engine_and_sampling_setting_has_a_doc_and_a_row() -> None:
    page = job_file_reference()
    for cls in (EngineConfig, SamplingParams):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            assert f"| `{f.name}` |" in page or f.name == "model"


def test_the_engine_section_is_the_engine_config_less_the_model() -> None:
    names = [f.name for f in dataclasses.fields(EngineSpec)]
    assert names == [f.name for f in dataclasses.fields(EngineConfig) if f.name != "model"] + ["offline"]


def test_the_engine_section_shows_the_engine_defaults() -> None:
    # A field left out of `engine:` takes EngineConfig's default: the page shows that value, not "unset".
    page = job_file_reference()
    assert "| `block_size` | integer \\| null | `16` |" in page
    assert "| `kv_cache_gib` | number \\| null | `2.0` |" in page
    assert "| `cuda_graphs` | bool \\| null | `true` |" in page
    assert "| `max_model_len` | integer \\| null | unset |" in page  # no engine default: its doc says what holds


def test_a_mapping_setting_shows_an_empty_mapping_as_its_default() -> None:
    # logit_bias is held as (id, bias) pairs: its empty default was shown as `[]` beside "mapping of integer: number"
    assert "| `logit_bias` | mapping of integer: number | `{}` |" in job_file_reference()
