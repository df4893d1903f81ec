"""bench/request_phases.py: where a closed-loop request's time goes, from client-side timings."""

from __future__ import annotations

import pytest

from bench.cluster_load import RequestTiming
from bench.request_phases import Spread, phases_lines, request_phases


def test_spread_median_and_nearest_rank_p90() -> None:
    s = Spread.of([float(x) for x in range(1, 11)])
    assert s.median == 5.5
    assert s.p90 == 9.0  # nearest rank: ceil(0.9 * 10) = 9th value
    assert Spread.of([3.0]) == Spread(3.0, 3.0)
    with pytest.raises(ValueError, match="no values"):
        Spread.of([])


def test_phases_of_one_request() -> None:
    # sent at 10.0; first token at 10.1 (1 token); second message at 10.3 (4 tokens);
    # then 10 more tokens by 10.8; the call ends at 10.85
    t = RequestTiming(10.0, ((10.1, 1), (10.3, 4), (10.5, 5), (10.8, 5)), 10.85)
    p = request_phases([t])
    assert p is not None and p.requests == 1
    assert p.to_first.median == pytest.approx(0.1)
    assert p.first_to_second.median == pytest.approx(0.2)
    assert p.per_token.median == pytest.approx(0.05)  # 0.5 s over the 10 tokens after message 2
    assert p.after_last.median == pytest.approx(0.05)
    assert p.total.median == pytest.approx(0.85)
    assert p.outside_share.median == pytest.approx(0.35 / 0.85)


def test_requests_without_two_messages_are_left_out_and_no_pace_is_zero() -> None:
    one = RequestTiming(0.0, ((0.1, 1),), 0.2)
    two = RequestTiming(0.0, ((0.1, 1), (0.4, 31)), 0.5)  # nothing after the second message
    p = request_phases([one, two])
    assert p is not None and p.requests == 1
    assert p.per_token == Spread(0.0, 0.0)
    assert p.outside_share.median == pytest.approx(1.0)
    assert request_phases([one]) is None
    assert request_phases([]) is None


def test_lines_name_every_phase() -> None:
    p = request_phases([RequestTiming(0.0, ((0.1, 1), (0.2, 2), (0.3, 2)), 0.3)])
    assert p is not None
    text = "\n".join(phases_lines(p))
    for name in ("first token", "second message", "per token", "-> end", "whole request", "outside"):
        assert name in text


def test_burst_sizes_chain_sends_at_most_the_gap_apart() -> None:
    from bench.request_phases import burst_sizes

    starts = [0.0, 0.04, 0.08, 1.0, 1.04, 2.0]  # 0.08 is 0.04 after 0.04: the chain goes on
    assert burst_sizes(starts, gap_s=0.05) == [3, 3, 3, 2, 2, 1]
    shuffled = [2.0, 0.08, 1.04, 0.0, 1.0, 0.04]
    assert burst_sizes(shuffled, gap_s=0.05) == [1, 3, 2, 3, 2, 3]
    assert burst_sizes([0.0, 0.06], gap_s=0.05) == [1, 1]
    assert burst_sizes([]) == []


def test_before_router_is_the_first_token_less_the_routers_ttft() -> None:
    # two requests sent together: 0.25 s to the first token, of which the router's TTFT is 0.05;
    # a third, alone, whose finish carried no TTFT: not counted in before_router
    a = RequestTiming(0.0, ((0.25, 1), (0.3, 2)), 0.4, router_ttft=0.05)
    b = RequestTiming(0.01, ((0.21, 1), (0.3, 2)), 0.4, router_ttft=0.1)
    c = RequestTiming(5.0, ((5.1, 1), (5.2, 2)), 5.3)
    p = request_phases([a, b, c])
    assert p is not None and p.before_router is not None and p.burst is not None
    assert sorted([p.before_router.median, p.before_router.p90]) == pytest.approx([0.15, 0.2])
    assert p.burst == Spread(2.0, 2.0)  # sizes 2, 2, 1: median and nearest-rank p90 are 2
    text = "\n".join(phases_lines(p))
    assert "router's TTFT" in text and "burst" in text
    p = request_phases([c])
    assert p is not None and p.before_router is None and p.burst == Spread(1.0, 1.0)
    assert "router's TTFT" not in "\n".join(phases_lines(p))
