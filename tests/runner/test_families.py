"""Every model family the README names gives the model's own numbers on the engine: greedy tokens equal to
transformers' `generate`, and each chosen token's log-probability within 1e-4 of log_softmax of transformers'
eager float32 logits, under both admission policies and with preemption forced.

Tiny random configs: sliding windows of 8-16 tokens and soft-capping low enough to bite, with prompts of up to
~100 tokens fed in chunks of 32, so every chunk, decode and recomputation crosses windows. gpt-oss adds
learned attention sinks."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
import transformers as tf
from tiny_models import EOS_ID, VOCAB_SIZE, word_tokenizer

from kvbatch.cache import backends
from kvbatch.cache.metadata import PLAIN
from kvbatch.errors import BackendUnavailableError
from kvbatch.runner import attention_hook
from kvbatch.runner import engine as engine_module
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import LoadedModel, ModelLoadError, load_model
from kvbatch.runner.request import GenerationRequest, SamplingParams

_IDS = dict(vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=EOS_ID, pad_token_id=0)
_LLAMA_LIKE = dict(
    _IDS,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)
_LOCAL_GLOBAL = ["sliding_attention", "full_attention"]

# The README's list of families ("How it works", "Models"), each as a tiny config that exercises what it adds.
FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**_LLAMA_LIKE, sliding_window=8),
    "qwen2": lambda: tf.Qwen2Config(**_LLAMA_LIKE, use_sliding_window=True, sliding_window=12, max_window_layers=1),
    "qwen3": lambda: tf.Qwen3Config(
        **_LLAMA_LIKE, head_dim=32, use_sliding_window=True, sliding_window=10, max_window_layers=1
    ),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        **_LLAMA_LIKE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2
    ),
    "gemma": lambda: tf.GemmaConfig(**_LLAMA_LIKE, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(
        **_LLAMA_LIKE, head_dim=16, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=30.0
    ),
    "gemma3": lambda: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, sliding_window=8, layer_types=_LOCAL_GLOBAL),
    "phi": lambda: tf.PhiConfig(
        **{k: v for k, v in _LLAMA_LIKE.items() if k != "num_key_value_heads"}, partial_rotary_factor=0.5
    ),
    "phi3": lambda: tf.Phi3Config(**_LLAMA_LIKE, sliding_window=16),
    "gpt2": lambda: tf.GPT2Config(**_IDS, n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.2),
    "opt": lambda: tf.OPTConfig(
        **_IDS,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
        init_std=0.2,
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        **_IDS,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=0.2,
    ),
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(
        **_IDS, n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.2
    ),
    "starcoder2": lambda: tf.Starcoder2Config(**_LLAMA_LIKE, sliding_window=12),
    "olmo2": lambda: tf.Olmo2Config(**_LLAMA_LIKE),
    "gpt_oss": lambda: tf.GptOssConfig(
        **{**_LLAMA_LIKE, "intermediate_size": 64},
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
    ),
    "smollm3": lambda: tf.SmolLM3Config(
        **_LLAMA_LIKE, use_sliding_window=True, sliding_window=8, layer_types=_LOCAL_GLOBAL
    ),
    "mixtral": lambda: tf.MixtralConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        **_LLAMA_LIKE,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "granite": lambda: tf.GraniteConfig(
        **_LLAMA_LIKE, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=3.0
    ),
    "granitemoe": lambda: tf.GraniteMoeConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "cohere": lambda: tf.CohereConfig(**_LLAMA_LIKE, logit_scale=0.5),
    "cohere2": lambda: tf.Cohere2Config(**_LLAMA_LIKE, sliding_window=8, layer_types=_LOCAL_GLOBAL),
    "olmo3": lambda: tf.Olmo3Config(**_LLAMA_LIKE, sliding_window=8),
    "exaone4": lambda: tf.Exaone4Config(**_LLAMA_LIKE, sliding_window=8, layer_types=_LOCAL_GLOBAL),
    "glm": lambda: tf.GlmConfig(**_LLAMA_LIKE),
    "ernie4_5": lambda: tf.Ernie4_5Config(**_LLAMA_LIKE),
    # PhiMoE builds a sliding-window mask from its config but passes no window to the attention: the window is the
    # mask's, read at load.
    "phimoe": lambda: tf.PhimoeConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
}

# Gemma 3n's last layers reuse the keys and values of an earlier layer of their kind (num_kv_shared_layers): layer 1
# attends over layer 0's, which reach the attention again as its own.
if hasattr(tf, "Gemma3nTextConfig"):
    FAMILIES["gemma3n_text"] = lambda: tf.Gemma3nTextConfig(
        **_LLAMA_LIKE,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention"],
        num_kv_shared_layers=1,
        vocab_size_per_layer_input=VOCAB_SIZE,
        hidden_size_per_layer_input=16,
        laurel_rank=8,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0, 0.0],
    )

# Families of newer transformers, tested where it has them: AFMoE (routed experts, local/global layers) and Flint
# (learned attention sinks on local and global layers).
_NEWER = {
    "afmoe": ("AfmoeConfig", dict(moe_intermediate_size=32, num_experts=4, num_shared_experts=1)),
    "flint": ("FlintConfig", dict(moe_intermediate_size=32, num_experts=4, shared_expert_intermediate_size=64)),
}
for _name, (_class, _fields) in _NEWER.items():
    if hasattr(tf, _class):
        FAMILIES[_name] = lambda c=getattr(tf, _class), f=_fields: c(
            **_LLAMA_LIKE, **f, head_dim=16, num_experts_per_tok=2, sliding_window=8, layer_types=_LOCAL_GLOBAL
        )

# GPT-J and CodeGen send their attention through transformers' interface in newer transformers (5.25 does); where
# they compute it in their own code, the loader refuses them, and so they are tested only where they can load.
for _name, _config, _model_class in (
    (
        "gptj",
        lambda: tf.GPTJConfig(
            **_IDS, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, initializer_range=0.2
        ),
        tf.GPTJPreTrainedModel,
    ),
    (
        "codegen",
        lambda: tf.CodeGenConfig(
            **_IDS, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, n_ctx=512, initializer_range=0.2
        ),
        tf.CodeGenPreTrainedModel,
    ),
):
    if getattr(_model_class, "_supports_attention_backend", False):
        FAMILIES[_name] = _config

NUM_PROMPTS = 4
MAX_NEW_TOKENS = 6
RUNS = {  # name: (policy, num_blocks_override, preemption expected)
    "optimistic": ("optimistic", 256, False),
    "reserve": ("reserve", 256, False),
    "preempted": ("optimistic", 36, True),
}


def _model(family: str, attn: str) -> torch.nn.Module:
    attention_hook.register()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=attn, dtype=torch.float32).eval()


def _loaded(family: str) -> LoadedModel:
    """The family's tiny model as the engine loads it (kvbatch's attention function, the load check's record of its
    layers), with the word tokenizer."""
    model = _model(family, attention_hook.ATTN_IMPLEMENTATION)
    layers = attention_hook.check_model(model, f"tiny-{family}")
    cpu = torch.device("cpu")
    return LoadedModel(model, word_tokenizer(), f"tiny-{family}", (EOS_ID,), 512, cpu, torch.float32, layers)


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(2, VOCAB_SIZE) for _ in range(n)] for n in (100, 61, 23, 9)][:NUM_PROMPTS]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Per family: transformers' greedy tokens (eager attention) and the log-probabilities of those tokens."""
    cache: dict[str, list[tuple[list[int], list[float]]]] = {}

    def get(family: str) -> list[tuple[list[int], list[float]]]:
        if family not in cache:
            model = _model(family, "eager")
            rows = []
            for prompt in _prompts():
                out = model.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=EOS_ID,
                    pad_token_id=0,
                )
                tokens = out[0, len(prompt) :].tolist()
                with torch.no_grad():
                    logits = model(out).logits[0, len(prompt) - 1 : -1].float()  # [new, vocab]
                logprobs = torch.log_softmax(logits, -1).gather(1, out[0, len(prompt) :, None])[:, 0]
                rows.append((tokens, logprobs.tolist()))
            cache[family] = rows
        return cache[family]

    return get


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family: str, run: str, reference) -> None:
    policy, num_blocks, preempts = RUNS[run]
    loaded = _loaded(family)
    config = EngineConfig(
        policy=policy, block_size=4, num_blocks_override=num_blocks, max_num_batched_tokens=32, prefix_cache=False
    )
    engine = Engine.from_loaded(loaded, config)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, logprobs=True)
    prompts = _prompts()
    got = {r.request_id: r for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))}
    assert (engine.stats.num_preemptions > 0) == preempts, engine.stats
    for i, (want_tokens, want_logprobs) in enumerate(reference(family)):
        completion = got[i].completions[0]
        assert completion.token_ids == want_tokens, f"{family}: prompt {i} ({len(prompts[i])} tokens) diverged"
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(want_logprobs), rtol=0, atol=1e-4)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_every_family_passes_the_load_check() -> None:
    for family in FAMILIES:
        layers = attention_hook.check_model(_model(family, attention_hook.ATTN_IMPLEMENTATION), family)
        assert sorted(layers) == [0, 1], family


