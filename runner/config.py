"""Every setting of the engine (`EngineConfig`) and of a request's sampling (`SamplingParams`), declared once.

Each field carries its type, default, bounds and a one-line doc (`setting(...)`). Everything that sets them is
checked against these declarations and nothing else: the job file's `engine:` and `sampling:` sections (with the
file, line and field in the message), `--set`, an OpenAI Batch body's or a row's own values (a bad one fails that
row), code that builds a config, and `kvbatch bench`. docs/job-file.md is generated from them.

Torch-free, so that a job file is checked before torch is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .structured_outputs import StructuredOutputs

# The seeds torch's manual_seed takes (-1 is 2**64 - 1 there, and here): OpenAI's and vLLM's int64 among them.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

Policy = Literal["optimistic", "reserve"]
POLICIES: tuple[str, ...] = typing.get_args(Policy)
DType = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]
Backend = Literal["auto", "torch", "cpu", "triton", "flash-attn"]

# A temperature below this is greedy: the distribution is a point mass on the top token anyway, and dividing
# the logits by it would overflow float32 (an all-inf row has no softmax).
GREEDY_BELOW_TEMPERATURE = 1e-5
REPETITION_PENALTY_MIN = 1e-6


def setting(default: Any = dataclasses.MISSING, doc: str = "", **rules: Any) -> Any:
    """A dataclass field with its doc and bounds: `min`, `max` (inclusive), `gt` (exclusive), `nonempty` and
    `no_empty_string` (strings), `pattern` with `pattern_help` (strings), `internal` (not settable from a file)."""
    metadata = {"doc": doc, **rules}
    if isinstance(default, (list, dict, set)):
        raise TypeError("a mutable default needs a tuple or a default_factory")
    return field(default=default, metadata=metadata)


def rule_violation(value: Any, rules: typing.Mapping[str, Any]) -> str | None:
    """Why `value` breaks the bounds in `rules` ("must be >= 1, got 0"), or None. One check for every path."""
    if isinstance(value, str):
        if rules.get("nonempty") and not value.strip():
            return "must not be empty"
        if rules.get("no_empty_string") and not value:  # whitespace is fine: "\n" is a common stop string
            return "must not be an empty string"
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            return f"must be {rules['pattern_help']}, got {value!r}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if "min" in rules and value < rules["min"]:
        return f"must be >= {rules['min']}, got {value}"
    if "max" in rules and value > rules["max"]:
        return f"must be <= {rules['max']}, got {value}"
    if "gt" in rules and value <= rules["gt"]:
        return f"must be > {rules['gt']}, got {value}"
    return None


def type_violation(hint: Any, value: Any) -> str | None:
    """Why `value` is not of the declared type (JSON and YAML values: no bool for a number, finite floats), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return type_violation(inner, value)
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(repr, args))}, got {value!r}"
    if origin is tuple and Ellipsis not in args:  # a fixed shape: (token id, bias)
        items_ok = isinstance(value, tuple) and len(value) == len(args)
        items_ok = items_ok and all(type_violation(a, item) is None for a, item in zip(args, value))
        return None if items_ok else f"must be a pair ({', '.join(_KIND_NAMES[a] for a in args)}), got {_shown(value)}"
    if origin is tuple:
        items_ok = isinstance(value, tuple) and all(type_violation(args[0], item) is None for item in value)
        kind = (
            _KIND_NAMES[args[0]] if typing.get_origin(args[0]) is tuple else f"{_KIND_NAMES[args[0]]} (a list of them)"
        )
        return None if items_ok else f"must be {kind}, got {_shown(value)}"
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f"must be a {hint.__name__}, got {value!r}"
    if hint is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):  # True is an int to Python, not to a setting
        ok = False
    elif hint is float:  # JSON and YAML can spell Infinity and NaN, which no setting means
        ok = isinstance(value, (int, float)) and is_finite(value)
    elif hint is int:
        ok = isinstance(value, int)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config.py does not support the field type {hint!r}")
    return None if ok else f"must be {_KIND_NAMES[hint]}, got {value!r}"


