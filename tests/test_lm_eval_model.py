"""lm-eval's own simple_evaluate with model `kvbatch` gives what its `hf` model gives on the same folder: a tiny
random Llama saved with save_pretrained, tasks defined from local JSONL files (no hub)."""

import json
import math
import random
from pathlib import Path
from typing import Any

import lm_eval
import lm_eval.tasks
import pytest
from tiny_models import hf_reference, word_tokenizer

import kvbatch.lm_eval  # noqa: F401 - registers the model

MAX_LENGTH = 48  # small, so rolling texts span several windows and long contexts are truncated

TASKS = {
    "kv_choice": """
task: kv_choice
dataset_path: json
dataset_kwargs: {data_files: {test: DATA/choice.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "kv_generate": """
task: kv_generate
dataset_path: json
dataset_kwargs: {data_files: {test: DATA/generate.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["w43", "w499"], max_gen_toks: 10, do_sample: false}
metric_list: [{metric: exact_match}]
""",
    "kv_rolling": """
task: kv_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: DATA/rolling.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
}


def words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(2, 512)}" for _ in range(count))


def write_tasks(folder: Path) -> None:
    rng = random.Random(0)
    rows = {
        # Contexts of 3 to 60 words: the longest are left-truncated to MAX_LENGTH; choices of 1 to 4 words.
        "choice": [
            {"question": words(rng, rng.randint(3, 60)), "choices": [words(rng, rng.randint(1, 4)) for _ in range(4)]}
            | {"answer": rng.randrange(4)}
            for _ in range(6)
        ],
        "generate": [{"question": words(rng, rng.randint(3, 20)), "answer": words(rng, 2)} for _ in range(4)],
        "rolling": [{"text": words(rng, n)} for n in (5, 47, 48, 130)],
    }
    for name, data in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
    for name, text in TASKS.items():
        (folder / f"{name}.yaml").write_text(text.replace("DATA", str(folder)))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_reference("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def with_chat_template(model_folder: Path, folder: Path, template: str) -> Path:
    """A copy of the model folder whose tokenizer has `template` as its chat template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_folder, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


def evaluate(model: str, model_args: str, task_folder: Path) -> dict:
    manager = lm_eval.tasks.TaskManager(include_path=str(task_folder), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(TASKS), task_manager=manager, log_samples=True, bootstrap_iters=0
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the models are local folders: nothing is fetched


def hf_and_kvbatch(folder: Path, extra_args: str = "") -> tuple[Any, Any]:
    """lm-eval's `hf` model and kvbatch's on the same folder, with the same model_args (`extra_args`: ",key=value")."""
    from lm_eval.api.registry import get_model

    args = f"device=cpu,max_length={MAX_LENGTH}{extra_args}"
    hf = get_model("hf").create_from_arg_string(f"pretrained={folder},{args}")
    return hf, get_model("kvbatch").create_from_arg_string(f"model={folder},{args}")


def test_kvbatch_gives_the_metrics_of_hf(model_folder: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    want = evaluate("hf", f"pretrained={model_folder},device=cpu,max_length={MAX_LENGTH}", tmp_path)
    got = evaluate("kvbatch", f"model={model_folder},device=cpu,max_length={MAX_LENGTH},block_size=4", tmp_path)
    for task in TASKS:
        want_metrics = {k: v for k, v in want["results"][task].items() if isinstance(v, float)}
        got_metrics = {k: v for k, v in got["results"][task].items() if isinstance(v, float)}
        assert want_metrics and got_metrics.keys() == want_metrics.keys()
        for key, value in want_metrics.items():
            assert math.isclose(got_metrics[key], value, rel_tol=1e-5, abs_tol=1e-5), (task, key)
        for want_sample, got_sample in zip(want["samples"][task], got["samples"][task], strict=True):
            want_resps, got_resps = want_sample["resps"], got_sample["resps"]
            if task == "kv_generate":
                assert got_resps == want_resps
                continue
            for (want_answer,), (got_answer,) in zip(want_resps, got_resps, strict=True):
                want_value = want_answer[0] if isinstance(want_answer, (list, tuple)) else want_answer
                got_value = got_answer[0] if isinstance(got_answer, (list, tuple)) else got_answer
                assert got_value == pytest.approx(want_value, abs=1e-4), task
                if task == "kv_choice":
                    assert got_answer[1] == want_answer[1]  # is_greedy


def test_the_results_config_names_the_kvbatch_model_and_its_dtype(
    model_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    # simple_evaluate merges get_model_info() into results["config"], whose "model" is the lm-eval model's name:
    # kvbatch's {"model": PATH} replaced "kvbatch" there, so the results no longer said which model ran them.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    args = f"model={model_folder},device=cpu,max_length={MAX_LENGTH}"
    results = lm_eval.simple_evaluate(
        model="kvbatch", model_args=args, tasks=["kv_rolling"], task_manager=manager, limit=1, bootstrap_iters=0
    )
    config = results["config"]
    assert config["model"] == "kvbatch" and config["model_args"] == args
    assert config["model_source"] == str(model_folder) and config["model_dtype"] == "float32"


def test_generate_until_reads_gen_kwargs_as_hf_does_and_leaves_them(model_folder: Path) -> None:
    # lm-eval's cache keys a request on its arguments: a model that adds the EOS to the request's own `until`
    # makes every cached run miss. max_tokens and max_completion_tokens are aliases of max_gen_toks.
    import copy

    from lm_eval.api.instance import Instance

    rng = random.Random(3)
    kwargs = [
        {"until": ["w43"], "max_tokens": 3},
        {"until": "w499", "max_completion_tokens": 5, "do_sample": False},
        {"until": ["w7", "w8"], "max_new_tokens": 4, "temperature": 0.0},
    ]
    requests = [
        Instance("generate_until", {}, (words(rng, 8), kw), idx=i, metadata=("t", i, 1)) for i, kw in enumerate(kwargs)
    ]
    asked = copy.deepcopy([r.args for r in requests])
    hf, model = hf_and_kvbatch(model_folder)
    want = hf.generate_until(copy.deepcopy(requests))
    assert model.generate_until(requests) == want
    assert [r.args for r in requests] == asked
    assert len(want[1].split()) == 5  # max_completion_tokens held (not the default of 256 tokens)


def test_add_bos_token_prepends_bos_as_hf_does(model_folder: Path) -> None:
    # The word tokenizer adds no BOS of its own; hf loads it with add_bos_token, which makes it prepend one.
    from lm_eval.api.instance import Instance

    rng = random.Random(5)
    pairs = [(words(rng, 6), " " + words(rng, 2)), ("", words(rng, 3))]
    requests = [Instance("loglikelihood", {}, pair, idx=i, metadata=("t", i, 1)) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (words(rng, 70),), idx=0, metadata=("t", 0, 1))]
    hf, model = hf_and_kvbatch(model_folder, ",add_bos_token=True")
    assert model.tok_encode("w5 w6") == hf.tok_encode("w5 w6") == [0, 5, 6]
    for got, want in zip(model.loglikelihood(requests), hf.loglikelihood(requests), strict=True):
        assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1] == want[1]
    assert model.loglikelihood_rolling(rolling)[0] == pytest.approx(hf.loglikelihood_rolling(rolling)[0], abs=1e-4)


def test_a_max_length_over_the_pool_is_refused_not_cut(model_folder: Path) -> None:
    # lm-eval truncates and windows by max_length: cut to the pool, the scores would depend on the machine's memory.
    from lm_eval.api.registry import get_model

    with pytest.raises(ValueError, match="max_length 48 is over the 32 tokens this engine holds"):
        get_model("kvbatch").create_from_arg_string(
            f"model={model_folder},device=cpu,max_length=48,block_size=4,num_blocks_override=8"
        )


def test_pretrained_names_the_model_as_in_hf_and_a_bad_max_length_is_refused(model_folder: Path) -> None:
    """`--model_args pretrained=...`, what hf, vllm and sglang take, was refused as unknown; a max_length of 0 or
    below was taken, and the requests failed later in odd ways."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    lm = get_model("kvbatch").create_from_arg_string(f"pretrained={model_folder},device=cpu,max_length={MAX_LENGTH}")
    hf = get_model("hf").create_from_arg_string(f"pretrained={model_folder},device=cpu,max_length={MAX_LENGTH}")
    requests = [Instance("loglikelihood", {}, ("w5 w6", " w7 w8"), idx=0, metadata=("t", 0, 1))]
    assert [s for s, _ in lm.loglikelihood(requests)] == pytest.approx([s for s, _ in hf.loglikelihood(requests)])
    with pytest.raises(ValueError, match="pretrained .* and model .* name two models; give one"):
        get_model("kvbatch").create_from_arg_string(f"pretrained={model_folder},model=other,device=cpu")
    with pytest.raises(ValueError, match="max_length 64 is over the model's context of 32 tokens"):
        get_model("kvbatch").create_from_arg_string(f"model={model_folder},device=cpu,max_model_len=32,max_length=64")
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"max_length must be at least 1, got {bad}"):
            get_model("kvbatch").create_from_arg_string(f"model={model_folder},device=cpu,max_length={bad}")


