"""Job files: every field, precedence (command line > job > defaults: > built-in), and errors naming field and line."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest

from kvbatch.errors import SpecError
from kvbatch.jobs.spec import (
    EngineSpec,
    InputSpec,
    JobSpec,
    OutputSpec,
    PromptSpec,
    input_format,
    input_path,
    job_from_dict,
    load_jobs_file,
    output_dir,
    output_format,
    output_path,
)
from kvbatch.runner.config import SamplingParams

EVERY_FIELD = """\
defaults:
  model: default
  sampling:
    max_new_tokens: 64
jobs:
  - name: full
    model: /models/tiny
    input:
      path: data/in
      format: hf
      split: train
      limit: 10
      max_line_bytes: 4096
      batch_rows: 8
      config: main
    prompt:
      column: question
      system: Be brief.
      chat_template: false
      allow_special_tokens: true
    id_column: id
    keep_columns: [topic, level]
    sampling:
      max_new_tokens: 12
      temperature: 0.5
      top_p: 0.9
      top_k: 40
      min_p: 0.05
      repetition_penalty: 1.1
      seed: 7
      stop: ["###", "END"]
      stop_token_ids: [2, 3]
      n: 2
      logprobs: true
      ignore_eos: true
    output:
      path: results/full.parquet
      format: auto
      mode: overwrite
      part_rows: 100
      part_seconds: 5
    output_dir: out
    engine:
      device: cpu
      dtype: float32
      block_size: 32
      max_num_seqs: 4
      max_num_batched_tokens: 256
      kv_cache_gib: 0.5
      gpu_memory_utilization: 0.8
      num_blocks_override: 64
      policy: reserve
      attention_backend: torch
      max_model_len: 1024
      trust_remote_code: false
      allow_pickle: false
      allow_download: false
      cuda_graphs: false
      seed: 3
    sort_window: 16
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load_one(tmp_path: Path, text: str, overrides: dict | None = None) -> JobSpec:
    (job,) = load_jobs_file(write(tmp_path, text), overrides).jobs
    return job