def is_finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer no float holds: JSON reads 1e400 as inf, but a 400-digit integer as an int
        return False


def _shown(value: Any) -> str:
    """A value as the row or file spelt it: lists arrive here as tuples."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


_KIND_NAMES = {
    int: "an integer",
    float: "a finite number",
    str: "a string",
    bool: "true or false",
    tuple[int, float]: "a token id -> bias mapping, or [id, bias] pairs",
}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The declared types of a settings dataclass's fields. Once per class: typing.get_type_hints compiles each
    annotation's text again at every call (23 compiles for a SamplingParams), and a job builds one for every row
    that sets its own sampling values (each OpenAI Batch line): two thirds of such a row's time on the host."""
    return typing.get_type_hints(cls)


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a settings dataclass against its declaration; raise ValueError naming the first bad one.

    Code that builds a config, and a row's own values, go through here; a job file is checked field by field
    against the same declarations with its lines (jobs/schema.py)."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        problem = type_violation(hints[f.name], value)
        if problem is None and isinstance(value, tuple):
            problem = next((p for p in (rule_violation(v, f.metadata) for v in value) if p), None)
        elif problem is None:
            problem = rule_violation(value, f.metadata)
        if problem:
            raise ValueError(f"{prefix}{f.name} {problem}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine is built; a job file's `engine:` section sets these (its `model` is the job's)."""

    model: str = setting("default", "the model: default, a local folder, a .gguf file, or a cached hub name")
    device: str = setting(
        "auto", "auto (cuda if available), cpu, cuda or cuda:N", pattern=r"auto|cpu|cuda(:\d+)?",
        pattern_help="auto, cpu, cuda or cuda:N",
    )  # fmt: skip
    dtype: DType = setting("auto", "weights' dtype; auto: float32 on cpu, bfloat16 on cuda")
    block_size: int = setting(16, "tokens per KV page", min=1)
    max_num_seqs: int = setting(256, "sequences running at once", min=1)
    max_num_batched_tokens: int | None = setting(None, "tokens per step; unset: 4096 on cpu, 16384 on cuda", min=1)
    kv_cache_gib: float = setting(2.0, "KV pool size on the cpu, GiB", gt=0)
    gpu_memory_utilization: float = setting(
        0.9, "share of the GPU that weights, activations and KV pages may use", gt=0, max=1
    )
    num_blocks_override: int | None = setting(None, "exact KV pool size in blocks (tests, benchmarks)", min=1)
    policy: Policy = setting("optimistic", "admission: optimistic (blocks of the next chunk) or reserve (whole row)")
    attention_backend: Backend = setting(
        "auto",
        "auto, torch (the float64 reference), cpu (float32, the CPU's default), triton or flash-attn",
    )
    max_model_len: int | None = setting(None, "context length; unset: the model's own", min=1)
    trust_remote_code: bool = setting(False, "run Python code shipped with the model (unsafe with untrusted models)")
    allow_pickle: bool = setting(False, "load pickled .bin/.pt weights (unsafe with untrusted models)")
    allow_download: bool = setting(False, "fetch a model name missing from the local cache from the hub")
    cuda_graphs: bool = setting(True, "capture decode steps as CUDA graphs")
    seed: int | None = setting(
        None,
        "base of the seeds of rows without sampling.seed (any int64 or uint64, as torch's manual_seed): jobs of "
        "one seed draw alike for the same row; unset: random",
        min=SEED_MIN,
        max=SEED_MAX,
    )
    prefix_cache: bool = setting(True, "reuse the K/V of full blocks shared with earlier prompts")
    async_scheduling: bool | None = setting(
        None, "plan the next step while the device runs this one; unset: on for cuda"
    )
    fused_layers: bool | None = setting(None, "Llama-family layers with fused kernels; unset: on for cuda and cpu")
    float32_logits: bool = setting(False, "a bf16/fp16 model's logits in float32, on a GPU")
    max_loras: int = setting(8, "LoRA adapters on the device at once; a step mixes at most this many", min=1)
    max_cpu_loras: int | None = setting(
        None, "LoRA adapters kept in host memory, at least max_loras; unset: max_loras", min=1
    )

    def __post_init__(self) -> None:
        check_fields(self, "EngineConfig.")
        # An adapter in a device slot keeps its host copy: fewer host copies than slots cannot be.
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): each adapter in a "
                "device slot keeps its host copy"
            )


