"""The cluster's KV store with an SSD tier in the simulator (issue #15 part 3, simulator/kv_store.py):
the router sees each prompt's stored prefix and its disk part, prices a fetch with its own
TtftTable.store_fetch at the tier's bandwidth, and the simulator charges that same price. On the
simulated clock (deterministic)."""

from __future__ import annotations

import pytest

from pdserve.cli import main
from router.policy import SLO, InstanceRole, PolicyKind
from router.policy.estimate import TtftEstimator, TtftTable
from simulator.config import CacheConfig, ClusterConfig, InstanceGroup, SimConfig, vllm_scheduler
from simulator.kv_store import SimKVStore, SimKVStoreConfig
from simulator.latency import LatencySpec
from simulator.sim import Simulation
from simulator.workload import named_workload
from tests.sim_fakes import LinearLatency


def Lat() -> LinearLatency:
    """10 ms per step + 1 ms per prefill token; decodes free."""
    return LinearLatency(1000, per_decode=0.0, transfer_bandwidth=1e9, transfer_latency_s=1e-3)


def _keys(n: int, tag: int = 0) -> list[bytes]:
    return [(tag * 1000 + i).to_bytes(8, "little") for i in range(n)]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dram_blocks": 0}, "dram_blocks"),
        ({"dram_blocks": 4, "disk_blocks": -1}, "disk_blocks"),
        ({"dram_blocks": 4, "disk_gb_s": 0.0}, "disk_gb_s"),
    ],
)
def test_store_config_refuses(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimKVStoreConfig(**kw)


def test_fetch_costs_the_routers_store_fetch_with_the_disk_blocks_in_range() -> None:
    block_bytes = 16 * 1000
    store = SimKVStore(SimKVStoreConfig(dram_blocks=4, disk_blocks=None, disk_gb_s=0.01), block_bytes)
    assert store.disk_block_s == pytest.approx(block_bytes / 1e7)
    keys = _keys(8)
    store.publish(keys)  # DRAM keeps the last 4; the first 4 are demoted to disk
    hit = store.prefix(keys)
    assert hit.blocks == 8 and hit.tiers == (False,) * 4 + (True,) * 4
    lat = Lat()
    # pull blocks [2, 6): two of them (2, 3) on disk
    t = store.fetch_s(lat, keys, 2, 6, 16)
    want = TtftTable(TtftEstimator(lat), 0, "", 2, block_bytes / 1e7).store_fetch(4, 16)
    assert t == want
    assert t == pytest.approx(lat.transfer_time(4 * 16 * 1000) + 2 * block_bytes / 1e7)
    # the pulled prefix was touched: blocks 0..5 are the most recent, the disk ones promoted
    assert store.prefix(keys[:6]).tiers[2:6] == (True,) * 4
    assert store.stats.fetches == 1 and store.stats.disk_blocks_read == 2 and store.stats.fetched_blocks == 4


def test_no_disk_tier_means_no_disk_price() -> None:
    store = SimKVStore(SimKVStoreConfig(dram_blocks=4), 16_000)
    keys = _keys(8)
    store.publish(keys)
    assert store.disk_block_s == 0.0 and store.prefix(keys).blocks == 0  # the first 4 were dropped
    assert store.prefix(keys[4:]).blocks == 4


def test_cluster_config_refuses_a_store_without_prefix_caching() -> None:
    with pytest.raises(ValueError, match="kv_store without prefix caching"):
        ClusterConfig(
            LatencySpec("llama-3-8b"),
            (InstanceGroup(InstanceRole.MIXED, 1),),
            cache=CacheConfig(enable_prefix_caching=False),
            kv_store=SimKVStoreConfig(100),
        )


def _mooncake(store: SimKVStoreConfig | None):
    c = ClusterConfig(
        LatencySpec("llama-3-8b", "a100"),
        (InstanceGroup(InstanceRole.MIXED, 4, 1, vllm_scheduler(32768)),),
        kv_blocks=3000,
        policy=PolicyKind.GLOBAL_CACHE_AWARE,
        kv_store=store,
    )
    return Simulation(c, SimConfig(slo=SLO(5.0, 1.0))).run(named_workload("mooncake", n=300, rate=1.0))


def test_router_reads_the_ssd_tier_only_when_its_bandwidth_makes_it_pay() -> None:
    """Mooncake trace head, a small DRAM store with an unlimited SSD tier: at 3 GB/s the router
    fetches prefixes from disk; at 0.01 GB/s the same prefixes are priced too slow and recomputed.
    Runs are deterministic."""
    fast = _mooncake(SimKVStoreConfig(5000, None, 3.0))
    again = _mooncake(SimKVStoreConfig(5000, None, 3.0))
    slow = _mooncake(SimKVStoreConfig(5000, None, 0.01))
    none = _mooncake(None)
    assert [(r.first_token, r.finish) for r in fast.records] == [
        (r.first_token, r.finish) for r in again.records
    ]
    assert fast.store.disk_blocks_read > 0 and fast.store.fetch_s > 0
    assert slow.store.disk_blocks_read == 0
    assert none.store is None
    assert fast.hit_ratio() > none.hit_ratio()
    assert fast.summary()["ttft_mean"] < none.summary()["ttft_mean"]
    # priced too slow, the store's disk copies change nothing
    assert [(r.first_token, r.finish) for r in slow.records] == [
        (r.first_token, r.finish) for r in none.records
    ]
    # what the fetches cost is what the requests waited for them
    assert sum(r.transfer_s for r in fast.records) == pytest.approx(fast.store.fetch_s, rel=1e-9)


def test_simulate_cli_store_flags(capsys) -> None:
    base = ["simulate", "--model", "llama-3-8b", "--workload", "mooncake", "--num-requests", "60", "--quiet"]
    assert (
        main(
            [
                *base,
                "--policy",
                "global_cache_aware",
                "--kv-store-blocks",
                "2000",
                "--kv-store-disk-blocks",
                "-1",
            ]
        )
        == 0
    )
    assert "kv store: " in capsys.readouterr().out
    assert main([*base, "--kv-store-disk-blocks", "5"]) == 2
    assert "need --kv-store-blocks" in capsys.readouterr().err
    assert main([*base, "--kv-store-blocks", "10", "--kv-store-disk-blocks", "-2"]) == 2
    assert "--kv-store-disk-blocks must be" in capsys.readouterr().err


def test_goodput_policy_fetches_from_the_store_in_a_disaggregated_cluster() -> None:
    """The goodput policy prices the store (its disk part included) for prefill instances; its
    colocated path prices local prefixes only, so the store is exercised disaggregated here."""

    def run(store: SimKVStoreConfig | None):
        c = ClusterConfig(
            LatencySpec("llama-3-8b", "a100"),
            (InstanceGroup(InstanceRole.PREFILL, 3, 1), InstanceGroup(InstanceRole.DECODE, 1, 1)),
            kv_blocks=3000,
            policy=PolicyKind.GOODPUT,
            kv_store=store,
        )
        return Simulation(c, SimConfig(slo=SLO(5.0, 1.0))).run(named_workload("mooncake", n=300, rate=1.0))

    with_store, without = run(SimKVStoreConfig(5000, None, 3.0)), run(None)
    assert with_store.store.disk_blocks_read > 0
    assert with_store.hit_ratio() > without.hit_ratio()
