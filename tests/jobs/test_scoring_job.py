"""Scoring and logprob columns of a real job on a tiny saved model: values against float32 log_softmax of
transformers' own logits, Arrow types readable by `datasets`."""

import functools
import json
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from tiny_models import hf_reference, sentencepiece_tokenizer, word_tokenizer

from kvbatch.jobs.arrow_io import read_arrow
from kvbatch.jobs.records import TOP_LOGPROB
from kvbatch.jobs.run import EngineCache, run_job
from kvbatch.jobs.spec import JobSpec, job_from_dict

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_reference("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@functools.cache
def reference() -> torch.nn.Module:
    return hf_reference("llama")


def reference_logprobs(tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(reference()(torch.tensor([tokens])).logits[0].float(), dim=-1)


def ids(text: str) -> list[int]:
    return word_tokenizer().encode(text)


def run(tmp_path: Path, model: Path, rows: list[dict], **job) -> list[dict]:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = job_from_dict(
        {
            "name": "j",
            "model": str(model),
            "input": {"path": "in.jsonl"},
            "prompt": {"chat_template": False},
            "engine": {"block_size": 4, "device": "cpu"},
            **job,
        },
        base_dir=str(tmp_path),
    )
    run_job(spec, EngineCache())
    path = tmp_path / "out" / "j.arrow"
    from datasets import Dataset

    table = read_arrow(path)
    readable = Dataset.from_file(str(path))
    assert readable.num_rows == table.num_rows
    return table.to_pylist()


def test_task_score_scores_each_continuation(tmp_path: Path, model_folder: Path) -> None:
    rows = [
        {"prompt": "w5 w6 w7 w8 w9 w10 w11 w12 w13 ", "continuations": ["w40", "w41 w42 w43", "w44 w45"]},
        {"prompt": "w30 w31", "choices": ["w46"]},  # no continuations column: an error row, the job goes on
        {"prompt": "w50", "continuations": [" w51 w52"]},  # as in lm-eval, the space starts the continuation
        {"prompt": "w60 w61", "continuations": '[" w62", " w63 w64"]'},  # JSON text, as a CSV export holds a list
        {"prompt": "w60 w61", "continuations": "w62"},  # text that is no JSON list: wrong_type
    ]
    out = run(tmp_path, model_folder, rows, task="score")
    assert out[1]["error_kind"] == "missing_column" and out[1]["scores"] is None
    assert "lists of strings are in 'choices': set continuations_column" in out[1]["error"]
    assert out[4]["error_kind"] == "wrong_type" and "must be a non-empty list of non-empty strings" in out[4]["error"]
    for row, got in zip((rows[0], rows[2], rows[3]), (out[0], out[2], out[3])):
        context = ids(row["prompt"])
        assert got["error"] is None and got["finish_reason"] == "stop"
        continuations = (
            json.loads(row["continuations"]) if isinstance(row["continuations"], str) else row["continuations"]
        )
        assert len(got["scores"]) == len(continuations)
        for continuation, score in zip(continuations, got["scores"]):
            # the context's trailing space moved into the continuation: the same words for this tokenizer
            tokens = context + ids(continuation)
            rows_lp = reference_logprobs(tokens)[len(context) - 1 : -1]
            want = rows_lp.gather(1, torch.tensor(ids(continuation))[:, None])[:, 0]
            assert score["num_tokens"] == len(ids(continuation))
            assert score["logprob"] == pytest.approx(want.sum().item(), abs=TOLERANCE * len(want))
            assert score["is_greedy"] == bool((rows_lp.argmax(-1) == torch.tensor(ids(continuation))).all())


def test_prompt_and_top_logprobs_columns(tmp_path: Path, model_folder: Path) -> None:
    rows = [{"prompt": "w5 w6 w7 w8 w9"}, {"prompt": "w100 w101"}]  # (no w2...: "w2" is the unknown token)
    sampling = {"max_new_tokens": 4, "logprobs": True, "top_logprobs": 3, "prompt_logprobs": True, "ignore_eos": True}
    out = run(tmp_path, model_folder, rows, sampling=sampling)
    tokenizer = word_tokenizer()
    for row, got in zip(rows, out):
        prompt = ids(row["prompt"])
        generated = [top[0]["token_id"] for top in got["top_logprobs"]]  # greedy: the chosen token leads
        logprobs = reference_logprobs(prompt + generated)
        want_prompt = logprobs[: len(prompt) - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
        assert got["prompt_logprobs"] == pytest.approx([None, *want_prompt], abs=TOLERANCE)
        values, top_ids = logprobs[len(prompt) - 1 : -1].topk(3, dim=-1)
        for step, top in enumerate(got["top_logprobs"]):
            assert [t["token_id"] for t in top] == top_ids[step].tolist()
            assert [t["logprob"] for t in top] == pytest.approx(values[step].tolist(), abs=TOLERANCE)
            assert [t["token"] for t in top] == [tokenizer.decode([t]) for t in top_ids[step].tolist()]
        assert got["logprobs"] == pytest.approx([t[0]["logprob"] for t in got["top_logprobs"]], abs=1e-6)


def _bos_folder(folder: Path) -> Path:
    """The tiny model with a tokenizer that adds <s> to every text, as Llama's does."""
    from tokenizers import processors

    tokenizer = word_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf_reference("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("task", ["score", "score_rolling"])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sampling.n", 2),
        ("sampling.logprobs", True),
        ("sampling.top_logprobs", 2),
        ("sampling.structured_outputs", {"json_object": True}),
        ("constraint_column", "schema"),
        ("output.parsed", True),
    ],
)
def test_scoring_refuses_settings_of_generated_tokens(tmp_path: Path, task: str, name: str, value) -> None:
    """Nothing is generated: their columns were written null on every row (n > 1: a list of one finish reason).
    A constraint (the job's or a column's) constrained nothing, compiled for the model all the same, and with
    output.parsed wrote a `parsed` column null on every row."""
    from kvbatch.errors import SpecError
    from kvbatch.jobs.job_io import layout_for

    base = {"name": "j", "input": {"path": "in.jsonl"}, "task": task}
    section, _, key = name.rpartition(".")
    setting = {section: {key: value}} if section else {key: value}
    with pytest.raises(SpecError, match=f"task {task} generates no tokens, so {name} has nothing") as refused:
        layout_for(job_from_dict(base | setting, base_dir=str(tmp_path)), {})
    assert refused.value.field == name


def test_a_scoring_rows_own_settings_of_generated_tokens_are_refused_as_the_jobs_are(
    tmp_path: Path, model_folder: Path
) -> None:
    """A scoring row whose own sampling values ask logprobs, top_logprobs or n (or prompt_logprobs of a rolling
    text) was told to set the job's sampling.logprobs (and so on), which the job file's load then refuses for the
    task. The row's values are held to the job's rule: its error says the task generates no tokens."""
    rows = [
        {"prompt": "w5 w6", "continuations": [" w7"], "s": {"logprobs": True}},
        {"prompt": "w5 w6", "continuations": [" w7"], "s": {"top_logprobs": 2}},
        {"prompt": "w5 w6", "continuations": [" w7"], "s": {"n": 2}},
        {"prompt": "w5 w6", "continuations": [" w7"], "s": {"prompt_logprobs": True}},  # task score has them
        {"prompt": "w5 w6", "continuations": [" w7"], "s": {"temperature": 0.5}},
        {"prompt": "w5 w6", "continuations": [" w7"], "s": {"structured_outputs": {"choice": ["a"]}}},
    ]
    (tmp_path / "score").mkdir()
    out = run(tmp_path / "score", model_folder, rows, task="score", sampling_column="s")
    for row, name in zip(out, ("logprobs", "top_logprobs", "n")):
        assert row["error_kind"] == "bad_request" and row["scores"] is None
        assert row["error"].endswith(f"task score generates no tokens, so sampling.{name} has nothing to apply to "
                                     "(each row gets `scores`)")  # fmt: skip
    assert out[3]["error"].endswith("set the job's sampling.prompt_logprobs: true")
    # A value only generation reads, refused in the job's `sampling`, would be dropped here: that row's error too.
    assert out[4]["error_kind"] == "bad_request" and out[4]["scores"] is None
    assert out[4]["error"].endswith("sets temperature, which task score generates no tokens, so sampling."
                                    "temperature has nothing to apply to (each row gets `scores`)")  # fmt: skip
    assert out[5]["error_kind"] == "bad_request"
    assert out[5]["error"].endswith("task score generates no tokens, so sampling.structured_outputs has nothing to "
                                    "apply to (each row gets `scores`)")  # fmt: skip
    (tmp_path / "rolling").mkdir()
    out = run(tmp_path / "rolling", model_folder, [{"prompt": "w5 w6", "s": {"prompt_logprobs": True}}],
              task="score_rolling", sampling_column="s")  # fmt: skip
    assert out[0]["error_kind"] == "bad_request"
    assert "task score_rolling writes each text's log-likelihood in `scores`; prompt_logprobs" in out[0]["error"]


@pytest.mark.parametrize("task", ["score", "score_rolling"])
def test_scoring_refuses_a_truncated_prompt(tmp_path: Path, task: str) -> None:
    # A score is of the text as given: a cut text's score, written under the row, would be another text's.
    from kvbatch.errors import SpecError
    from kvbatch.jobs.job_io import layout_for

    base = {"name": "j", "input": {"path": "in.jsonl"}, "task": task, "sampling": {"truncate_prompt_tokens": 8}}
    with pytest.raises(SpecError, match=f"task {task} scores each text as given") as refused:
        layout_for(job_from_dict(base, base_dir=str(tmp_path)), {})
    assert refused.value.field == "sampling.truncate_prompt_tokens"


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "adds-bos"])
def test_task_score_rolling_gives_lm_evals_loglikelihood_rolling(
    tmp_path: Path, model_folder: Path, monkeypatch, bos: bool
) -> None:
    """Each row's text scored whole in windows of the 32-token context equals lm-eval's own `hf` model's
    loglikelihood_rolling on the same folder with max_length 32 (texts of one token to four windows). A tokenizer
    that adds a BOS gives it to the text, as lm-eval encodes it: its first window scores the BOS after the prefix."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    if bos:
        model_folder = _bos_folder(tmp_path / "bos-model")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = random.Random(4)
    # Words from w300 on: lm-eval's encoding parses special-token text in the data ("w2", the unknown token, in
    # "w205"), kvbatch's leaves it text unless prompt.allow_special_tokens is set.
    texts = [" ".join(f"w{rng.randrange(300, 512)}" for _ in range(n)) for n in (1, 5, 31, 32, 33, 100)]
    rows = [{"prompt": text} for text in texts] + [{"text": "no prompt column"}]  # an error row, the job goes on
    engine = {"block_size": 4, "device": "cpu", "max_model_len": 32}
    out = run(tmp_path, model_folder, rows, task="score_rolling", engine=engine)
    assert out[-1]["error_kind"] == "missing_column" and out[-1]["scores"] is None
    hf = HFLM(pretrained=str(model_folder), device="cpu", max_length=32, batch_size=1)
    instances = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    want = hf.loglikelihood_rolling(instances, disable_tqdm=True)
    for text, got, logprob in zip(texts, out, want, strict=False):
        assert got["error"] is None and got["text"] is None and got["finish_reason"] == "stop"
        (score,) = got["scores"]
        assert score["num_tokens"] == len(word_tokenizer().encode(text, add_special_tokens=False)) + bos
        assert score["logprob"] == pytest.approx(logprob, abs=TOLERANCE * score["num_tokens"])


def test_task_score_rolling_scores_a_whitespace_text_as_lm_eval_does(tmp_path: Path, monkeypatch) -> None:
    """A text of whitespace alone has tokens (a SentencePiece tokenizer's "▁"), and lm-eval's loglikelihood_rolling
    scores them; such a row was an empty_prompt error ("is only whitespace"), as a generation prompt is, so a
    perplexity job over lines lost its blank ones. An empty text, with no tokens, is still that error."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path / "sp-model"
    hf_reference("llama").save_pretrained(folder)
    sentencepiece_tokenizer(legacy=False).save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [" ", "  \n ", "ab c"]
    out = run(tmp_path, folder, [{"prompt": text} for text in [*texts, ""]], task="score_rolling")
    assert out[-1]["error_kind"] == "empty_prompt" and out[-1]["scores"] is None
    hf = HFLM(pretrained=str(folder), device="cpu", max_length=64, batch_size=1)
    instances = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    want = hf.loglikelihood_rolling(instances, disable_tqdm=True)
    for text, got, logprob in zip(texts, out, want, strict=False):
        assert got["error"] is None, got["error"]
        (score,) = got["scores"]
        assert score["num_tokens"] == len(sentencepiece_tokenizer(legacy=False).encode(text))
        assert score["logprob"] == pytest.approx(logprob, abs=TOLERANCE * score["num_tokens"])


def test_scoring_refuses_openai_batch_output(tmp_path: Path) -> None:
    """OpenAI Batch output has no place for scores: a scoring job over a Batch file must name another format
    instead of writing responses without them."""
    from kvbatch.errors import SpecError
    from kvbatch.jobs.job_io import layout_for

    def job(**fields):
        base = {"name": "j", "input": {"path": "batch.jsonl", "format": "openai"}, "task": "score_rolling"}
        return job_from_dict(base | fields, base_dir=str(tmp_path))

    with pytest.raises(SpecError, match="no place for.*set output.format") as refused:
        layout_for(job(), {})
    assert refused.value.field == "task"
    assert layout_for(job(output={"format": "jsonl"}), {}).scores


def test_rolling_scores_refuse_prompt_logprobs(tmp_path: Path) -> None:
    # A rolling text has no one prompt to align per-token log-probabilities to: refused when the job loads, not
    # written as a null column.
    from kvbatch.errors import SpecError
    from kvbatch.jobs.job_io import layout_for

    base = {"name": "j", "input": {"path": "in.jsonl"}, "task": "score_rolling"}
    with pytest.raises(SpecError, match="prompt_logprobs .* applies to task generate and task score") as refused:
        layout_for(job_from_dict(base | {"sampling": {"prompt_logprobs": True}}, base_dir=str(tmp_path)), {})
    assert refused.value.field == "sampling.prompt_logprobs"
    score = {**base, "task": "score", "sampling": {"prompt_logprobs": True}}
    assert layout_for(job_from_dict(score, base_dir=str(tmp_path)), {}).prompt_logprobs


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "adds-bos"])
def test_task_score_gives_lm_evals_loglikelihood_with_and_without_a_context(
    tmp_path: Path, model_folder: Path, monkeypatch, bos: bool
) -> None:
    """Continuations after a context and after an empty one (lm-eval's unconditional case: the BOS, else the EOS,
    as the context, which a continuation that starts with it has as its own) equal lm-eval's own `hf` model's
    loglikelihood on the same folder, is_greedy included."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    if bos:
        model_folder = _bos_folder(tmp_path / "bos-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [
        {"prompt": "", "continuations": ["w40", "w41 w42 w43", "<s> w305"]},  # <s>: the prefix token itself
        {"prompt": "w30 w31 w32 ", "continuations": ["w44", "w45 w46"]},
    ]
    out = run(tmp_path, model_folder, rows, task="score")
    hf = HFLM(pretrained=str(model_folder), device="cpu", max_length=64, batch_size=1)
    pairs = [(row["prompt"], c) for row in rows for c in row["continuations"]]
    want = hf.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], True)
    assert [row["error"] for row in out] == [None, None]
    got = [score for row in out for score in row["scores"]]
    for score, (logprob, is_greedy) in zip(got, want, strict=True):
        assert score["logprob"] == pytest.approx(logprob, abs=TOLERANCE * score["num_tokens"])
        assert score["is_greedy"] == is_greedy


def test_task_score_reads_a_spelt_bos_as_lm_eval_does(tmp_path: Path, monkeypatch) -> None:
    """With prompt.allow_special_tokens, a prompt that starts with the BOS's text (a chat template rendered to text)
    gets no second BOS from a tokenizer that adds one, as lm-eval's hf model encodes it: the scores equal its
    loglikelihood on the same folder. The context was encoded as <s> <s> w30 ..."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model_folder = _bos_folder(tmp_path / "bos-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"prompt": "<s> w30 w31 w32 ", "continuations": ["w44", "w45 w46"]}]
    out = run(tmp_path, model_folder, rows, task="score", prompt={"chat_template": False, "allow_special_tokens": True})
    hf = HFLM(pretrained=str(model_folder), device="cpu", max_length=64, batch_size=1)
    pairs = [(rows[0]["prompt"], c) for c in rows[0]["continuations"]]
    want = hf.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], True)
    assert out[0]["error"] is None and out[0]["prompt_tokens"] == len(ids("<s> w30 w31 w32")) == 4
    for score, (logprob, is_greedy) in zip(out[0]["scores"], want, strict=True):
        assert score["logprob"] == pytest.approx(logprob, abs=TOLERANCE * score["num_tokens"])
        assert score["is_greedy"] == is_greedy