def spec_error(tmp_path: Path, text: str, overrides: dict | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_jobs_file(write(tmp_path, text), overrides)
    return info.value


def test_every_field_is_read(tmp_path: Path) -> None:
    job = load_one(tmp_path, EVERY_FIELD)
    assert job == JobSpec(
        name="full",
        model="/models/tiny",
        input=InputSpec("data/in", "hf", "train", 10, 4096, 8, "main"),
        prompt=PromptSpec(column="question", system="Be brief.", chat_template=False, allow_special_tokens=True),
        id_column="id",
        keep_columns=("topic", "level"),
        sampling=SamplingParams(
            max_new_tokens=12,
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            seed=7,
            stop=("###", "END"),
            stop_token_ids=(2, 3),
            n=2,
            logprobs=True,
            ignore_eos=True,
        ),  # fmt: skip
        output=OutputSpec("results/full.parquet", "auto", "overwrite", 100, 5.0),
        output_dir="out",
        engine=EngineSpec(
            "cpu", "float32", 32, 4, 256, 0.5, 0.8, 64, "reserve", "torch", 1024, False, False, False, False, 3
        ),
        sort_window=16,
        base_dir=str(tmp_path.resolve()),
    )
    assert output_format(job) == "parquet"
    assert output_path(job) == tmp_path.resolve() / "out" / "results" / "full.parquet"
    assert job.engine.settings()["num_blocks_override"] == 64


def test_extensions_are_read_whatever_their_case(tmp_path: Path) -> None:
    # DATA.JSONL and OUT.Parquet, as Windows tools name files, were refused: "cannot tell the input format"
    (tmp_path / "DATA.JSONL").write_text('{"prompt": "hi"}\n')
    job = job_from_dict(
        {"name": "a", "input": {"path": "DATA.JSONL"}, "output": {"path": "OUT.Parquet"}}, base_dir=str(tmp_path)
    )
    assert (input_format(job), output_format(job)) == ("jsonl", "parquet")
    assert output_path(job).name == "OUT.Parquet"


def test_built_in_defaults(tmp_path: Path) -> None:
    job = load_one(tmp_path, "jobs:\n  - name: a\n    input: {path: in.parquet}\n")
    assert (job.model, job.prompt, job.sampling, job.output, job.engine) == (
        "default",
        PromptSpec(),
        SamplingParams(),
        OutputSpec(),
        EngineSpec(),
    )
    assert (job.input.format, job.input.limit, job.id_column, job.keep_columns, job.output_dir, job.sort_window) == (
        "auto",
        None,
        None,
        (),
        "out",
        1024,
    )
    assert input_format(job) == "parquet" and output_format(job) == "arrow"
    assert output_path(job).name == "a.arrow"
    assert job.engine.settings() == {}


def test_precedence_command_line_over_job_over_defaults(tmp_path: Path) -> None:
    text = """\
    defaults:
      model: from-defaults
      sampling: {max_new_tokens: 10, temperature: 0.3, top_k: 5}
    jobs:
      - name: a
        input: {path: in.jsonl}
        sampling: {temperature: 0.6}
      - name: b
        input: {path: in.jsonl}
        model: from-job
    """
    a, b = load_jobs_file(write(tmp_path, text), {"sampling.top_k": 9, "model": None}).jobs
    # a: temperature from the job, max_new_tokens from defaults, top_k from the command line, the rest built in
    assert (a.model, a.sampling.max_new_tokens, a.sampling.temperature, a.sampling.top_k, a.sampling.top_p) == (
        "from-defaults",
        10,
        0.6,
        9,
        1.0,
    )
    assert (b.model, b.sampling.temperature, b.sampling.top_k) == ("from-job", 0.3, 9)
    (c,) = load_jobs_file(write(tmp_path, text), {"model": "from-cli"}).select(["b"])
    assert c.model == "from-cli"


def test_a_later_set_of_a_whole_section_keeps_an_earlier_field_of_it(tmp_path: Path) -> None:
    # --set engine.device=cpu --set 'engine={seed: 1}': the mapping replaced the field set before it, silently
    overrides = {"engine.device": "cpu", "engine": {"seed": 1}, "sampling.temperature": 0.5, "sampling": {"top_k": 3}}
    job = load_one(tmp_path, "jobs:\n  - name: a\n    input: {path: in.jsonl}\n", overrides)
    assert (job.engine.device, job.engine.seed, job.sampling.temperature, job.sampling.top_k) == ("cpu", 1, 0.5, 3)
    overrides = {"engine": {"seed": 1}, "engine.device": "cpu"}
    job = load_one(tmp_path, "jobs:\n  - name: a\n    input: {path: in.jsonl}\n", overrides)
    assert (job.engine.device, job.engine.seed) == ("cpu", 1)
    assert overrides == {"engine": {"seed": 1}, "engine.device": "cpu"}  # the caller's values are left as given


def test_a_jobs_prompt_source_replaces_the_defaults(tmp_path: Path) -> None:
    """A row becomes a prompt one way: a job's template over `defaults:`' column was refused as setting both, unless
    the job wrote `column: null`; so was --set prompt.messages_column over a job's column. The later one wins, as a
    constraint does; two in one place are still refused."""
    text = """\
        defaults:
          prompt: {column: question, system: Be brief.}
        jobs:
          - name: a
            input: {path: in.jsonl}
            prompt: {template: "Q: {question}"}
          - name: b
            input: {path: in.jsonl}
        """
    a, b = load_jobs_file(write(tmp_path, text)).jobs
    assert (a.prompt.column, a.prompt.template, a.prompt.system) == (None, "Q: {question}", "Be brief.")
    assert (b.prompt.column, b.prompt.template) == ("question", None)
    a, b = load_jobs_file(write(tmp_path, text), {"prompt.messages_column": "chat"}).jobs
    assert {(j.prompt.column, j.prompt.messages_column, j.prompt.template) for j in (a, b)} == {(None, "chat", None)}
    both = text.replace('{template: "Q: {question}"}', '{template: "Q: {question}", messages_column: chat}')
    assert "set only one of column, messages_column, template" in spec_error(tmp_path, both).message
    job = job_from_dict(
        {"name": "g", "input": {"path": "in.jsonl"}, "prompt": {"template": "{x}"}}, under={"prompt.column": "q"}
    )
    assert (job.prompt.column, job.prompt.template) == (None, "{x}")


def test_a_jobs_constraint_replaces_the_defaults_whole(tmp_path: Path) -> None:
    # Merged key by key, the job's schema took the defaults' properties too, and a job's choice beside the
    # defaults' regex was two constraints
    text = """\
    defaults:
      sampling:
        structured_outputs:
          json: {type: object, properties: {name: {type: string}}, required: [name]}
    jobs:
      - name: a
        input: {path: in.jsonl}
        sampling:
          structured_outputs:
            json: {type: object, properties: {age: {type: integer}}, required: [age]}
      - name: b
        input: {path: in.jsonl}
        sampling: {structured_outputs: {choice: [red, blue]}}
    """
    a, b = load_jobs_file(write(tmp_path, text)).jobs
    schema = '{"type":"object","properties":{"age":{"type":"integer"}},"required":["age"]}'
    assert a.sampling.structured_outputs.json == schema
    assert b.sampling.structured_outputs.choice == ("red", "blue") and b.sampling.structured_outputs.json is None
    (c, _) = load_jobs_file(write(tmp_path, text), {"sampling.structured_outputs": {"regex": "[0-9]+"}}).jobs
    assert (c.sampling.structured_outputs.regex, c.sampling.structured_outputs.json) == ("[0-9]+", None)


def test_a_jobs_logit_bias_replaces_the_defaults_whatever_its_spelling(tmp_path: Path) -> None:
    # As a list it replaced the defaults', as a mapping it was merged into them: {} could not clear them
    text = """\
    defaults:
      sampling: {logit_bias: {5: -100}}
    jobs:
      - {name: mapping, input: {path: in.jsonl}, sampling: {logit_bias: {6: 2}}}
      - {name: pairs, input: {path: in.jsonl}, sampling: {logit_bias: [[6, 2]]}}
      - {name: cleared, input: {path: in.jsonl}, sampling: {logit_bias: {}}}
      - {name: kept, input: {path: in.jsonl}}
    """
    jobs = load_jobs_file(write(tmp_path, text)).jobs
    assert [job.sampling.logit_bias for job in jobs] == [((6, 2.0),), ((6, 2.0),), (), ((5, -100.0),)]
    (job, *_) = load_jobs_file(write(tmp_path, text), {"sampling.logit_bias": {7: 1}}).jobs
    assert job.sampling.logit_bias == ((7, 1.0),)


@pytest.mark.parametrize(
    ("text", "where", "field", "words"),
    [
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling:\n      temprature: 0.5\n",
            ":5",
            "jobs[0].sampling.temprature",
            "did you mean 'temperature'",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    max_tokens: 5\n",
            ":4",
            "jobs[0].max_tokens",
            "unknown field",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    smapling:\n      temperature: 0.5\n",
            ":4",
            "jobs[0].smapling",
            "did you mean 'sampling'",
        ),
        (
            "defaults:\n  sampling: {max_new_token: 5}\njobs:\n  - name: a\n    input: {path: x.jsonl}\n",
            ":2",
            "defaults.sampling.max_new_token",
            "did you mean 'max_new_tokens'",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling:\n      max_new_tokens: lots\n",
            ":5",
            "jobs[0].sampling.max_new_tokens",
            "expected an integer, got str 'lots'",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling: {temperature: -1}\n",
            ":4",
            "jobs[0].sampling.temperature",
            "must be >= 0",
        ),
        (  # a row may ask at most 128 samples; the job had no bound, and one job's n held every row up
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling: {n: 129}\n",
            ":4",
            "jobs[0].sampling.n",
            "must be <= 128, got 129",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    prompt: {chat_template: maybe}\n",
            ":4",
            "jobs[0].prompt.chat_template",
            "expected true or false",
        ),
        (  # with the template off, the raw text goes to the model: the tools were silently dropped
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    prompt:\n"
            "      chat_template: false\n      tools_column: t\n",
            ":6",
            "jobs[0].prompt.tools_column",
            "is given to the chat template, which prompt.chat_template: false turns off",
        ),
        (  # a job file's ray_address without runner: ray ran the job locally, with no word of it
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    parallel: {ray_address: auto}\n",
            ":4",
            "jobs[0].parallel.ray_address",
            "is for runner: ray, and this job runs locally (runner: local)",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    parallel: {ray_actors: 4}\n",
            ":4",
            "jobs[0].parallel.ray_actors",
            "is for runner: ray, and this job runs locally (runner: local)",
        ),
        (  # refused only as the job's turn came, after the jobs before it had run (data and tensor: at load)
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    runner: ray\n    parallel: {shard: 0/2}\n",
            ":5",
            "jobs[0].parallel.shard",
            "runner: ray spreads rows over its actors; leave parallel.shard unset",
        ),
        (  # refused naming `runner` at its line: the value to change is parallel.data's, lines below
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    runner: ray\n    parallel:\n"
            "      ray_actors: 2\n      data: 2\n",
            ":7",
            "jobs[0].parallel.data",
            "with runner: ray, scale with parallel.ray_actors (one engine per actor), not data/tensor",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    runner: ray\n    parallel:\n      tensor: 2\n",
            ":6",
            "jobs[0].parallel.tensor",
            "with runner: ray, scale with parallel.ray_actors (one engine per actor), not data/tensor",
        ),
        (  # an empty path named the job file's own folder as the adapter: every row failed as bad_adapter
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    adapter: ''\n",
            ":4",
            "jobs[0].adapter",
            "must not be empty",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    adapters: {tone: ' '}\n",
            ":4",
            "jobs[0].adapters.tone",
            "must not be empty",
        ),
        (  # no adapter_column and no `adapter`: every row ran on the base model, the adapters unread
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    adapters: {tone: t}\n",
            ":4",
            "jobs[0].adapters.tone",
            "no row can name adapter 'tone': set adapter_column",
        ),
        (  # `adapter` picks one of them for every row: the other was never run
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    adapter: tone\n    adapters:\n"
            "      tone: t\n      billing: b\n",
            ":7",
            "jobs[0].adapters.billing",
            "no row can name adapter 'billing': set adapter_column",
        ),
        (  # rolling scores read the text raw: the template file was never used
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    task: score_rolling\n"
            "    prompt: {chat_template_file: t.jinja}\n",
            ":5",
            "jobs[0].prompt.chat_template_file",
            "is given to the chat template, which task score_rolling does not apply",
        ),
        (  # the text was scored raw, the chat template asked for never applied
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    task: score_rolling\n"
            "    prompt: {chat_template: true}\n",
            ":5",
            "jobs[0].prompt.chat_template",
            "task score_rolling scores each text raw, without the chat template",
        ),
        (  # without task: score the job generated text for each prompt, its continuations unread
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    continuations_column: choices\n",
            ":4",
            "jobs[0].continuations_column",
            "is for task: score, and this job's task is generate",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    output: {format: csv}\n",
            ":4",
            "jobs[0].output.format",
            "must be one of",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    keep_columns: {a: 1}\n",
            ":4",
            "jobs[0].keep_columns",
            "expected a list",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    id_column: row\n",
            ":4",
            "jobs[0].id_column",
            "'row' is an output column name",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    engine: {device: gpu}\n",
            ":4",
            "jobs[0].engine.device",
            "must be auto, cpu, cuda or cuda:N",
        ),
        (
            "jobs:\n  - name: .a\n    input: {path: x.jsonl}\n",
            ":2",
            "jobs[0].name",
            "start with a letter, digit or '_'",
        ),
        (
            'jobs:\n  - name: a\n    input: {path: x.jsonl}\n    prompt: {system: "be \\ud800 brief"}\n',
            ":4",
            "jobs[0].prompt.system",
            "holds '\\ud800' at character 3: not text (a lone surrogate",
        ),
        ("jobs:\n  - name: a\n", ":2", "jobs[0]", "missing required field 'input'"),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n  - name: a\n    input: {path: y.jsonl}\n",
            ":4",
            "jobs[1].name",
            "duplicate job name",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl, split: test}\n",
            ":3",
            "jobs[0].input.split",
            "a split is for a datasets input, not a jsonl one",
        ),
        (  # two jobs, one output file: the second would refuse to resume the first's output, or overwrite it
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    output: {path: o.jsonl}\n"
            "  - name: b\n    input: {path: y.jsonl}\n    output: {path: o.jsonl}\n",
            ":5",
            "jobs[1]",
            "jobs 'a' and 'b' both write",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    prompt: {column: q, template: '{q}'}\n",
            ":4",
            "jobs[0].prompt",
            "set only one of",
        ),
        ("jobs:\n  - name: a b\n    input: {path: x.jsonl}\n", ":2", "jobs[0].name", "job names use letters"),
        ('jobs:\n  - name: a\n    model: ""\n    input: {path: x.jsonl}\n', ":3", "jobs[0].model", "must not be empty"),
        ("job:\n  - name: a\n", ":1", "job", "unknown top-level field"),
        # no column has an empty name; the engine's seed, as a row's, has 63 bits
        ('jobs:\n  - name: a\n    input: {path: x.jsonl}\n    id_column: ""\n', ":4", "jobs[0].id_column", "empty"),
        (
            'jobs:\n  - name: a\n    input: {path: x.jsonl}\n    keep_columns: [""]\n',
            ":4",
            "jobs[0].keep_columns[0]",
            "empty",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    engine: {seed: 18446744073709551616}\n",
            ":4",
            "jobs[0].engine.seed",
            "<= 18446744073709551615",
        ),
        (
            'jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling: {stop: ["###", ""]}\n',
            ":4",
            "jobs[0].sampling.stop[1]",
            "must not be an empty string",
        ),
        # An OpenAI Batch line's body is its request and custom_id its id: a column named here would be ignored
        *(
            (
                f"jobs:\n  - name: a\n    input: {{path: x.jsonl, format: openai}}\n    {text}\n",
                ":4",
                f"jobs[0].{field}",
                "an OpenAI Batch input has no columns",
            )
            for text, field in [
                ("prompt: {template: 'Q: {q}'}", "prompt.template"),
                ("prompt: {column: q}", "prompt.column"),
                ("prompt: {tools_column: functions}", "prompt.tools_column"),
                ("id_column: id", "id_column"),
                ("sampling_columns: [temperature]", "sampling_columns"),
                ("constraint_column: schema", "constraint_column"),
                ("adapter_column: lora", "adapter_column"),
            ]
        ),
        (  # a row keeps only what it holds of the body: messages, model, tools, chat_template_kwargs
            "jobs:\n  - name: a\n    input: {path: x.jsonl, format: openai}\n    keep_columns: [model, topic]\n",
            ":4",
            "jobs[0].keep_columns",
            "an OpenAI Batch input has no column 'topic': its rows hold each body's messages, model",
        ),
        (  # every row would fail with missing_column, after the model loaded
            "jobs:\n  - name: a\n    input: {path: x.jsonl, format: openai}\n    task: score\n",
            ":4",
            "jobs[0].task",
            "task score reads each row's continuations from a column",
        ),
        (  # a rule across engine fields, checked where the file is read, not as the engine starts
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    engine: {max_loras: 4, max_cpu_loras: 2}\n",
            ":4",
            "jobs[0].engine",
            "max_cpu_loras (2) must be >= max_loras (4)",
        ),
        (  # Parquet was written into out.jsonl, which a JSONL reader then failed on
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    output: {path: out.jsonl, format: parquet}\n",
            ":4",
            "jobs[0].output.format",
            "is parquet, but output.path 'out.jsonl' has the extension of jsonl",
        ),
        # Output settings the job cannot write failed only when the job's turn came, after the jobs before it ran,
        # and without the file and line: refused as the file loads.
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    output: {parsed: true}\n",
            ":4",
            "jobs[0].output.parsed",
            "output.parsed needs JSON output",
        ),
        (  # the job ran, and its OpenAI Batch output lines held none of the kept values
            "jobs:\n  - name: a\n    input: {path: x.jsonl, format: openai}\n    keep_columns: [model]\n",
            ":4",
            "jobs[0].keep_columns",
            "OpenAI Batch output lines have no place for kept columns; set output.format to arrow, parquet or jsonl",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl, format: openai}\n    sampling: {prompt_logprobs: true}\n",
            ":4",
            "jobs[0].sampling.prompt_logprobs",
            "prompt log-probabilities have no place in OpenAI Batch output lines",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    task: score_rolling\n"
            "    sampling: {prompt_logprobs: true}\n",
            ":5",
            "jobs[0].sampling.prompt_logprobs",
            "task score_rolling writes each text's log-likelihood in `scores`",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    task: score\n    sampling: {n: 2}\n",
            ":5",
            "jobs[0].sampling.n",
            "task score generates no tokens, so sampling.n has nothing to apply to",
        ),
        (  # scores are the model's own log-probabilities: a temperature, stop string or seed was dropped
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    task: score\n"
            "    sampling:\n      prompt_logprobs: true\n      temperature: 0.7\n",
            ":7",
            "jobs[0].sampling.temperature",
            "task score generates no tokens, so sampling.temperature has nothing to apply to",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    task: score_rolling\n    sampling: {stop: [END]}\n",
            ":5",
            "jobs[0].sampling.stop",
            "task score_rolling generates no tokens, so sampling.stop has nothing to apply to",
        ),
        (  # a column of such values was read on every row and dropped there, without a word
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    task: score\n"
            "    sampling_columns: [prompt_logprobs, temperature]\n",
            ":5",
            "jobs[0].sampling_columns",
            "each row's temperature would be dropped: task score generates no tokens, so sampling.temperature has "
            "nothing to apply to",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling: {structured_outputs: {choice: [y, n]}}\n"
            "    sampling_columns: [temperature, stop]\n",
            ":5",
            "jobs[0].sampling_columns",
            "each row's stop would be dropped: does not apply to a constrained row, which ends where its grammar ends",
        ),
        (
            "jobs:\n  - name: a\n    input: {path: x.jsonl, format: openai}\n    task: score_rolling\n",
            ":4",
            "jobs[0].task",
            "task score_rolling writes a `scores` column, which OpenAI Batch output has no place for",
        ),
    ],
)
def test_bad_field_names_field_and_line(tmp_path: Path, text: str, where: str, field: str, words: str) -> None:
    error = spec_error(tmp_path, text)
    assert error.field == field
    assert error.where == f"{tmp_path / 'jobs.yaml'}{where}"
    assert words in error.message
    assert str(error).startswith(f"{error.where}: {field}: ")


