"""Skip-join MLFQ (FastServe): the pure rules, and the scheduler's order, demotion, preemption
with proactive swap-out, and anti-starvation guard on a fake clock (no torch)."""

from __future__ import annotations

import math

import pytest

from engine import mlfq
from engine.block_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulingPolicy
from engine.swap_policy import SwapRates

FAST_COPY = SwapRates(swap_bytes_per_s=1e9, recompute_tokens_per_s=1e3)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------- pure rules
@pytest.mark.parametrize(
    ("pred", "level"),
    [
        (0.0, 0),
        (0.01, 0),
        (0.05, 0),
        (0.06, 1),
        (0.1, 1),
        (0.11, 2),
        (0.2, 2),
        (0.4, 3),
        (100.0, 3),
        (math.nan, 0),
    ],
)
def test_skip_join_level(pred, level):
    assert mlfq.skip_join_level(pred, base_prefill_s=0.05, num_levels=4) == level


def test_demotion_after_each_levels_quantum():
    lvl, it = 0, 0
    trace = []
    for _ in range(2 + 4 + 8 + 3):
        lvl, it = mlfq.demote(lvl, it, base_iters=2, num_levels=4)
        trace.append(lvl)
    # level 0: 2 iterations, level 1: 4, level 2: 8, then the last level keeps it
    assert trace == [0, 1] + [1, 1, 1, 2] + [2] * 7 + [3] + [3, 3, 3]
    assert mlfq.quantum_iters(3, 2) == 16


def test_starvation_bound():
    assert not mlfq.is_starving(now=4.9, last_served=0.0, starvation_s=5.0)
    assert mlfq.is_starving(now=5.0, last_served=0.0, starvation_s=5.0)


def test_bad_settings_refused():
    with pytest.raises(ValueError, match="num_levels"):
        mlfq.skip_join_level(1.0, 0.05, 0)
    with pytest.raises(ValueError, match="mlfq_swap_watermark"):
        SchedulerConfig(mlfq_swap_watermark=0.0)
    with pytest.raises(ValueError, match="mlfq_starvation_s"):
        SchedulerConfig(mlfq_starvation_s=0)
    with pytest.raises(ValueError, match="needs a clock"):
        Scheduler(SchedulerConfig(policy=SchedulingPolicy.MLFQ), KVCacheManager(8, 4, "m"))


# ----------------------------------------------------------------- scheduler
def _sched(clock, blocks=64, host=0, caching=True, rates: SwapRates | None = None, **kw) -> Scheduler:
    cfg = SchedulerConfig(
        **{
            "max_num_batched_tokens": 256,
            "long_prefill_token_threshold": 0,
            "max_model_len": 1024,
            "policy": SchedulingPolicy.MLFQ,
            "mlfq_base_prefill_s": 0.05,
            "mlfq_quantum_iters": 2,
            # these tests check the rules of an immediate preemption; the wait before one:
            # tests/unit/test_mlfq_wait.py
            "mlfq_preempt_wait_iters": 0,
            **kw,
        }
    )
    s = Scheduler(
        cfg,
        KVCacheManager(blocks, 4, "m", enable_prefix_caching=caching, num_host_blocks=host),
        clock=clock,
        block_nbytes=100,
        prefill_time=lambda n: n * 0.001,  # 1 ms per prompt token
    )
    s.set_swap_rates(rates or FAST_COPY)
    return s


def _req(rid, n, max_tokens=4, arrival=0.0) -> Request:
    return Request(rid, range(n), SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival)


def _step(s: Scheduler, clock: FakeClock | None = None):
    out = s.schedule()
    s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    if clock is not None:
        clock.t += 1.0
    return out


def test_skip_join_short_prompt_overtakes_long_one_and_long_is_swapped_not_recomputed():
    clock = FakeClock()
    # no prefix cache: a drop would lose the long request's KV (with one, its blocks would stay
    # cached on device and dropping would cost nothing: tests/unit/test_mlfq_swap_admission.py)
    s = _sched(clock, host=64, max_num_seqs=1, caching=False)
    long = _req("long", 200, max_tokens=20, arrival=0.0)  # 0.2 s predicted -> level 2
    s.add_request(long)
    assert long.mlfq_level == 2
    _step(s)
    assert long.status is RequestStatus.RUNNING and long.num_output_tokens == 1
    short = _req("short", 10, max_tokens=3, arrival=1.0)  # 0.01 s -> level 0
    s.add_request(short)
    assert short.mlfq_level == 0
    out = _step(s)
    # the batch is full: the lower-level running request is swapped out, the short one admitted
    assert out.swapped_out == ["long"] and long.status is RequestStatus.SWAPPED
    assert [x.request.request_id for x in out.scheduled] == ["short"]
    while short.status is RequestStatus.RUNNING:
        out = _step(s)
        assert [x.request.request_id for x in out.scheduled] == ["short"]
    # the step in which short sampled its last token swapped long back in ahead of its turn
    # (swap-in prefetch, SchedulerConfig.swap_prefetch): it runs at once, with no copy of its own
    assert out.prefetched == ["long"]
    out = _step(s)
    assert not out.swapped_in and not out.swap_in
    (sr,) = out.scheduled
    assert sr.start == 200 and sr.num_new_tokens == 1  # resumed after its prompt: not recomputed
    while s.has_unfinished():
        _step(s)
    assert long.num_output_tokens == 20 and long.num_swaps == 1
    assert s.kv.num_free_blocks == 64 and s.kv.num_free_host_blocks == 64


