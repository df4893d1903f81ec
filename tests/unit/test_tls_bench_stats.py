"""The statistics bench/tls_overhead.py decides with: a bootstrap interval of the median of
per-pair ratios, and a verdict that passes only when the whole interval is within the target."""

from __future__ import annotations

import random

from bench.tls_overhead import median_ci, verdict


def test_verdict_needs_the_whole_interval():
    assert verdict(0.97, 1.04) == "PASS"
    assert verdict(0.97, 1.05) == "PASS"  # the target itself is within it
    assert verdict(1.06, 1.20) == "FAIL"
    assert verdict(0.98, 1.09) == "INCONCLUSIVE"  # noise wider than the margin


def test_median_ci_brackets_the_median_and_narrows_with_more_pairs():
    rng = random.Random(1)
    few = [1.0 + rng.gauss(0, 0.1) for _ in range(10)]
    many = [1.0 + rng.gauss(0, 0.1) for _ in range(400)]
    m, lo, hi = median_ci(few, random.Random(0))
    assert lo <= m <= hi and lo < hi
    m2, lo2, hi2 = median_ci(many, random.Random(0))
    assert lo2 <= m2 <= hi2
    assert hi2 - lo2 < hi - lo
    assert median_ci([1.02] * 20, random.Random(0)) == (1.02, 1.02, 1.02)  # no spread, no width