def test_a_shard_from_the_command_line_stays_on_a_ray_job_for_its_run_to_refuse(tmp_path: Path) -> None:
    """--shard (or a Slurm array task's own shard) is meant for a file's local jobs: the Ray job keeps it and refuses
    it as its turn comes, as before its own parallel.shard was refused at load; the local jobs run their shard."""
    text = "jobs:\n  - {name: a, input: {path: x.jsonl}, runner: ray}\n  - {name: b, input: {path: x.jsonl}}\n"
    ray_job, local_job = load_jobs_file(write(tmp_path, text), {"parallel.shard": "0/2"}).jobs
    assert (ray_job.parallel.shard, local_job.parallel.shard) == ("0/2", "0/2")


def test_an_openai_input_keeps_the_body_fields_its_rows_hold(tmp_path: Path) -> None:
    text = (
        "jobs:\n  - name: a\n    input: {path: x.jsonl, format: openai}\n    keep_columns: [model, messages]\n"
        "    output: {format: jsonl}\n"
    )
    (job,) = load_jobs_file(write(tmp_path, text)).jobs
    assert job.keep_columns == ("model", "messages")


def test_defaults_meant_for_other_jobs_stop_no_job_that_drops_them(tmp_path: Path) -> None:
    """`defaults:` may set what only some of the file's jobs use: an OpenAI Batch job reads no columns, a job
    without a chat template takes no template settings, a local job no Ray settings, a generating job no
    continuations. The same fields written on such a job itself are refused (above)."""
    text = (
        "defaults:\n  id_column: id\n  keep_columns: [topic]\n  continuations_column: choices\n"
        "  prompt: {column: q, chat_template_kwargs: {enable_thinking: false}}\n"
        "  parallel: {ray_actors: 4}\n  runner: ray\njobs:\n"
        "  - name: a\n    input: {path: x.parquet}\n    task: score\n"
        "  - name: b\n    input: {path: x.jsonl, format: openai}\n    runner: local\n"
        "  - name: c\n    input: {path: x.jsonl}\n    prompt: {chat_template: false}\n    runner: local\n"
    )
    plain, openai, raw = load_jobs_file(write(tmp_path, text)).jobs
    assert (plain.id_column, plain.runner, plain.parallel.ray_actors) == ("id", "ray", 4)
    assert (openai.input.format, openai.runner, raw.prompt.chat_template) == ("openai", "local", False)


