"""The scoring kernel (runner/scoring_kernels.py) against torch's float32 log_softmax and argmax.

Without CUDA the kernel runs in Triton's CPU interpreter (tests/conftest.py sets it), on tiny vocabularies in
blocks that do not divide them; with CUDA the engine's own entry, score_on_device, runs it on a real shape.
"""

import pytest
import torch

from kvbatch.runner import scoring, scoring_kernels

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCAB_SIZE = 1000
BLOCK = 256  # 1000 = 3 * 256 + 232: three full blocks and a masked tail


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    return logprobs, logits.argmax(dim=-1) == targets


def check(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (logprobs, greedy), after asserting they equal the reference's."""
    logprobs, greedy = scoring_kernels.score_rows(logits, targets, block_elements=BLOCK)
    want_logprobs, want_greedy = reference(logits, targets)
    assert logprobs.dtype == torch.float32 and greedy.dtype == torch.bool
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(greedy, want_greedy)
    return logprobs, greedy


def random_rows(num_rows: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of spread 4 (as a model's), and targets: every other row its argmax, the others random."""
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(num_rows, VOCAB_SIZE, generator=gen)).to(DEVICE, dtype)
    targets = torch.randint(0, VOCAB_SIZE, (num_rows,), generator=gen).to(DEVICE)
    targets[::2] = logits[::2].argmax(dim=-1)
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_rows_match_torch(dtype):
    logits, targets = random_rows(13, dtype)
    _, greedy = check(logits, targets)
    assert greedy[::2].all() and not greedy[1::2].any()


def test_ties_go_to_the_first_index():
    """A row's maximum twice: the target at the first occurrence is greedy, at the second it is not. Pairs in
    one block, across blocks, and with the second in the masked tail block."""
    logits, _ = random_rows(4, torch.bfloat16, seed=1)
    pairs = [(10, 20), (100, 700), (255, 256), (300, 999)]
    rows, targets, want = [], [], []
    for base, (first, second) in zip(logits, pairs):
        for target, greedy in ((first, True), (second, False)):
            row = base.clone()
            row[first] = row[second] = row.max() + 1
            rows.append(row)
            targets.append(target)
            want.append(greedy)
    logprobs, greedy = check(torch.stack(rows), torch.tensor(targets, device=DEVICE))
    assert greedy.tolist() == want
    assert torch.equal(logprobs[0::2], logprobs[1::2])  # the two occurrences score the same


def test_running_max_rescales_the_sum():
    """The maximum grows in every block (a rising row) or sits in the first (a falling one); large logits
    overflow exp unless the sum is rescaled to the running maximum."""
    ramp = torch.linspace(-50.0, 3000.0, VOCAB_SIZE, device=DEVICE)
    logits = torch.stack([ramp, ramp.flip(0), ramp - 10_000])
    targets = torch.tensor([VOCAB_SIZE - 1, 0, VOCAB_SIZE - 2], device=DEVICE)
    logprobs, greedy = check(logits, targets)
    assert greedy.tolist() == [True, True, False]
    assert torch.isfinite(logprobs).all()


def test_leading_blocks_of_minus_infinity():
    """Blocks where every logit is -inf (a masked part of the vocabulary) before the first finite one: the sum
    must start at 0, not at NaN."""
    logits, _ = random_rows(3, torch.float32, seed=2)
    logits[:, : 2 * BLOCK + 7] = float("-inf")
    targets = logits.argmax(dim=-1)
    targets[1] = 3  # a target of probability 0
    logprobs, greedy = check(logits, targets)
    assert logprobs[1] == float("-inf") and not greedy[1]
    assert torch.isfinite(logprobs[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_stride(dtype):
    """Rows of a wider tensor (every other one, cut to the vocabulary): the kernel follows the row stride and
    never reads the columns past the vocabulary, which hold the largest logits."""
    wide, _ = random_rows(10, dtype, seed=3)
    wide = torch.cat([wide, torch.full((10, 37), 1000.0, dtype=dtype, device=DEVICE)], dim=1)
    logits = wide[::2, :VOCAB_SIZE]
    assert logits.stride() == (2 * (VOCAB_SIZE + 37), 1)
    targets = logits.argmax(dim=-1)
    targets[0] = 5
    _, greedy = check(logits, targets)
    assert greedy.tolist() == [False, True, True, True, True]


def test_score_on_device_kernel_matches_torch_path():
    """The switch: score_on_device runs the kernel when asked (here interpreted on the CPU) and equals torch's path."""
    logits, targets = random_rows(17, torch.bfloat16, seed=4)
    kernel = scoring.score_on_device(logits, targets, use_kernel=True)
    torch_path = scoring.score_on_device(logits, targets, use_kernel=False)
    torch.testing.assert_close(kernel.logprobs, torch_path.logprobs, rtol=0, atol=1e-5)
    assert torch.equal(kernel.greedy, torch_path.greedy)
    assert kernel.to_host()[1] == torch_path.to_host()[1]


@pytest.mark.parametrize("use_kernel", [True, False])
def test_targets_name_their_rows(monkeypatch, use_kernel):
    """Targets scored on named rows, a row more than once (a prompt's last row against each continuation's
    first token): each equals the reference on its row. torch's path in slices of 3 rows, so targets of one
    row fall in one slice and the others keep what earlier slices wrote."""
    monkeypatch.setitem(scoring.SLICE_ELEMENTS, "cpu", 3 * VOCAB_SIZE)
    monkeypatch.setitem(scoring.SLICE_ELEMENTS, "cuda", 3 * VOCAB_SIZE)
    logits, _ = random_rows(7, torch.bfloat16, seed=7)
    rows = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 4, 5, 5, 5, 6], device=DEVICE)
    gen = torch.Generator().manual_seed(8)
    targets = torch.randint(0, VOCAB_SIZE, rows.shape, generator=gen).to(DEVICE)
    targets[[1, 5, 11]] = logits[rows[[1, 5, 11]]].argmax(dim=-1)
    scored = scoring.score_on_device(logits, targets, rows, use_kernel=use_kernel)
    want_logprobs, want_greedy = reference(logits[rows], targets)
    torch.testing.assert_close(scored.logprobs, want_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(scored.greedy, want_greedy) and scored.greedy[[1, 5, 11]].all()


@pytest.mark.skipif(CUDA, reason="the CPU's default path; on CUDA the default is the kernel (tested below)")
def test_cpu_default_is_torch_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path ran the Triton kernel")

    monkeypatch.setattr(scoring_kernels, "score_rows", refuse)
    logits, targets = random_rows(5, torch.float32, seed=5)
    scored = scoring.score_on_device(logits, targets)
    want_logprobs, want_greedy = reference(logits, targets)
    torch.testing.assert_close(scored.logprobs, want_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(scored.greedy, want_greedy)


@pytest.mark.skipif(not CUDA, reason="the kernel is score_on_device's default on a CUDA device only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_default_is_kernel(monkeypatch, dtype):
    """Llama-3's vocabulary (128,256: not a multiple of the block), rows of a larger step's logits."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return score_rows(*args, **kwargs)

    score_rows = scoring_kernels.score_rows
    monkeypatch.setattr(scoring_kernels, "score_rows", counted)
    gen = torch.Generator(device="cuda").manual_seed(6)
    step_logits = (4 * torch.randn(600, 128_256, generator=gen, device="cuda")).to(dtype)
    logits = step_logits[50:550]
    targets = torch.randint(0, 128_256, (500,), generator=gen, device="cuda")
    targets[::2] = logits[::2].argmax(dim=-1)
    scored = scoring.score_on_device(logits, targets)
    assert calls == [logits.shape]
    torch_path = scoring.score_on_device(logits, targets, use_kernel=False)
    torch.testing.assert_close(scored.logprobs, torch_path.logprobs, rtol=0, atol=1e-5)
    assert torch.equal(scored.greedy, torch_path.greedy)
    assert scored.greedy[::2].all()
    assert scored.start_download().to_host() == (scored.logprobs.tolist(), scored.greedy.tolist())
