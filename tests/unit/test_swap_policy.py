"""Swap-or-recompute policy, host pool and KV manager swap accounting, scheduler swap (pure)."""

from __future__ import annotations

import math

import pytest

from engine.block_manager import HostBlock, KVCacheManager
from engine.host_pool import HostBlockPool
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.swap_policy import (
    PreemptionMode,
    RateEstimator,
    SwapRates,
    choose_preemption_mode,
    swap_budget_tokens,
)

FAST_COPY = SwapRates(swap_bytes_per_s=1e9, recompute_tokens_per_s=1e3)  # copying is cheap
SLOW_COPY = SwapRates(swap_bytes_per_s=1e3, recompute_tokens_per_s=1e9)  # recomputing is cheap


# ----------------------------------------------------------------- policy
def test_swap_when_copy_is_cheaper():
    d = choose_preemption_mode(
        blocks_to_copy=4, block_nbytes=1000, tokens_to_recompute=64, host_free_blocks=10, rates=FAST_COPY
    )
    assert d.mode is PreemptionMode.SWAP
    assert d.swap_s == pytest.approx(2 * 4000 / 1e9)
    assert d.recompute_s == pytest.approx(64 / 1e3)


def test_recompute_when_recompute_is_cheaper():
    d = choose_preemption_mode(
        blocks_to_copy=4, block_nbytes=1000, tokens_to_recompute=64, host_free_blocks=10, rates=SLOW_COPY
    )
    assert d.mode is PreemptionMode.RECOMPUTE
    assert d.swap_s > d.recompute_s


def test_break_even_is_decided_by_both_directions_of_copy():
    # one-way copy 0.5 s < recompute 0.75 s, but out + in = 1.0 s > 0.75 s: recompute
    rates = SwapRates(swap_bytes_per_s=2000, recompute_tokens_per_s=100)
    d = choose_preemption_mode(
        blocks_to_copy=1, block_nbytes=1000, tokens_to_recompute=75, host_free_blocks=5, rates=rates
    )
    assert d.mode is PreemptionMode.RECOMPUTE
    d = choose_preemption_mode(
        blocks_to_copy=1, block_nbytes=1000, tokens_to_recompute=101, host_free_blocks=5, rates=rates
    )
    assert d.mode is PreemptionMode.SWAP


def test_host_pool_full_means_recompute():
    d = choose_preemption_mode(
        blocks_to_copy=11, block_nbytes=10, tokens_to_recompute=10_000, host_free_blocks=10, rates=FAST_COPY
    )
    assert d.mode is PreemptionMode.RECOMPUTE


def test_no_rates_yet_means_recompute_and_all_shared_means_swap():
    d = choose_preemption_mode(
        blocks_to_copy=1, block_nbytes=10, tokens_to_recompute=100, host_free_blocks=10, rates=None
    )
    assert d.mode is PreemptionMode.RECOMPUTE
    d = choose_preemption_mode(
        blocks_to_copy=0, block_nbytes=10, tokens_to_recompute=100, host_free_blocks=0, rates=SLOW_COPY
    )
    assert d.mode is PreemptionMode.SWAP  # nothing to copy: keeping the shared blocks is free


def test_policy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="block_nbytes"):
        choose_preemption_mode(
            blocks_to_copy=1, block_nbytes=0, tokens_to_recompute=1, host_free_blocks=1, rates=FAST_COPY
        )
    with pytest.raises(ValueError, match="swap_bytes_per_s"):
        SwapRates(0.0, 1.0)
    with pytest.raises(ValueError, match="recompute_tokens_per_s"):
        SwapRates(1.0, math.inf)


def test_swap_budget_tokens():
    # 4 blocks x 1000 B at 1e6 B/s = 4 ms; at 1e4 tokens/s that is 40 tokens of budget
    assert swap_budget_tokens(4, 1000, SwapRates(1e6, 1e4)) == 40
    assert swap_budget_tokens(0, 1000, SwapRates(1e6, 1e4)) == 0
    assert swap_budget_tokens(1, 1, SwapRates(1e12, 1.0)) == 1  # never free
    assert swap_budget_tokens(3, 1000, None) == 1


