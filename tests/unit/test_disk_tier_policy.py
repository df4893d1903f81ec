"""The engine's disk tier for cold swapped-out KV, the pure parts: the spill plan and the cost
choice, the KV manager's spill/promote accounting, the scheduler's spills and its promotion of
disk-resident requests ahead of their turn (prefetch), checked against a fake data plane that
applies every step's copies in the model runner's order and verifies each scheduled request
reads exactly its own tokens' KV."""

from __future__ import annotations

import dataclasses
import math

import pytest

from engine.block_manager import NULL_BLOCK, DiskBlock, HostBlock, KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, SchedulingPolicy
from engine.swap_policy import (
    PreemptionMode,
    RateEstimator,
    SwapRates,
    choose_preemption_mode,
    disk_budget_tokens,
    plan_spill,
)

# copies and disk are both far cheaper than recomputing
FAST = SwapRates(swap_bytes_per_s=1e9, recompute_tokens_per_s=1e3, disk_bytes_per_s=1e8)


# ----------------------------------------------------------------- policy
def test_plan_spill_takes_the_coldest_whole_requests_that_fit_the_disk():
    cands = [("cold", 2), ("warm", 3), ("hot", 4)]
    assert plan_spill(0, cands, 10) == ([], 0)
    assert plan_spill(2, cands, 10) == (["cold"], 2)
    assert plan_spill(4, cands, 10) == (["cold", "warm"], 5)
    assert plan_spill(4, cands, 4) is None  # "cold" fits, then neither "warm" nor "hot" does
    assert plan_spill(3, cands[1:], 3) == (["warm"], 3)
    assert plan_spill(10, cands, 100) is None  # not enough to spill
    assert plan_spill(1, cands, 1) is None  # the disk cannot take any of them


def test_choose_counts_the_spill_at_the_disk_bandwidth():
    kw = dict(blocks_to_copy=4, block_nbytes=1000, tokens_to_recompute=64, host_free_blocks=1)
    d = choose_preemption_mode(**kw, rates=FAST, spill_blocks=3)
    assert d.mode is PreemptionMode.SWAP and d.spill_blocks == 3
    assert d.swap_s == pytest.approx(2 * 4000 / 1e9 + 2 * 3000 / 1e8)
    # no spill possible (None) or too little: recompute, as without a disk tier
    assert choose_preemption_mode(**kw, rates=FAST, spill_blocks=None).mode is PreemptionMode.RECOMPUTE
    assert choose_preemption_mode(**kw, rates=FAST, spill_blocks=2).mode is PreemptionMode.RECOMPUTE
    # a slow disk: writing 3 blocks now and reading them later costs more than recomputing 64 tokens
    slow = SwapRates(swap_bytes_per_s=1e9, recompute_tokens_per_s=1e3, disk_bytes_per_s=1e4)
    d = choose_preemption_mode(**kw, rates=slow, spill_blocks=3)
    assert d.mode is PreemptionMode.RECOMPUTE and d.spill_blocks == 0
    # disk bandwidth unknown: a spill costs infinitely much
    unknown = SwapRates(swap_bytes_per_s=1e9, recompute_tokens_per_s=1e3)
    assert choose_preemption_mode(**kw, rates=unknown, spill_blocks=3).mode is PreemptionMode.RECOMPUTE
    with pytest.raises(ValueError):
        choose_preemption_mode(**kw, rates=FAST, spill_blocks=-1)


def test_disk_budget_tokens_and_rates():
    assert disk_budget_tokens(0, 1000, FAST) == 0
    assert disk_budget_tokens(4, 1000, SwapRates(1e9, 1e4, 1e6)) == 40  # 4 ms at 1e4 tokens/s
    assert disk_budget_tokens(3, 1000, SwapRates(1e9, 1e4)) == 1  # no disk rate known yet
    assert disk_budget_tokens(1, 1, SwapRates(1e9, 1.0, 1e12)) == 1  # never free
    with pytest.raises(ValueError):
        SwapRates(1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        SwapRates(1.0, 1.0, math.nan)
    est = RateEstimator(alpha=0.5)
    est.observe_copy(1000, 1.0)
    est.observe_prefill(100, 1.0)
    assert est.rates == SwapRates(1000.0, 100.0, None)
    est.observe_disk(4000, 2.0)
    est.observe_disk(0, 1.0)  # ignored
    assert est.rates == SwapRates(1000.0, 100.0, 2000.0)
    assert est.with_rates(FAST).rates == FAST


# ----------------------------------------------------------------- KV manager accounting
def _req(rid, n, max_tokens=4, priority=0, arrival=0.0, base=0) -> Request:
    return Request(
        rid, range(base, base + n), SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival, priority
    )


def _fill(kv: KVCacheManager, req: Request) -> None:
    cached = kv.find_cached_prefix(req)
    assert kv.allocate_slots(req, req.num_tokens - len(cached) * kv.block_size, cached)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)