def test_an_attention_argument_the_kernels_lack_is_refused_at_load() -> None:
    model = _model("llama", attention_hook.ATTN_IMPLEMENTATION)
    attention = model.model.layers[1].self_attn
    forward = attention.forward

    def with_bias(*args, **kwargs):  # as T5-style layers hand their relative-position bias to the attention
        return forward(*args, **kwargs, position_bias=torch.zeros(1))

    attention.forward = with_bias
    with pytest.raises(attention_hook.UnsupportedAttentionError, match=r"'tiny-llama'.*\(layer 1\).*position_bias"):
        attention_hook.check_model(model, "tiny-llama")


@pytest.mark.parametrize("kind", ["chunked_attention", "linear_attention", "conv"])
def test_a_layer_kind_the_kernels_lack_is_refused_at_load(kind: str) -> None:
    """A mask the kernels do not build (Llama 4's chunks) or a layer that is no attention over the pages at all
    (linear attention, LFM2's convolutions, which keep a state): the message names the kind, not a mask."""
    config = tf.LlamaConfig(**_LLAMA_LIKE)
    config.layer_types = ["full_attention", kind]
    model = _probe_model(config)
    message = (
        f"model 'tiny' has layers of kind {kind} (config.layer_types), which kvbatch's paged attention does not "
        "serve (it serves full and sliding-window attention layers)"
    )
    with pytest.raises(attention_hook.UnsupportedAttentionError, match=re.escape(message)):
        attention_hook.check_model(model, "tiny")