def test_rate_estimator_ewma():
    est = RateEstimator(alpha=0.5)
    assert est.rates is None
    est.observe_copy(1000, 1.0)
    assert est.rates is None  # no prefill rate yet
    est.observe_prefill(100, 1.0)
    assert est.rates == SwapRates(1000.0, 100.0)
    est.observe_copy(3000, 1.0)
    est.observe_prefill(0, 1.0)  # ignored
    est.observe_copy(10, 0.0)  # ignored
    assert est.rates == SwapRates(2000.0, 100.0)
    with pytest.raises(ValueError):
        RateEstimator(alpha=0)


def test_decode_rate_stands_in_until_a_prefill_is_measured():
    """A decode worker adopts its requests' KV and never prefills until it recomputes: without a
    stand-in its swap-or-recompute choice had no rates and always recomputed."""
    est = RateEstimator(alpha=0.5)
    est.observe_copy(1000, 1.0)
    est.observe_decode(0, 1.0)  # ignored
    assert est.rates is None
    est.observe_decode(50, 1.0)
    assert est.rates == SwapRates(1000.0, 50.0, recompute_estimated=True)
    est.observe_decode(150, 1.0)
    assert est.rates == SwapRates(1000.0, 100.0, recompute_estimated=True)
    # the stand-in is no prefill measurement: MLFQ's prediction and the prefill rate stay unknown
    assert est.prefill_tokens_per_s is None and est.predict_prefill_seconds(64) == 0.0
    est.observe_prefill(400, 1.0)  # the first measured prefill replaces it
    assert est.rates == SwapRates(1000.0, 400.0)
    est.observe_decode(10, 1.0)  # decodes no longer move the recompute rate
    assert est.rates == SwapRates(1000.0, 400.0)


def test_a_stand_in_recompute_rate_swaps_to_the_host_but_never_spills() -> None:
    measured = SwapRates(1e9, 100.0, disk_bytes_per_s=1e9)
    estimated = SwapRates(1e9, 100.0, disk_bytes_per_s=1e9, recompute_estimated=True)
    room = dict(blocks_to_copy=4, block_nbytes=1000, tokens_to_recompute=500, host_free_blocks=8)
    for rates in (measured, estimated):  # room on the host: the cheaper one, either way
        assert choose_preemption_mode(**room, rates=rates).mode is PreemptionMode.SWAP
    short = dict(room, host_free_blocks=1, spill_blocks=3)  # room only by spilling to disk
    assert choose_preemption_mode(**short, rates=measured).mode is PreemptionMode.SWAP
    d = choose_preemption_mode(**short, rates=estimated)
    assert d.mode is PreemptionMode.RECOMPUTE and d.spill_blocks == 0


def test_prefill_prediction_is_affine_not_throughput():
    """A step's fixed cost is not charged per token (issue #15: n / throughput predicted 45 ms for
    a 128-token prompt on the tiny CPU model whose step took 4.6 ms, and skip-join put every
    prompt at the bottom level)."""
    est = RateEstimator()
    assert est.predict_prefill_seconds(100) == 0.0  # nothing measured: top level
    est.observe_prefill(100, 0.02)
    # one size seen: no slope to fit, the throughput predicts
    assert est.predict_prefill_seconds(50) == pytest.approx(0.01)
    for _ in range(30):  # 3 ms fixed + 10 us per token
        for n in (1, 16, 64, 256):
            est.observe_prefill(n, 0.003 + 1e-5 * n)
    assert est.predict_prefill_seconds(128) == pytest.approx(0.003 + 1e-5 * 128, rel=0.05)
    assert est.predict_prefill_seconds(1) == pytest.approx(0.003, rel=0.05)
    assert est.predict_prefill_seconds(0) == 0.0
    # a fit whose intercept comes out negative goes through the origin (never negative times)
    neg = RateEstimator()
    for n, t in ((10, 0.001), (20, 0.004), (40, 0.010)):
        neg.observe_prefill(n, t)
    assert neg.predict_prefill_seconds(1) > 0
    assert neg.predict_prefill_seconds(40) == pytest.approx(
        (10 * 0.001 + 20 * 0.004 + 40 * 0.010) / (100 + 400 + 1600) * 40, rel=0.1
    )
    with pytest.raises(ValueError):
        RateEstimator(fit_alpha=0)


