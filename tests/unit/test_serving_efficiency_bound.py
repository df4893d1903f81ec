"""bench/serving_efficiency.py's floor bound: the highest cluster / embedded ratio that the gRPC
floor's CPU per request leaves on the given cores (min(1, cores * E / (E + F)))."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.serving_efficiency import floor_bound  # noqa: E402


def test_floor_bound() -> None:
    # 32 tokens at 0.088 ms: E 2.8 ms; a floor of 8.3 ms on 2 cores caps the ratio near 0.5
    assert floor_bound(2.8, 8.3, 2) == pytest.approx(2 * 2.8 / 11.1)
    assert floor_bound(2.8, 8.3, 2) < 0.8
    # 256 tokens: E 22.5 ms, a floor of 12 ms: the engine thread's own core is the bound
    assert floor_bound(22.5, 12.0, 2) == 1.0
    assert floor_bound(1.0, 0.0, 1) == 1.0  # no floor on one core: the engine alone
    assert floor_bound(1.0, 1.0, 1) == 0.5
    for bad in ((0.0, 1.0, 2), (1.0, -1.0, 2), (1.0, 1.0, 0)):
        with pytest.raises(ValueError, match="floor_bound"):
            floor_bound(*bad)