def test_adapters_are_refused_only_where_no_row_can_name_them(tmp_path: Path) -> None:
    """A job's `adapters` run only on rows that name them: through adapter_column, an OpenAI Batch body's
    `model`, or `adapter` for every row. Without either, a job ran every row on the base model and exited 0 (above,
    refused); `defaults:` may list adapters for the jobs that pick one."""
    text = (
        "defaults:\n  adapters: {tone: t, billing: b}\njobs:\n"
        "  - name: a\n    input: {path: x.jsonl}\n    adapter_column: lora\n"
        "  - name: b\n    input: {path: x.jsonl, format: openai}\n"
        "  - name: c\n    input: {path: x.jsonl}\n    adapter: tone\n"
        "  - name: d\n    input: {path: x.jsonl}\n    adapters: {tone: t2}\n    adapter: tone\n"
    )
    jobs = load_jobs_file(write(tmp_path, text)).jobs
    assert [job.adapter_column for job in jobs] == ["lora", None, None, None]
    assert [job.adapter for job in jobs] == [None, None, "tone", "tone"]
    assert [sorted(job.adapters) for job in jobs] == [["billing", "tone"]] * 4
    assert jobs[3].adapters["tone"] == "t2"


def test_a_scoring_job_passes_over_the_defaults_generation_settings(tmp_path: Path) -> None:
    """Generation's sampling values from `defaults:` are for the file's generating jobs: a scoring job beside them
    loads (its own are refused, above, and so are its sampling_columns naming them), keeping prompt_logprobs, which
    task score reads; so does --set of one that the generating job reads, and only a job that runs alone refuses it."""
    text = (
        "defaults:\n  sampling: {temperature: 0.7, stop: [END], max_new_tokens: 8, seed: 3}\n"
        "  sampling_columns: [temperature]\njobs:\n"
        "  - name: gen\n    input: {path: x.jsonl}\n"
        "  - name: scores\n    input: {path: x.jsonl}\n    task: score\n    sampling: {prompt_logprobs: true}\n"
    )
    generate, score = load_jobs_file(write(tmp_path, text)).jobs
    assert (generate.sampling.temperature, generate.sampling.stop) == (0.7, ("END",))
    assert (score.sampling.temperature, score.sampling.prompt_logprobs) == (0.7, True)
    assert score.sampling_columns == generate.sampling_columns == ("temperature",)
    generate, score = load_jobs_file(write(tmp_path, text), {"sampling.top_k": 5}).jobs
    assert (generate.sampling.top_k, score.sampling.top_k) == (5, 0)
    with pytest.raises(SpecError) as refused:
        load_jobs_file(write(tmp_path, text), {"sampling.top_k": 5}, ["scores"])
    error = refused.value
    assert (error.field, error.where, error.message) == (
        "sampling.top_k",
        "command line",
        "task score generates no tokens, so sampling.top_k has nothing to apply to (each row gets `scores`)",
    )