def test_prefill_prediction_survives_with_rates():
    est = RateEstimator()
    for n in (1, 64, 256):
        est.observe_prefill(n, 0.002 + 1e-5 * n)
    seeded = est.with_rates(SwapRates(1e9, 1e4))
    assert seeded.predict_prefill_seconds(128) == pytest.approx(est.predict_prefill_seconds(128))


# ----------------------------------------------------------------- host pool
def test_host_pool_allocate_free():
    hp = HostBlockPool(3)
    a = hp.allocate(2)
    assert hp.num_free_blocks == 1 and hp.num_used_blocks == 2
    with pytest.raises(RuntimeError, match="cannot allocate 2"):
        hp.allocate(2)
    assert hp.num_free_blocks == 1  # a failed allocation takes nothing
    hp.free(a)
    assert hp.num_free_blocks == 3
    with pytest.raises(RuntimeError, match="not held"):
        hp.free([a[0]])
    with pytest.raises(ValueError):
        HostBlockPool(0)


# ----------------------------------------------------------------- KV manager swap
def _req(rid, n, max_tokens=4, priority=0, arrival=0.0, tokens=None) -> Request:
    toks = tokens if tokens is not None else range(n)
    return Request(rid, toks, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival, priority)


def _fill(kv: KVCacheManager, req: Request) -> None:
    """Allocate and 'compute' the request's whole prompt (registering full blocks)."""
    cached = kv.find_cached_prefix(req)
    assert kv.allocate_slots(req, req.num_tokens - len(cached) * kv.block_size, cached)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)


def test_swap_out_and_in_round_trip_accounting():
    kv = KVCacheManager(8, 4, "m", num_host_blocks=4)
    r = _req("a", 10)  # 3 blocks (2 full + 1 partial)
    _fill(kv, r)
    table = kv.block_table("a")
    pairs = kv.swap_out(r)
    assert [d for d, _ in pairs] == table and len({h for _, h in pairs}) == 3
    assert kv.is_swapped("a") and not kv.has("a")
    assert kv.num_free_blocks == 8 and kv.num_free_host_blocks == 1
    assert kv.num_swap_in_blocks("a") == 3
    # evict the device prefix cache so every block must be copied back
    kv.pool.evict_all_cached()
    assert kv.swap_in_blocks_needed(r, 1) == 3  # the next token still fits the partial block
    back = kv.swap_in(r)
    assert sorted(h for h, _ in back) == sorted(h for _, h in pairs)
    assert [d for _, d in back] == kv.block_table("a")
    assert kv.num_free_host_blocks == 4 and kv.num_free_blocks == 5
    assert kv.swap_stats.blocks_out == 3 and kv.swap_stats.blocks_in == 3
    kv.free("a")
    assert kv.num_free_blocks == 8


def test_swap_in_reuses_blocks_still_in_the_device_prefix_cache():
    kv = KVCacheManager(8, 4, "m", num_host_blocks=4)
    r = _req("a", 10)
    _fill(kv, r)
    kv.swap_out(r)
    back = kv.swap_in(r)  # the 2 full blocks are still cached on device: only the partial one copies
    assert len(back) == 1
    assert kv.swap_stats.blocks_in_reused == 2
    kv.free("a")
    assert kv.num_free_blocks == 8 and kv.num_free_host_blocks == 4


def test_shared_prefix_blocks_stay_on_device_not_duplicated():
    kv = KVCacheManager(16, 4, "m", num_host_blocks=8)
    a = _req("a", 13, tokens=list(range(13)))
    b = _req("b", 13, tokens=list(range(12)) + [99])  # shares a's first 3 full blocks (12 tokens)
    _fill(kv, a)
    _fill(kv, b)
    shared = kv.block_table("a")[:3]
    assert kv.block_table("b")[:3] == shared
    assert kv.num_swap_out_blocks("b") == 1  # b's own last block only
    pairs = kv.swap_out(b)
    assert len(pairs) == 1 and {d for d, _ in pairs}.isdisjoint(shared)
    assert kv.swap_stats.blocks_kept == 3
    assert all(kv.pool.blocks[i].ref_cnt == 2 for i in shared)  # b still holds them
    kv.free("a")
    assert all(kv.pool.blocks[i].ref_cnt == 1 for i in shared)  # ... so a's exit cannot lose them
    kv.pool.evict_all_cached()
    kv.swap_in(b)
    assert kv.block_table("b")[:3] == shared
    kv.free("b")
    assert kv.num_free_blocks == 16 and kv.num_free_host_blocks == 8


