"""oneDNN float32 linears on the CPU: the same bits for a row at any batch size, float32 accuracy, and greedy
tokens equal to transformers' generate (which keeps torch's own linear) on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_exact_vs_generate import hf_greedy, random_prompts
from tiny_models import EOS_ID, hf_reference, tiny_loaded, tiny_model, word_tokenizer

from kvbatch.runner import cpu_linear
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.cpu_linear import OneDNNLinear, use_onednn_linears
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import load_model
from kvbatch.runner.request import GenerationRequest

# The build decides (not onednn_usable(), the code under test): a torch with oneDNN must take this path.
TORCH_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
pytestmark = pytest.mark.skipif(not TORCH_HAS_ONEDNN, reason="this torch is built without oneDNN")


def test_a_torch_with_onednn_uses_it_unless_turned_off(monkeypatch):
    monkeypatch.delenv(cpu_linear.ENV_VAR, raising=False)
    assert cpu_linear.onednn_usable()
    monkeypatch.setenv(cpu_linear.ENV_VAR, "aten")
    assert not cpu_linear.onednn_usable()


def converted(in_features: int, out_features: int, bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    assert use_onednn_linears(torch.nn.Sequential(layer)) == 1
    assert isinstance(layer, OneDNNLinear)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_a_row_has_the_same_bits_at_any_batch_size(bias: bool) -> None:
    layer = converted(96, 160, bias)
    x = torch.randn(300, 96)
    with torch.inference_mode():
        full = layer(x)
        assert torch.allclose(full, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        for rows in [1, 2, 3, 7, 16, 17, 64, 129, 299]:
            assert torch.equal(layer(x[1 : 1 + rows]), full[1 : 1 + rows]), f"{rows} rows differ from the full batch"
        assert torch.equal(layer(x[None, 5:45]), full[None, 5:45])  # [batch, rows, features] as the models call it
        assert torch.equal(layer(x[5]), full[5])  # a bare vector


def test_packed_weights_give_the_plain_bits_and_follow_weight_changes() -> None:
    packed, plain = converted(64, 96, bias=True), converted(64, 96, bias=True)
    plain.pack_weight = False
    x = torch.randn(20, 64)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
        packed.weight.mul_(2.0)  # changed in place: packed again at the next call
        assert torch.allclose(packed(x) - packed.bias, 2 * (plain(x) - plain.bias), rtol=1e-5, atol=1e-5)
    packed.weight = torch.nn.Parameter(torch.zeros(96, 64))  # replaced (as tensor parallel does)
    with torch.inference_mode():
        assert torch.equal(packed(x), packed.bias.expand(20, -1))


def test_weights_are_packed_only_under_the_limit() -> None:
    small, large = torch.nn.Linear(8, 8), torch.nn.Linear(64, 64)
    use_onednn_linears(torch.nn.Sequential(small), pack_limit_bytes=8 * 8 * 4)
    use_onednn_linears(torch.nn.Sequential(large), pack_limit_bytes=8 * 8 * 4)
    assert small.pack_weight and not large.pack_weight


def test_training_and_other_dtypes_use_torchs_linear() -> None:
    layer = converted(32, 48, bias=True)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()  # autograd works: the grad-enabled path is torch's linear
    assert x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        x64 = torch.randn(4, 32, dtype=torch.float64)
        layer64 = converted(32, 48, bias=False).double()
        assert torch.equal(layer64(x64), torch.nn.functional.linear(x64, layer64.weight))


def test_greedy_equals_generate_and_packing_keeps_bits() -> None:
    loaded = tiny_loaded("llama", seed=5)
    assert use_onednn_linears(loaded.model) == 2 * 7 + 1  # q k v o gate up down per layer, and the lm head
    prompts = random_prompts(12, 1, 60, seed=21)
    params = SamplingParams(max_new_tokens=20, logprobs=True)
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=4, num_blocks_override=256, max_num_batched_tokens=64))
    packed = {
        r.request_id: r.completions[0]
        for r in engine.generate(GenerationRequest(i, p, params) for i, p in enumerate(prompts))
    }
    reference = hf_reference("llama", seed=5)  # torch's own linear
    for i in (0, 5, 11):
        alone = next(iter(engine.generate([GenerationRequest(i, prompts[i], params)]))).completions[0]
        assert (alone.token_ids, alone.logprobs) == (packed[i].token_ids, packed[i].logprobs), (
            f"prompt {i} alone differs"
        )
    for i, prompt in enumerate(prompts):
        assert packed[i].token_ids == hf_greedy(reference, prompt, 20), f"prompt {i} diverged from generate"


def test_load_model_converts_float32_cpu_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_model("llama", 0, attn="sdpa").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu", dtype="float32").model
    assert all(type(m) is OneDNNLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setenv(cpu_linear.ENV_VAR, "aten")
    model = load_model(str(tmp_path), device="cpu", dtype="float32").model
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())
    assert EOS_ID == model.config.eos_token_id