@pytest.mark.parametrize("legacy", [False, True], ids=["metaspace", "legacy-prepend"])
def test_chat_continuations_of_a_sentencepiece_model_give_lm_evals_loglikelihood(
    tmp_path: Path, monkeypatch, legacy: bool
) -> None:
    """With a chat template each continuation follows the rendered prompt. A SentencePiece tokenizer encoding it
    alone put "▁" in front of it: "four" was scored as " four", both got the same logprob. The scores now equal
    lm-eval's `hf` model's loglikelihood of the rendered prompt and the continuation on the same folder."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path / "sp-model"
    hf_reference("llama").save_pretrained(folder)
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    tokenizer = sentencepiece_tokenizer(legacy, template)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"prompt": "what is two and two", "continuations": ["four", " four", "four and"]}]
    out = run(tmp_path, folder, rows, task="score", prompt={"chat_template": True})
    messages = [{"role": "user", "content": rows[0]["prompt"]}]
    context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    hf = HFLM(pretrained=str(folder), device="cpu", max_length=64, batch_size=1)
    pairs = [(context, c) for c in rows[0]["continuations"]]
    want = hf.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], True)
    assert out[0]["error"] is None
    assert [s["num_tokens"] for s in out[0]["scores"]] == [4, 5, 8]
    for score, (logprob, is_greedy) in zip(out[0]["scores"], want, strict=True):
        assert score["logprob"] == pytest.approx(logprob, abs=TOLERANCE * score["num_tokens"])
        assert score["is_greedy"] == is_greedy


def test_generate_batch_on_its_own_returns_the_columns_the_job_asks_for(model_folder: Path) -> None:
    # GenerateBatch (Ray Data's callable) outside a runner: ray job: a scoring job's scores, against the float32
    # reference, and a generation job's top_logprobs, typed as the job's own output types them.
    from kvbatch.jobs.ray_data import GenerateBatch

    base = {"name": "x", "model": str(model_folder), "input": {"path": "-"}, "prompt": {"chat_template": False}}
    base["engine"] = {"device": "cpu", "block_size": 4}
    scoring = GenerateBatch({**base, "task": "score"})
    table = scoring({"prompt": ["w5 w6 w7 "], "continuations": [["w40", "w41 w42"]]})
    (row,) = table.to_pylist()
    assert row["error"] is None and [s["num_tokens"] for s in row["scores"]] == [1, 2]
    for continuation, score in zip(["w40", "w41 w42"], row["scores"]):
        tokens = ids("w5 w6 w7") + ids(continuation)
        rows_lp = reference_logprobs(tokens)[len(ids("w5 w6 w7")) - 1 : -1]
        want = rows_lp.gather(1, torch.tensor(ids(continuation))[:, None]).sum().item()
        assert score["logprob"] == pytest.approx(want, abs=TOLERANCE * len(ids(continuation)))
    sampling = {"max_new_tokens": 3, "top_logprobs": 2, "ignore_eos": True}
    table = GenerateBatch({**base, "sampling": sampling})({"prompt": ["w5 w6"]})
    assert table.schema.field("top_logprobs").type == pa.list_(pa.list_(TOP_LOGPROB))
    assert [len(step) for step in table.column("top_logprobs")[0].as_py()] == [2, 2, 2]


def test_scores_of_a_reasoning_models_template_are_written(tmp_path: Path, model_folder: Path) -> None:
    # A template that marks thinking with <think> (Qwen3's), or prompt.split_reasoning: true, gave a scoring job a
    # reasoning column to fill from texts it has none of: the first scored row failed the whole job.
    import shutil

    from transformers import AutoTokenizer

    thinking = tmp_path / "thinking-model"
    shutil.copytree(model_folder, thinking)
    tokenizer = AutoTokenizer.from_pretrained(thinking)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}<think>"
    tokenizer.save_pretrained(thinking)
    rows = [{"prompt": "w5 w6", "continuations": [" w7", " w8 w9"]}]
    for name, model, prompt in (
        ("template", thinking, {"chat_template": True}),
        ("split", model_folder, {"chat_template": False, "split_reasoning": True}),
    ):
        (tmp_path / name).mkdir()
        out = run(tmp_path / name, model, rows, task="score", prompt=prompt)
        assert out[0]["error"] is None and len(out[0]["scores"]) == 2, name
        assert "reasoning" not in out[0], name


def test_a_scoring_job_after_another_on_one_engine_reports_its_own_kv_peak(tmp_path: Path, model_folder: Path) -> None:
    """A job on an engine an earlier job had loaded took its KV peak from usage sampled between steps, when a
    scored row's blocks are free again: a scoring job after a generation job reported a peak of 0%, where the same
    job run alone reported the blocks its steps held."""
    prompts = [" ".join(f"w{i + j}" for j in range(30)) + " " for i in range(2, 8)]
    rows = [{"prompt": p, "continuations": ["w3 w4", "w5"]} for p in prompts]
    (tmp_path / "score.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "w9 w8 w7"}) + "\n")

    def job(name: str, **fields) -> JobSpec:
        return job_from_dict(
            {
                "name": name,
                "model": str(model_folder),
                "input": {"path": "score.jsonl"},
                "prompt": {"chat_template": False},
                # no prefix cache: the second scoring job computes what the first did, step for step
                "engine": {"block_size": 4, "device": "cpu", "num_blocks_override": 256, "prefix_cache": False},
                **fields,
            },
            base_dir=str(tmp_path),
        )

    alone = run_job(job("alone", task="score"), EngineCache())
    engines = EngineCache()
    run_job(job("generated", input={"path": "gen.jsonl"}, sampling={"max_new_tokens": 4}), engines)
    after_another = run_job(job("after", task="score"), engines)
    assert alone.peak_kv_usage > 0
    assert after_another.peak_kv_usage == alone.peak_kv_usage