def test_a_block_shared_only_by_swapped_requests_is_copied_to_the_host_once():
    kv = KVCacheManager(16, 4, "m", num_host_blocks=8)
    a = _req("a", 13, tokens=list(range(13)))
    b = _req("b", 13, tokens=list(range(12)) + [99])
    _fill(kv, a)
    _fill(kv, b)
    shared = kv.block_table("a")[:3]
    kv.swap_out(b)  # a still runs: the 3 shared blocks stay on device, b's own block moves
    pairs = kv.swap_out(a)  # the last running holder leaves: each shared block moves once
    assert len(pairs) == 4 and {d for d, _ in pairs} >= set(shared)
    assert kv.num_free_blocks == 16 and kv.num_free_host_blocks == 8 - 5
    slots = {d: h for d, h in pairs}
    assert [e.host_id for e in kv._swapped["b"][:3]] == [slots[d] for d in shared]
    assert all(kv.host.ref_cnt(slots[d]) == 2 for d in shared)
    assert kv.swap_stats.host_refs_shared == 3
    kv.pool.evict_all_cached()
    back_a = kv.swap_in(a)
    assert len(back_a) == 4  # copied back (the device cache was evicted)
    back_b = kv.swap_in(b)
    assert len(back_b) == 1  # the shared blocks are found in the device prefix cache again
    assert kv.block_table("b")[:3] == kv.block_table("a")[:3]
    assert kv.num_free_host_blocks == 8
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 16


def test_free_of_a_swapped_request_releases_host_and_kept_blocks():
    kv = KVCacheManager(16, 4, "m", num_host_blocks=8)
    a = _req("a", 13, tokens=list(range(13)))
    b = _req("b", 13, tokens=list(range(12)) + [99])
    _fill(kv, a)
    _fill(kv, b)
    kv.swap_out(b)
    kv.free("b")
    kv.free("a")
    assert kv.num_free_blocks == 16 and kv.num_free_host_blocks == 8
    assert not kv.is_swapped("b")


def test_swap_errors_change_nothing():
    kv = KVCacheManager(8, 4, "m", num_host_blocks=2)
    r = _req("a", 10)
    _fill(kv, r)
    with pytest.raises(RuntimeError, match="host blocks"):
        kv.swap_out(r)  # 3 blocks, 2 host slots
    assert kv.has("a") and kv.num_free_host_blocks == 2
    with pytest.raises(RuntimeError, match="not swapped"):
        kv.swap_in(r)
    with pytest.raises(RuntimeError, match="host block pool"):
        KVCacheManager(8, 4, "m").swap_out(r)


def test_swap_in_refuses_when_device_is_short():
    kv = KVCacheManager(4, 4, "m", num_host_blocks=4)
    r = _req("a", 10)
    _fill(kv, r)
    kv.swap_out(r)
    kv.pool.evict_all_cached()
    hog = _req("hog", 8, tokens=list(range(100, 108)))
    _fill(kv, hog)  # 2 of 4 blocks; a needs 3
    assert kv.swap_in_blocks_needed(r, 1) == 3
    with pytest.raises(RuntimeError, match="needs 3 blocks"):
        kv.swap_in(r)
    assert kv.is_swapped("a") and kv.num_free_blocks == 2
    assert isinstance(kv._swapped["a"][0], HostBlock)


# ----------------------------------------------------------------- scheduler with swap
def _sched(blocks, host, bs=4, rates=FAST_COPY, **kw) -> Scheduler:
    cfg = SchedulerConfig(
        **{"max_num_batched_tokens": 32, "long_prefill_token_threshold": 16, "max_model_len": 256, **kw}
    )
    s = Scheduler(cfg, KVCacheManager(blocks, bs, "m", num_host_blocks=host), block_nbytes=100)
    s.set_swap_rates(rates)
    return s


