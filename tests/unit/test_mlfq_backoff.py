"""MLFQ swap backoff (issue #15): a request swapped out and back in is not preempted by the policy
for a number of iterations doubling with its swaps, so a long job is not swapped out
and back at every higher-level arrival (swap ping-pong). Fake clock, no torch."""

from __future__ import annotations

import pytest

from engine import mlfq
from engine.request import RequestStatus
from engine.scheduler import SchedulerConfig
from tests.unit.test_mlfq import FakeClock, _req, _sched, _step


def test_backoff_doubles_with_swaps_up_to_the_cap():
    assert [mlfq.swap_backoff_iters(k, 8, 100) for k in range(6)] == [0, 8, 16, 32, 64, 100]
    assert mlfq.swap_backoff_iters(3, 0, 100) == 0  # off
    assert mlfq.swap_backoff_iters(10_000, 8, 512) == 512  # no overflow
    with pytest.raises(ValueError):
        mlfq.swap_backoff_iters(1, -1, 10)
    with pytest.raises(ValueError, match="mlfq_swap_backoff_iters"):
        SchedulerConfig(mlfq_swap_backoff_iters=-1)


def _short_job_stream(backoff: int, steps: int = 120) -> tuple[object, list[tuple[str, int]], object]:
    """One long level-2 job and a short level-0 job every 3 iterations, batch of 1, no prefix
    cache (a policy preemption swaps); returns the scheduler, the long job's swap events
    (direction, iteration) and the long job."""
    clock = FakeClock()
    s = _sched(clock, host=64, max_num_seqs=1, caching=False, mlfq_swap_backoff_iters=backoff)
    long = _req("long", 200, max_tokens=50, arrival=0.0)  # 0.2 s predicted -> level 2
    s.add_request(long)
    events: list[tuple[str, int]] = []
    for i in range(steps):
        if i % 3 == 1:
            s.add_request(_req(f"s{i}", 10, max_tokens=2, arrival=clock.t))
        out = _step(s, clock)
        if "long" in out.swapped_out:
            events.append(("out", s.iteration))
        if "long" in out.swapped_in:
            events.append(("in", s.iteration))
    while s.has_unfinished():
        _step(s, clock)
    return s, events, long


def test_without_backoff_the_long_job_ping_pongs():
    s, events, long = _short_job_stream(backoff=0)
    outs = [it for d, it in events if d == "out"]
    assert len(outs) >= 10  # swapped out at (almost) every short arrival
    assert long.num_output_tokens == 50 and s.num_backoff_holds == 0


def test_backoff_keeps_a_resumed_job_running_for_growing_windows():
    s, events, long = _short_job_stream(backoff=4)
    # every swap-in opens a window of 4 * 2**(k-1) iterations (k: swaps so far) with no
    # policy swap-out of the long job
    k = 0
    last_in = None
    for d, it in events:
        if d == "out":
            k += 1
            if last_in is not None:
                assert it - last_in >= mlfq.swap_backoff_iters(k - 1, 4, 512), events
        else:
            last_in = it
    assert long.num_swaps == k >= 2
    _, events0, long0 = _short_job_stream(backoff=0)
    assert long.num_swaps < long0.num_swaps / 2  # far fewer round trips than without backoff
    assert s.num_backoff_holds > 0  # short jobs waited for the window to end
    # everyone finished, nothing leaked
    assert long.num_output_tokens == 50 and long.status is RequestStatus.FINISHED_LENGTH
    assert s.kv.num_free_blocks == 64 and s.kv.num_free_host_blocks == 64


def test_memory_preemption_ignores_the_backoff():
    """Running requests that need blocks still take them from a backing-off request (that is
    not a policy choice): the pool is too small for both to grow."""
    clock = FakeClock()
    s = _sched(clock, blocks=24, host=64, max_num_seqs=4, caching=False, mlfq_swap_backoff_iters=1000)
    a = _req("a", 40, max_tokens=30, arrival=0.0)
    b = _req("b", 40, max_tokens=30, arrival=0.0)
    b.num_preemptions = b.num_swaps = 1  # as if swapped before: protected 1000 iterations once admitted
    s.add_request(a)
    s.add_request(b)
    preempted: list[str] = []
    for _ in range(200):
        if not s.has_unfinished():
            break
        preempted += _step(s, clock).preempted
    assert not s.has_unfinished()
    # 2 x (40 + 30) tokens need 36 blocks of 4 > 24: b (the later of two equal requests) gives way
    assert "b" in preempted and b.mlfq_protected_until > s.iteration
    assert a.num_output_tokens == 30 and b.num_output_tokens == 30


def test_no_backoff_without_a_swap():
    """A request dropped to the prefix cache (slot-only preemption, no swap) is not protected:
    the backoff counts swaps."""
    clock = FakeClock()
    s = _sched(clock, host=0, max_num_seqs=1)
    r = _req("r", 10, max_tokens=3)
    r.num_preemptions = 2  # preempted before, never swapped
    s.add_request(r)
    _step(s, clock)
    assert r.status is RequestStatus.RUNNING and r.mlfq_protected_until == 0
