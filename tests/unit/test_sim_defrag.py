"""De-fragmentation in the simulator (simulator/migration.py defrag_decisions, Llumnix): a request
queued at an instance that no instance's free blocks can hold gets room made there by migrating
that instance's smaller requests to instances with room; it starts earlier than when it waits for
them to finish, and nothing is lost (requests, blocks)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from router.policy import InstanceRole
from router.policy.migration import MigrationConfig, MigrationReason
from router.policy.placement import LeastLoadedPolicy
from simulator.config import ClusterConfig, InstanceGroup
from simulator.latency import LatencySpec
from simulator.migration import MigrationResult, SimMigrationConfig, decode_load, defrag_decisions
from simulator.sim import Simulation
from simulator.workload import Workload, WorkloadRequest

BLOCKS = 100
# (arrival s, prompt, output, decode instance): d0 holds two 20-block requests, d1 and d2 one
# 30-block request each; then a 1200-token prompt (76 blocks) arrives at d0, more than any
# instance has free (<= ~69), but d0 can hold it once one of its requests moved to d1 or d2
PLAN = [
    (0.00, 320, 150, 0),
    (0.01, 320, 150, 0),
    (0.02, 480, 150, 1),
    (0.03, 480, 150, 2),
    (0.30, 1200, 20, 0),
]
WORKLOAD = Workload("defrag", tuple(WorkloadRequest(t, i, o) for t, i, o, _ in PLAN))


class _Assigned(LeastLoadedPolicy):
    """Each request goes to the decode instance PLAN names, whatever its room."""

    def __init__(self, clock) -> None:
        super().__init__(clock=clock)
        self._n = 0

    def pick_decode(self, pool, num_blocks):
        k = PLAN[self._n][3]
        self._n += 1
        return sorted(pool, key=lambda i: i.instance_id)[k]


def _cluster(migration: SimMigrationConfig | None) -> ClusterConfig:
    return ClusterConfig(
        LatencySpec("llama-2-7b", "a100"),
        (InstanceGroup(InstanceRole.DECODE, 3),),
        kv_blocks=BLOCKS,
        max_model_len=1600,
        migration=migration,
    )


DEFRAG = SimMigrationConfig(
    interval_s=0.05,
    policy=MigrationConfig(balance_threshold=math.inf, max_decisions=4),
    reasons=frozenset({MigrationReason.DEFRAGMENT}),
)


@pytest.fixture(scope="module")
def runs():
    def run(m):
        return Simulation(_cluster(m), policy_factory=lambda loop, lat, cl: _Assigned(loop)).run(WORKLOAD)

    return run(None), run(DEFRAG)


def test_defragmentation_starts_the_big_request_earlier_and_loses_nothing(runs):
    off, on = runs
    assert off.complete and on.complete
    assert not off.migrations
    done = [m for m in on.migrations if m.result is MigrationResult.DONE]
    assert done and all(m.reason is MigrationReason.DEFRAGMENT and m.source == "decode0" for m in done)
    big_off = next(r for r in off.records if r.request_id == "4")
    big_on = next(r for r in on.records if r.request_id == "4")
    assert big_on.decode_instance == "decode0"
    # room made for it instead of waiting for d0's requests to finish: it completes much earlier
    assert big_on.finish < 0.75 * big_off.finish
    for res in (off, on):
        assert sorted(int(r.request_id) for r in res.records if r.finished) == list(range(len(PLAN)))
        assert all(s["free_blocks_end"] == BLOCKS for s in res.instance_stats.values())


def test_defrag_decisions_only_for_a_head_no_instance_can_hold():
    def inst(iid, free, running, head):
        kv = SimpleNamespace(
            num_free_blocks=free,
            num_held_blocks=lambda rid: running[rid],
            blocks_needed=lambda n: -(-n // 16),
        )
        reqs = [SimpleNamespace(request_id=r, priority=0, status=None, is_decoding=True) for r in running]
        sched = SimpleNamespace(
            running=reqs, waiting=[SimpleNamespace(num_tokens=head - 1)] if head else [], swapped=[]
        )
        return SimpleNamespace(instance_id=iid, kv=kv, sched=sched, pending=[], total_blocks=100)

    from engine.request import RequestStatus

    insts = [inst("a", 45, {"r1": 40, "r2": 30}, 70 * 16), inst("b", 60, {"s": 40}, 0)]
    for i in insts:
        for r in i.sched.running:
            r.status = RequestStatus.RUNNING
    loads = [decode_load(i, set()) for i in insts]
    cfg = MigrationConfig(balance_threshold=math.inf)
    (d,) = defrag_decisions(insts, loads, cfg)
    assert (d.request_id, d.source, d.destination, d.reason) == ("r2", "a", "b", MigrationReason.DEFRAGMENT)
    insts[1].kv.num_free_blocks = 80  # b can hold the head itself: not de-fragmentation's
    assert defrag_decisions(insts, [decode_load(i, set()) for i in insts], cfg) == []