def _run(s: Scheduler, max_steps=300):
    outs = []
    steps = 0
    while s.has_unfinished() and steps < max_steps:
        out = s.schedule()
        # the runner's contract: no swapped block is touched before its copy; check ordering
        outs.append(out)
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
        steps += 1
    assert not s.has_unfinished()
    return outs


def test_scheduler_swaps_instead_of_recomputing_and_resumes_where_it_left():
    s = _sched(blocks=6, host=8)
    a = _req("a", 8, max_tokens=10, priority=0)
    b = _req("b", 8, max_tokens=10, priority=1)
    s.add_request(a)
    s.add_request(b)
    computed_at_swap = None
    outs = []
    while s.has_unfinished():
        out = s.schedule()
        if "b" in out.swapped_out:
            computed_at_swap = b.num_computed_tokens
            assert b.status is RequestStatus.SWAPPED
            assert out.swap_out and not out.swap_in  # no swap-in in a step that preempted
        if "b" in out.swapped_in:
            # b resumes with its KV: no token is recomputed
            sr = next(x for x in out.scheduled if x.request is b)
            assert sr.start == computed_at_swap and sr.num_new_tokens == 1
        outs.append(out)
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    assert computed_at_swap is not None
    assert s.num_swap_outs >= 1 and s.num_swap_ins == s.num_swap_outs
    assert b.num_output_tokens == 10 and b.num_swaps >= 1
    assert s.kv.num_free_blocks == 6 and s.kv.num_free_host_blocks == 8
    assert (
        sum(len(o.swap_out) for o in outs)
        == sum(len(o.swap_in) for o in outs) + s.kv.swap_stats.blocks_in_reused
    )


def test_scheduler_recomputes_when_host_pool_is_full_or_copy_is_slow():
    for host, rates in ((1, FAST_COPY), (8, SLOW_COPY)):
        s = _sched(blocks=6, host=host, rates=rates)
        s.add_request(_req("a", 8, max_tokens=10, priority=0))
        s.add_request(_req("b", 8, max_tokens=10, priority=1))
        outs = _run(s)
        assert s.num_preemptions >= 1
        assert s.num_swap_outs == 0 and not any(o.swap_out for o in outs)
        assert s.kv.num_free_blocks == 6


def test_swap_traffic_is_charged_to_the_token_budget():
    # one block of 100 B at 1e3 B/s copies in 0.1 s = 3 tokens at 25 tokens/s (rounded up per
    # direction and step); swapping 2-3 blocks out and in (0.4-0.6 s) beats recomputing >= 16
    # tokens (0.64 s)
    rates = SwapRates(swap_bytes_per_s=1e3, recompute_tokens_per_s=25)
    s = _sched(blocks=6, host=8, rates=rates, max_num_batched_tokens=32)
    s.add_request(_req("a", 8, max_tokens=12, priority=0))
    s.add_request(_req("b", 8, max_tokens=12, priority=1))
    saw_in = saw_out = False
    while s.has_unfinished():
        out = s.schedule()
        expect = swap_budget_tokens(len(out.swap_out), 100, rates) + swap_budget_tokens(
            len(out.swap_in), 100, rates
        )
        assert out.swap_budget_tokens == expect
        saw_out |= bool(out.swap_out)
        saw_in |= bool(out.swap_in)
        assert out.num_batched_tokens + out.swap_budget_tokens <= 32
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    assert saw_out and saw_in


def test_a_swap_in_costlier_than_the_budget_still_runs_alone():
    s = _sched(blocks=6, host=8, rates=FAST_COPY, max_num_batched_tokens=32)
    r = _req("a", 8, max_tokens=4)
    s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, {"a": 7})
    s._preempt(r, out)  # swapped out while copying was measured fast
    assert r.status is RequestStatus.SWAPPED
    s.set_swap_rates(SwapRates(swap_bytes_per_s=1e3, recompute_tokens_per_s=1e3))  # 100 tokens/block
    out = s.schedule()
    assert out.swapped_in == ["a"] and out.swap_budget_tokens == 200
    assert [x.num_new_tokens for x in out.scheduled] == [1]


