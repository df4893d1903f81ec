"""Speed work must not change results: stand-in block keys vs the engine's own hashed keys.

The simulator pre-fills ``Request.block_hashes`` with :func:`simulator.sim.request_block_keys`
so that the KV manager never hashes; these tests run the same simulations with the old
behaviour (the engine computes every key past the trace's) and require identical outcomes,
including runs that preempt (a recomputed request re-hits its own cached blocks) and trace
runs with a host pool (keys reach the pool).
"""

from __future__ import annotations

from dataclasses import fields

import pytest

import engine.block_manager as block_manager
from router.policy import SLO, InstanceRole, PolicyKind
from simulator import sim as sim_mod
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
from simulator.latency import LatencySpec
from simulator.metrics import RequestRecord, SimResult
from simulator.sim import Simulation, request_block_keys
from simulator.workload import Workload, WorkloadRequest, sharegpt

L7 = LatencySpec("llama-2-7b", "a100")
L3 = LatencySpec("llama-3-8b", "a100")


def _trace(n: int = 120, rate: float = 6.0) -> Workload:
    """Shared-prefix trace: 4 conversations, growing prompts (hash ids = prefix ids)."""
    reqs = []
    for i in range(n):
        conv = i % 4
        turns = 1 + i // 4 % 6
        ids = tuple(conv * 100 + k for k in range(turns))
        reqs.append(WorkloadRequest(i / rate, turns * 512 - 37, 40 + 7 * (i % 5), ids))
    return Workload("trace", tuple(reqs))


CASES = {
    "colocated-preempting": (
        colocated(L7, 2, kv_blocks=300, max_model_len=4096),
        sharegpt(150, rate=30.0, seed=1),
    ),
    "sarathi": (colocated(L7, 2, scheduler=sarathi_scheduler(4096, 256)), sharegpt(120, rate=20.0, seed=2)),
    "disaggregated-preempting": (disaggregated(L7, 1, 1, kv_blocks=400), sharegpt(150, rate=25.0, seed=3)),
    "splitwise": (splitwise(L7, 1, 1, 1, kv_blocks=500), sharegpt(150, rate=25.0, seed=4)),
    "trace-host-pool": (
        ClusterConfig(
            L3,
            (InstanceGroup(InstanceRole.PREFILL, 2, 1), InstanceGroup(InstanceRole.DECODE, 1, 1)),
            policy=PolicyKind.GLOBAL_CACHE_AWARE,
            kv_blocks=600,
            cache=CacheConfig(host_pool=HostPool.LIMITED, host_pool_tokens=8 * 512),
        ),
        _trace(),
    ),
    "trace-no-hbm-cache": (
        ClusterConfig(
            L3,
            (InstanceGroup(InstanceRole.MIXED, 2, 1),),
            policy=PolicyKind.LOCAL_CACHE_AWARE,
            cache=CacheConfig(enable_prefix_caching=False, host_pool=HostPool.UNLIMITED),
        ),
        _trace(),
    ),
}


def _outcome(res: SimResult) -> tuple:
    names = [f.name for f in fields(RequestRecord)]
    recs = [tuple(getattr(r, n) for n in names) for r in res.records]
    return repr(recs), repr(res.instance_stats), res.num_events, res.complete


def _engine_keys(self, inst, index, prefix, num_tokens):  # the behaviour before stand-in keys
    return prefix


@pytest.mark.parametrize("name", list(CASES))
def test_stand_in_keys_change_nothing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, wl = CASES[name]
    cfg = SimConfig(slo=SLO(0.5, 0.1), track_tbt=True)
    fast = Simulation(cluster, cfg).run(wl)
    with monkeypatch.context() as m:
        m.setattr(sim_mod._Run, "_request_keys", _engine_keys)
        slow = Simulation(cluster, cfg).run(wl)
    assert _outcome(fast) == _outcome(slow)
    if name.endswith("preempting"):
        assert sum(s["preemptions"] for s in fast.instance_stats.values()) > 0  # self-hits exercised


def test_no_block_is_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = block_manager.chain_hashes

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(block_manager, "chain_hashes", counting)
    cluster, wl = CASES["colocated-preempting"]
    res = Simulation(cluster, SimConfig()).run(wl)
    assert res.num_finished == len(wl)
    assert not calls


def test_request_block_keys_contract() -> None:
    a = request_block_keys(7, 0, 5)
    assert len(a) == 5 and all(len(k) == 12 for k in a)
    assert len(set(a)) == 5
    assert request_block_keys(7, 2, 4) == a[2:4]
    assert not set(a) & set(request_block_keys(8, 0, 5))
