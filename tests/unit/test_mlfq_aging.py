"""MLFQ fixes for the memory-bound, swap-pool case (issue #15; bench/mlfq_jct.py --kv-blocks 600
--swap-gib 16): anti-starvation by aging (one level per starvation period, not straight to the top),
a slot-only preemption that does not pretend the victim's blocks survive when the pool could not
hold them, and the default swap backoff that stops ping-pong. Fake clock, no torch."""

from __future__ import annotations

import pytest

from engine import mlfq
from engine.request import RequestStatus
from engine.scheduler import SchedulerConfig
from engine.swap_policy import SwapRates
from tests.unit.test_mlfq import FakeClock, _req, _sched, _step


def test_promote_rises_by_the_given_levels_and_stops_at_the_top():
    assert mlfq.promote(3, 1) == 2
    assert mlfq.promote(1, 1) == 0
    assert mlfq.promote(3, 2) == 1
    assert mlfq.promote(3, 4) == 0
    assert mlfq.promote(0, 1) == 0
    with pytest.raises(ValueError, match="promote_levels"):
        mlfq.promote(2, 0)
    with pytest.raises(ValueError, match="mlfq_promote_levels"):
        SchedulerConfig(mlfq_promote_levels=0)


def _starved_run(promote_levels: int) -> tuple[list[tuple[float, int]], float | None, object]:
    """A level-2 job behind a stream of short level-0 jobs (batch of 1): each change of its
    level while it waits (clock, new level) and when it first runs."""
    clock = FakeClock()
    s = _sched(clock, host=0, max_num_seqs=1, mlfq_starvation_s=5.0, mlfq_promote_levels=promote_levels)
    victim = _req("victim", 200, max_tokens=2, arrival=0.0)  # 0.2 s predicted -> level 2
    s.add_request(victim)
    assert victim.mlfq_level == 2
    s.add_request(_req("s0", 10, max_tokens=3, arrival=0.0))
    levels: list[tuple[float, int]] = []
    served_at = None
    for i in range(40):
        if i % 3 == 0:
            s.add_request(_req(f"s{i + 1}", 10, max_tokens=3, arrival=clock.t))
        before = victim.mlfq_level
        t = clock.t
        out = _step(s, clock)
        ran = any(x.request is victim for x in out.scheduled)
        if served_at is None and ran:
            served_at = t
        if served_at is None and victim.mlfq_level != before:
            levels.append((t, victim.mlfq_level))
    return levels, served_at, s


def test_aging_raises_a_starving_job_one_level_per_period():
    levels, served_at, s = _starved_run(promote_levels=1)
    # level 2 -> 1 after 5 s unserved; there it is older than the short jobs that a quantum of
    # 2 iterations demoted to level 1, so it runs when the slot frees, before a second period
    assert levels == [(5.0, 1)]
    assert served_at is not None and 5.0 < served_at <= 2 * 5.0
    assert s.num_promotions >= 1


def test_aging_bound_is_levels_times_the_period():
    _, served_at, _ = _starved_run(promote_levels=1)
    levels_top, served_top, _ = _starved_run(promote_levels=4)  # the old rule: straight to level 0
    assert levels_top == [(5.0, 0)]
    assert served_top is not None and served_top <= 5.0 + 3.0
    assert served_at is not None and served_top < served_at <= 2 * 5.0 + 3.0


def test_a_promoted_job_does_not_overtake_fresh_top_level_arrivals_before_reaching_level_0():
    """After one period a level-3 job is at level 2: a level-0 arrival still runs first."""
    clock = FakeClock()
    s = _sched(clock, blocks=256, host=0, max_num_seqs=1, mlfq_starvation_s=5.0)
    s.add_request(_req("busy", 10, max_tokens=6, arrival=0.0))  # holds the slot
    old = _req("old", 400, max_tokens=2, arrival=0.0)  # 0.4 s -> level 3
    s.add_request(old)
    assert old.mlfq_level == 3
    _step(s)
    clock.t = 5.5  # the old job has waited a period: promoted at the next schedule
    s.add_request(_req("fresh", 10, max_tokens=2, arrival=5.5))
    first: list[str] = []
    while s.has_unfinished():
        for x in _step(s).scheduled:
            if x.request.request_id not in first:
                first.append(x.request.request_id)
    assert s.num_promotions == 1  # the clock stood still after the first period
    assert first.index("fresh") < first.index("old")
    assert old.num_output_tokens == 2


# copying the victim (14 blocks x 100 B) out and back takes 2.8 s at 1e3 B/s; recomputing its 54
# tokens at 10 tok/s 5.4 s: swap is the cheaper preemption once the drop loses its blocks
SLOWISH_COPY = SwapRates(swap_bytes_per_s=1e3, recompute_tokens_per_s=10)


def test_slot_only_drop_counts_as_a_loss_when_the_pool_could_not_hold_the_blocks():
    """Batch full (one slot), the pool nearly full: dropping the long job would leave its blocks
    in the prefix cache only until the next allocations evict them, so the scheduler swaps it
    out instead (the KV survives on the host) and it resumes with nothing recomputed."""
    clock = FakeClock()
    s = _sched(clock, blocks=16, host=32, rates=SLOWISH_COPY, max_num_seqs=1)
    long = _req("long", 54, max_tokens=4, arrival=0.0)  # 55 tokens: 14 of the 16 blocks
    s.add_request(long)
    _step(s, clock)
    long.mlfq_level = 3
    assert s.kv.num_free_blocks == 2  # fewer than the 14 a drop would leave to the cache
    s.add_request(_req("short", 6, max_tokens=2, arrival=1.0))
    out = _step(s, clock)
    assert out.swapped_out == ["long"] and long.status is RequestStatus.SWAPPED
    while s.has_unfinished():
        _step(s, clock)
    assert long.num_output_tokens == 4 and long.num_swaps == 1
    assert s.kv.num_free_blocks == 16 and s.kv.num_free_host_blocks == 32


def test_slot_only_drop_is_refused_without_a_host_pool_when_the_pool_is_tight():
    """Same without a host pool: the preemption would discard the KV (a recompute), which the
    policy never does; the short job waits for the slot."""
    clock = FakeClock()
    s = _sched(clock, blocks=16, host=0, max_num_seqs=1)
    long = _req("long", 54, max_tokens=4, arrival=0.0)
    s.add_request(long)
    _step(s, clock)
    long.mlfq_level = 3
    s.add_request(_req("short", 6, max_tokens=2, arrival=1.0))
    out = _step(s, clock)
    assert not out.preempted and [x.request.request_id for x in out.scheduled] == ["long"]
    while s.has_unfinished():
        _step(s, clock)
    assert long.num_preemptions == 0 and long.num_output_tokens == 4


def test_default_backoff_stops_ping_pong_of_a_long_job():
    """A long job and a short level-0 job every 3 iterations in a batch of one (no prefix cache,
    so each policy preemption swaps): with the defaults it is swapped out at most twice over
    120 iterations (8 iterations per window, the old default, swapped it out 5+ times)."""
    from tests.unit.test_mlfq_backoff import _short_job_stream

    cfg = SchedulerConfig()
    assert cfg.mlfq_swap_backoff_iters == 256 and cfg.mlfq_swap_watermark == 1.0
    s, events, long = _short_job_stream(backoff=cfg.mlfq_swap_backoff_iters)
    outs = [it for d, it in events if d == "out"]
    assert 1 <= len(outs) <= 2
    assert long.num_output_tokens == 50
    _, old_events, _ = _short_job_stream(backoff=8)
    assert len([1 for d, _ in old_events if d == "out"]) > len(outs)