def test_abort_of_a_swapped_request_frees_host_blocks():
    s = _sched(blocks=6, host=8)
    s.add_request(_req("a", 8, max_tokens=10, priority=0))
    s.add_request(_req("b", 8, max_tokens=10, priority=1))
    for _ in range(50):
        out = s.schedule()
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
        if s.swapped:
            break
    assert s.swapped and s.kv.num_free_host_blocks < 8
    s.abort_request("b")
    assert not s.swapped and s.kv.num_free_host_blocks == 8
    s.abort_request("a")
    assert s.kv.num_free_blocks == 6 and not s.has_unfinished()


# ----------------------------------------------------------------- randomized accounting check
def _check_accounting(s: Scheduler) -> None:
    """Every device reference is a table's or a swapped request's; every host slot one entry's."""
    kv = s.kv
    refs: dict[int, int] = {}
    for table in kv._tables.values():
        for b in table:
            if b is not None:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
    host_refs: dict[int, int] = {}
    kept: dict[int, set[str]] = {}
    for rid, entries in kv._swapped.items():
        for e in entries:
            if isinstance(e, HostBlock):
                host_refs[e.host_id] = host_refs.get(e.host_id, 0) + 1
            elif e is not None:
                refs[e.block_id] = refs.get(e.block_id, 0) + 1
                kept.setdefault(e.block_id, set()).add(rid)
    for blk in kv.pool.blocks:
        assert blk.ref_cnt == refs.get(blk.block_id, 0)
        assert (blk.ref_cnt == 0) == (blk.block_id in kv.pool._free)
    assert kv.host is not None and kv.host.num_used_blocks == len(host_refs)
    assert all(kv.host.ref_cnt(h) == n for h, n in host_refs.items())
    assert kv._kept == kept
    assert {r.request_id for r in s.swapped} == set(kv._swapped)
    for r in s.running:
        assert r.status is RequestStatus.RUNNING and kv.has(r.request_id)


@pytest.mark.parametrize("policy", ["priority", "fcfs", "mlfq"])
def test_random_workload_with_aborts_keeps_both_pools_consistent(policy):
    import random

    from engine.scheduler import SchedulingPolicy

    rng = random.Random(7)
    t = [0.0]
    cfg = SchedulerConfig(
        max_num_batched_tokens=48,
        long_prefill_token_threshold=16,
        max_model_len=256,
        max_num_seqs=6,
        policy=SchedulingPolicy(policy),
        mlfq_quantum_iters=2,
        mlfq_starvation_s=15.0,
        mlfq_swap_watermark=0.7,
    )
    s = Scheduler(
        cfg,
        KVCacheManager(20, 4, "m", num_host_blocks=40),
        clock=lambda: t[0],
        block_nbytes=100,
        prefill_time=lambda n: n * 0.002,
    )
    s.set_swap_rates(FAST_COPY)
    shared = list(range(24))  # 6 blocks most prompts share: kept, then copied once
    n = 0
    swapped_any = False
    for _ in range(400):
        if n < 40 and rng.random() < 0.3:
            k = rng.randint(2, 30)
            toks = (shared if rng.random() < 0.8 else []) + [rng.randint(20, 300) for _ in range(k)]
            s.add_request(
                Request(
                    f"r{n}",
                    toks,
                    SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=True),
                    t[0],
                    rng.randint(0, 3),
                )
            )
            n += 1
        if s.requests and rng.random() < 0.05:
            s.abort_request(rng.choice(sorted(s.requests)))
        out = s.schedule()
        swapped_any |= bool(out.swapped_out)
        # a swap-in never reuses a host slot swapped out in the same step, nor a request preempted in it
        assert set(out.swapped_in).isdisjoint(out.preempted)
        assert {h for _, h in out.swap_out}.isdisjoint({h for h, _ in out.swap_in})
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
        _check_accounting(s)
        t[0] += 1.0
    while s.has_unfinished():
        out = s.schedule()
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
        _check_accounting(s)
    assert swapped_any
    assert s.kv.num_free_blocks == 20 and s.kv.num_free_host_blocks == 40