def test_prefix_token_id_is_the_context_of_an_empty_one_as_in_hf(model_folder: Path) -> None:
    # hf's prefix_token_id model_arg: the token before an empty context and before a rolling text's first window.
    from lm_eval.api.instance import Instance

    hf, model = hf_and_kvbatch(model_folder, ",prefix_token_id=7")
    assert model.prefix_token_id == hf.prefix_token_id == 7
    requests = [Instance("loglikelihood", {}, ("", "w40 w41"), idx=0, metadata=("t", 0, 1))]
    rolling = [Instance("loglikelihood_rolling", {}, (words(random.Random(6), 60),), idx=0, metadata=("t", 0, 1))]
    got, want = model.loglikelihood(requests)[0], hf.loglikelihood(requests)[0]
    assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1] == want[1]
    assert model.loglikelihood_rolling(rolling)[0] == pytest.approx(hf.loglikelihood_rolling(rolling)[0], abs=1e-4)


def test_a_template_that_refuses_a_system_role_drops_it_as_hf_does(model_folder: Path, tmp_path: Path) -> None:
    # --system_instruction on a model whose template raises on a system role (Gemma, older Mistral): hf renders
    # the chat again without the system messages instead of failing the evaluation.

    folder = with_chat_template(
        model_folder,
        tmp_path / "no-system",
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}w9{% endif %}",
    )
    chat = [{"role": "system", "content": "w5"}, {"role": "user", "content": "w6 w7"}]
    hf, model = hf_and_kvbatch(folder)
    assert model.apply_chat_template(chat) == hf.apply_chat_template(chat) == "w6 w7</s>w9"


