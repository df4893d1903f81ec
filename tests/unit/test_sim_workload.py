"""Workload loaders, synthetic generators, rate scaling and trace block keys."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.sim import trace_block_keys
from simulator.workload import (
    ArrivalKind,
    ArrivalProcess,
    LengthDistribution,
    LengthKind,
    RateSource,
    Workload,
    WorkloadRequest,
    load_azure,
    load_mooncake,
    named_workload,
    sharegpt,
    synthetic,
)


def test_mooncake_trace_loads_with_prefix_ids() -> None:
    w = load_mooncake(limit=100)
    assert len(w) == 100
    r = w.requests[0]
    assert r.arrival_s == 0.0 and r.input_len == 6758 and r.output_len == 500 and r.hash_ids[:3] == (0, 1, 2)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(w.requests, w.requests[1:], strict=False))
    assert all(len(x.hash_ids) == -(-x.input_len // 512) for x in w.requests)


def test_azure_trace_loads_relative_times() -> None:
    w = load_azure(limit=50)
    assert len(w) == 50 and w.requests[0].arrival_s == 0.0
    assert w.requests[1].arrival_s == pytest.approx(0.052, abs=1e-3)
    assert (w.requests[0].input_len, w.requests[0].output_len) == (4808, 10)


def test_synthetic_rate_and_lengths() -> None:
    w = synthetic(4000, rate=5.0, seed=3)
    assert w.rate == pytest.approx(5.0, rel=0.05)
    fixed = LengthDistribution(LengthKind.FIXED, 100)
    u = synthetic(
        10, 1.0, fixed, LengthDistribution(LengthKind.UNIFORM, 5, 9), ArrivalProcess(ArrivalKind.UNIFORM)
    )
    assert {r.input_len for r in u.requests} == {100}
    assert all(5 <= r.output_len <= 9 for r in u.requests)
    assert [r.arrival_s for r in u.requests] == pytest.approx(list(np.arange(10.0)))
    assert synthetic(50, 2.0, seed=1) == synthetic(50, 2.0, seed=1)


def test_gamma_arrivals_are_burstier_than_poisson() -> None:
    rng = np.random.default_rng(0)
    gaps_p = np.diff(ArrivalProcess().times(rng, 20000, 10.0))
    gaps_g = np.diff(ArrivalProcess(ArrivalKind.GAMMA, cv=3.0).times(rng, 20000, 10.0))
    assert gaps_p.std() / gaps_p.mean() == pytest.approx(1.0, abs=0.05)
    assert gaps_g.std() / gaps_g.mean() == pytest.approx(3.0, rel=0.15)
    assert gaps_g.mean() == pytest.approx(0.1, rel=0.1)


def test_sharegpt_like_lengths_fit_the_context() -> None:
    w = sharegpt(5000, seed=2)
    i, o = w.mean_lengths()
    assert 600 < i < 800 and 150 < o < 230
    assert all(r.input_len + r.output_len <= 2048 for r in w.requests)


def test_rate_scaling_and_clipping() -> None:
    w = Workload("t", tuple(WorkloadRequest(float(t), 10, 5, (t,)) for t in range(11)))
    assert w.rate == pytest.approx(1.0)
    assert w.with_rate(4.0).rate == pytest.approx(4.0)
    assert w.with_rate(4.0).requests[-1].arrival_s == pytest.approx(2.5)
    c = Workload("t", (WorkloadRequest(0.0, 3000, 100, tuple(range(6))),)).clipped(
        max_input=1024, max_total=1100
    )
    assert (c.requests[0].input_len, c.requests[0].output_len, len(c.requests[0].hash_ids)) == (1024, 76, 2)


def test_rate_source_sizes_workloads_and_repeats_traces() -> None:
    src = RateSource(duration_s=10, min_requests=20, max_requests=500)
    assert len(src.at_rate(1.0)) == 20 and len(src.at_rate(8.0)) == 80 and len(src.at_rate(1000)) == 500
    assert src.at_rate(8.0).rate == pytest.approx(8.0, rel=0.3)
    base = Workload("t", tuple(WorkloadRequest(float(t), 10, 5, (t, 100 + t)) for t in range(5)))
    rep = RateSource(base=base, duration_s=3, min_requests=12).at_rate(2.0)
    assert len(rep) == 12
    times = [r.arrival_s for r in rep.requests]
    assert times == sorted(times)
    assert rep.requests[5].hash_ids != base.requests[0].hash_ids  # repetitions do not share cache


def test_named_workloads() -> None:
    assert len(named_workload("sharegpt", n=10)) == 10
    assert len(named_workload("mooncake", n=10)) == 10
    assert named_workload("azure-code", n=100, rate=2.0).rate == pytest.approx(2.0)
    with pytest.raises(ValueError):
        named_workload("nope")


def test_trace_block_keys_expand_and_share_prefixes() -> None:
    a = trace_block_keys([7, 8, 9], 1300, 16)  # 1300 // 16 = 81 full blocks
    b = trace_block_keys([7, 8, 5], 1300, 16)
    assert len(a) == 81 and len(set(a)) == 81
    assert a[:64] == b[:64] and a[64] != b[64]
    assert trace_block_keys([7], 10, 16) == []
    with pytest.raises(ValueError):
        trace_block_keys([1], 600, 48)


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("t.jsonl", '{"x": 1}\n', "line 1: not a Mooncake-format request (KeyError: 'timestamp')"),
        (
            "t.jsonl",
            '{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": []}\nnot json\n',
            "line 2: not a Mooncake-format request (JSONDecodeError",
        ),
        ("t.jsonl", "\n\n", "holds no requests"),
        ("t.csv", "a,b\n1,2\n", "line 2: not an Azure-format request (KeyError: 'TIMESTAMP')"),
        (
            "t.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,2\n",
            "line 2: not an Azure-format request (ValueError",
        ),
        ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "holds no requests"),
    ],
)
def test_a_malformed_trace_is_refused_naming_its_line(tmp_path, name, content, says) -> None:
    from pdserve.errors import InvalidRequestError

    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(InvalidRequestError) as e:
        named_workload(str(p))
    assert str(e.value).startswith(f"trace {p}") and says in str(e.value), str(e.value)
