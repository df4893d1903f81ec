"""router.feedback_log: the goodput policy's "policy feedback" line at most once per interval,
the held state logged when the interval ends naming the latest request (#12)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from pdserve.tracing import JsonFormatter, request_scope
from router.feedback_log import FeedbackLog
from router.policy import GoodputAwarePolicy


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("router"))
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines():
    h = _Lines()
    lg = logging.getLogger("router.service")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    yield h.lines
    lg.removeHandler(h)
    lg.setLevel(old)


def _feedback(lines: list[dict]) -> list[dict]:
    return [x for x in lines if x["msg"] == "policy feedback"]


def test_refuses_a_non_positive_interval():
    with pytest.raises(ValueError, match="interval_s"):
        FeedbackLog(0.0)


def test_off_a_loop_every_offer_is_logged(lines):
    fb, policy = FeedbackLog(60.0), GoodputAwarePolicy()
    for rid in ("a", "b"):
        with request_scope(rid):
            fb.offer(policy)
    assert [x["request_id"] for x in _feedback(lines)] == ["a", "b"]


def test_on_a_loop_a_burst_gives_the_first_line_then_the_last_when_the_interval_ends(lines):
    policy = GoodputAwarePolicy()

    async def burst() -> None:
        fb = FeedbackLog(0.2)
        for i in range(50):
            with request_scope(f"r{i}"):
                fb.offer(policy)
        assert [x["request_id"] for x in _feedback(lines)] == ["r0"]  # the rest held
        await asyncio.sleep(0.5)
        with request_scope("late"):  # the interval has passed: at once
            fb.offer(policy)

    asyncio.run(asyncio.wait_for(burst(), 10))
    got = _feedback(lines)
    assert [x["request_id"] for x in got] == ["r0", "r49", "late"]
    for x in got:  # the line's fields are the policy's state
        assert {"ttft_factor", "tpot_factor", "ttft_samples", "tpot_samples", "length_samples"} <= x.keys()


def test_close_logs_a_held_line(lines):
    policy = GoodputAwarePolicy()

    async def run() -> None:
        fb = FeedbackLog(30.0)
        for rid in ("x", "y"):
            with request_scope(rid):
                fb.offer(policy)
        fb.close()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert [x["request_id"] for x in _feedback(lines)] == ["x", "y"]