def test_thinking_args_are_read_as_hf_reads_them(model_folder: Path, tmp_path: Path) -> None:
    # enable_thinking and chat_template_args reach the chat template; a generation keeps what follows the last
    # think_end_token (a string, or a token id); loglikelihood tasks are refused with enable_thinking. These args
    # were refused as unknown.
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from transformers import AutoTokenizer

    folder = with_chat_template(
        model_folder,
        tmp_path / "thinking",
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if enable_thinking %}w7 {% endif %}"
        "{% if style %}{{ style }} {% endif %}",
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(9)
    requests = [
        Instance("generate_until", {}, (words(rng, 6), {"until": ["w499"], "max_gen_toks": 12}), idx=0)
        for _ in range(4)
    ]
    args = f"device=cpu,max_length={MAX_LENGTH}"
    plain = get_model("hf").create_from_arg_string(f"pretrained={folder},{args}").generate_until(requests)
    think = plain[0].split()[3]  # a word every model here generates: the end of "thinking" in the first answer
    think_id = tokenizer.convert_tokens_to_ids(think)
    for end in (think, str(think_id)):
        hf, model = hf_and_kvbatch(folder, f",enable_thinking=True,think_end_token={end}")
        chat = [{"role": "user", "content": "w5"}]
        assert model.apply_chat_template(chat) == hf.apply_chat_template(chat) == "w5 w7 "
        got, want = model.generate_until(requests), hf.generate_until(requests)
        assert got == want and got[0] != plain[0], end
        with pytest.raises(ValueError, match="enable_thinking=True"):
            model.loglikelihood([Instance("loglikelihood", {}, ("w1", " w2"), idx=0)])
    styled = get_model("kvbatch").create_from_arg_string(
        f"model={folder},{args}", {"chat_template_args": {"style": "w8"}}
    )
    assert styled.apply_chat_template([{"role": "user", "content": "w5"}]) == "w5 w8 "
    with pytest.raises(ValueError, match="needs think_end_token"):
        get_model("kvbatch").create_from_arg_string(f"model={folder},{args},enable_thinking=True")


