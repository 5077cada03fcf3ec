import random

import pytest


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def break_steps():
    """break_steps(model, broken): every forward of `model` whose input ids make broken(input_ids) true raises
    RuntimeError(broken.message), as a broken kernel or a bad row would. The hook sits on the embeddings, which
    transformers' layers and the fused decoder both run first; it is removed after the test (the tiny models are
    shared by a module's tests)."""
    handles = []

    def install(model, broken) -> None:
        def hook(module, args):
            if broken(args[0]):
                raise RuntimeError(broken.message)

        handles.append(model.get_input_embeddings().register_forward_pre_hook(hook))

    yield install
    for handle in handles:
        handle.remove()
