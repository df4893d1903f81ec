"""Live migration in the simulator (issue #14): the router's migration policies
(router/policy/migration.py) run periodically over the simulated decode instances; a move copies
the KV in stages while the request decodes, then a short stop-and-copy switches it over.

Checked here: requests, tokens and blocks are conserved; a skewed load (every request first
placed on one decode instance) gets spread; off (the default) and on-but-never-triggered give
identical results; a copy that cannot finish aborts cleanly."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest

from router.policy import InstanceRole
from router.policy.migration import MigrationConfig, MigrationReason
from router.policy.placement import LeastLoadedPolicy
from simulator.config import ClusterConfig, InstanceGroup
from simulator.latency import LatencySpec
from simulator.migration import MigrationResult, SimMigrationConfig
from simulator.sim import Simulation
from simulator.workload import LengthDistribution, LengthKind, synthetic

BLOCKS = 2000


class FirstFitPolicy(LeastLoadedPolicy):
    """Every handoff goes to the first decode instance with room: a maximally skewed load."""

    def pick_decode(self, pool, num_blocks):
        return pool[0]


def first_fit(loop, latency, cluster):
    return FirstFitPolicy(clock=loop)


def cluster(migration: SimMigrationConfig | None, decode: int = 3) -> ClusterConfig:
    return ClusterConfig(
        LatencySpec("llama-2-7b", "a100"),
        (InstanceGroup(InstanceRole.DECODE, decode),),
        kv_blocks=BLOCKS,
        max_model_len=4096,
        migration=migration,
    )


WORKLOAD = synthetic(
    60,
    20.0,
    LengthDistribution(LengthKind.LOGNORMAL, 200, 0.5, lo=16, hi=600),
    LengthDistribution(LengthKind.LOGNORMAL, 150, 0.8, lo=8, hi=600),
    seed=3,
)
ON = SimMigrationConfig(interval_s=0.05, policy=MigrationConfig(balance_threshold=4.0, max_decisions=2))


@pytest.fixture(scope="module")
def skewed():
    """The same skewed workload without and with migration (each run once per module)."""
    off = Simulation(cluster(None), policy_factory=first_fit).run(WORKLOAD)
    on = Simulation(cluster(ON), policy_factory=first_fit).run(WORKLOAD)
    return off, on


def test_default_is_off():
    assert ClusterConfig(LatencySpec("llama-2-7b", "a100"), ()).migration is None


def test_migration_conserves_requests_tokens_and_blocks(skewed):
    _, on = skewed
    assert on.complete
    done = [m for m in on.migrations if m.result is MigrationResult.DONE]
    assert done, "the skewed load should trigger migrations"
    # every request finished exactly once, none lost or duplicated
    assert sorted(int(r.request_id) for r in on.records if r.finished) == list(range(len(WORKLOAD)))
    stats = on.instance_stats
    # no preemption here (ample blocks), so every output token after the first was decoded once
    assert sum(s["preemptions"] for s in stats.values()) == 0
    assert sum(s["decode_tokens"] for s in stats.values()) == sum(w.output_len - 1 for w in WORKLOAD.requests)
    # blocks: every instance ends with its whole pool free (nothing leaked on either side)
    assert all(s["free_blocks_end"] == BLOCKS for s in stats.values())
    assert sum(s["migrations_out"] for s in stats.values()) == len(done)
    assert sum(s["migrations_in"] for s in stats.values()) == len(done)
    assert sum(s["migrated_blocks"] for s in stats.values()) == sum(m.blocks_copied for m in done)
    # a moved request finished on its last destination; downtime is the stop-and-copy only
    last = {m.request_id: m.destination for m in done}
    by_id = {r.request_id: r for r in on.records}
    for rid, dst in last.items():
        assert by_id[rid].decode_instance == dst
    for m in done:
        assert m.source != m.destination and m.reason is MigrationReason.LOAD_BALANCE
        assert m.stages >= 2  # at least one staged copy, then the stop-and-copy
        assert ON.stop_copy_s <= m.downtime_s < m.end - m.start
        assert m.blocks_copied >= 1
    assert all(m.result is not None for m in on.migrations)  # none left in flight


def test_skewed_load_gets_balanced(skewed):
    off, on = skewed

    def spread(res) -> float:
        tokens = [s["decode_tokens"] for s in res.instance_stats.values()]
        return max(tokens) / max(1, min(tokens))

    # first fit piles the decodes onto decode0; migration spreads them
    assert spread(off) > 2 * spread(on)
    assert Counter(m.source for m in on.migrations)["decode0"] >= 1
    assert on.array("tpot").max() < off.array("tpot").max()


def test_on_but_never_triggered_changes_nothing():
    """Off (None) and on with an unreachable gap threshold: the periodic policy ticks and load
    snapshots do not perturb the run (identical records and end time)."""
    never = SimMigrationConfig(interval_s=0.05, policy=MigrationConfig(balance_threshold=math.inf))
    a = Simulation(cluster(None), policy_factory=first_fit).run(WORKLOAD)
    b = Simulation(cluster(never), policy_factory=first_fit).run(WORKLOAD)
    assert not b.migrations
    assert [dataclasses.astuple(r) for r in a.records] == [dataclasses.astuple(r) for r in b.records]
    assert a.sim_time_s == b.sim_time_s
    assert a.instance_stats == b.instance_stats


def test_copy_that_cannot_finish_aborts_cleanly():
    """A link so slow that no copy ends before its request does: every migration aborts as
    FINISHED, the destination frees what it allocated, and the requests finish on the source."""
    slow = dataclasses.replace(ON, bandwidth_gb_s=1e-6)
    res = Simulation(cluster(slow), policy_factory=first_fit).run(WORKLOAD)
    assert res.complete and res.num_finished == len(WORKLOAD)
    assert res.migrations
    assert {m.result for m in res.migrations} == {MigrationResult.FINISHED}
    assert all(math.isnan(m.downtime_s) for m in res.migrations)
    assert all(s["free_blocks_end"] == BLOCKS for s in res.instance_stats.values())
    assert sum(s["migrations_out"] for s in res.instance_stats.values()) == 0


def test_unsupported_reason_refused():
    with pytest.raises(ValueError, match="drain"):
        SimMigrationConfig(reasons=frozenset({MigrationReason.DRAIN}))
    with pytest.raises(ValueError, match="interval_s"):
        SimMigrationConfig(interval_s=0)
