"""pdserve.metrics.observe_all: the batched histogram observe of the router's inter-token
latencies gives the buckets, count and sum that one observe per amount gives."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from pdserve.metrics import gaps_of, observe_all


def _samples(reg: CollectorRegistry, name: str) -> dict[tuple, float]:
    out = {}
    for fam in reg.collect():
        for s in fam.samples:
            if s.name.startswith(name):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


AMOUNTS = [0.0, 0.001, 0.005, 0.0051, 0.02, 0.02, 0.3, 1.0, 7.5, 1e9, -0.5, math.inf]


@pytest.mark.parametrize("labelled", [False, True])
def test_observe_all_equals_one_observe_per_amount(labelled):
    buckets = (0.001, 0.005, 0.02, 0.1, 1.0)
    one, many = CollectorRegistry(), CollectorRegistry()
    labels = ("cls",) if labelled else ()
    h1 = Histogram("x_seconds", "x", labels, buckets=buckets, registry=one)
    h2 = Histogram("x_seconds", "x", labels, buckets=buckets, registry=many)
    c1, c2 = (h1.labels("a"), h2.labels("a")) if labelled else (h1, h2)
    for a in AMOUNTS:
        c1.observe(a)
    observe_all(c2, AMOUNTS)
    observe_all(c2, [])  # nothing observed
    got, want = _samples(many, "x_seconds"), _samples(one, "x_seconds")
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k[0].endswith("_sum"):
            assert got[k] == v or (math.isinf(v) and math.isinf(got[k]))
        else:
            assert got[k] == v, k  # buckets and count: exact


def test_observe_all_nan_counts_in_no_bucket_like_observe():
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("y_seconds", "y", buckets=(1.0,), registry=one)
    h2 = Histogram("y_seconds", "y", buckets=(1.0,), registry=many)
    for a in (0.5, math.nan):
        h1.observe(a)
    observe_all(h2, [0.5, math.nan])
    want = {k: v for k, v in _samples(one, "y_seconds").items() if not k[0].endswith("_sum")}
    got = {k: v for k, v in _samples(many, "y_seconds").items() if not k[0].endswith("_sum")}
    assert got == want
    assert math.isnan(_samples(many, "y_seconds")[("y_seconds_sum", ())])


def test_observe_all_on_a_labelled_parent_raises_as_observe_does():
    h = Histogram("z_seconds", "z", ("cls",), registry=CollectorRegistry())
    with pytest.raises(ValueError):
        h.observe(1.0)
    with pytest.raises(ValueError):
        observe_all(h, [1.0])


def test_observe_all_many_amounts_equal_one_observe_each():
    """A request's worth of inter-token latencies (many, repeated, some on a bound exactly)."""
    import random

    rng = random.Random(7)
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
    amounts = [rng.choice(buckets) if rng.random() < 0.2 else rng.expovariate(40.0) for _ in range(1000)]
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("w_seconds", "w", buckets=buckets, registry=one)
    h2 = Histogram("w_seconds", "w", buckets=buckets, registry=many)
    for a in amounts:
        h1.observe(a)
    observe_all(h2, amounts)
    got, want = _samples(many, "w_seconds"), _samples(one, "w_seconds")
    for k, v in want.items():
        if k[0].endswith("_sum"):
            assert got[k] == pytest.approx(v, rel=1e-12)
        else:
            assert got[k] == v, k


def test_gaps_of_a_requests_token_times():
    assert gaps_of([]) == []
    assert gaps_of([1.0]) == []
    assert gaps_of((1.0, 1.5, 1.75)) == [0.5, 0.25]
    assert gaps_of([1.0, 0.5, 2.0]) == [0.0, 1.5]  # a clock that stepped back: no negative latency