def test_demotion_lets_a_fresh_job_preempt_an_old_one_same_level_does_not():
    clock = FakeClock()
    s = _sched(clock, host=64, max_num_seqs=1)
    a = _req("a", 8, max_tokens=12, arrival=0.0)
    b = _req("b", 8, max_tokens=12, arrival=0.5)
    s.add_request(a)
    order = [x.request.request_id for x in _step(s).scheduled]
    s.add_request(b)
    while s.has_unfinished():
        order += [x.request.request_id for x in _step(s).scheduled]
    # a: 2 iterations at level 0 -> level 1; b (level 0) preempts it; b: 2 iterations -> level 1,
    # where a waits: same level, no preemption, b runs on for level 1's 4 iterations -> level 2;
    # a (level 1) preempts it: 4 iterations -> level 2, same level as b, a runs on to its end
    assert order == ["a"] * 2 + ["b"] * 6 + ["a"] * 10 + ["b"] * 6
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert a.num_swaps == 1 and b.num_swaps == 1


def test_anti_starvation_promotes_a_waiting_job_on_the_fake_clock():
    clock = FakeClock()
    # straight back to level 0 after one period (mlfq_promote_levels >= the levels)
    s = _sched(clock, host=0, max_num_seqs=1, mlfq_starvation_s=5.0, mlfq_promote_levels=4)
    victim = _req("victim", 200, max_tokens=2, arrival=0.0)  # level 2
    s.add_request(victim)
    first_short = _req("s0", 10, max_tokens=3, arrival=0.0)
    s.add_request(first_short)
    served_at = None
    for i in range(40):
        # a stream of short level-0 jobs that would keep the level-2 job waiting forever
        if i % 3 == 0:
            s.add_request(_req(f"s{i + 1}", 10, max_tokens=3, arrival=clock.t))
        out = _step(s, clock)
        if any(x.request is victim for x in out.scheduled) and served_at is None:
            served_at = clock.t - 1.0
    assert served_at is not None and served_at <= 5.0 + 3.0  # within the bound (+ a short job's run)
    assert s.num_promotions >= 1


def test_without_promotion_the_same_stream_starves_it():
    clock = FakeClock()
    s = _sched(clock, host=0, max_num_seqs=1, mlfq_starvation_s=1e9)
    victim = _req("victim", 200, max_tokens=2, arrival=0.0)
    s.add_request(victim)
    s.add_request(_req("s0", 10, max_tokens=3, arrival=0.0))
    for i in range(40):
        if i % 3 == 0:
            s.add_request(_req(f"s{i + 1}", 10, max_tokens=3, arrival=clock.t))
        out = _step(s, clock)
        assert all(x.request is not victim for x in out.scheduled)
    assert s.num_promotions == 0


def test_proactive_swap_out_when_the_pool_passes_the_watermark():
    clock = FakeClock()
    s = _sched(clock, blocks=10, host=16, max_num_seqs=8, mlfq_swap_watermark=0.5)
    low = _req("low", 22, max_tokens=14)  # 36 tokens: 9 of the 10 blocks at the end
    s.add_request(low)
    low.mlfq_level = 3  # a long-running job demoted to the bottom
    _step(s)
    assert s.kv.num_free_blocks == 4  # 6 blocks held
    high = _req("high", 6, max_tokens=2)  # level 0, needs 2 blocks: 4 - 2 < 5 (watermark)
    s.add_request(high)
    out = _step(s)
    assert out.swapped_out == ["low"]
    assert [x.request.request_id for x in out.scheduled] == ["high"]
    while s.has_unfinished():
        _step(s)
    assert low.num_output_tokens == 14 and s.kv.num_free_blocks == 10 and s.kv.num_free_host_blocks == 16


# ----------------------------------------------------------------- thrash (memory binds, no swap)
def test_policy_preemption_that_would_discard_kv_is_refused():
    assert mlfq.preemptible(tokens_lost=0, block_size=16)  # swapped out: nothing recomputed
    assert mlfq.preemptible(tokens_lost=15, block_size=16)  # only the partial last block
    assert not mlfq.preemptible(tokens_lost=16, block_size=16)
    assert not mlfq.preemptible(tokens_lost=2048, block_size=16)


def _thrash_run(caching: bool):
    """A long low-level prompt (chunked, 8 steps) while short level-0 jobs keep arriving into a
    pool that is past the watermark; no host pool, so a preemption would recompute."""
    clock = FakeClock()
    s = _sched(
        clock, blocks=48, host=0, caching=caching, long_prefill_token_threshold=16, mlfq_swap_watermark=0.5
    )
    long = _req("long", 128, max_tokens=4, arrival=0.0)  # 0.128 s predicted -> level 2
    s.add_request(long)
    assert long.mlfq_level == 2
    progress = []  # the long prompt's computed tokens after each step it ran
    for i in range(60):
        if i % 2 == 0 and i < 40:
            s.add_request(_req(f"s{i}", 8, max_tokens=2, arrival=clock.t))
        out = _step(s, clock)
        if any(x.request is long for x in out.scheduled):
            progress.append(long.num_computed_tokens)
        if not s.has_unfinished():
            break
    return s, long, progress


@pytest.mark.parametrize("caching", [False, True])
def test_long_prompt_is_not_preempted_mid_recompute_by_short_jobs(caching):
    s, long, progress = _thrash_run(caching)
    # before the fix each arriving short job (level 0) dropped the long prompt's chunks for
    # memory and its recompute restarted from 0, again and again (FastServe's thrash)
    assert long.num_preemptions == 0
    assert progress[:8] == [16 * k for k in range(1, 9)]  # chunk after chunk, never reset
    assert long.num_output_tokens == 4 and not s.has_unfinished()
    assert s.num_preemptions == 0
    assert s.kv.num_free_blocks == 48
