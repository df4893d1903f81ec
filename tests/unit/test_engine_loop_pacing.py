"""EngineLoop's test pacing (env PDSERVE_TEST_MIN_STEP_S): each step with work lasts at least that
long, commands still run while it waits, and a bad value is refused naming the variable."""

from __future__ import annotations

import threading
import time

import pytest

from engine.engine_loop import MIN_STEP_ENV, EngineLoop, min_step_s


class _Engine:
    """Three steps of work, each timed; nothing else."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.done = threading.Event()

    def has_unfinished(self) -> bool:
        return len(self.starts) < 3

    def step(self):
        self.starts.append(time.perf_counter())
        if len(self.starts) == 3:
            self.done.set()
        return []


def test_unset_is_off(monkeypatch):
    monkeypatch.delenv(MIN_STEP_ENV, raising=False)
    assert min_step_s() == 0.0


@pytest.mark.parametrize("raw", ["-1", "abc", "inf", "nan"])
def test_bad_values_are_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(MIN_STEP_ENV, raw)
    with pytest.raises(ValueError, match=MIN_STEP_ENV):
        min_step_s()


def test_each_step_lasts_at_least_the_minimum_and_commands_still_run(monkeypatch):
    monkeypatch.setenv(MIN_STEP_ENV, "0.3")
    engine = _Engine()
    el = EngineLoop(engine, name="test-pacing")  # type: ignore[arg-type]
    try:
        assert el.min_step_s == 0.3
        time.sleep(0.05)  # inside the first step's pacing wait
        t = time.perf_counter()
        assert el.call(lambda e: len(e.starts), timeout_s=5.0) >= 1
        assert time.perf_counter() - t < 0.2  # served during the wait, not after it
        assert engine.done.wait(5.0)
    finally:
        el.stop()
    gaps = [b - a for a, b in zip(engine.starts, engine.starts[1:], strict=False)]
    assert min(gaps) >= 0.3
