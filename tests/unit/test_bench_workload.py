"""``pdserve bench``'s arrivals: a trace's coarse timestamps are de-quantised, not replayed as
bursts (issue #19: the Mooncake trace stamps requests in 3 s buckets)."""

from __future__ import annotations

from pdserve.bench_cli import at_rate, spread_ties
from simulator.workload import Workload, WorkloadRequest


def _w(times: list[float]) -> Workload:
    return Workload("t", tuple(WorkloadRequest(t, 10 + i, 2) for i, t in enumerate(times)))


def test_ties_spread_within_their_bucket_keeping_order_and_counts() -> None:
    w = _w([0.0] * 4 + [3.0] * 3 + [6.0] * 2)
    s = spread_ties(w, seed=3)
    t = [r.arrival_s for r in s.requests]
    assert t[0] == 0.0 and t == sorted(t) and len(set(t)) == len(t)
    assert all(0.0 <= x < 3.0 for x in t[:4]) and all(3.0 <= x < 6.0 for x in t[4:7])
    assert all(6.0 <= x < 9.0 for x in t[7:])  # the last bucket: the median width
    assert [r.input_len for r in s.requests] == [r.input_len for r in w.requests]  # trace order
    assert spread_ties(w, seed=3) == s  # seeded


def test_a_trace_without_ties_is_kept_and_the_rate_is_the_one_asked() -> None:
    w = _w([0.0, 1.0, 2.5, 4.0])
    assert spread_ties(w) is w
    bursty = _w([0.0] * 10 + [3.0] * 16 + [6.0] * 3 + [9.0] * 3)
    r = at_rate(bursty, 0.5, seed=0)
    assert abs(r.rate - 0.5) < 1e-9
    assert len({x.arrival_s for x in r.requests}) == 32  # no two requests at one instant