def test_a_think_end_token_id_strips_every_answer_as_hf_does(model_folder: Path, tmp_path: Path) -> None:
    """Under a token-id think_end_token, hf decodes each answer's tokens (those after the id's last occurrence, or
    all), strips the leading whitespace, and only then cuts at the stops. kvbatch stripped only answers that held
    the id, and cut the others at the stops first: " w5 w43 w7" with until " w43" was " w5" where hf's was "w5"."""
    import shutil

    from lm_eval.api.instance import Instance
    from tokenizers import decoders
    from transformers import AutoTokenizer

    folder = tmp_path / "leading-space"
    shutil.copytree(model_folder, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer._tokenizer.decoder = decoders.Replace("w", " w")  # answers decode as " w5 w6": a leading space
    tokenizer.save_pretrained(folder)
    rng = random.Random(12)
    requests = [
        Instance("generate_until", {}, (words(rng, 6), {"until": [], "max_gen_toks": 6}), idx=i) for i in range(4)
    ]
    hf, model = hf_and_kvbatch(folder)
    plain = model.generate_until(requests)
    assert plain == hf.generate_until(requests) and all(answer.startswith(" w") for answer in plain)
    assert all(" w511" not in answer for answer in plain)  # the think_end_token below: never generated here
    second_words = [answer.split()[1] for answer in plain]
    cut = [
        Instance("generate_until", {}, (r.args[0], {"until": [" " + word], "max_gen_toks": 6}), idx=r.idx)
        for r, word in zip(requests, second_words, strict=True)
    ]
    hf, model = hf_and_kvbatch(folder, ",think_end_token=511")
    got = model.generate_until(requests + cut)
    assert got == hf.generate_until(requests + cut)
    assert got[:4] == [answer.lstrip() for answer in plain]
    assert got[4:] == [answer.split()[0] for answer in plain]


def test_sampled_generations_follow_lm_evals_torch_seed_as_hf_does(model_folder: Path) -> None:
    # hf samples from torch's generator, which simple_evaluate seeds (--seed, 1234 by default) before it builds
    # the model: a sampled run gives the same answers every time. kvbatch drew a fresh seed base on each run.
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    rng = random.Random(4)
    sampled = {"until": ["w43"], "max_gen_toks": 6, "temperature": 0.8}
    requests = [Instance("generate_until", {}, (words(rng, 5), sampled), idx=i) for i in range(3)]

    def answers(torch_seed: int, extra: str = "") -> list[str]:
        torch.manual_seed(torch_seed)
        model = get_model("kvbatch").create_from_arg_string(f"model={model_folder},device=cpu,max_length=32{extra}")
        return model.generate_until(requests)

    first = answers(1234)
    assert answers(1234) == first
    assert answers(1235) != first
    assert answers(1234, ",seed=7") == answers(1235, ",seed=7")  # the engine's own seed, where given, wins


def test_a_torch_seed_over_2_63_is_the_engines_seed_as_it_is(model_folder: Path) -> None:
    """engine.seed takes every seed torch's manual_seed takes (up to 2**64 - 1), but lm-eval's torch seed was still
    cut to 63 bits on its way there, a leftover of the narrower range: 2**63 + 1234 sampled what 1234 did."""
    import torch
    from lm_eval.api.registry import get_model

    for torch_seed in (1234, 2**63 + 1234, 2**64 - 1):
        torch.manual_seed(torch_seed)
        model = get_model("kvbatch").create_from_arg_string(f"model={model_folder},device=cpu,max_length=32")
        assert model.engine.config.seed == torch_seed


def test_generation_kwargs_the_engine_cannot_follow_are_refused(model_folder: Path) -> None:
    # hf hands the other kwargs to generate(): num_beams=2 searches beams, a typo fails. kvbatch logged a warning
    # per request and generated greedily, answers other than hf's. num_beams=1 (set by tasks) changes nothing.
    from lm_eval.api.instance import Instance

    context = words(random.Random(4), 8)
    hf, model = hf_and_kvbatch(model_folder)
    beam1 = [Instance("generate_until", {}, (context, {"until": ["w43"], "max_gen_toks": 6, "num_beams": 1}), idx=0)]
    assert model.generate_until(beam1) == hf.generate_until(beam1)
    for extra in ({"num_beams": 2}, {"no_repeat_ngram_size": 2}, {"max_length": 40}, {"bogus": 1}):
        request = Instance("generate_until", {}, (context, {"until": ["w43"], "max_gen_toks": 6} | extra), idx=0)
        refused = f"kvbatch cannot follow the generation kwargs \\['{next(iter(extra))}'\\]"
        with pytest.raises(ValueError, match=refused):
            model.generate_until([request])


def test_a_seed_gen_kwarg_is_refused_before_generating_as_in_hf(model_folder: Path, monkeypatch) -> None:
    # hf hands `seed` to generate(), which is no generation setting of transformers: it raises a ValueError before
    # generating, sampled or not. kvbatch read it as the engine's per-request seed, so a task that hf fails ran.
    from lm_eval.api.instance import Instance

    context = words(random.Random(4), 8)
    hf, model = hf_and_kvbatch(model_folder)
    monkeypatch.setattr(model.engine, "generate", lambda requests: pytest.fail("the engine was asked to generate"))
    for kwargs in ({"seed": 3}, {"seed": 3, "do_sample": True, "temperature": 1.0}):
        request = Instance("generate_until", {}, (context, {"until": ["w43"], "max_gen_toks": 4} | kwargs), idx=0)
        with pytest.raises(ValueError, match="not used by the model: \\['seed'\\]"):
            hf.generate_until([request])
        with pytest.raises(ValueError, match="kvbatch cannot follow the generation kwargs \\['seed'\\]"):
            model.generate_until([request])


def test_an_empty_stop_string_ends_the_generation_after_one_token_as_in_hf(model_folder: Path) -> None:
    # hf's stop criteria ask whether each stop is in the decoded text, and "" is in every text: hf stops after the
    # first token, whose text its post-processing keeps (it skips empty stops). kvbatch dropped the empty stop and
    # generated up to max_gen_toks. The long context checks that truncation still leaves room for max_gen_toks.
    from lm_eval.api.instance import Instance

    rng = random.Random(8)
    kwargs = [
        {"until": [""], "max_gen_toks": 6},
        {"until": "", "max_gen_toks": 6},
        {"until": ["w43", ""], "max_gen_toks": 6},
        {"until": ["w43"], "max_gen_toks": 6},
    ]
    requests = [
        Instance("generate_until", {}, (words(rng, n), kw), idx=i)
        for i, (n, kw) in enumerate(zip((5, 60, 9, 5), kwargs, strict=True))
    ]
    hf, model = hf_and_kvbatch(model_folder)
    got, want = model.generate_until(requests), hf.generate_until(requests)
    assert got == want
    assert [len(answer.split()) for answer in got[:3]] == [1, 1, 1] and len(got[3].split()) > 1


def test_do_sample_without_a_temperature_is_refused_as_in_hf(model_folder: Path) -> None:
    # hf hands do_sample=True and a temperature of 0 (its default where none is given) to generate(), which raises
    # a ValueError: the temperature has to be strictly positive. kvbatch generated greedily, which is not what the
    # task asked for. do_sample=False with a temperature is greedy in both.
    from lm_eval.api.instance import Instance

    context = words(random.Random(2), 6)
    hf, model = hf_and_kvbatch(model_folder)
    for kwargs in ({"do_sample": True}, {"do_sample": True, "temperature": 0}, {"do_sample": True, "temperature": 0.0}):
        request = Instance("generate_until", {}, (context, {"until": ["w43"], "max_gen_toks": 4} | kwargs), idx=0)
        with pytest.raises(ValueError, match="strictly positive"):
            hf.generate_until([request])
        with pytest.raises(ValueError, match="do_sample=True needs a temperature over 0"):
            model.generate_until([request])
    greedy_kwargs = {"do_sample": False, "temperature": 0.7, "max_gen_toks": 4}
    greedy = [Instance("generate_until", {}, (context, greedy_kwargs), idx=0)]
    assert model.generate_until(greedy) == hf.generate_until(greedy)


def test_generation_contexts_get_a_bos_as_in_hf(model_folder: Path) -> None:
    # hf encodes generation contexts with tok_batch_encode, which leaves out special tokens only where a context
    # starts with the tokenizer's BOS text, not with the prefix token's as tok_encode does. kvbatch used
    # tok_encode: with prefix_token_id=7 and add_bos_token, a context starting "w7" lost its BOS and its answer.
    from lm_eval.api.instance import Instance

    text = words(random.Random(1), 6)
    requests = [
        Instance("generate_until", {}, (context, {"until": ["w43"], "max_gen_toks": 5}), idx=i)
        for i, context in enumerate((f"w7 {text}", f"<s> {text}", text))
    ]
    hf, model = hf_and_kvbatch(model_folder, ",prefix_token_id=7,add_bos_token=True")
    assert model.generate_until(requests) == hf.generate_until(requests)


def test_without_do_sample_the_temperature_is_ignored_as_in_hf(model_folder: Path) -> None:
    # lm-eval reads a temperature <= 0 without do_sample as do_sample=False, and hf's generate() then decodes
    # greedily whatever the temperature. kvbatch handed a negative temperature to SamplingParams, which refused it.
    from lm_eval.api.instance import Instance

    context = words(random.Random(2), 6)
    requests = [
        Instance("generate_until", {}, (context, {"until": ["w43"], "max_gen_toks": 4} | kwargs), idx=i)
        for i, kwargs in enumerate(({"temperature": -1.0}, {"temperature": -1.0, "do_sample": False}))
    ]
    hf, model = hf_and_kvbatch(model_folder)
    assert model.generate_until(requests) == hf.generate_until(requests)


def test_an_until_that_is_not_text_is_refused_before_generating(model_folder: Path, monkeypatch) -> None:
    # hf fails on `until: null` (lm-eval reads it as [None]) as it builds its stop criteria, before generating.
    # kvbatch dropped the None from the engine's stops, generated, and failed in post-processing with a TypeError.
    from lm_eval.api.instance import Instance

    context = words(random.Random(2), 6)
    hf, model = hf_and_kvbatch(model_folder)
    monkeypatch.setattr(model.engine, "generate", lambda requests: pytest.fail("the engine was asked to generate"))
    for until in (None, [None], ["w43", 5]):
        request = Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": 4}), idx=0)
        with pytest.raises(ValueError):
            hf.generate_until([request])
        with pytest.raises(ValueError, match="until must be a string or a list of strings"):
            model.generate_until([request])


def test_the_models_generation_config_sets_defaults_as_in_hf(model_folder: Path, tmp_path: Path) -> None:
    # hf's generate() starts from the folder's generation_config.json, then transformers' defaults (top_k 50), and
    # lm-eval's gen kwargs go over them: a repetition_penalty there holds in greedy tasks too (Qwen's instruct
    # models set one), top_k and top_p where a task samples. kvbatch read none of them.
    import shutil

    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    folder = tmp_path / "generation-config"
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config |= {"repetition_penalty": 50.0, "top_k": 1}  # top_k 1: a sampled answer is the greedy one, comparable
    (folder / "generation_config.json").write_text(json.dumps(config))
    context = words(random.Random(7), 60)  # greedy without the penalty repeats w149 seven times here
    requests = [
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 10} | kwargs), idx=i)
        for i, kwargs in enumerate(({}, {"do_sample": True, "temperature": 1.0}, {"repetition_penalty": 1.0}))
    ]
    hf, model = hf_and_kvbatch(folder)
    got = model.generate_until(requests)
    assert got == hf.generate_until(requests)
    assert got[0] != got[2]  # the request's own repetition_penalty wins

    plain = get_model("kvbatch").create_from_arg_string(f"model={model_folder},device=cpu,max_length={MAX_LENGTH}")
    sampled = Instance("generate_until", {}, (context, {"do_sample": True, "temperature": 0.8}), idx=0)
    assert plain._sampling(sampled.args[1], "</s>")[0].top_k == 50  # transformers' default where the folder has none


