"""bench.thread_meter: schedstat parsing, the CPU / run-delay / blocked split, and a live sample
(a blocked thread shows as blocked, a spinning one as CPU)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench.thread_meter import ThreadSample, ThreadSplit, parse_schedstat, sample_threads, thread_split


def test_parse_schedstat() -> None:
    assert parse_schedstat("123 456 7\n") == (123, 456)


@pytest.mark.parametrize("text", ["", "12", "a b c", "-1 2 3"])
def test_parse_schedstat_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a schedstat line"):
        parse_schedstat(text)


def test_split_orders_by_cpu_and_derives_blocked() -> None:
    before = {1: ThreadSample(1, "a", 0, 0), 2: ThreadSample(2, "b", 0, 0), 3: ThreadSample(3, "gone", 0, 0)}
    after = {
        1: ThreadSample(1, "a", 200_000_000, 100_000_000),
        2: ThreadSample(2, "b", 600_000_000, 0),
        4: ThreadSample(4, "new", 5, 5),  # started inside the window: left out
    }
    rows = thread_split(before, after, 1.0)
    assert [r.tid for r in rows] == [2, 1]
    assert rows[1].cpu_s == pytest.approx(0.2)
    assert rows[1].run_delay_s == pytest.approx(0.1)
    assert rows[1].blocked_s == pytest.approx(0.7)
    # counters read a little after the wall clock never give a negative blocked time
    assert ThreadSplit(1, "a", 1.0, 0.8, 0.3).blocked_s == 0.0


def test_split_refuses_empty_window() -> None:
    with pytest.raises(ValueError, match="wall_s"):
        thread_split({}, {}, 0.0)


def test_live_sample_tells_a_spinning_thread_from_a_blocked_one() -> None:
    stop = threading.Event()
    ids: dict[str, int] = {}

    def spin() -> None:
        ids["spin"] = threading.get_native_id()
        while not stop.is_set():
            sum(range(1000))

    def block() -> None:
        ids["block"] = threading.get_native_id()
        stop.wait()

    threads = [threading.Thread(target=spin), threading.Thread(target=block)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(ids) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        t0, w0 = sample_threads(os.getpid()), time.monotonic()
        time.sleep(0.3)
        rows = {r.tid: r for r in thread_split(t0, sample_threads(os.getpid()), time.monotonic() - w0)}
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    spun, blocked = rows[ids["spin"]], rows[ids["block"]]
    assert spun.cpu_s > 0.02  # it ran (shared with this thread and the host's load)
    assert blocked.cpu_s < 0.01
    assert blocked.blocked_s > 0.2
