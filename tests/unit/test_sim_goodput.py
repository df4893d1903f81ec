"""Goodput binary search on synthetic monotone attainment functions."""

from __future__ import annotations

import pytest

from simulator.goodput import search_goodput


def step(knee: float):
    return lambda r: 0.99 if r <= knee else 0.5


@pytest.mark.parametrize("knee", [0.013, 0.37, 3.7, 42.0, 1000.0])
def test_finds_knee_within_tolerance(knee: float) -> None:
    res = search_goodput(step(knee), 0.9, start=1.0, rel_tol=0.01)
    assert knee * 0.99 <= res.rate <= knee
    assert all(a >= 0.9 for r, a in res.evaluations if r <= res.rate)


def test_smooth_decreasing_attainment() -> None:
    # attainment = 1 / (1 + (r/10)^4): crosses 0.9 at r = 10 * (1/9)^(1/4)
    truth = 10 * (1 / 9) ** 0.25
    res = search_goodput(lambda r: 1 / (1 + (r / 10) ** 4), 0.9, rel_tol=0.005)
    assert res.rate == pytest.approx(truth, rel=0.01)
    assert res.rate <= truth


def test_never_feasible_and_always_feasible() -> None:
    assert search_goodput(lambda r: 0.0, 0.9).rate == 0.0
    res = search_goodput(lambda r: 1.0, 0.9, max_rate=100.0)
    assert res.rate >= 64.0


def test_bad_target() -> None:
    with pytest.raises(ValueError):
        search_goodput(lambda r: 1.0, 1.5)
