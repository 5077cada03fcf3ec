"""kvbatch as an lm-evaluation-harness model: `loglikelihood`, `loglikelihood_rolling` and `generate_until` on
kvbatch's engine (pip install 'kvbatch[eval]').

Importing this module registers the model under the name `kvbatch` (lm-eval 0.4 finds models only in its own
list or among classes registered by code already imported; it reads no entry points), so:

    import kvbatch.lm_eval
    lm_eval.simple_evaluate(model="kvbatch", model_args="model=PATH", tasks=[...])

and on the command line `kvbatch-lm-eval` is lm-eval's own CLI with the model registered:

    kvbatch-lm-eval --model kvbatch --model_args model=PATH,max_num_batched_tokens=8192 --tasks hellaswag

`model_args`: `model` (a folder, a .gguf file, a cached hub name or `default`), any EngineConfig field (device,
dtype, kv_cache_gib, max_num_batched_tokens, ...), `max_length` (the context lm-eval truncates to; default the
model's; refused over what the KV pool holds), and as `hf` reads them `add_bos_token`, `prefix_token_id`,
`enable_thinking`, `chat_template_args` (given to the chat template) and `think_end_token` (a generation keeps
what follows its last one).
`seed` (the engine's) defaults to lm-eval's torch seed (`--seed`), so a sampled run repeats, as with `hf`.
Generation kwargs other than lm-eval's own, top_p, top_k, min_p, repetition_penalty, min_new_tokens, min_length
and num_beams=1 are refused (`seed` too, as hf's generate() refuses it).
top_p, top_k, min_p and repetition_penalty left unset come, as in hf's generate(), from the model's
generation_config.json, else transformers' defaults (top_k 50 when sampling); its min_new_tokens, min_length,
suppress_tokens and max_new_tokens (over max_gen_toks, as hf's generate() prefers it to lm-eval's max_length) hold
too, and the fields hf follows that kvbatch cannot (no_repeat_ngram_size, typical_p, num_beams, ...) are named
in a warning at load.
`batch_size` is accepted and ignored: the engine packs requests by free KV blocks. On the command line the device
is lm-eval's `--device` (its default, cuda:0, falls back to the CPU without a GPU).

Tokenization follows lm-eval's `hf` model exactly (context and continuation encoded together and split, trailing
whitespace of the context moved into the continuation, an empty context replaced by the prefix token, left
truncation to max_length + 1 tokens), so scores are those of `hf` on the same folder. Choices of one context are
one scoring request: its blocks are computed once and shared through the prefix cache.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import fields, replace
from typing import Any

import jinja2
import lm_eval.models  # noqa: F401 - fills lm-eval's registry first: an empty one would hide its own models
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from kvbatch.jobs.run import release_engines
from kvbatch.runner.config import EngineConfig, SamplingParams
from kvbatch.runner.engine import Engine
from kvbatch.runner.request import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

_ENGINE_FIELDS = {f.name for f in fields(EngineConfig)}
# lm-eval's generation kwargs that SamplingParams knows under the same name (besides until, max_gen_toks,
# temperature and do_sample, handled below). Not `seed`: hf's generate() has no such setting and refuses it.
_SAMPLING_KWARGS = {"top_p", "top_k", "min_p", "repetition_penalty"}
# What hf's generate() uses where neither the request nor the model's generation_config.json sets these:
# transformers' own defaults (GenerationConfig._get_default_generation_params; min_p has none).
_HF_GENERATION_DEFAULTS: dict[str, float | int | None] = {
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}
# generation_config.json fields hf's generate() follows (the sampling ones when sampling) that kvbatch has no control
# for, each with the value that does nothing: one set otherwise is named at load, as answers may differ from hf's.
_HF_UNFOLLOWED: dict[str, Any] = {
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "encoder_repetition_penalty": 1.0,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "dola_layers": None,
    "guidance_scale": 1.0,
    "sequence_bias": None,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "watermarking_config": None,
}


class EngineRowError(RuntimeError):
    """An lm-eval request the engine refused (too long for the context, token ids outside the vocabulary)."""


@register_model("kvbatch")
class KVBatchLM(TemplateLM):
    def __init__(
        self,
        model: str | None = None,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        enable_thinking: bool | None = None,
        chat_template_args: dict[str, Any] | str | None = None,
        think_end_token: str | int | None = None,
        batch_size: Any = None,
        max_batch_size: Any = None,
        device: str | None = None,
        engine: Engine | None = None,
        pretrained: str | None = None,
        **engine_settings: Any,
    ) -> None:
        super().__init__()
        # `pretrained=` names the model for lm-eval's hf, vllm and sglang models: a model_args line written for
        # them runs here as it is
        if pretrained is not None and model is not None and pretrained != model:
            raise ValueError(
                f"kvbatch model_args: pretrained {pretrained!r} and model {model!r} name two models; give one"
            )
        model = model or pretrained or "default"
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"kvbatch model_args: max_length must be at least 1, got {max_length}")
        unknown = set(engine_settings) - _ENGINE_FIELDS
        if unknown:
            raise ValueError(
                f"kvbatch model_args: unknown {sorted(unknown)}; model_args are model (or pretrained), max_length, "
                "add_bos_token, "
                "prefix_token_id, enable_thinking, chat_template_args, think_end_token and EngineConfig's fields: "
                f"{', '.join(sorted(_ENGINE_FIELDS - {'model'}))}"
            )
        if device is not None:  # lm-eval's --device, whose default is cuda:0 even where there is no GPU
            if device.startswith("cuda") and not torch.cuda.is_available():
                logger.warning("kvbatch: device %s asked for, but CUDA is not available; running on the CPU", device)
                device = "cpu"
            engine_settings.setdefault("device", device)
        # hf samples from torch's generator, which lm-eval seeds (--seed) before it builds the model: the engine's
        # seed base follows that seed, so a sampled run gives the same answers each time, as hf's does.
        engine_settings.setdefault("seed", torch.initial_seed())
        if engine is None:
            # One engine at a time on a device, as a GPU's KV pool takes the memory the weights leave: one that
            # kvbatch.generate or a job holds in this process goes first (kvbatch.generate loads it again).
            release_engines()
            engine = Engine(EngineConfig(model=model, **engine_settings))
        self.engine = engine
        self.tokenizer = self.engine.tokenizer
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        # hf loads the tokenizer with add_bos_token, which makes it prepend BOS; kvbatch shares the engine's, so it
        # prepends BOS itself where that tokenizer would not.
        bos = self.tokenizer.bos_token_id
        self._prepends_bos = bool(add_bos_token) and bos is not None and self.tokenizer.encode("a")[:1] != [bos]
        self._max_length = max_length or self.engine.max_model_len
        if self._max_length > self.engine.max_model_len:  # more memory would not help
            raise ValueError(
                f"kvbatch model_args: max_length {self._max_length} is over the model's context of "
                f"{self.engine.max_model_len} tokens (max_model_len); set max_length to at most "
                f"{self.engine.max_model_len}"
            )
        if self._max_length > self.engine.capacity_tokens:
            # lm-eval's truncation and rolling windows follow max_length: cut to the pool, the scores would depend
            # on this machine's memory (as task: score_rolling refuses too).
            raise ValueError(
                f"kvbatch model_args: max_length {self._max_length} is over the {self.engine.capacity_tokens} "
                f"tokens this engine holds (context {self.engine.max_model_len}, KV pool "
                f"{self.engine.pool_size.num_tokens}); give the pool more memory (kv_cache_gib, "
                f"gpu_memory_utilization) or set max_length to at most {self.engine.capacity_tokens}"
            )
        self._model_name = model
        # hf's thinking args: enable_thinking goes to the chat template, which needs the generation's end of
        # thinking to cut the trace off; a token id spelt as digits is that id.
        if isinstance(chat_template_args, str):  # from a model_args string
            chat_template_args = json.loads(chat_template_args)
        self.chat_template_args = dict(chat_template_args or {})
        if enable_thinking is not None:
            self.chat_template_args["enable_thinking"] = enable_thinking
        self.enable_thinking = enable_thinking
        if isinstance(think_end_token, str) and think_end_token.isdigit():
            think_end_token = int(think_end_token)
        if enable_thinking and think_end_token is None:
            raise ValueError(
                "kvbatch model_args: enable_thinking=True needs think_end_token (the text or token id that ends the "
                "thinking), as lm-eval's hf model does"
            )
        self.think_end_token = think_end_token
        self._generation_defaults = self._hf_generation_defaults()
        config = getattr(self.engine.model, "generation_config", None)
        # hf masks EOS while fewer than min_new_tokens are new, else (min_new_tokens unset) while the context and
        # the new tokens are fewer than min_length: per request, the engine's min_tokens. A request's own gen
        # kwargs go over these.
        self._min_new_tokens: int | None = getattr(config, "min_new_tokens", None)
        self._min_length = int(getattr(config, "min_length", None) or 0)
        # hf passes max_length (context + max_gen_toks) to generate(), where the config's max_new_tokens wins.
        self._max_new_tokens: int | None = getattr(config, "max_new_tokens", None)
        unfollowed = sorted(
            name
            for name, neutral in _HF_UNFOLLOWED.items()
            if getattr(config, name, None) not in (None, neutral, [], {})
        )
        if unfollowed:
            logger.warning(
                "kvbatch: the model's generation_config.json sets %s, which lm-eval's hf model follows and kvbatch "
                "does not: generations may differ from hf's",
                ", ".join(unfollowed),
            )

    # ---- what lm-eval asks of a model ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's hf model: its prefix_token_id model_arg, else BOS where the tokenizer has one, else EOS
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self._model_name)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False  # the text already starts with BOS
        return self._encode(string, add_special_tokens)

    def _encode_generation_context(self, context: str) -> list[int]:
        # hf encodes these with tok_batch_encode, which looks for the tokenizer's BOS text at the start, where
        # tok_encode looks for the prefix token's: they differ under a prefix_token_id model_arg.
        return self._encode(context, False if has_bos_prefix(context, self.tokenizer.bos_token) else None)

    def _encode(self, string: str, add_special_tokens: bool | None) -> list[int]:
        """`string`'s token ids; add_special_tokens None: as add_bos_token says, else as the tokenizer does."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        if self._prepends_bos and add_special_tokens is not False:
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
                **self.chat_template_args,
            )

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            # As lm-eval's hf model: a template that refuses a system role (--system_instruction on Gemma, older
            # Mistral) is rendered again without the system messages.
            logger.warning("kvbatch: the chat template failed; rendering it again without the system messages")
            return render([m for m in chat_history if m["role"] != "system"])

    # ---- scoring ---------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.enable_thinking:  # as hf: a thinking model's scores would not be of its answers
            tasks = sorted({req.task_name for req in requests if getattr(req, "task_name", None)})
            raise ValueError(
                f"enable_thinking=True does not go with loglikelihood tasks (as in lm-eval's hf model): {tasks}"
            )
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """Each (context, continuation) pair scored as lm-eval's hf model scores it; pairs with the same context
        tokens go to the engine as one request with several continuations."""
        groups: dict[tuple[int, ...], list[int]] = {}
        pairs: list[tuple[list[int], list[int]]] = []
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"lm-eval request {index}: the continuation has no tokens")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"lm-eval request {index}: the continuation has {len(continuation)} tokens, "
                    f"over max_length {self.max_length}"
                )
            # hf's window: the last max_length + 1 tokens, the last of which is never input
            tokens = (context + continuation)[-(self.max_length + 1) :]
            context = tokens[: len(tokens) - len(continuation)]
            pairs.append((context, continuation))
            groups.setdefault(tuple(context), []).append(index)
        engine_requests = [
            GenerationRequest(n, list(context), continuations=[pairs[i][1] for i in members])
            for n, (context, members) in enumerate(groups.items())
        ]
        members_of = list(groups.values())
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="kvbatch loglikelihood")
        for result in self._run(engine_requests):
            for index, score in zip(members_of[result.request_id], result.scores or []):
                answers[index] = (score.logprob, score.is_greedy)
                request_str = requests[index][0]
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answers[index])
            progress.update(len(members_of[result.request_id]))
        progress.close()
        return answers  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts, scored in lm-eval's disjoint windows of max_length tokens."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        engine_requests = []
        stops: list[list[str]] = []
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            params, until, (min_new_tokens, min_length) = self._sampling(gen_kwargs, eos_text)
            # hf's room for the answer: the context is left-truncated to max_length - max_gen_toks tokens
            max_context = self.max_length - params.max_new_tokens
            if max_context <= 0:
                raise ValueError(
                    f"max_gen_toks {params.max_new_tokens} leaves no context of max_length {self.max_length}"
                )
            if self._max_new_tokens is not None:
                params = replace(params, max_new_tokens=int(self._max_new_tokens))
            if "" in until:
                # hf's stop criteria ask whether a stop is in the decoded text, and "" is in every text: hf stops
                # after the first token and keeps it (its post-processing skips empty stops). The context above
                # is still cut to leave room for max_gen_toks, as in hf.
                params = replace(params, max_new_tokens=1)
            context_ids = self._encode_generation_context(context)[-max_context:]
            # transformers sets min_length to the context and min_new_tokens where that is given, even as 0
            min_tokens = min_length - len(context_ids) if min_new_tokens is None else min_new_tokens
            if min_tokens > 0:  # hf's mask holds to the end where it asks for more than max_gen_toks
                params = replace(params, min_tokens=min(min_tokens, params.max_new_tokens))
            engine_requests.append(GenerationRequest(index, context_ids, params))
            stops.append(until)
        answers = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="kvbatch generate_until")
        for result in self._run(engine_requests):
            text = self._answer(result, stops[result.request_id])
            answers[result.request_id] = text
            self.cache_hook.add_partial("generate_until", requests[result.request_id].args, text)
            progress.update(1)
        progress.close()
        return answers

    def _answer(self, result: GenerationResult, until: list[str]) -> str:
        """The generation as hf post-processes it: what follows the last think_end_token (a token id: its last
        occurrence among the tokens), cut at the first stop."""
        text, think = result.text, self.think_end_token
        if isinstance(think, int):
            # hf decodes the tokens after the id's last occurrence, or all of them, and strips the leading
            # whitespace of every answer before it cuts at the stops: the engine's text, cut first, would keep it.
            tokens = result.completions[0].token_ids
            last = len(tokens) - 1 - tokens[::-1].index(think) if think in tokens else -1
            text = self.tok_decode(tokens[last + 1 :]).lstrip()
        return postprocess_generated_text(text, until, think if isinstance(think, str) else None)

    def _hf_generation_defaults(self) -> dict[str, Any]:
        """top_k, top_p, min_p and repetition_penalty where a request does not set them, as hf's generate() takes
        them: from the model's generation_config.json, else transformers' defaults. hf applies a repetition_penalty
        there in greedy tasks too (Qwen's instruct models set one), and samples from the top 50 tokens by default.
        The config's suppress_tokens, which hf masks at every step, leave the others as allowed_token_ids."""
        config = getattr(self.engine.model, "generation_config", None)
        defaults: dict[str, Any] = {}
        for name, default in _HF_GENERATION_DEFAULTS.items():
            value = getattr(config, name, None)
            value = default if value is None else value
            if value is not None:
                defaults[name] = value
        suppressed = set(getattr(config, "suppress_tokens", None) or ())
        if suppressed:
            defaults["allowed_token_ids"] = tuple(i for i in range(self.engine.vocab_size) if i not in suppressed)
        return defaults

    def _sampling(
        self, gen_kwargs: dict[str, Any], eos_text: str
    ) -> tuple[SamplingParams, list[str], tuple[int | None, int]]:
        """The request's SamplingParams, its stops, and the min_new_tokens and min_length that EOS waits for (the
        second needs the context's length: generate_until makes them the engine's min_tokens)."""
        # lm-eval's own reading, as its hf model's: a copy (the request's until stays as it was, which lm-eval's
        # cache keys on), the max_gen_toks aliases, and do_sample against temperature.
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        if not all(isinstance(stop, str) for stop in until):
            # hf fails on these as it builds its stop criteria; left to post-processing, they fail after generating
            raise ValueError(f"until must be a string or a list of strings, got {gen_kwargs.get('until')!r}")
        max_new = kwargs.pop("max_gen_toks")
        do_sample = kwargs.pop("do_sample")
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not do_sample:
            # hf's generate() decodes greedily without do_sample, whatever the temperature (lm-eval leaves a
            # negative one in place)
            temperature = 0.0
        elif temperature <= 0:
            # hf hands generate() do_sample=True with a temperature of 0 (its default where none is given), which
            # transformers refuses; generating greedily instead would answer a task that asked for samples.
            raise ValueError(
                f"do_sample=True needs a temperature over 0 (got {temperature}), as in lm-eval's hf model, whose "
                "generate() refuses it; give a temperature, or do_sample=False for greedy decoding"
            )
        settings = self._generation_defaults | {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_KWARGS}
        # as hf's generate() takes them: the request's over generation_config.json's
        min_new_tokens = kwargs.pop("min_new_tokens", self._min_new_tokens)
        eos_floor = (
            None if min_new_tokens is None else int(min_new_tokens),
            int(kwargs.pop("min_length", self._min_length) or 0),
        )
        if kwargs.get("num_beams") == 1:  # one beam is what the engine does (tasks set it)
            del kwargs["num_beams"]
        if kwargs:
            # hf hands these to generate(), which follows them (num_beams, no_repeat_ngram_size) or fails on a typo or
            # on `seed`: generating without them would give other answers than the task asks for.
            seeded = "; hf's generate() refuses seed too: a run's seed is lm-eval's --seed" if "seed" in kwargs else ""
            raise ValueError(
                f"kvbatch cannot follow the generation kwargs {sorted(kwargs)}; it reads until, max_gen_toks "
                f"(or an alias), do_sample, temperature, {', '.join(sorted(_SAMPLING_KWARGS))}, min_new_tokens, "
                f"min_length and num_beams=1{seeded}"
            )
        params = SamplingParams(
            max_new_tokens=int(max_new),
            temperature=temperature,
            stop=tuple(s for s in until if s),
            **settings,
        )
        return params, until, eos_floor

    def _run(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        for result in self.engine.generate(requests):
            if result.error:
                raise EngineRowError(f"kvbatch could not run an lm-eval request: {result.error}")
            yield result

    def get_model_info(self) -> dict[str, Any]:
        # simple_evaluate merges this into the results' config, whose own `model` names the lm-eval model
        # ("kvbatch"): keys of hf's kind (model_*) keep it. The dtype is the engine's choice ("auto": bfloat16
        # on cuda), which scores depend on.
        loaded = self.engine.loaded
        return {"model_source": loaded.source, "model_dtype": str(loaded.dtype).removeprefix("torch.")}


def main() -> None:
    """`kvbatch-lm-eval`: lm-eval's own CLI, with the `kvbatch` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
