"""Float32 logits from a half-precision lm_head (runner/float32_logits.py)."""

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from kvbatch.runner.float32_logits import Float32LogitsHead, use_float32_logits

CUDA = torch.cuda.is_available()


def test_cpu_keeps_the_models_head_and_says_why(caplog):
    model = tiny_model("llama").to(torch.bfloat16)
    head = model.lm_head
    with caplog.at_level("WARNING"):
        assert use_float32_logits(model, True, torch.device("cpu")) is False
    assert model.lm_head is head
    assert "cpu" in caplog.text  # asked for and refused: the log says why


def test_a_float32_model_already_has_float32_logits():
    model = tiny_model("llama")
    head = model.lm_head
    assert use_float32_logits(model, None, torch.device("cpu")) is True
    assert model.lm_head is head  # nothing to swap


def test_off_restores_the_models_own_head():
    """Two engines on one loaded model (bench check): the second's setting wins over the first's swap."""
    model = tiny_model("llama").to(torch.bfloat16)
    head = model.lm_head
    model.lm_head = Float32LogitsHead(head)
    assert use_float32_logits(model, False, torch.device("cpu")) is False
    assert model.lm_head is head


@pytest.mark.skipif(not CUDA, reason="torch's float32-output GEMM for half inputs exists on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_are_the_unrounded_gemm(dtype):
    """The wrapped head gives the float32 accumulator: within float32 summation order of the float64 product,
    and closer to it than the model's own rounded logits."""
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(256, 1000, bias=False).to("cuda", dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, 256, generator=gen).to(dtype))
    hidden = torch.randn(3, 5, 256, generator=gen).to("cuda", dtype)
    exact = hidden.double() @ head.weight.double().t()
    got = Float32LogitsHead(head)(hidden)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 1000)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)
    rounded = head(hidden).double()
    assert (got.double() - exact).abs().max() < (rounded - exact).abs().max() / 10