def test_spill_and_promote_round_trip_accounting():
    kv = KVCacheManager(8, 4, "m", num_host_blocks=4, num_disk_blocks=6)
    a = _req("a", 10, base=100)
    _fill(kv, a)
    out_pairs = kv.swap_out(a)
    assert len(out_pairs) == 3 and kv.num_free_host_blocks == 1
    assert kv.num_spill_blocks("a") == 3
    kv.begin_step()
    spilled = kv.spill("a")
    assert [h for h, _ in spilled] == [h for _, h in out_pairs]
    assert kv.num_free_host_blocks == 4 and kv.num_free_disk_blocks == 3
    assert kv.num_disk_blocks_of("a") == 3 and kv.disk_ids_of("a") == [d for _, d in spilled]
    assert kv.swap_stats.blocks_spilled == 3
    with pytest.raises(RuntimeError, match="promote it before its swap-in"):
        kv.swap_in(a)
    assert kv.swap_in_blocks_needed(a, 1) >= 3  # the disk blocks count as blocks to bring back
    back = kv.promote("a")
    assert sorted(d for d, _ in back) == sorted(d for _, d in spilled)
    assert kv.num_free_disk_blocks == 6 and kv.num_free_host_blocks == 1
    assert kv.host_ids_of("a") == [h for _, h in back]
    with pytest.raises(RuntimeError, match="after a promotion in the same step"):
        kv.spill("a")  # would reuse a disk slot this step's promotion still has to read
    kv.begin_step()
    pairs = kv.swap_in(a)
    # a block whose hash is still in the device prefix cache is reused instead of copied
    assert set(h for h, _ in pairs) <= set(h for _, h in back)
    assert len(pairs) + kv.swap_stats.blocks_in_reused == 3
    assert kv.num_free_host_blocks == 4
    kv.free("a")
    assert kv.num_free_blocks == 8


def test_shared_host_blocks_stay_on_the_host_and_free_releases_disk_slots():
    kv = KVCacheManager(8, 4, "m", num_host_blocks=8, num_disk_blocks=8)
    a = _req("a", 9, base=200)
    b = Request("b", list(range(200, 208)) + [999], SamplingParams(max_tokens=4, ignore_eos=True), 0.0, 0)
    _fill(kv, a)
    _fill(kv, b)  # shares a's two full blocks (prefix cache)
    kv.swap_out(b)  # shared blocks stay on device (a runs)
    kv.swap_out(a)  # now both: the shared blocks are copied once, referenced twice on the host
    assert kv.num_spill_blocks("a") == 1 and kv.num_spill_blocks("b") == 1
    kv.spill("a")
    assert kv.num_disk_blocks_of("a") == 1
    assert sum(isinstance(e, HostBlock) for e in kv._swapped["a"]) == 2
    assert sum(isinstance(e, DiskBlock) for e in kv._swapped["a"]) == 1
    kv.free("a")
    kv.free("b")
    assert kv.num_free_disk_blocks == 8 and kv.num_free_host_blocks == 8 and kv.num_free_blocks == 8


def test_disk_tier_needs_a_host_pool_and_bounds():
    with pytest.raises(ValueError, match="needs a host pool"):
        KVCacheManager(8, 4, "m", num_disk_blocks=2)
    kv = KVCacheManager(8, 4, "m", num_host_blocks=4, num_disk_blocks=2)
    a = _req("a", 12)
    _fill(kv, a)
    kv.swap_out(a)
    with pytest.raises(RuntimeError):
        kv.spill("a")  # 3 blocks, 2 disk slots: nothing changes
    assert kv.num_free_disk_blocks == 2 and kv.num_free_host_blocks == 1
    with pytest.raises(RuntimeError, match="without a disk tier"):
        KVCacheManager(8, 4, "m", num_host_blocks=4).spill("a")