@dataclass(frozen=True)
class SamplingParams:
    """How each row is sampled; a job file's `sampling:` section, and a row's own values, set these."""

    max_new_tokens: int = setting(256, "new tokens per sample at most", min=1)
    temperature: float = setting(0.0, "0 = greedy", min=0)
    # 0 as the OpenAI API and transformers' TopPLogitsWarper take it: the most likely token alone stays
    top_p: float = setting(
        1.0, "nucleus sampling: keep the smallest set of this probability mass (0: the top token)", min=0, max=1
    )
    top_k: int = setting(0, "keep the k most likely tokens; 0 = off, and -1 (vLLM's off) is 0", min=-1)
    min_p: float = setting(0.0, "drop tokens below min_p times the top token's probability", min=0, max=1)
    # At least 1e-6: a seen token's logit divided by it, then by a temperature of at least 1e-5, stays in float32's
    # range for any logit under 1e27. Smaller, a logit overflowed to inf, the probabilities became NaN, and a
    # sampled row silently drew token 0 at every step.
    repetition_penalty: float = setting(
        1.0,
        "divide the positive logits, and multiply the negative ones, of tokens in the prompt or the output so far "
        "(>1 discourages)",
        min=REPETITION_PENALTY_MIN,
    )
    # A row's noise follows its seed and position alone (vLLM's per-request seed), so rows given one seed draw
    # alike. Any seed torch's manual_seed takes: a pipeline's random.getrandbits(64), or OpenAI's int64.
    seed: int | None = setting(
        None,
        "same seed, same sample, whatever else shares the batch; one seed for every row makes their samples "
        "alike: engine.seed gives each row its own. Any int64 or uint64; a negative seed is itself plus 2**64, "
        "as in torch",
        min=SEED_MIN,
        max=SEED_MAX,
    )
    stop: tuple[str, ...] = setting((), "stop strings; the text is cut before them", no_empty_string=True)
    stop_token_ids: tuple[int, ...] = setting((), "token ids that stop a sample, besides the model's EOS", min=0)
    # At most OpenAI's (and vLLM's server's) 128: a job's n, or one row's, must not hold every other row up.
    n: int = setting(1, "samples per prompt", min=1, max=128)
    logprobs: bool = setting(
        False,
        "the log-probability of each chosen token, of the model's own distribution: before the logit bias, "
        "penalties, temperature and filters",
    )
    top_logprobs: int = setting(
        0,
        "the most likely tokens and their log-probabilities at each generated position, of the distribution "
        "logprobs reads",
        min=0,
        max=20,
    )
    prompt_logprobs: bool = setting(
        False, "each prompt token's log-probability given those before it (the first: none)"
    )
    ignore_eos: bool = setting(False, "run on past EOS until max_new_tokens or a stop")
    structured_outputs: StructuredOutputs | None = setting(
        None,
        "constrain the output (docs/structured-output.md): one of json, regex, choice, grammar, json_object",
        parse=StructuredOutputs.from_value,
    )
    # Fields since the first manifests (jobs/spec.py fingerprints them only when set): vLLM's names and meanings.
    presence_penalty: float = setting(
        0.0, "subtracted from the logit of each token already in the output (>0 discourages)", min=-2, max=2
    )
    frequency_penalty: float = setting(
        0.0, "subtracted, times its count in the output so far, from each token's logit", min=-2, max=2
    )
    min_tokens: int = setting(0, "EOS, stop token ids and stop strings do not stop a sample before this many", min=0)
    logit_bias: tuple[tuple[int, float], ...] = setting(
        (), "token id -> bias added to its logit (-100 to 100); a mapping, or a list of [id, bias] pairs"
    )
    bad_words: tuple[str, ...] = setting(
        (),
        "words never generated (a word's last token is masked where the output so far ends with its others)",
        no_empty_string=True,
    )
    allowed_token_ids: tuple[int, ...] = setting((), "only these token ids may be generated; empty: all", min=0)
    include_stop_str_in_output: bool = setting(False, "keep the stop string that ended a sample in its text")
    truncate_prompt_tokens: int | None = setting(
        None,
        "keep only the prompt's last k tokens, as vLLM cuts them (a raw text keeps the BOS its tokenizer adds); "
        "unset: the whole prompt",
        min=1,
    )

    def __post_init__(self) -> None:
        # A mapping ({"json": schema}) becomes the constraint; a malformed one raises ConstraintError (a ValueError).
        if self.structured_outputs is not None:
            object.__setattr__(self, "structured_outputs", StructuredOutputs.from_value(self.structured_outputs))
        # Per-row values arrive as parsed JSON: a wrong type or bound is refused here, as that row's error,
        # rather than failing inside the engine for the whole batch.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif isinstance(value, str) and f.name in _STRING_LISTS:  # `stop: "###"`, as a job file may write it
                object.__setattr__(self, f.name, (value,))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        check_fields(self)
        if self.top_k == -1:  # vLLM's spelling of off: one value for the sampler, the fingerprint and the output
            object.__setattr__(self, "top_k", 0)
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias {token_id}: {bias} needs a token id >= 0 and a bias in [-100, 100]")
        if len({token_id for token_id, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError(f"logit_bias gives a token id twice: {self.logit_bias}")
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def wants_logprobs(self) -> bool:
        """Whether the chosen tokens' distribution is needed (their log-probabilities or the top alternatives)."""
        return self.logprobs or self.top_logprobs > 0

    @property
    def reads_output(self) -> bool:
        """The next token's logits depend on the sample's own tokens so far: async scheduling drains first."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty or self.bad_words)

    @property
    def changes_logits(self) -> bool:
        """Anything done to the logits before the draw (penalties, bias, masks)."""
        return self.reads_output or bool(self.min_tokens or self.logit_bias or self.allowed_token_ids)

    def token_ids_outside(self, vocab_size: int) -> tuple[str, list[int]] | None:
        """The first field naming token ids past a vocabulary of `vocab_size`, and up to five of them; None if all
        fit (negative ids are refused above). The logits have no such column: a logit_bias or allowed_token_ids
        index would fail the step, and min_tokens bans stop_token_ids by index too."""
        for name, asked in (
            ("logit_bias", [token_id for token_id, _ in self.logit_bias]),
            ("allowed_token_ids", self.allowed_token_ids),
            ("stop_token_ids", self.stop_token_ids),
        ):
            outside = [token_id for token_id in asked if token_id >= vocab_size][:5]
            if outside:
                return name, outside
        return None


# Fields that hold a list of strings, where one string is a list of one (a row's `{"stop": "###"}`).
_STRING_LISTS = frozenset(n for n, h in typing.get_type_hints(SamplingParams).items() if h == tuple[str, ...])


def _bias_pairs(value: Any) -> Any:
    """A logit bias as sorted (token id, bias) pairs: hashable, one spelling. OpenAI bodies give a mapping with
    string keys ({"50256": -100}), a YAML file one with integer keys, code a list of pairs; all are accepted."""
    if isinstance(value, typing.Mapping):
        value = tuple(value.items())
    if not isinstance(value, tuple):
        return value  # check_fields names the type
    pairs = []
    for pair in value:
        if isinstance(pair, list):
            pair = tuple(pair)
        if isinstance(pair, tuple) and len(pair) == 2:
            token_id, bias = pair
            if isinstance(token_id, str) and re.fullmatch(r"[0-9]+", token_id):  # \d: "٥" too
                token_id = int(token_id)
            if isinstance(bias, int) and not isinstance(bias, bool) and is_finite(bias):
                bias = float(bias)
            pair = (token_id, bias)
        pairs.append(pair)
    try:
        return tuple(sorted(pairs))
    except TypeError:  # mixed key types: the type check says which
        return tuple(pairs)
