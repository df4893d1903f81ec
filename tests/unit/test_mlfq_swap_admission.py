"""MLFQ with a host swap pool on a fake clock (issue #15, FastServe): a swapped-out request of a
higher level comes back before lower-level waiting requests, anti-starvation reaches swapped
requests too, and a preemption that only frees a batch slot (the pool below its watermark) does
not pay two copies when the victim's blocks stay in the device prefix cache (the cost the
scheduler compares is what a re-admission would really recompute)."""

from __future__ import annotations

from engine.request import RequestStatus
from engine.scheduler import Scheduler
from engine.swap_policy import SwapRates
from tests.unit.test_mlfq import FakeClock, _req, _step
from tests.unit.test_mlfq import _sched as _mlfq_sched

FAST_COPY = SwapRates(swap_bytes_per_s=1e9, recompute_tokens_per_s=1e3)
# copying a long request out and back (51 blocks x 100 B x 2 / 1e4 B/s = 1.02 s) beats recomputing
# all its 200 computed tokens (2.0 s) but not recomputing what the prefix cache does not keep
SLOW_COPY = SwapRates(swap_bytes_per_s=1e4, recompute_tokens_per_s=100)


def _sched(clock, *, blocks=64, host=64, rates=FAST_COPY, caching=True, **kw) -> Scheduler:
    """test_mlfq's MLFQ scheduler (1 ms per prompt token, quantum 2), with a host pool by default."""
    return _mlfq_sched(clock, blocks=blocks, host=host, caching=caching, rates=rates, **kw)


def test_swapped_higher_level_comes_back_before_lower_level_waiting():
    clock = FakeClock()
    s = _sched(clock, max_num_seqs=1, caching=False)  # a drop would lose the KV: swaps
    mid = _req("mid", 60, max_tokens=30, arrival=0.0)  # 0.06 s -> level 1
    s.add_request(mid)
    _step(s, clock)
    top = _req("top", 10, max_tokens=2, arrival=1.0)  # level 0: takes mid's slot
    s.add_request(top)
    out = _step(s, clock)
    assert out.swapped_out == ["mid"] and mid.status is RequestStatus.SWAPPED
    low = _req("low", 200, max_tokens=2, arrival=1.5)  # level 2, arrives while top runs
    s.add_request(low)
    assert (mid.mlfq_level, top.mlfq_level, low.mlfq_level) == (1, 0, 2)
    while top.status is RequestStatus.RUNNING:
        out = _step(s, clock)
    # the slot frees and the blocks allow: the swapped level-1 request is copied back in (ahead
    # of its turn, in the step top finished: swap-in prefetch), the level-2 waiting one (which
    # arrived later but does not matter: lower level) waits
    assert out.prefetched == ["mid"] and low.status is RequestStatus.WAITING
    out = _step(s, clock)
    assert [x.request.request_id for x in out.scheduled] == ["mid"] and not out.swap_in
    assert low.status is RequestStatus.WAITING
    while s.has_unfinished():
        _step(s, clock)
    assert mid.num_output_tokens == 30 and low.num_output_tokens == 2
    assert s.kv.num_free_host_blocks == 64


def test_anti_starvation_brings_a_swapped_request_back():
    clock = FakeClock()
    s = _sched(clock, max_num_seqs=1, mlfq_starvation_s=5.0, caching=False, mlfq_promote_levels=4)
    victim = _req("victim", 200, max_tokens=40, arrival=0.0)  # level 2
    s.add_request(victim)
    _step(s, clock)
    served: list[float] = []
    swapped_at = None
    for i in range(40):
        if i % 3 == 0:  # a stream of short level-0 jobs
            s.add_request(_req(f"s{i}", 10, max_tokens=3, arrival=clock.t))
        t = clock.t
        out = _step(s, clock)
        if "victim" in out.swapped_out and swapped_at is None:
            swapped_at = t
        if swapped_at is not None and ("victim" in out.swapped_in or "victim" in out.prefetched):
            served.append(t)
    assert swapped_at is not None
    # promoted to level 0 after 5 s unserved, then swapped back in (within a short job's run)
    assert served and served[0] - swapped_at <= 5.0 + 3.0
    assert s.num_promotions >= 1 and victim.num_swaps >= 1


def test_slot_preemption_with_room_drops_to_the_prefix_cache_instead_of_swapping():
    """The batch is full but the pool is far below the watermark: dropping the victim leaves
    its full blocks cached on device, so a re-admission recomputes nothing; swapping would
    copy 51 blocks out and back. The scheduler must compare those real costs."""
    clock = FakeClock()
    s = _sched(clock, blocks=256, host=256, rates=SLOW_COPY, max_num_seqs=1)
    long = _req("long", 200, max_tokens=6, arrival=0.0)  # level 2
    s.add_request(long)
    _step(s, clock)
    short = _req("short", 10, max_tokens=2, arrival=1.0)  # level 0
    s.add_request(short)
    out = _step(s, clock)
    assert out.preempted == ["long"] and not out.swapped_out and not out.swap_out
    assert long.status is RequestStatus.PREEMPTED
    while short.status is RequestStatus.RUNNING:
        _step(s, clock)
    out = _step(s, clock)
    (sr,) = out.scheduled
    # back with its 200 prompt tokens' KV from the device cache: only the pending token runs
    assert sr.request is long and sr.start == 200 and sr.num_new_tokens == 1
    assert not out.swap_in
    while s.has_unfinished():
        _step(s, clock)
    assert long.num_output_tokens == 6 and s.num_swap_outs == 0


def test_slot_preemption_swaps_when_the_cache_does_not_keep_the_blocks():
    """Same, without a prefix cache: the dropped blocks are lost, so recomputing means all 201
    tokens and the swap (cheaper) is chosen."""
    clock = FakeClock()
    s = _sched(clock, blocks=256, host=256, rates=SLOW_COPY, caching=False, max_num_seqs=1)
    long = _req("long", 200, max_tokens=6, arrival=0.0)
    s.add_request(long)
    _step(s, clock)
    s.add_request(_req("short", 10, max_tokens=2, arrival=1.0))
    out = _step(s, clock)
    assert out.swapped_out == ["long"] and long.status is RequestStatus.SWAPPED


def test_memory_preemption_swaps_even_with_a_prefix_cache():
    """Past the watermark the freed blocks are taken at once (they would not stay cached), so
    the full recompute is what a drop costs and the swap is chosen (FastServe's proactive swap)."""
    clock = FakeClock()
    s = _sched(clock, blocks=60, host=64, rates=SLOW_COPY, max_num_seqs=8, mlfq_swap_watermark=0.5)
    long = _req("long", 200, max_tokens=6, arrival=0.0)  # 51 of 60 blocks
    s.add_request(long)
    _step(s, clock)
    s.add_request(_req("short", 10, max_tokens=2, arrival=1.0))  # 9 free - 3 < 30: tight
    out = _step(s, clock)
    assert out.swapped_out == ["long"] and long.status is RequestStatus.SWAPPED
    while s.has_unfinished():
        _step(s, clock)
    assert long.num_output_tokens == 6 and s.kv.num_free_host_blocks == 64
