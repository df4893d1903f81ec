"""MLFQ's wait before a preemption (engine.mlfq.waited_enough, SchedulerConfig.mlfq_preempt_wait_iters)
on a fake clock: a queued higher-level request preempts only after waiting that many measured
iterations, so a seat that frees up sooner comes without a swap (issue #15: live, batch 4, MLFQ
swapped long jobs out for short ones that would have had a seat a few iterations later)."""

from __future__ import annotations

import pytest

from engine import mlfq
from engine.request import RequestStatus
from engine.scheduler import SchedulerConfig
from tests.unit.test_mlfq import FakeClock, _req, _sched, _step


def test_waited_enough_rule():
    assert mlfq.waited_enough(0.0, None, 8)  # no iteration measured yet: at once
    assert mlfq.waited_enough(0.0, 0.01, 0)  # off
    assert not mlfq.waited_enough(0.079, 0.01, 8)
    assert mlfq.waited_enough(0.08, 0.01, 8)
    with pytest.raises(ValueError, match="wait_iters"):
        mlfq.waited_enough(1.0, 0.01, -1)
    with pytest.raises(ValueError, match="mlfq_preempt_wait_iters"):
        SchedulerConfig(mlfq_preempt_wait_iters=-1)


def _long_then_short(wait: int, long_tokens: int) -> tuple[object, object, object, list[int]]:
    """Batch of 1, a level-2 job running, a level-0 one arriving at t=3 (one iteration per
    second); returns the scheduler, both jobs and the iterations at which the long one was
    swapped out."""
    clock = FakeClock()
    s = _sched(clock, host=64, max_num_seqs=1, caching=False, mlfq_preempt_wait_iters=wait)
    long = _req("long", 200, max_tokens=long_tokens, arrival=0.0)  # 0.2 s predicted -> level 2
    s.add_request(long)
    for _ in range(3):
        _step(s, clock)
    short = _req("short", 10, max_tokens=2, arrival=clock.t)
    s.add_request(short)
    outs = []
    while s.has_unfinished():
        out = _step(s, clock)
        if "long" in out.swapped_out:
            outs.append(s.iteration)
    return s, long, short, outs


def test_preemption_waits_the_iterations():
    s, long, short, outs = _long_then_short(wait=3, long_tokens=30)
    assert s.iteration_s == pytest.approx(1.0)
    # arrived before iteration 4: waits iterations 4..6 (3 s), preempts at iteration 7
    assert outs == [7]
    assert s.num_wait_holds == 3
    assert long.status is RequestStatus.FINISHED_LENGTH and short.status is RequestStatus.FINISHED_LENGTH
    assert s.kv.num_free_blocks == 64 and s.kv.num_free_host_blocks == 64


def test_no_preemption_when_the_seat_frees_within_the_wait():
    # the long job has 2 tokens left when the short one arrives: its seat frees first
    s, long, short, outs = _long_then_short(wait=3, long_tokens=5)
    assert outs == [] and s.num_preemptions == 0
    assert short.status is RequestStatus.FINISHED_LENGTH


def test_wait_zero_preempts_at_once():
    s, _, _, outs = _long_then_short(wait=0, long_tokens=5)
    assert outs == [4] and s.num_wait_holds == 0


def test_idle_gaps_are_not_iterations():
    clock = FakeClock()
    s = _sched(clock, max_num_seqs=1)
    s.add_request(_req("a", 8, max_tokens=2))
    while s.has_unfinished():
        _step(s, clock)  # 1 s per iteration
    clock.t += 100.0  # idle
    s.schedule()  # nothing to run
    s.add_request(_req("b", 8, max_tokens=3, arrival=clock.t))
    while s.has_unfinished():
        _step(s, clock)
    assert s.iteration_s == pytest.approx(1.0)
