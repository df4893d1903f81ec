"""Fetch-or-recompute of a remote cached prefix: the pure rule and its online estimates."""

from __future__ import annotations

import math

import pytest

from prefill_worker.__main__ import parse_prefix_args
from prefill_worker.prefix_policy import (
    FetchMode,
    PrefixDecision,
    PrefixFetchConfig,
    PrefixFetchPolicy,
    decide,
    predict_fetch_s,
    predict_recompute_s,
    should_fetch,
)

# SmolLM2-135M in float32: 46080 KV bytes per token; 16-token blocks (737 kB each)
BLOCK_BYTES = 46080 * 16


def test_predictions_on_hand_numbers():
    # 8 blocks = 5.9 MB at 1 GB/s + 2 ms per call
    assert predict_fetch_s(8 * BLOCK_BYTES, 1e9, 2e-3) == pytest.approx(2e-3 + 8 * BLOCK_BYTES / 1e9)
    assert predict_fetch_s(0, 1e9, 2e-3) == 0.0
    assert predict_recompute_s(128, 2000.0) == pytest.approx(0.064)
    assert predict_recompute_s(-5, 2000.0) == 0.0


def test_fetch_when_faster_recompute_otherwise():
    # fast link: 7.9 ms to fetch vs 64 ms to recompute -> fetch
    e = decide(
        128, 8 * BLOCK_BYTES, bandwidth_bytes_per_s=1e9, call_latency_s=2e-3, prefill_tokens_per_s=2000
    )
    assert e.decision is PrefixDecision.FETCH
    assert e.fetch_s == pytest.approx(0.0079, rel=1e-2) and e.recompute_s == pytest.approx(0.064)
    # slow link (10 MB/s): 592 ms to fetch vs 64 ms -> recompute
    e = decide(
        128, 8 * BLOCK_BYTES, bandwidth_bytes_per_s=1e7, call_latency_s=2e-3, prefill_tokens_per_s=2000
    )
    assert e.decision is PrefixDecision.RECOMPUTE
    # a fast engine (1M tok/s: 0.128 ms) loses to a 2 ms call latency -> recompute
    e = decide(128, 8 * BLOCK_BYTES, bandwidth_bytes_per_s=1e9, call_latency_s=2e-3, prefill_tokens_per_s=1e6)
    assert e.decision is PrefixDecision.RECOMPUTE


def test_tie_recomputes_and_nothing_to_fetch():
    assert not should_fetch(0.01, 0.01)
    assert should_fetch(0.009, 0.01)
    e = decide(0, 0, bandwidth_bytes_per_s=1e9, call_latency_s=0, prefill_tokens_per_s=1)
    assert e == (e.__class__(PrefixDecision.RECOMPUTE, 0.0, 0.0))


@pytest.mark.parametrize(
    ("mode", "want"), [(FetchMode.ALWAYS, PrefixDecision.FETCH), (FetchMode.NEVER, PrefixDecision.RECOMPUTE)]
)
def test_forced_modes_keep_predictions(mode, want):
    # ALWAYS fetches even on a hopeless link; NEVER recomputes even when fetching is free
    bw = 1.0 if mode is FetchMode.ALWAYS else 1e15
    e = decide(
        64, 4 * BLOCK_BYTES, bandwidth_bytes_per_s=bw, call_latency_s=0.0, prefill_tokens_per_s=100, mode=mode
    )
    assert e.decision is want
    assert e.recompute_s == pytest.approx(0.64) and e.fetch_s > 0


def test_config_validation():
    with pytest.raises(ValueError):
        PrefixFetchConfig(bandwidth_bytes_per_s=0)
    with pytest.raises(ValueError):
        PrefixFetchConfig(prefill_tokens_per_s=-1)
    with pytest.raises(ValueError):
        PrefixFetchConfig(call_latency_s=-1e-3)
    with pytest.raises(ValueError):
        PrefixFetchConfig(alpha=0)


