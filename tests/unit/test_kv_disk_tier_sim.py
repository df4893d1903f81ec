"""The simulator's model of the store's disk tier (simulator/tiered_store.py) and the tiered
prefix-hit study (simulator.cache_study.tiered_prefix_hit_ratio)."""

from __future__ import annotations

import pytest

from simulator.cache_study import prefix_hit_ratio, tiered_prefix_hit_ratio
from simulator.tiered_store import TieredPrefixStore
from simulator.workload import Workload, WorkloadRequest


def k(*ids: int) -> list[bytes]:
    return [i.to_bytes(8, "little") for i in ids]


def test_evicted_blocks_are_demoted_and_a_disk_hit_is_promoted() -> None:
    s = TieredPrefixStore(dram_capacity=2, disk_capacity=None)
    s.add(k(1, 2, 3))  # 1 is evicted from DRAM: demoted
    assert s.demotions == 1 and len(s) == 3
    hit = s.lookup(k(1, 2, 3, 4))
    assert hit.tiers == (False, True, True) and (hit.dram, hit.disk, hit.dram_run) == (2, 1, 0)
    assert s.promotions == 1
    # promoting 1 demoted 2, touching 2 demoted 3, touching 3 evicted 1 again: 1 was still on
    # disk (a promoted block keeps its disk copy), so only 2 and 3 were written
    assert s.demotions == 3
    assert s.lookup(k(3, 2)).tiers == (True, True)
    assert s.lookup(k(1)).tiers == (False,)


def test_without_a_disk_tier_evicted_blocks_are_gone() -> None:
    s = TieredPrefixStore(dram_capacity=2, disk_capacity=0)
    s.add(k(1, 2, 3))
    assert s.lookup(k(1, 2, 3)).blocks == 0 and s.demotions == 0


def test_bounded_disk_evicts_oldest_and_promoting_a_run_longer_than_the_disk_is_safe() -> None:
    s = TieredPrefixStore(dram_capacity=1, disk_capacity=2)
    s.add(k(1, 2, 3))  # DRAM: 3; disk: 1, 2
    assert s.lookup(k(1, 2)).tiers == (False, False)  # promoting 1 demotes 3, evicting a disk copy
    assert s.disk_evictions >= 1
    with pytest.raises(ValueError):
        TieredPrefixStore(0)


def _trace() -> Workload:
    reqs = []
    for i in range(60):
        ids = [i % 7, 100 + i % 5, 200 + i]  # shared first blocks, then unique ones
        reqs.append(WorkloadRequest(float(i), 3 * 512 - 10, 8, tuple(ids)))
    return Workload("t", tuple(reqs))


def test_tiered_ratio_matches_the_single_tier_study_at_the_extremes() -> None:
    w = _trace()
    for cap in (2, 5, 20):
        assert tiered_prefix_hit_ratio(w, cap, 0).ratio == pytest.approx(prefix_hit_ratio(w, cap).ratio)
    unlimited = prefix_hit_ratio(w).ratio
    t = tiered_prefix_hit_ratio(w, 2, None)
    assert t.ratio == pytest.approx(unlimited) and t.disk_tokens > 0
    assert t.dram_tokens + t.disk_tokens == sum(d + x for _, d, x, _ in t.per_request)
    assert all(run <= d for _, d, _, run in t.per_request)


def _prefill_only(disk_pool_tokens: int, disk_gb_s: float = 100.0):
    from router.policy import InstanceRole
    from simulator.config import CacheConfig, ClusterConfig, HostPool, InstanceGroup
    from simulator.latency import LatencySpec

    cache = CacheConfig(
        host_pool=HostPool.LIMITED,
        host_pool_tokens=1024,  # two 512-token host blocks
        disk_pool_tokens=disk_pool_tokens,
        disk_gb_s=disk_gb_s,
    )
    # 70 GPU KV blocks (one prompt): a later request's prompt evicts an earlier one's from the GPU
    group = (InstanceGroup(InstanceRole.PREFILL, 1),)
    return ClusterConfig(LatencySpec("llama-2-7b", "a100"), group, cache=cache, kv_blocks=70)


def test_simulator_charges_a_disk_tier_hit_its_read_time() -> None:
    from simulator.sim import Simulation

    # A, then B and C (other prefixes) push A's two host blocks out of the 2-block DRAM pool; D
    # reuses A's prefix: recomputed without a disk tier, read back from disk with one
    reqs = [
        WorkloadRequest(0.0, 1100, 1, (1, 2, 3)),
        WorkloadRequest(5.0, 1100, 1, (4, 5, 6)),
        WorkloadRequest(10.0, 1100, 1, (7, 8, 9)),
        WorkloadRequest(15.0, 1100, 1, (1, 2, 3)),
    ]
    w = Workload("t", tuple(reqs))
    plain = Simulation(_prefill_only(0)).run(w)
    tiered = Simulation(_prefill_only(-1)).run(w)
    assert plain.records[3].cached_tokens == 0
    assert tiered.records[3].cached_tokens == 1024
    (stats,) = tiered.instance_stats.values()
    assert stats["disk_blocks"] == 64  # 1024 tokens / 16-token KV blocks
    # the 1024 reused tokens' KV (512 KiB/token for Llama-2-7B) read at 100 GB/s before it starts
    read_s = 1024 * 512 * 1024 / 100e9
    t = tiered.records[3]
    assert t.first_scheduled - t.arrival == pytest.approx(read_s, rel=1e-6)
    # at 1 GB/s the read (0.54 s) would take longer than recomputing 1024 tokens: not used
    slow = Simulation(_prefill_only(-1, disk_gb_s=1.0)).run(w)
    assert slow.records[3].cached_tokens == 0
    assert next(iter(slow.instance_stats.values()))["disk_blocks"] == 0
    with pytest.raises(ValueError, match="LIMITED host pool"):
        from simulator.config import CacheConfig

        CacheConfig(disk_pool_tokens=100)
