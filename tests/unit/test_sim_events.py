"""Event loop: time order, FIFO ties, simulated clock, stop/until."""

from __future__ import annotations

import pytest

from router.policy import Clock, ManualClock
from simulator.events import EventLoop


def test_events_run_in_time_order_with_fifo_ties() -> None:
    loop = EventLoop()
    seen: list[tuple[float, str]] = []

    def note(tag: str) -> None:
        seen.append((loop.now(), tag))

    loop.at(2.0, note, "c")
    loop.at(1.0, note, "a")
    loop.at(2.0, note, "d")  # same time as "c", scheduled later: runs after it
    loop.at(1.0, note, "b")
    assert loop.run() == 4
    assert seen == [(1.0, "a"), (1.0, "b"), (2.0, "c"), (2.0, "d")]


def test_callbacks_schedule_more_events_and_clock_follows() -> None:
    loop = EventLoop()
    times: list[float] = []

    def tick(n: int) -> None:
        times.append(loop.now())
        if n:
            loop.after(0.5, tick, n - 1)

    loop.at(0.0, tick, 3)
    loop.run()
    assert times == [0.0, 0.5, 1.0, 1.5]
    assert isinstance(loop, Clock)


def test_run_until_and_stop() -> None:
    loop = EventLoop()
    ran: list[int] = []
    for i in range(5):
        loop.at(float(i), ran.append, i)
    assert loop.run(until=2.5) == 3 and ran == [0, 1, 2]
    assert loop.pending == 2
    loop.at(3.0, loop.stop)  # runs after the event at 3.0 already queued
    loop.run()
    assert ran == [0, 1, 2, 3]
    loop.run()
    assert ran == [0, 1, 2, 3, 4]


def test_cannot_schedule_in_the_past() -> None:
    loop = EventLoop()
    loop.at(1.0, lambda: None)
    loop.run()
    with pytest.raises(ValueError):
        loop.at(0.5, lambda: None)


def test_manual_clock() -> None:
    c = ManualClock(1.0)
    c.advance(0.5)
    assert c.now() == 1.5
    with pytest.raises(ValueError):
        c.advance(-1)
    with pytest.raises(ValueError):
        c.set(1.0)