def test_policy_seeds_and_counts():
    p = PrefixFetchPolicy(
        PrefixFetchConfig(bandwidth_bytes_per_s=1e9, call_latency_s=2e-3, prefill_tokens_per_s=2000)
    )
    assert p.decide(128, 8 * BLOCK_BYTES).decision is PrefixDecision.FETCH
    assert p.decide(0, 0).decision is PrefixDecision.RECOMPUTE  # not counted: nothing to decide
    assert p.counts == {PrefixDecision.FETCH: 1, PrefixDecision.RECOMPUTE: 0}


def test_ewma_updates_on_hand_numbers():
    cfg = PrefixFetchConfig(
        bandwidth_bytes_per_s=1e9,
        call_latency_s=2e-3,
        prefill_tokens_per_s=2000,
        alpha=0.5,
        min_sample_tokens=64,
    )
    p = PrefixFetchPolicy(cfg)
    assert p.observe_call(4e-3)
    assert p.call_latency_s == pytest.approx(3e-3)  # 2 ms + 0.5 * (4 - 2) ms
    # 1e6 bytes in 8 ms, 3 ms of it call latency -> 2e8 B/s sample -> (1e9 + 2e8) / 2
    assert p.observe_fetch(1e6, 8e-3)
    assert p.bandwidth_bytes_per_s == pytest.approx(6e8)
    # latency estimate above the sample: at least half the time counts as bytes -> 1e6 / 2 ms
    q = PrefixFetchPolicy(PrefixFetchConfig(call_latency_s=10e-3, alpha=1.0))
    assert q.observe_fetch(1e6, 4e-3)
    assert q.bandwidth_bytes_per_s == pytest.approx(5e8)
    # 1000 tokens in 0.25 s -> 4000 tok/s sample -> (2000 + 4000) / 2
    assert p.observe_prefill(1000, 0.25)
    assert p.prefill_tokens_per_s == pytest.approx(3000)


def test_bad_samples_are_ignored():
    p = PrefixFetchPolicy(PrefixFetchConfig(min_sample_s=1e-4, min_sample_tokens=64))
    before = (p.call_latency_s, p.bandwidth_bytes_per_s, p.prefill_tokens_per_s)
    assert not p.observe_call(0.0)
    assert not p.observe_call(math.nan)
    assert not p.observe_fetch(0, 1e-3)
    assert not p.observe_fetch(1e6, 1e-6)  # below min_sample_s: timer noise
    assert not p.observe_prefill(10, 1e-2)  # too few tokens: per-step overhead dominates
    assert not p.observe_prefill(1000, math.inf)
    assert (p.call_latency_s, p.bandwidth_bytes_per_s, p.prefill_tokens_per_s) == before


def test_learning_flips_the_decision():
    # seeded to fetch; then the link proves slow (10 MB/s) and the decision becomes recompute
    p = PrefixFetchPolicy(
        PrefixFetchConfig(bandwidth_bytes_per_s=1e9, call_latency_s=1e-3, prefill_tokens_per_s=2000)
    )
    assert p.decide(128, 8 * BLOCK_BYTES).decision is PrefixDecision.FETCH
    for _ in range(40):
        p.observe_fetch(8 * BLOCK_BYTES, 1e-3 + 8 * BLOCK_BYTES / 1e7)
    assert p.bandwidth_bytes_per_s == pytest.approx(1e7, rel=0.05)
    assert p.decide(128, 8 * BLOCK_BYTES).decision is PrefixDecision.RECOMPUTE
    assert p.counts == {PrefixDecision.FETCH: 1, PrefixDecision.RECOMPUTE: 1}


def test_main_flags():
    cfg, rest = parse_prefix_args(
        ["--worker-id", "p0", "--prefix-fetch", "never", "--prefill-tokens-per-s", "500", "--store", "x:1"]
    )
    assert cfg.mode is FetchMode.NEVER and cfg.prefill_tokens_per_s == 500
    assert rest == ["--worker-id", "p0", "--store", "x:1"]
    cfg, rest = parse_prefix_args([])
    assert cfg == PrefixFetchConfig() and rest == []
    with pytest.raises(SystemExit):
        parse_prefix_args(["--prefix-bandwidth", "0"])
