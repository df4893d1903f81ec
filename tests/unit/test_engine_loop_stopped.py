"""EngineLoop after its thread ended (stopped, or killed by an error): a command is never left
waiting for a loop that will not run it. Before, ``call`` blocked forever: a prefill worker's
handler aborting its streamed request after the worker had stopped the loop hung there, and the
process could not exit (its gRPC pool threads are joined at exit)."""

from __future__ import annotations

import threading
import time

import pytest

from engine.engine_loop import EngineLoop
from pdserve.errors import CancelledError


class _Idle:
    def has_unfinished(self) -> bool:
        return False

    def step(self):  # pragma: no cover - never called: no work
        return []


class _Boom(BaseException):
    """Not an Exception: the loop does not catch it, its thread ends."""


class _Dies:
    """One step of work that kills the loop thread."""

    def __init__(self) -> None:
        self.stepped = threading.Event()

    def has_unfinished(self) -> bool:
        return not self.stepped.is_set()

    def step(self):
        self.stepped.set()
        raise _Boom("the engine thread dies")


def test_call_after_stop_fails_at_once():
    el = EngineLoop(_Idle(), name="test-stopped")  # type: ignore[arg-type]
    assert el.call(lambda e: 7, timeout_s=5.0) == 7
    el.stop()
    t = time.monotonic()
    with pytest.raises(CancelledError, match="shutting down"):
        el.call(lambda e: 7, timeout_s=5.0)  # the old code: TimeoutError after 5 s
    assert time.monotonic() - t < 1.0
    fut = el.submit(lambda e: 7)
    assert isinstance(fut.exception(timeout=1.0), CancelledError)


def test_abort_after_stop_returns_not_found():
    el = EngineLoop(_Idle(), name="test-stopped-abort")  # type: ignore[arg-type]
    el.stop()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(el.abort("r1")), daemon=True)
    t.start()
    t.join(5.0)
    assert not t.is_alive(), "abort on a stopped loop blocked"
    assert got == [False]


def test_call_after_the_loop_thread_died_fails(monkeypatch):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is expected
    engine = _Dies()
    el = EngineLoop(engine, name="test-died")  # type: ignore[arg-type]
    assert engine.stepped.wait(5.0)
    el._thread.join(5.0)
    assert not el._thread.is_alive()
    with pytest.raises(CancelledError, match="shutting down"):
        el.call(lambda e: 7, timeout_s=5.0)