def _probe_model(config) -> torch.nn.Module:
    attention_hook.register()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation=attention_hook.ATTN_IMPLEMENTATION).eval()


def test_layers_that_drop_the_forwards_arguments_are_refused_at_load() -> None:
    """Nemotron's decoder layer calls its attention without the forward's keyword arguments: the step never
    reaches the pages, so the model is refused by name, not failed at every row."""
    model = _probe_model(tf.NemotronConfig(**_LLAMA_LIKE))
    with pytest.raises(attention_hook.UnsupportedAttentionError, match=r"'tiny'.*nemotron layers.*keyword arguments"):
        attention_hook.check_model(model, "tiny")


def test_keys_of_another_size_than_the_pages_are_refused_at_load() -> None:
    """JetMoE repeats its 2 configured key/value heads for each of its 2 experts a token: 4 heads reach the
    attention, where pages sized from the config hold 2 (every row failed writing them)."""
    config = tf.JetMoeConfig(
        **_IDS,
        hidden_size=64,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=16,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    with pytest.raises(attention_hook.UnsupportedAttentionError, match=r"layer 0 .* 4 key/value heads of 16.* 2 of 16"):
        attention_hook.check_model(_probe_model(config), "tiny")


def test_values_of_another_head_size_than_the_keys_are_refused_at_load() -> None:
    """Multi-head latent attention (DeepSeek-V3): keys of qk_nope + qk_rope dimensions, values of v_head_dim."""
    config = tf.DeepseekV3Config(
        **_LLAMA_LIKE | {"num_key_value_heads": 4},
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )
    with pytest.raises(
        attention_hook.UnsupportedAttentionError, match=r"24 \(queries\), 24 \(keys\) and 16 \(values\)"
    ):
        attention_hook.check_model(_probe_model(config), "tiny")


# Families whose attention the pages cannot hold, each refused at load by name rather than run wrong. Each was
# silently wrong (or failed with transformers' own error) before its check: run, they gave other tokens than
# transformers' generate. Types this transformers lacks are left out.
_REFUSED = {
    # DiffLlama attends twice per layer, once per value half: the second call wrote over the first's K/V.
    "diffllama": ("DiffLlamaConfig", dict(_LLAMA_LIKE), "layer 0 attends more than once in a forward"),
    # Doge hands the attention a per-key bias of its own making as the mask.
    "doge": ("DogeConfig", dict(_LLAMA_LIKE, sliding_window=None), "layer 0 builds its own attention mask or bias"),
    # An encoder's self-attention says it is bidirectional on the module (is_causal=False), not in the call.
    "bert": (
        "BertConfig",
        dict(_IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        r"BertSelfAttention \(layer 0\) asks for non-causal attention",
    ),
    # RoBERTa-style decoders number positions from padding_idx + 1, skipping padding tokens, when the forward gives
    # none; kvbatch's position_ids from 0 looked up other position embeddings (every logprob off by up to 3).
    "roberta": (
        "RobertaConfig",
        dict(_IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, is_decoder=True),
        "numbers its own positions otherwise than from 0",
    ),
    # X-MOD's layers pick an adapter by a language id set on the model, and a forward without one fails: the load
    # check's forward raised transformers' ValueError out of the loader instead of refusing the model by name.
    "xmod": (
        "XmodConfig",
        dict(_IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, is_decoder=True),
        r"a one-token forward fails \(ValueError: Input language unknown",
    ),
    # Dory and HRM run their layers more than once a forward (a loop over the same layer indexes).
    "dory": (
        "DoryConfig",
        dict(_LLAMA_LIKE, head_dim=16, sliding_window=8, layer_types=_LOCAL_GLOBAL),
        "layer 0 attends more than once in a forward",
    ),
    "hrm_text": ("HrmTextConfig", dict(_LLAMA_LIKE, head_dim=16), "layer 0 attends more than once in a forward"),
    # Gemma 4 gives its full-attention layers a head size of their own (per_layer_config).
    "gemma4_text": (
        "Gemma4TextConfig",
        dict(_LLAMA_LIKE, head_dim=16, vocab_size_per_layer_input=512, hidden_size_per_layer_input=16),
        "its layers have attention shapes of their own",
    ),
}


def test_a_window_the_mask_lacks_is_not_applied() -> None:
    """OLMoE passes its config's sliding_window to the attention but builds a full causal mask (OLMo 2's and Llama's
    configs carry the field, so converted checkpoints may too): the engine windowed every row, and a 100-token
    prompt's logprobs were off transformers' float32 forward past the window. transformers' generate is no oracle
    here: its cache keeps only the window (DynamicSlidingWindowLayer, from the same field) for the decodes alone."""
    config = tf.OlmoeConfig(**_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, sliding_window=8)
    model = _probe_model(config)
    layers = attention_hook.check_model(model, "tiny")
    assert list(layers.values()) == [PLAIN, PLAIN]
    rng = random.Random(5)
    prompt = [rng.randrange(2, VOCAB_SIZE) for _ in range(100)]
    loaded = LoadedModel(model, word_tokenizer(), "tiny", (EOS_ID,), 512, torch.device("cpu"), torch.float32, layers)
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=4, num_blocks_override=256, max_num_batched_tokens=32))
    [result] = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=True))])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    want = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert result.prompt_logprobs == pytest.approx([None, *want.tolist()], abs=1e-4)