def test_output_settings_from_defaults_fail_only_the_job_that_cannot_write_them(tmp_path: Path) -> None:
    """`defaults: {output: {parsed: true}}` meant for a file's constrained jobs refused the whole file at load for
    one job without a JSON constraint: that job fails at its turn, naming the field, and the others run."""
    from job_fakes import fake_factory

    from kvbatch.jobs.runners import run_jobs

    (tmp_path / "x.jsonl").write_text('{"prompt": "hi"}\n')
    text = (
        "defaults:\n  output: {parsed: true}\n  output_dir: out\njobs:\n"
        "  - name: a\n    input: {path: x.jsonl}\n    sampling: {structured_outputs: {json_object: true}}\n"
        "  - name: b\n    input: {path: x.jsonl}\n"
    )
    jobs = load_jobs_file(write(tmp_path, text)).jobs
    a, b = run_jobs(jobs, engine_factory=fake_factory())
    assert a.error is None and isinstance(b.error, SpecError) and b.error.field == "output.parsed"
    own = text.replace("defaults:\n  output: {parsed: true}\n", "defaults:\n").replace(
        "  - name: b\n    input: {path: x.jsonl}\n",
        "  - name: b\n    input: {path: x.jsonl}\n    output: {parsed: true}\n",
    )
    error = spec_error(tmp_path, own)
    assert (error.field, error.where) == ("jobs[1].output.parsed", f"{tmp_path / 'jobs.yaml'}:9")