def with_generation_config(model_folder: Path, folder: Path, **settings: Any) -> Path:
    """A copy of the model folder whose generation_config.json also sets `settings`."""
    import shutil

    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(config | settings))
    return folder


def test_generation_config_bans_of_eos_and_tokens_hold_as_in_hf(model_folder: Path, tmp_path: Path) -> None:
    # hf's generate() follows min_new_tokens and min_length (EOS masked until then) and suppress_tokens (masked at
    # every step) from generation_config.json. kvbatch followed none of them: its answers stopped at EOS, or held a
    # suppressed token, where hf's did not.
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    context = "w503 w124 w128 w181 w361 w113"  # greedy here: w293 w88 </s>
    requests = [
        Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": 8}), idx=i)
        for i, until in enumerate(([], ["w43"], [""]))
    ]
    args = f"device=cpu,max_length={MAX_LENGTH}"
    plain = get_model("kvbatch").create_from_arg_string(f"model={model_folder},{args}").generate_until(requests)
    assert plain[0] == "w293 w88"
    models = {}
    for name, settings in {
        "min-new-tokens": {"min_new_tokens": 5},
        "min-length": {"min_length": 6 + 4},  # the context's 6 tokens and 4 new ones
        "suppress": {"suppress_tokens": [88, 7]},
        "both": {"min_new_tokens": 3, "suppress_tokens": [88]},
    }.items():
        folder = with_generation_config(model_folder, tmp_path / name, **settings)
        hf, model = hf_and_kvbatch(folder)
        got = model.generate_until(requests)
        assert got == hf.generate_until(requests), name
        assert got[0] != plain[0], name
        models[name] = (model, hf)
    # As gen kwargs, min_new_tokens and min_length go over the folder's, as hf's generate() takes them; a
    # min_new_tokens, even 0, takes the place of min_length (transformers' _prepare_generated_length).
    for name, extra in (
        ("both", {"min_new_tokens": 0}),
        ("both", {"min_new_tokens": 6}),
        ("both", {"min_length": 6 + 5}),
        ("min-length", {"min_new_tokens": 0}),
        ("min-length", {"min_new_tokens": 1}),
    ):
        model, hf = models[name]
        asked = [Instance(r.request_type, {}, (r.args[0], r.args[1] | extra), idx=r.idx) for r in requests]
        assert model.generate_until(asked) == hf.generate_until(asked), (name, extra)


