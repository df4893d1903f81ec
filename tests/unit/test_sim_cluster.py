"""End-to-end simulations with a hand-checkable latency model: lifecycle, timing, modes, caches."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.scheduler import Scheduler
from router.policy import SLO, InstanceRole, PlacementPolicy, PolicyKind
from simulator.config import (
    CacheConfig,
    ClusterConfig,
    HostPool,
    InstanceGroup,
    SimConfig,
    colocated,
    disaggregated,
    sarathi_scheduler,
    splitwise,
)
from simulator.latency import LatencyModel, LatencySpec
from simulator.sim import Simulation
from simulator.workload import Workload, WorkloadRequest


class TokenLatency(LatencyModel):
    """Prefill: ``per_token`` s per new token (+``base`` per step); decode step: ``decode`` s."""

    def __init__(
        self, per_token: float = 1e-3, base: float = 0.0, decode: float = 0.01, bw: float = 1e6
    ) -> None:
        super().__init__(kv_bytes_per_token=1000, transfer_bandwidth=bw, transfer_latency_s=0.0)
        self.per_token, self.base, self.decode = per_token, base, decode

    def step_time(
        self,
        prefill_tokens: Sequence[int],
        prefill_contexts: Sequence[int],
        num_decodes: int,
        decode_context: int,
    ) -> float:
        t = self.base + self.per_token * sum(prefill_tokens) if prefill_tokens else 0.0
        return t + (self.decode if num_decodes else 0.0)


SPEC = LatencySpec("fake-model")
KW = dict(kv_blocks=4096, max_model_len=4096)


def run(cluster: ClusterConfig, reqs: Sequence[WorkloadRequest], lat: LatencyModel | None = None, **cfg):
    lat = lat or TokenLatency()
    return Simulation(cluster, SimConfig(**cfg), latency_factory=lambda tp: lat).run(
        Workload("t", tuple(reqs))
    )


def no_leaks(res) -> bool:
    return all(s["free_blocks_end"] == s["kv_blocks"] for s in res.instance_stats.values())


def test_colocated_single_request_timing() -> None:
    res = run(colocated(SPEC, 1, **KW), [WorkloadRequest(0.0, 100, 5)])
    r = res.records[0]
    assert r.ttft == pytest.approx(0.1)  # one 100-token prefill step
    assert r.tpot == pytest.approx(0.01)  # four decode steps of 10 ms
    assert r.e2e == pytest.approx(0.14) and r.queueing == 0.0
    assert res.complete and no_leaks(res)


def test_queueing_behind_a_running_step() -> None:
    res = run(colocated(SPEC, 1, **KW), [WorkloadRequest(0.0, 1000, 2), WorkloadRequest(0.5, 100, 2)])
    a, b = res.records
    assert a.ttft == pytest.approx(1.0)
    assert b.queueing == pytest.approx(0.5)  # waits for the first prompt's step to end at t=1.0
    assert b.ttft == pytest.approx(0.5 + 0.1 + 0.01)  # joins a step with a's decode (+10 ms)


def test_disaggregated_lifecycle_includes_kv_transfer() -> None:
    res = run(disaggregated(SPEC, 1, 1, **KW), [WorkloadRequest(0.0, 100, 5)])
    r = res.records[0]
    assert (r.prefill_instance, r.decode_instance) == ("prefill0", "decode0")
    assert r.ttft == pytest.approx(0.1)
    assert r.transfer_s == pytest.approx(100 * 1000 / 1e6)  # 0.1 s
    assert r.finish == pytest.approx(0.1 + 0.1 + 4 * 0.01)
    assert res.complete and no_leaks(res)


def test_one_token_outputs_finish_at_prefill() -> None:
    res = run(disaggregated(SPEC, 1, 1, **KW), [WorkloadRequest(0.0, 100, 1)])
    assert res.records[0].finish == pytest.approx(0.1) and res.records[0].decode_instance == ""
    assert no_leaks(res)


def test_phase_studies() -> None:
    pre = run(disaggregated(SPEC, 1, 0, **KW), [WorkloadRequest(0.0, 100, 50)])
    assert pre.records[0].finish == pytest.approx(0.1)  # ends at the first token
    dec = run(disaggregated(SPEC, 0, 1, **KW), [WorkloadRequest(0.0, 100, 5)])
    assert dec.records[0].ttft == 0.0 and dec.records[0].finish == pytest.approx(0.04)


def test_prefix_cache_reuses_shared_trace_blocks() -> None:
    reqs = [WorkloadRequest(0.0, 1024, 2, (1, 2)), WorkloadRequest(5.0, 1100, 2, (1, 2, 3))]
    res = run(colocated(SPEC, 1, **KW), reqs)
    assert res.records[0].cached_tokens == 0
    assert res.records[1].cached_tokens == 1024
    assert res.records[1].ttft == pytest.approx(0.076)  # only 76 tokens computed
    off = run(colocated(SPEC, 1, cache=CacheConfig(enable_prefix_caching=False), **KW), reqs)
    assert off.records[1].cached_tokens == 0


def test_global_cache_aware_fetches_prefix_from_a_busy_instance() -> None:
    c = ClusterConfig(
        SPEC, (InstanceGroup(InstanceRole.PREFILL, 2),), policy=PolicyKind.GLOBAL_CACHE_AWARE,
        cache=CacheConfig(host_pool=HostPool.UNLIMITED), **KW,
    )  # fmt: skip
    reqs = [
        WorkloadRequest(0.0, 1024, 1, (1, 2)),  # -> prefill0, caches the prefix
        WorkloadRequest(2.0, 4000, 1, (9, 10, 11, 12, 13, 14, 15, 16)),  # -> prefill0 (tie), busy 4 s
        WorkloadRequest(2.1, 1100, 1, (1, 2, 3)),  # prefix on prefill0 but queued: fetch it to prefill1
    ]
    res = run(c, reqs, TokenLatency(bw=1e9))
    r = res.records[2]
    assert r.prefill_instance == "prefill1" and r.fetched_blocks == 64 and r.cached_tokens == 1024
    assert r.ttft == pytest.approx(1024 * 16 * 1000 / 16 / 1e9 + 0.076)
    local = run(
        ClusterConfig(SPEC, c.groups, policy=PolicyKind.LOCAL_CACHE_AWARE, cache=c.cache, **KW),
        reqs,
        TokenLatency(bw=1e9),
    )
    assert local.records[2].fetched_blocks == 0 and local.records[2].ttft > 1.0


def test_host_pool_hit_after_hbm_eviction() -> None:
    small = dict(kv_blocks=80, max_model_len=1200)
    reqs = [
        WorkloadRequest(0.0, 1024, 1, (1, 2)),
        WorkloadRequest(1.0, 1024, 1, (5, 6)),
        WorkloadRequest(2.0, 1100, 1, (1, 2, 3)),
    ]
    hbm = run(colocated(SPEC, 1, **small), reqs)
    # 80 blocks: the second prompt evicted the first one's blocks LRU, tail first; 16 head blocks survive
    assert hbm.records[2].cached_tokens == 256
    pool = run(colocated(SPEC, 1, cache=CacheConfig(host_pool=HostPool.UNLIMITED), **small), reqs)
    assert pool.records[2].cached_tokens == 1024  # reloaded from the host pool


def test_too_long_prompt_is_rejected_not_stuck() -> None:
    res = run(colocated(SPEC, 1, kv_blocks=10, max_model_len=4096), [WorkloadRequest(0.0, 1000, 2)])
    assert res.records[0].rejected.startswith("invalid")
    assert res.attainment(SLO()) == 0.0


def test_early_stop_when_target_is_out_of_reach() -> None:
    reqs = [WorkloadRequest(0.01 * i, 500, 2) for i in range(100)]  # 0.5 s of work every 10 ms
    res = run(colocated(SPEC, 1, **KW), reqs, slo=SLO(ttft_s=0.6), attainment_target=0.9, early_stop=True)
    assert not res.complete
    assert res.attainment(SLO(ttft_s=0.6)) < 0.9
    assert res.num_finished < 100


def test_splitwise_mixed_pool_absorbs_overflow() -> None:
    c = splitwise(SPEC, 1, 1, 1, **KW)
    reqs = [WorkloadRequest(0.05 * i, 400, 3) for i in range(20)]  # 0.4 s of prefill every 50 ms
    res = run(c, reqs, slo=SLO(ttft_s=0.5))
    places = {r.prefill_instance for r in res.records}
    assert places == {"prefill0", "mixed0"}
    assert res.complete and no_leaks(res)


def test_sarathi_chunks_prompts_and_keeps_decodes_flowing() -> None:
    reqs = [WorkloadRequest(0.0, 100, 50), WorkloadRequest(0.2, 2000, 2)]
    vllm = run(colocated(SPEC, 1, **KW), reqs, track_tbt=True)
    sarathi = run(colocated(SPEC, 1, scheduler=sarathi_scheduler(4096, 512), **KW), reqs, track_tbt=True)
    v, s = vllm.records[0], sarathi.records[0]
    # without chunking the long prompt stalls the first request's decodes for one 2 s step
    assert v.max_tbt == pytest.approx(2.0 + 0.01)
    assert s.max_tbt == pytest.approx(0.511 + 0.01)  # a 512-token budget (511 prompt + 1 decode)
    assert sarathi.records[1].ttft > vllm.records[1].ttft  # chunking delays the long prompt a little


def test_simulator_runs_the_shared_policy_and_scheduler_code() -> None:
    from simulator.sim import _Run

    c = disaggregated(SPEC, 1, 1, **KW)
    r = _Run(c, SimConfig(), lambda loop, lat, cl: __import__("simulator.sim").sim.default_policy_factory(loop, lat, cl),
             lambda tp: TokenLatency(), Workload("t", ()))  # fmt: skip
    assert isinstance(r.policy, PlacementPolicy)
    assert all(type(i.sched) is Scheduler for i in r.instances)


def test_dispatch_overhead_delays_submission() -> None:
    reqs = [WorkloadRequest(0.0, 100, 5), WorkloadRequest(0.05, 100, 5)]
    base = run(colocated(SPEC, 1, **KW), reqs)
    res = run(colocated(SPEC, 1, dispatch_overhead_s=0.2, **KW), reqs)
    a, b = res.records
    assert a.ttft == pytest.approx(0.3)  # 0.2 s on the way in + the 100-token prefill
    assert a.queueing == pytest.approx(0.2)
    assert b.ttft > base.records[1].ttft  # still queues behind the first request's step
    assert res.num_events == base.num_events + 2  # one submission event per request
    assert res.complete and no_leaks(res)