def test_whitespace_stop_strings_are_accepted(tmp_path: Path) -> None:
    text = 'jobs:\n  - name: a\n    input: {path: x.jsonl}\n    sampling: {stop: ["\\n\\n", " ", "\\n"]}\n'
    (job,) = load_jobs_file(write(tmp_path, text)).jobs
    assert job.sampling.stop == ("\n\n", " ", "\n")


def test_bad_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    error = spec_error(tmp_path, "jobs:\n  - name: a\n    input: {path: x.jsonl\n    sampling: 3\n")
    assert "YAML syntax error" in error.message
    assert error.where is not None and error.where.startswith(str(tmp_path / "jobs.yaml") + ":")
    assert int(error.where.rsplit(":", 1)[1]) in (3, 4, 5)


def test_duplicate_key_and_python_tags_are_refused(tmp_path: Path) -> None:
    dup = spec_error(tmp_path, "jobs:\n  - name: a\n    name: b\n    input: {path: x.jsonl}\n")
    assert (dup.field, dup.where.rsplit(":", 1)[1]) == (
        "jobs[0].name",
        "3",
    ) and "duplicate field (first at line 2)" in dup.message
    tag = spec_error(tmp_path, "jobs:\n  - name: !!python/object:os.system a\n    input: {path: x.jsonl}\n")
    assert "unsupported YAML value" in tag.message


def test_command_line_override_errors_name_the_field_without_a_line(tmp_path: Path) -> None:
    error = spec_error(tmp_path, "jobs:\n  - name: a\n    input: {path: x.jsonl}\n", {"sampling.temperature": "hot"})
    assert (error.field, error.where) == ("sampling.temperature", "command line")  # as typed in --set
    assert "expected a finite number" in error.message


def test_job_from_dict_and_select(tmp_path: Path) -> None:
    job = job_from_dict({"name": "g", "input": {"path": "in.jsonl"}, "sampling": {"n": 2}}, base_dir=str(tmp_path))
    assert job.sampling == dataclasses.replace(SamplingParams(), n=2) and job.base_dir == str(tmp_path)
    jobs = load_jobs_file(
        write(tmp_path, "jobs:\n  - {name: a, input: {path: x.jsonl}}\n  - {name: b, input: {path: x.jsonl}}\n")
    )
    assert [j.name for j in jobs.select(["b"])] == ["b"] and [j.name for j in jobs.select(None)] == ["a", "b"]
    assert [j.name for j in jobs.select(["b", "a", "b"])] == ["b", "a"]  # `-j b -j a -j b` ran b twice
    with pytest.raises(SpecError, match="no job named 'c'.*jobs: a, b"):
        jobs.select(["c"])


def test_output_must_stay_inside_output_dir(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="inside output_dir"):
        job_from_dict({"name": "a", "input": {"path": "x.jsonl"}, "output": {"path": "../escape.arrow"}}, str(tmp_path))
    error = spec_error(
        tmp_path, "jobs:\n  - name: a\n    input: {path: x.jsonl}\n    output:\n      path: ../escape.arrow\n"
    )
    assert (error.where, error.field) == (f"{tmp_path / 'jobs.yaml'}:5", "jobs[0].output.path")