@pytest.mark.parametrize("family", [f for f, (config, _, _) in _REFUSED.items() if hasattr(tf, config)])
def test_attention_the_pages_cannot_hold_is_refused_at_load(family: str) -> None:
    config_class, fields, words = _REFUSED[family]
    model = _probe_model(getattr(tf, config_class)(**fields))
    with pytest.raises(attention_hook.UnsupportedAttentionError, match=rf"'tiny': .*{words}"):
        attention_hook.check_model(model, "tiny")


def test_a_model_whose_own_forward_fails_is_refused_for_that(tmp_path) -> None:
    """The loader names the failure, not a computation kvbatch lacks: the model's own code fails a plain forward."""
    config_class, fields, words = _REFUSED["xmod"]
    _probe_model(getattr(tf, config_class)(**fields)).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"{words}.*as every row would, so kvbatch does not load it$"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_scores_match_transformers(family: str) -> None:
    """Scoring rows (continuations after a prompt, and the prompt's own logprobs) on every family: each scored
    token's logprob within 1e-4 of log_softmax of transformers' eager float32 logits over prompt + continuation.
    Prompts of up to 70 tokens in chunks of 32 cross the sliding windows; the prefix cache shares each prompt."""
    rng = random.Random(3)
    requests = [
        GenerationRequest(
            i,
            [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(5, 70))],
            SamplingParams(prompt_logprobs=True),
            continuations=[[rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(1, 9))] for _ in range(3)],
        )
        for i in range(3)
    ]
    loaded = _loaded(family)
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=4, num_blocks_override=256, max_num_batched_tokens=32))
    results = {r.request_id: r for r in engine.generate(requests)}
    reference = _model(family, "eager")
    for request in requests:
        result = results[request.request_id]
        assert result.error is None, result.error
        prompt = request.prompt_token_ids
        for continuation, score in zip(request.continuations, result.scores, strict=True):
            tokens = prompt + continuation
            with torch.no_grad():
                logprobs = torch.log_softmax(reference(torch.tensor([tokens])).logits[0].float(), -1)
            want = logprobs[len(prompt) - 1 : -1].gather(1, torch.tensor(continuation)[:, None])[:, 0]
            assert score.token_logprobs == pytest.approx(want.tolist(), abs=1e-4)
        want = logprobs[: len(prompt) - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert result.prompt_logprobs == pytest.approx([None, *want.tolist()], abs=1e-4)


def _longrope_phi3() -> tf.Phi3Config:
    """Phi-3 with LongRoPE (as Phi-3-mini-128k, Phi-3.5 and Phi-4-mini ship), its original context 64 tokens."""
    factors = dict(short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[2.0 + 0.5 * i for i in range(8)])
    rope = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64, **factors)
    return tf.Phi3Config(**_LLAMA_LIKE, rope_parameters=rope, original_max_position_embeddings=64)