def test_generation_config_fields_kvbatch_cannot_follow_are_named_once(
    model_folder: Path, tmp_path: Path, caplog
) -> None:
    # hf's generate() follows no_repeat_ngram_size, typical_p, forced_eos_token_id... from generation_config.json;
    # kvbatch has no such control and gave other answers than hf without a word.
    import logging

    from lm_eval.api.registry import get_model

    args = f"device=cpu,max_length={MAX_LENGTH}"
    folder = with_generation_config(
        model_folder,
        tmp_path / "unfollowed",
        no_repeat_ngram_size=3,
        typical_p=0.9,
        forced_eos_token_id=1,
        num_beams=1,  # transformers' default: nothing to warn about
        epsilon_cutoff=0.0,
    )
    with caplog.at_level(logging.WARNING, logger="kvbatch.lm_eval"):
        get_model("kvbatch").create_from_arg_string(f"model={folder},{args}")
    warnings = [r.getMessage() for r in caplog.records if r.name == "kvbatch.lm_eval"]
    assert len(warnings) == 1
    assert "forced_eos_token_id, no_repeat_ngram_size, typical_p" in warnings[0]
    assert "num_beams" not in warnings[0] and "epsilon_cutoff" not in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvbatch.lm_eval"):
        get_model("kvbatch").create_from_arg_string(f"model={model_folder},{args}")
    assert not [r for r in caplog.records if r.name == "kvbatch.lm_eval"]