_SCHEMA = "jobs[0].sampling.structured_outputs.json"


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ('output_dir: "a\\0b"', "jobs[0].output_dir", "holds a NUL character"),
        ('output: {path: "a\\0.arrow"}', "jobs[0].output.path", "holds a NUL character"),
        ('sampling: {structured_outputs: {json: "a\\0b.json"}}', _SCHEMA, "is no file name"),
        ('sampling: {structured_outputs: {json: "\\ud800.json"}}', _SCHEMA, "is no file name"),
        ("sampling: {structured_outputs: {json: deep.json}}", _SCHEMA, "is not valid JSON: nested too deeply"),
    ],
    ids=["nul-output-dir", "nul-output-path", "nul-schema-file", "surrogate-schema-file", "deep-schema-file"],
)
def test_paths_no_file_can_have_are_spec_errors(tmp_path: Path, extra: str, field: str, words: str) -> None:
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    error = spec_error(tmp_path, f"jobs:\n  - name: a\n    input: {{path: x.jsonl}}\n    {extra}\n")
    assert (error.field, error.where) == (field, f"{tmp_path / 'jobs.yaml'}:4")
    assert words in error.message


_NO_USER = "~nosuchuser_kvbatch"


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        ("output_dir: ~/out", "jobs[0].output_dir", "~/out"),
        (f"model: {_NO_USER}/m", "jobs[0].model", f"{_NO_USER}/m"),
        (
            f"prompt: {{chat_template_file: {_NO_USER}/t.jinja}}",
            "jobs[0].prompt.chat_template_file",
            f"{_NO_USER}/t.jinja",
        ),
        (f"adapters: {{a: {_NO_USER}/a}}", "jobs[0].adapters.a", f"{_NO_USER}/a"),
        (f"sampling: {{structured_outputs: {{json: {_NO_USER}/s.json}}}}", _SCHEMA, f"{_NO_USER}/s.json"),
    ],
)
def test_a_path_in_a_home_folder_the_machine_lacks_is_a_spec_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str, field: str, value: str
) -> None:
    """`output_dir: ~/out` with HOME unset and no home in the user database (a container's user), or a path under
    `~user` for a user the machine lacks, raised pathlib's RuntimeError ("Could not determine home directory"): a
    traceback, wherever the path was first read. It is refused at load, naming file, line and field."""
    import pwd

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    error = spec_error(tmp_path, f"jobs:\n  - name: a\n    input: {{path: x.jsonl}}\n    {extra}\n")
    assert (error.field, error.where) == (field, f"{tmp_path / 'jobs.yaml'}:4")
    if value == "~/out":
        words = "starts with ~, but HOME is unset and the user database gives this user no home folder"
    else:
        words = "starts with the home folder of user 'nosuchuser_kvbatch', whom this machine does not know"
    assert error.message == f"{value!r} {words}; write the path without ~"
    error = spec_error(tmp_path, f"jobs:\n  - name: a\n    input: {{path: {_NO_USER}/in.jsonl}}\n")
    assert (error.field, error.where) == ("jobs[0].input.path", f"{tmp_path / 'jobs.yaml'}:3")


@pytest.mark.parametrize(
    ("input_path", "output", "words"),
    [
        ("in.hf", {"path": "in.hf"}, "is the input file"),  # a datasets folder: overwrite would replace it
        ("in.hf", {"path": "in.hf/out.jsonl"}, "lies inside the input folder"),
        ("data/in.jsonl", {"path": "data", "format": "hf"}, "holds or lies inside the input folder"),
    ],
)
def test_output_cannot_be_or_hold_an_input_folder(tmp_path: Path, input_path: str, output: dict, words: str) -> None:
    (tmp_path / "in.hf").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(SpecError, match=words):
        job_from_dict(
            {"name": "j", "input": {"path": input_path}, "output_dir": ".", "output": {**output, "mode": "overwrite"}},
            base_dir=str(tmp_path),
        )


def test_output_cannot_be_the_input(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(
        SpecError, match="output.path 'data.jsonl' is the input file .*data.jsonl; write the output elsewhere"
    ):
        job_from_dict(
            {
                "name": "j",
                "input": {"path": "data.jsonl"},
                "output_dir": ".",
                "output": {"path": "data.jsonl", "mode": "overwrite"},
            },
            base_dir=str(tmp_path),
        )


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_an_output_file_where_a_directory_stands_is_refused_before_anything_runs(tmp_path: Path, fmt: str) -> None:
    """A directory at the output's path failed the job only after every row had run, with "cannot write
    out/d.arrow: Is a directory; ... fix this (free space?)" (and, resuming, advice to overwrite it)."""
    from job_fakes import fake_factory

    from kvbatch.errors import ExitCode, exit_code_of
    from kvbatch.jobs.runners import run_jobs

    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    folder = tmp_path / "out" / f"d.{fmt}"
    folder.mkdir(parents=True)
    refusal = f"output.path 'd.{fmt}' is a directory ({folder}), not a file: remove it or choose another output.path"
    with pytest.raises(SpecError) as refused:  # named in the job: when the job is read
        job_from_dict({"name": "j", "input": {"path": "in.jsonl"}, "output": {"path": f"d.{fmt}"}}, str(tmp_path))
    assert (refused.value.field, refused.value.message) == ("output.path", refusal)
    # the job's own name for its output: when the job starts, before the model loads
    spec = job_from_dict({"name": "d", "input": {"path": "in.jsonl"}, "output": {"format": fmt}}, str(tmp_path))
    factory = fake_factory()
    [outcome] = run_jobs([spec], engine_factory=factory)
    assert isinstance(outcome.error, SpecError) and exit_code_of(outcome.error) == ExitCode.USAGE
    assert str(outcome.error) == f"output.path: {refusal}"
    assert factory.engines == []
    # a datasets output is a folder: one already there is its earlier run's
    (tmp_path / "out" / "d.hf").mkdir()
    job_from_dict({"name": "j", "input": {"path": "in.jsonl"}, "output": {"path": "d.hf"}}, str(tmp_path))


def test_missing_job_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="job file not found"):
        load_jobs_file(tmp_path / "nope.yaml")


