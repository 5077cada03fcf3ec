"""Loading an engine for a job: no automatic cyclic collection while torch, transformers and the model load, and
the collector as it was afterwards."""

from __future__ import annotations

import gc

import pytest

from kvbatch.jobs import run
from kvbatch.runner import engine as engine_module


class Probe:
    """Stands in for the Engine: notes whether the collector ran automatically while it was built."""

    def __init__(self, config: object, adapters: object = None) -> None:
        self.collector_on = gc.isenabled()


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_collector_pauses_while_the_engine_loads(monkeypatch: pytest.MonkeyPatch, enabled_before: bool) -> None:
    monkeypatch.setattr(engine_module, "Engine", Probe)
    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        built = run.default_engine_factory("some/model", {})
        assert isinstance(built, Probe) and built.collector_on is False
        assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()


def test_the_collector_comes_back_when_loading_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(config: object, adapters: object = None) -> None:
        raise OSError("no such model")

    monkeypatch.setattr(engine_module, "Engine", broken)
    assert gc.isenabled()
    with pytest.raises(OSError, match="no such model"):
        run.default_engine_factory("missing", {})
    assert gc.isenabled()