def test_a_generation_config_max_new_tokens_sets_the_length_as_in_hf(model_folder: Path, tmp_path: Path) -> None:
    # lm-eval's hf model passes max_length (context + max_gen_toks) to generate(), where a max_new_tokens from
    # generation_config.json takes precedence: hf's answers have that many tokens, more or fewer than max_gen_toks.
    # kvbatch generated max_gen_toks tokens. The context is still cut to leave max_gen_toks, as in hf.
    from lm_eval.api.instance import Instance

    rng = random.Random(11)
    requests = [
        Instance("generate_until", {}, (words(rng, n), {"until": until, "max_gen_toks": 8}), idx=i)
        for i, (n, until) in enumerate(((5, []), (60, []), (5, [""])))
    ]
    for max_new_tokens in (3, 12):
        folder = with_generation_config(model_folder, tmp_path / str(max_new_tokens), max_new_tokens=max_new_tokens)
        hf, model = hf_and_kvbatch(folder)
        got = model.generate_until(requests)
        assert got == hf.generate_until(requests), max_new_tokens
        assert len(got[0].split()) == max_new_tokens and len(got[2].split()) == 1


def test_the_model_releases_the_engine_kvbatch_generate_holds(model_folder: Path, monkeypatch) -> None:
    """A GPU's KV pool takes the memory its engine's weights leave: an lm-eval model built in a process where
    kvbatch.generate had loaded a model found none for its pages. The Python API's engine is closed first."""
    from job_fakes import fake_factory

    from kvbatch.jobs import generate as generate_module
    from kvbatch.jobs.run import EngineCache

    closed: list[str] = []
    inner = fake_factory()

    def factory(model: str, settings: dict) -> Any:
        engine = inner(model, settings)
        engine.close = lambda: closed.append(model)
        return engine

    monkeypatch.setattr(generate_module, "_ENGINES", EngineCache(factory))
    assert kvbatch.generate(["hi"], model="m1") is not None and closed == []
    kvbatch.lm_eval.KVBatchLM(model=str(model_folder), device="cpu")
    assert closed == ["m1"]