def test_a_job_file_from_a_pipe_has_the_working_folders_paths(tmp_path: Path, monkeypatch) -> None:
    """`kvbatch run /dev/stdin` (or `<(...)`) reads the file from a pipe, whose resolved folder is /proc/PID/fd: the
    job's input and output_dir were looked for there. They are the working folder's, as the command line's are."""
    monkeypatch.chdir(tmp_path)
    read, write = os.pipe()
    os.write(write, b"jobs:\n  - {name: a, input: {path: in.jsonl}, output_dir: results}\n")
    os.close(write)
    try:
        (job,) = load_jobs_file(f"/dev/fd/{read}").jobs
    finally:
        os.close(read)
    assert job.base_dir == str(tmp_path)
    assert input_path(job) == tmp_path / "in.jsonl" and output_dir(job) == tmp_path / "results"


def test_offline_forbids_downloads_whatever_allow_download_says():
    from kvbatch.jobs.spec import EngineSpec

    assert EngineSpec(offline=True, allow_download=True).settings() == {"allow_download": False}
    assert EngineSpec(allow_download=True).settings() == {"allow_download": True}
    assert "offline" not in EngineSpec(offline=False).settings()


def test_a_relative_model_path_is_relative_to_the_job_file(tmp_path):
    from kvbatch.jobs.spec import load_jobs_file

    (tmp_path / "jobs").mkdir()
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "jobs" / "j.yaml").write_text(
        "jobs:\n"
        "  - {name: a, model: ../models/tiny, input: {path: in.jsonl}}\n"
        "  - {name: b, model: someorg/some-model, input: {path: in.jsonl}}\n"
        "  - {name: c, input: {path: in.jsonl}}\n"
    )
    a, b, c = load_jobs_file(tmp_path / "jobs" / "j.yaml").jobs
    assert a.model == str(tmp_path / "models" / "tiny")  # wherever kvbatch is started from
    assert b.model == "someorg/some-model" and c.model == "default"


def test_a_model_given_on_the_command_line_is_named_alike_from_any_folder(tmp_path, monkeypatch):
    """--model is relative to where kvbatch starts: named absolutely, a rerun from elsewhere is the same job."""
    from kvbatch.jobs.spec import load_jobs_file

    (tmp_path / "jobs").mkdir()
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "jobs" / "j.yaml").write_text("jobs:\n  - {name: a, input: {path: in.jsonl}}\n")
    monkeypatch.chdir(tmp_path)
    first = load_jobs_file("jobs/j.yaml", {"model": "models/tiny"}).jobs[0]
    monkeypatch.chdir(tmp_path / "models")
    second = load_jobs_file("../jobs/j.yaml", {"model": "tiny"}).jobs[0]
    assert first.model == second.model == str(tmp_path / "models" / "tiny")
    assert load_jobs_file("../jobs/j.yaml", {"model": "someorg/some-model"}).jobs[0].model == "someorg/some-model"
    # Spelt as a path, it is one in the working folder, as the plain name is: it named a folder beside the job
    # file that was not there (the load then failed on a model in plain sight).
    monkeypatch.chdir(tmp_path)
    assert load_jobs_file("jobs/j.yaml", {"model": "./models/tiny"}).jobs[0].model == first.model
    assert load_jobs_file("jobs/j.yaml", {"model": "./models/gone"}).jobs[0].model == str(tmp_path / "models" / "gone")
    assert job_from_dict({"name": "a", "input": {"path": "in.jsonl"}, "model": "./models/tiny"}).model == first.model


def test_a_model_folder_only_in_the_working_folder_is_refused(tmp_path, monkeypatch):
    """From another folder, the same job file would load another model (or none) under the same spec."""
    from kvbatch.jobs.spec import load_jobs_file

    (tmp_path / "jobs").mkdir()
    (tmp_path / "mdl").mkdir()
    (tmp_path / "jobs" / "j.yaml").write_text("jobs:\n  - {name: a, model: mdl, input: {path: in.jsonl}}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SpecError, match="model 'mdl' is no folder beside the job file .* but is one in the working folder"
    ):
        load_jobs_file(tmp_path / "jobs" / "j.yaml")
    (tmp_path / "default").mkdir()  # `default` always names the embedded model
    (tmp_path / "jobs" / "d.yaml").write_text("jobs:\n  - {name: a, model: default, input: {path: in.jsonl}}\n")
    assert load_jobs_file(tmp_path / "jobs" / "d.yaml").jobs[0].model == "default"


def test_an_integer_no_float_holds_is_not_a_finite_number(tmp_path: Path) -> None:
    # YAML reads it as an int, which math.isfinite cannot convert: the file failed with a traceback, not its line
    huge = "1" + "0" * 400
    error = spec_error(tmp_path, f"jobs:\n  - name: a\n    input: {{path: x.jsonl}}\n    sampling: {{top_p: {huge}}}\n")
    assert (error.field, error.where.rsplit(":", 1)[1]) == ("jobs[0].sampling.top_p", "4")
    assert "expected a finite number, got int 1000" in error.message
