"""Tiny random models of real architectures, and a word-level tokenizer that fits them.

Weights are drawn with a large init range so the logits are peaked: greedy choices then hinge on
real differences, not on float noise between near-equal logits.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kvbatch.runner import attention_hook
from kvbatch.runner.model_loader import LoadedModel

VOCAB_SIZE = 512
EOS_ID = 1

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=EOS_ID,
    pad_token_id=0,
    initializer_range=0.2,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=32),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE)}
    vocab["<s>"], vocab["</s>"] = 0, EOS_ID
    del vocab["w0"], vocab["w1"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="w2")


def sentencepiece_tokenizer(legacy: bool, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level SentencePiece-style tokenizer (Llama 2, Mistral) that fits the tiny models: "▁" marks a
    space, and the start of a text is marked too, by a Metaspace pre-tokenizer (prepend_scheme "first") or, as
    legacy Llama tokenizer.json files do it, by a Prepend normalizer on each stretch of text between added tokens."""
    chars = sorted(set("[INST]/abcdefghijklmnopqrstuvwxyz<>"))
    vocab = {"<s>": 0, "</s>": EOS_ID, "<unk>": 2, "▁": 3, **{c: 4 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=chat_template
    )


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's tokenizer.json in small: BPE with byte fallback (a character outside the vocabulary becomes its
    UTF-8 bytes as <0xNN> tokens), "▁" for a space and in front of the text, and Llama 2's decoder, which drops
    the one space a decoded text begins with."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *"abcdefghijklmnopqrstuvwxyz"]
    words = ["▁y", "▁ye", "▁yes", "▁n", "▁no"]
    merges = [("▁", "y"), ("▁y", "e"), ("▁ye", "s"), ("▁", "n"), ("▁n", "o")]
    vocab = {piece: i for i, piece in enumerate(pieces + words)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(arch: str = "llama", seed: int = 0, attn: str = attention_hook.ATTN_IMPLEMENTATION):
    attention_hook.register()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attn, dtype=torch.float32).eval()


def tiny_loaded(arch: str = "llama", seed: int = 0) -> LoadedModel:
    model = tiny_model(arch, seed)
    return LoadedModel(model, word_tokenizer(), f"tiny-{arch}", (EOS_ID,), 512, torch.device("cpu"), torch.float32)


def hf_reference(arch: str, seed: int = 0):
    """The same weights, with transformers' own sdpa attention, for model.generate()."""
    return tiny_model(arch, seed, attn="sdpa")