# ----------------------------------------------------------------- scheduler + fake data plane
class FakePlane:
    """Device, host and disk block contents (the tokens each slot holds), updated in the model
    runner's order: disk writes, swap-outs, copy-on-write, swap-ins, the forward pass (after a
    check that every scheduled request reads its own tokens), disk reads."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.dev: dict[int, tuple] = {}
        self.host: dict[int, tuple] = {}
        self.disk: dict[int, tuple] = {}
        self.checked_blocks = 0

    def run(self, out: SchedulerOutput) -> None:
        for h, d in out.disk_out:
            self.disk[d] = self.host[h]
        for d, h in out.swap_out:
            self.host[h] = self.dev[d]
        for src, dst in out.copy_blocks:
            self.dev[dst] = self.dev[src]
        for h, d in out.swap_in:
            self.dev[d] = self.host[h]
        bs = self.s.kv.block_size
        for sr in out.scheduled:
            req = sr.request
            toks = req.all_token_ids()
            table = self.s.kv.block_table(req.request_id)
            for j in range((sr.start + bs - 1) // bs):  # blocks holding computed tokens
                if table[j] == NULL_BLOCK:
                    continue
                got = self.dev[table[j]]
                end = min((j + 1) * bs, sr.start)
                assert got[: end - j * bs] == tuple(toks[j * bs : end]), (req.request_id, j)
                self.checked_blocks += 1
            # the forward pass writes the KV of the tokens it computes
            for pos in range(sr.start, sr.start + sr.num_new_tokens):
                b = table[pos // bs]
                cur = list(self.dev.get(b, ()))
                cur = (cur + [None] * bs)[:bs]
                cur[pos % bs] = toks[pos]
                self.dev[b] = tuple(cur)
        for h, d in out.prefetch_in:  # swap-in prefetch: after the forward pass
            self.dev[d] = self.host[h]
        for d, h in out.disk_in:
            self.host[h] = self.disk[d]


def _sched(blocks, host, disk, bs=4, rates=FAST, clock=None, **kw) -> Scheduler:
    cfg = SchedulerConfig(
        **{"max_num_batched_tokens": 32, "long_prefill_token_threshold": 16, "max_model_len": 256, **kw}
    )
    kv = KVCacheManager(blocks, bs, "m", num_host_blocks=host, num_disk_blocks=disk)
    s = Scheduler(cfg, kv, block_nbytes=100, clock=clock)
    s.set_swap_rates(rates)
    return s


def _drive(s: Scheduler, plane: FakePlane, max_steps=2000) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished() and len(outs) < max_steps:
        out = s.schedule()
        plane.run(out)
        outs.append(out)
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    assert not s.has_unfinished()
    return outs


@pytest.mark.parametrize("policy", [SchedulingPolicy.PRIORITY, SchedulingPolicy.FCFS])
def test_many_requests_spill_and_return_with_their_own_kv(policy):
    s = _sched(blocks=16, host=4, disk=64, policy=policy)
    for i in range(10):
        s.add_request(_req(f"r{i}", 6 + 3 * i % 11, max_tokens=14, priority=i % 3, arrival=i, base=1000 * i))
    plane = FakePlane(s)
    outs = _drive(s, plane)
    assert s.num_spills > 0 and s.num_disk_promotions > 0
    assert s.num_swap_ins == s.num_swap_outs and s.num_disk_fallbacks == 0
    assert plane.checked_blocks > 0
    # a request is never swapped in in the step that promotes it, nor promoted in its spill's step
    for o in outs:
        assert not set(o.promoted) & set(o.swapped_in)
        assert not set(o.promoted) & set(o.spilled)
    kv = s.kv
    assert kv.num_free_blocks == 16 and kv.num_free_host_blocks == 4 and kv.num_free_disk_blocks == 64
    assert kv.swap_stats.blocks_spilled == kv.swap_stats.blocks_promoted


def test_disk_traffic_is_charged_to_the_token_budget():
    rates = SwapRates(swap_bytes_per_s=1e9, recompute_tokens_per_s=100, disk_bytes_per_s=1e4)  # 1 token/block
    s = _sched(blocks=12, host=4, disk=64, rates=rates)
    for i in range(8):
        s.add_request(_req(f"r{i}", 10, max_tokens=14, priority=i, arrival=i, base=1000 * i))
    outs = _drive(s, FakePlane(s))
    assert any(o.disk_out for o in outs) and any(o.disk_in for o in outs)
    for o in outs:
        assert o.swap_budget_tokens >= len(o.disk_out) + len(o.disk_in)


def test_full_disk_recomputes_and_is_counted():
    s = _sched(blocks=12, host=4, disk=1)
    for i in range(10):
        s.add_request(_req(f"r{i}", 10, max_tokens=14, priority=i, arrival=i, base=1000 * i))
    plane = FakePlane(s)
    _drive(s, plane)
    assert s.num_disk_full > 0 and s.num_spills == 0
    assert s.num_preemptions > s.num_swap_outs  # the rest recomputed


def test_spilling_off_and_drop_swapped_fall_back_to_recompute():
    s = _sched(blocks=12, host=4, disk=64)
    for i in range(10):
        s.add_request(_req(f"r{i}", 10, max_tokens=14, priority=i, arrival=i, base=1000 * i))
    plane = FakePlane(s)
    dropped = []
    while s.has_unfinished():
        out = s.schedule()
        plane.run(out)
        s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
        if out.spilled and not dropped:
            # the engine's reaction to a failed disk write: spilling off, the request recomputes
            s.disk_enabled = False
            for rid in out.spilled:
                assert s.drop_swapped(rid)
                dropped.append(rid)
                assert s.requests[rid].status is RequestStatus.PREEMPTED
                assert s.requests[rid].num_computed_tokens == 0
    assert dropped and s.num_disk_fallbacks == len(dropped)
    assert s.num_spills == len(dropped)  # none after spilling was turned off
    assert not s.drop_swapped("r0") and not s.drop_swapped("nope")  # finished / unknown
    assert s.kv.num_free_disk_blocks == 64 and s.kv.num_free_host_blocks == 4


def _swap_out_three(
    s: Scheduler, c_len: int = 8, plane: FakePlane | None = None, seats: int = 0
) -> list[Request]:
    """Run a, b, c (queue order) one step, then swap them out c first, spilling c to disk right
    after its swap-out: a and b end on the host, c on disk. ``plane``: apply the copies to it;
    ``seats``: then lower ``max_num_seqs`` to this (0: keep it)."""
    lens = {"a": 8, "b": 8, "c": c_len}
    reqs = [
        _req(n, lens[n], max_tokens=8, priority=i, arrival=i, base=100 * (i + 1)) for i, n in enumerate("abc")
    ]
    for r in reqs:
        s.add_request(r)
    out = s.schedule()
    if plane is not None:
        plane.run(out)
    s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    assert all(r.status is RequestStatus.RUNNING for r in reqs)
    for r in reversed(reqs):
        out = SchedulerOutput()
        s._preempt(r, out)
        if r.request_id == "c":
            out.disk_out = s.kv.spill("c")
        if plane is not None:
            for d, h in out.swap_out:
                plane.host[h] = plane.dev[d]
            for h, d in out.disk_out:
                plane.disk[d] = plane.host[h]
    assert [r.status for r in reqs] == [RequestStatus.SWAPPED] * 3
    assert s.kv.num_disk_blocks_of("c") > 0 and s.kv.num_disk_blocks_of("a") == 0
    s.kv.begin_step()
    s._step_swapped_out = set()  # a new step: their host copies are written
    if seats:
        s.config = dataclasses.replace(s.config, max_num_seqs=seats)
    return reqs


def _step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    return out


def test_prefetch_promotes_the_next_requests_in_queue_order_before_their_turn():
    # host: 4 slots; a and b hold 2 blocks each (8 computed tokens, block size 4), c 3
    s = _sched(blocks=16, host=4, disk=64)
    _swap_out_three(s, c_len=12)
    s.kv.spill("b")
    assert s.kv.num_free_host_blocks == 2
    # a (on the host) swaps in; b, next in queue order, is on disk: it waits, and the step
    # promotes it ahead of its turn; c (3 blocks) does not fit the host slots left yet
    out = _step(s)
    assert out.swapped_in == ["a"] and out.promoted == ["b"] and not out.spilled
    assert s.kv.num_disk_blocks_of("b") == 0 and s.kv.num_disk_blocks_of("c") == 3
    # next step: b's KV is already on the host and swaps straight in; that frees host slots
    # and c is promoted in the same step, to swap in at the next
    out = _step(s)
    assert out.swapped_in == ["b"] and out.promoted == ["c"]
    out = _step(s)
    assert out.swapped_in == ["c"] and not out.promoted


def test_a_disk_resident_head_is_promoted_by_spilling_colder_requests():
    s = _sched(blocks=16, host=4, disk=64)
    _swap_out_three(s)  # a, b fill the host, c on disk
    s.kv.spill("a")
    s.kv.promote("c")  # now the head (a) is on disk, b and c fill the host
    s.kv.begin_step()
    assert s.kv.num_free_host_blocks == 0
    # the end-of-step promotion, alone (nothing swapped in before it freed host slots): the
    # coldest host-resident request spills to make room for the head
    out = SchedulerOutput()
    s._promote_ahead(32, out)
    assert out.spilled == ["c"] and out.promoted == ["a"]
    assert sorted(h for h, _ in out.disk_out) == sorted(h for _, h in out.disk_in)  # c's slots, reused
    s.update_from_output(out, {})
    out = _step(s)
    assert out.swapped_in[0] == "a"


def test_the_queue_goes_on_past_a_disk_resident_head():
    s = _sched(blocks=16, host=4, disk=64)
    _swap_out_three(s)
    s.kv.spill("a")
    s.kv.promote("c")
    s.kv.begin_step()
    # a waits for its promotion; b and c (on the host) swap in, which frees the host slots that
    # a's promotion takes in the same step: no spill needed
    out = _step(s)
    assert out.swapped_in == ["b", "c"] and out.promoted == ["a"] and not out.spilled
    out = _step(s)
    assert out.swapped_in == ["a"]


def test_mlfq_prefetches_by_level_on_a_fake_clock():
    now = [0.0]
    s = _sched(
        blocks=16,
        host=4,
        disk=64,
        clock=lambda: now[0],
        policy=SchedulingPolicy.MLFQ,
        mlfq_starvation_s=100.0,
    )
    a, b, c = _swap_out_three(s, c_len=12)
    s.kv.spill("b")
    a.mlfq_level, b.mlfq_level, c.mlfq_level = 1, 3, 2  # c runs after a, b last
    now[0] = 1.0
    out = _step(s)
    assert out.swapped_in == ["a"] and out.promoted == ["c"]  # by level, not arrival


def test_swap_in_prefetch_brings_the_next_request_back_before_its_turn():
    # one seat: a runs; the step in which a samples its last token swaps b in ahead of its turn
    s = _sched(blocks=16, host=8, disk=64)
    plane = FakePlane(s)
    a, b, c = _swap_out_three(s, plane=plane, seats=1)
    outs = _drive(s, plane)
    pre = [i for i, o in enumerate(outs) if "b" in o.prefetched]
    assert len(pre) == 1
    i = pre[0]
    assert "a" in [x.request.request_id for x in outs[i].scheduled] and a.status.finished
    nxt = outs[i + 1]
    # b runs at once, without a copy in its step (its KV came back with the previous one)
    assert [x.request.request_id for x in nxt.scheduled] == ["b"] and not nxt.swap_in and not nxt.swapped_in
    assert s.num_prefetches >= 2 and s.num_swap_ins == s.num_swap_outs  # c was prefetched too
    assert plane.checked_blocks > 0
    assert s.kv.num_free_blocks == 16 and s.kv.num_free_host_blocks == 8 and s.kv.num_free_disk_blocks == 64


def test_prefetched_blocks_go_back_before_a_running_request_is_preempted():
    s = _sched(blocks=16, host=8, disk=64)
    a, b, c = _swap_out_three(s, seats=2)
    out = _step(s)  # a and b swap in, the two seats are taken
    assert out.swapped_in == ["a", "b"]
    # force c back to the device ahead of its turn, then make the pool run short
    s.kv.begin_step()
    s.kv.promote("c")
    s.swapped.remove(c)
    s.kv.swap_in(c)
    s.prefetched.append(c)
    s.kv.extend_blocks("hog", s.kv.num_free_blocks)  # a full pool: the next block a needs is c's
    preempted_before = s.num_preemptions
    for _ in range(50):
        out = _step(s)
        if s.num_prefetch_evictions:
            break
    else:
        raise AssertionError("the prefetched request never gave its blocks back")
    assert c.status is RequestStatus.SWAPPED and c in s.swapped and c not in s.prefetched
    assert out.swap_out and s.num_preemptions == preempted_before  # nobody running was preempted