def test_a_longrope_context_ends_where_its_frequencies_would_follow_the_step() -> None:
    """LongRoPE rotates a whole forward with its long factors once any position in it passes
    original_max_position_embeddings. Run past it, a 100-token prompt's first chunks were rotated with the short
    factors and its last with the long ones, and the short rows sharing its steps with the long factors: every row
    gave other tokens than transformers' generate (a 23-token row alone matched). The context stops there."""
    from kvbatch.runner.model_loader import ContextLengthError, context_length

    with pytest.raises(ContextLengthError, match="at most 64"):
        context_length(_longrope_phi3(), 128)
    assert context_length(_longrope_phi3(), None) == 64
    attention_hook.register()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_longrope_phi3(), attn_implementation="eager").eval()
    rng = random.Random(5)
    prompts = [[rng.randrange(2, VOCAB_SIZE) for _ in range(n)] for n in (100, 50, 23, 9)]
    want = []
    for prompt in prompts[1:]:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=EOS_ID, pad_token_id=0
        )
        with torch.no_grad():
            logits = model(out).logits[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(logits, -1).gather(1, out[0, len(prompt) :, None])[:, 0]
        want.append((out[0, len(prompt) :].tolist(), logprobs.tolist()))
    model.set_attn_implementation(attention_hook.ATTN_IMPLEMENTATION)
    loaded = LoadedModel(model, word_tokenizer(), "tiny-phi3", (EOS_ID,), 512, torch.device("cpu"), torch.float32)
    config = EngineConfig(block_size=4, num_blocks_override=256, max_num_batched_tokens=32, prefix_cache=False)
    engine = Engine.from_loaded(loaded, config)
    assert engine.max_model_len == 64
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, logprobs=True)
    got = {r.request_id: r for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))}
    assert got[0].error is not None and "100 tokens" in str(got[0].error)
    for i, (tokens, logprobs) in enumerate(want, start=1):
        completion = got[i].completions[0]
        assert completion.token_ids == tokens, f"prompt {i} ({len(prompts[i])} tokens) diverged"
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-4)


def test_the_engine_keeps_flash_attn_for_plain_layers(monkeypatch) -> None:
    """Where flash-attn could run (a GPU with the package and 256-token pages, faked here), a soft-capped, windowed
    model (Gemma 2) got it from `auto` and every row failed; asked for by name, it is refused when the engine is
    built. A plain model still gets it."""
    real = backends.why_unavailable
    monkeypatch.setattr(
        backends, "why_unavailable", lambda name, *args: None if name == "flash-attn" else real(name, *args)
    )
    config = EngineConfig(block_size=256, num_blocks_override=4)
    assert Engine.from_loaded(_loaded("gemma2"), config).backend.name == "cpu"
    assert Engine.from_loaded(_loaded("llama"), config).backend.name == "flash-attn"
    forced = dataclasses.replace(config, attention_backend="flash-attn")
    with pytest.raises(BackendUnavailableError, match="plain causal attention only.*soft-capping, a sliding window"):
        Engine.from_loaded(_loaded("gemma2"), forced)


def test_a_loaded_model_is_not_probed_again_for_its_backend(monkeypatch, tmp_path) -> None:
    """load_model keeps the load check's record of the layers, so choosing the backend runs no second forward: on a
    tensor-parallel rank that rebuilds its engine alone, a forward through sharded layers would wait on the others."""
    _model("gemma2", "eager").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.layers is not None and not all(layer.is_plain for layer in loaded.layers.values())
    real = backends.why_unavailable
    monkeypatch.setattr(
        backends, "why_unavailable", lambda name, *args: None if name == "flash-attn" else real(name, *args)
    )
    monkeypatch.setattr(engine_module, "layer_options", lambda *args: pytest.fail("probed a checked model again"))
    assert Engine.from_loaded(loaded, EngineConfig(block_size=256, num_blocks_override=4)).backend.name == "cpu"
