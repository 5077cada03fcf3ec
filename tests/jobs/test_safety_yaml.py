"""Configs load safely: no Python tags (nothing is ever constructed or run), no custom tags silently dropped, no
alias bombs, and unknown or misspelt fields are errors naming the field and the line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbatch.cli import _parse_sets
from kvbatch.errors import SpecError
from kvbatch.jobs.spec import load_jobs_file

JOB = "jobs:\n  - name: a\n    input: {path: x.jsonl}\n"


def load_error(tmp_path: Path, text: str) -> str:
    (tmp_path / "jobs.yaml").write_text(text)
    with pytest.raises(SpecError) as caught:
        load_jobs_file(tmp_path / "jobs.yaml")
    return str(caught.value).replace(f"{tmp_path}/", "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            JOB + "    model: !!python/object/apply:os.system ['touch {marker}']\n",
            "jobs.yaml:4: jobs[0].model: unsupported YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'; "
            "job files hold plain values only",
        ),
        (
            "jobs:\n  - name: !!python/name:os.system\n    input: {path: x.jsonl}\n",
            "jobs.yaml:2: jobs[0].name: unsupported YAML value: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/name:os.system'",
        ),
        (
            JOB + "    prompt: !!python/object/new:builtins.dict {}\n",
            "jobs.yaml:4: jobs[0].prompt: unsupported YAML tag 'tag:yaml.org,2002:python/object/new:builtins.dict'",
        ),
        (
            JOB + "    sampling: !custom {temperature: 0.5}\n",
            "jobs.yaml:4: jobs[0].sampling: unsupported YAML tag '!custom'",
        ),
    ],
    ids=["object-apply", "python-name", "object-new", "custom-tag"],
)
def test_tags_are_refused_and_nothing_runs(tmp_path: Path, text: str, message: str) -> None:
    marker = tmp_path / "ran"
    assert load_error(tmp_path, text.replace("{marker}", str(marker))).startswith(message)
    assert not marker.exists()


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    layers = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10**9 values if expanded
        layers.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = "\n".join(layers) + "\n" + JOB
    assert "the job file expands to more than 100000 values (nested YAML aliases?)" in load_error(tmp_path, text)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "    engine:\n      trust_remote: true\n",
            "jobs.yaml:5: jobs[0].engine.trust_remote: unknown field (did you mean 'trust_remote_code'?",
        ),
        (
            "    prompt:\n      allow_special_token: true\n",
            "jobs.yaml:5: jobs[0].prompt.allow_special_token: unknown field (did you mean 'allow_special_tokens'?",
        ),
        ("    outptu: {path: y.arrow}\n", "jobs.yaml:4: jobs[0].outptu: unknown field (did you mean 'output'?"),
    ],
)
def test_unknown_fields_name_field_and_line(tmp_path: Path, extra: str, message: str) -> None:
    assert load_error(tmp_path, JOB + extra).startswith(message)


def test_command_line_values_use_the_safe_loader_too() -> None:
    with pytest.raises(
        SpecError, match=r"--set model:1: unsupported YAML tag .*python/object/apply:os.system.*plain values only"
    ):
        _parse_sets(["model=!!python/object/apply:os.system ['true']"])
    with pytest.raises(SpecError, match="--set sampling:1: top_k: duplicate field"):
        _parse_sets(["sampling={top_k: 1, top_k: 2}"])
    assert _parse_sets(["sampling.temperature=0.5"]) == {"sampling.temperature": 0.5}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "    prompt: {system: 2001-02-30}\n",
            "jobs.yaml:4: jobs[0].prompt.system: unsupported YAML value '2001-02-30'",
        ),
        ('    sort_window: !!int "abc"\n', "jobs.yaml:4: jobs[0].sort_window: unsupported YAML value 'abc'"),
        ('    sampling: {temperature: !!float "x"}\n', "jobs.yaml:4: jobs[0].sampling.temperature: unsupported YAML"),
        ("    sort_window: " + "9" * 5000 + "\n", "jobs.yaml:4: jobs[0].sort_window: unsupported YAML value '999"),
        ("    prompt: {system: a\x01b}\n", "jobs.yaml:4: YAML error: the character '\\x01' is not allowed"),
        ("    prompt: {system: a\ufffeb}\n", "jobs.yaml:4: YAML error: the character '\\ufffe' is not allowed"),
        ("    keep_columns: " + "[" * 3000 + "]" * 3000 + "\n", "jobs.yaml: YAML error: nested too deeply"),
    ],
    ids=["bad-date", "int-tag", "float-tag", "int-over-4300-digits", "control-char", "noncharacter", "deep"],
)
def test_values_yaml_cannot_build_are_spec_errors(tmp_path: Path, extra: str, message: str) -> None:
    assert load_error(tmp_path, JOB + extra).startswith(message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # YAML 1.1 (PyYAML's) reads these as 10 and 90, YAML 1.2 (and most other readers) as 12 and text
        ("    sampling: {max_new_tokens: 012}\n", "jobs.yaml:4: jobs[0].sampling.max_new_tokens: '012' reads as 10"),
        ("    sampling: {seed: -0012}\n", "jobs.yaml:4: jobs[0].sampling.seed: '-0012' reads as -10"),
        ("    sampling: {max_new_tokens: 1:30}\n", "jobs.yaml:4: jobs[0].sampling.max_new_tokens: '1:30' reads as 90"),
        ("    progress_seconds: 1:30.5\n", "jobs.yaml:4: jobs[0].progress_seconds: '1:30.5' reads as 90.5"),
        ("    sampling: {stop: [10:30]}\n", "jobs.yaml:4: jobs[0].sampling.stop[0]: '10:30' reads as 630"),
    ],
    ids=["octal", "negative-octal", "base-60", "base-60-float", "base-60-text"],
)
def test_numbers_yaml_versions_read_apart_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    assert load_error(tmp_path, JOB + extra).startswith(message)


def test_numbers_every_yaml_reads_alike_load(tmp_path: Path) -> None:
    text = JOB + "    sampling: {max_new_tokens: 0x10, seed: 0, top_k: 1_000, temperature: 0.5, top_p: 0.05}\n"
    (tmp_path / "jobs.yaml").write_text(text)
    (job,) = load_jobs_file(tmp_path / "jobs.yaml").jobs
    sampling = job.sampling
    assert (sampling.max_new_tokens, sampling.seed, sampling.top_k, sampling.top_p) == (16, 0, 1000, 0.05)
    assert _parse_sets(["sampling.seed='0012'"]) == {"sampling.seed": "0012"}
    with pytest.raises(SpecError, match="--set sampling.seed:1: '0012' reads as 10"):
        _parse_sets(["sampling.seed=0012"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # documented values that YAML 1.1 reads as booleans: the error said only "got bool False"
        ("    progress: off\n", "jobs[0].progress: must be one of 'auto', 'bar', 'lines', 'off', got bool False (YAML"),
        ("    parallel: {shard: off}\n", "jobs[0].parallel.shard: expected a string, got bool False (YAML"),
        ("    prompt: {system: yes}\n", "jobs[0].prompt.system: expected a string, got bool True (YAML"),
    ],
)
def test_words_yaml_reads_as_booleans_say_to_quote_them(tmp_path: Path, extra: str, message: str) -> None:
    error = load_error(tmp_path, JOB + extra)
    assert message in error and "quote a word meant as text" in error


_AS_TRUE = "reads as true in YAML 1.1, which reads job files, but as text in YAML 1.2 and JSON: quote it for text"
_AS_TEXT = "reads as text in YAML 1.1, which reads job files, but as a number in YAML 1.2 and JSON: quote it for text"


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (
            "      structured_outputs:\n        json: {type: object, properties: {a: {enum: [yes, no]}}}\n",
            "jobs.yaml:6: jobs[0].sampling.structured_outputs.json.properties.a.enum[0]: "
            f"'yes' {_AS_TRUE} ('yes'), or write true",
        ),
        (
            "      structured_outputs: {choice: [Yes, 'no']}\n",
            f"jobs.yaml:5: jobs[0].sampling.structured_outputs.choice[0]: 'Yes' {_AS_TRUE} ('Yes'), or write true",
        ),
        (
            "      structured_outputs: {json: {type: object, additionalProperties: OFF}}\n",
            "jobs.yaml:5: jobs[0].sampling.structured_outputs.json.additionalProperties: 'OFF' reads as false in YAML "
            "1.1, which reads job files, but as text in YAML 1.2 and JSON: quote it for text ('OFF'), or write false",
        ),
        (
            "      structured_outputs: {json: {enum: [1e3, 2]}}\n",
            "jobs.yaml:5: jobs[0].sampling.structured_outputs.json.enum[0]: "
            f"'1e3' {_AS_TEXT} ('1e3'), or write the number as 1.0e+3",
        ),
        (
            "      structured_outputs: {json: {type: number, maximum: 2.5E6}}\n",
            "jobs.yaml:5: jobs[0].sampling.structured_outputs.json.maximum: "
            f"'2.5E6' {_AS_TEXT} ('2.5E6'), or write the number as 2.5e+6",
        ),
    ],
)
def test_a_schema_word_or_number_yaml_1_1_misreads_is_refused(tmp_path: Path, extra: str, error: str) -> None:
    """A schema takes any JSON, so no type check caught what YAML 1.1 (PyYAML) reads otherwise than YAML 1.2 and
    JSON: `enum: [yes, no]` loaded as [true, false], and a labelling job wrote {"a": true} where "yes" was meant;
    `1e3` loaded as the text "1e3". The job file is refused at the value's line; quoted or written as JSON, it
    loads as meant."""
    assert load_error(tmp_path, JOB + "    sampling:\n" + extra) == error
    meant = "      structured_outputs:\n        json: {enum: ['yes', 'no', 1.0e+3, true, false]}\n"
    (tmp_path / "jobs.yaml").write_text(JOB + "    sampling:\n" + meant)
    (job,) = load_jobs_file(tmp_path / "jobs.yaml").jobs
    assert job.sampling.structured_outputs.json == '{"enum":["yes","no",1000.0,true,false]}'


def test_an_exponent_without_a_dot_says_how_yaml_reads_it(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 as text (1.0e-3 is a number): "expected a finite number, got str '1e-3'" said no more
    error = load_error(tmp_path, JOB + "    sampling: {min_p: 1e-3}\n")
    assert "jobs[0].sampling.min_p: expected a finite number, got str '1e-3' (YAML reads an exponent" in error
    assert "write 1.0e-3" in error
    (tmp_path / "jobs.yaml").write_text(JOB + "    sampling: {min_p: 1.0e-3}\n")
    assert load_jobs_file(tmp_path / "jobs.yaml").jobs[0].sampling.min_p == 0.001
    error = load_error(tmp_path, JOB + "    sampling: {max_new_tokens: 1e3}\n")
    assert "got str '1e3' (YAML reads an exponent without a dot or a sign as text: write 1000)" in error
    # An exponent without a sign is text too: the advice was `write 1.0e3`, which YAML reads as text again, and
    # 1.5e3 got no advice at all. Each now says what YAML reads as the number.
    for written, spelt in (("1e3", "1.0e+3"), ("1.5e3", "1.5e+3"), (".5e3", ".5e+3")):
        error = load_error(tmp_path, JOB + f"    sampling: {{temperature: {written}}}\n")
        assert f"got str '{written}' (YAML reads an exponent without a dot or a sign as text: write {spelt})" in error
        (tmp_path / "jobs.yaml").write_text(JOB + f"    sampling: {{temperature: {spelt}}}\n")
        assert load_jobs_file(tmp_path / "jobs.yaml").jobs[0].sampling.temperature == float(written)


def test_an_alias_inside_itself_is_refused(tmp_path: Path) -> None:
    assert load_error(tmp_path, "jobs: &a\n  - *a\n").startswith("jobs.yaml: YAML error: nested too deeply")


def test_command_line_values_that_yaml_cannot_build_are_spec_errors() -> None:
    with pytest.raises(SpecError, match=r"--set prompt.system:1: unsupported YAML value '2001-02-30'"):
        _parse_sets(["prompt.system=2001-02-30"])
    with pytest.raises(SpecError, match=r"--set prompt.system:1: YAML error: the character '\\x01'"):
        _parse_sets(["prompt.system=a\x01b"])
    with pytest.raises(SpecError, match="nested too deeply"):
        _parse_sets(["prompt.chat_template_kwargs=" + "[" * 3000 + "]" * 3000])
