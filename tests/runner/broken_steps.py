"""What breaks a step, for the tests of failure handling (the `break_steps` fixture in conftest.py installs one)."""


class Poison:
    """A step containing token `poison` breaks."""

    message = "poisoned row"

    def __init__(self, poison: int) -> None:
        self.poison = poison

    def __call__(self, input_ids) -> bool:
        return bool((input_ids == self.poison).any())


class FailsOnce:
    """The `fail_at`-th step breaks, as a step that breaks while another is in flight would."""

    message = "step broke"

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, input_ids) -> bool:
        self.calls += 1
        return self.calls == self.fail_at
