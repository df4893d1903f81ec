"""The router prices a KV-store prefix held partly on a node's SSD tier (#15): which of the
prefix's blocks are only on disk there (the index's tiers), what one block's read costs (the
node's measured bandwidth from its Stats, cached), and the placement's TTFT with those reads:
a prefix on a slow disk is recomputed rather than fetched when that is faster."""

from __future__ import annotations

import pytest

from engine.block_hash import chain_hashes
from kv_store.handle import BlockLocation
from kv_store.index import InMemoryIndex, Tier, locate_prefix_tiers, prompt_prefix_hashes
from router.policy import (
    ClusterView,
    GoodputAwarePolicy,
    GoodputConfig,
    InstanceRole,
    InstanceSnapshot,
    LinearLatency,
    ManualClock,
    RequestInfo,
)
from router.policy.placement import STORE_SOURCE
from router.store_disk import DEFAULT_DISK_READ_BYTES_PER_S, DiskReadRates, NodeDiskRate

MS = 1e-3


def test_the_index_says_which_prefix_blocks_a_node_holds_only_on_disk():
    idx = InMemoryIndex()
    loc = BlockLocation("kv0", "127.0.0.1:1")
    idx.add_node(loc)
    ids = list(range(100, 100 + 16 * 6 + 1))  # 6 full prefix blocks before the last token
    hashes = prompt_prefix_hashes(ids, 16, "m")
    assert len(hashes) == 6
    idx.register("kv0", hashes[:4], Tier.DRAM)
    idx.register("kv0", hashes[4:], Tier.DISK)
    idx.register("kv0", hashes[1:2], Tier.DISK)  # demoted later: moves to the disk tier
    got = locate_prefix_tiers(idx, ids, 16, "m")
    assert got is not None and got[0].node_id == "kv0" and got[1:] == (6, 3)
    assert idx.lookup(hashes).disk_blocks_in_prefix("kv0", 2) == 1
    assert idx.lookup(hashes).disk_blocks_in_prefix("nope", 6) == 0
    assert locate_prefix_tiers(idx, [1, 2, 3], 16, "m") is None  # no full block
    assert chain_hashes(ids[:16], 16, "m") == hashes[:1]


def test_disk_read_rates_come_from_stats_with_a_ttl_and_a_default():
    now = [0.0]
    calls: list[str] = []
    rates = {"a": NodeDiskRate(2e9, 2_000_000), "b": NodeDiskRate(0.0, 1_000_000)}

    def fetch(addr: str) -> NodeDiskRate:
        calls.append(addr)
        if addr == "down":
            raise ConnectionError("unreachable")
        return rates[addr]

    r = DiskReadRates(fetch, ttl_s=10.0, clock=lambda: now[0])
    assert r.block_read_s("a") == pytest.approx(1e-3)  # 2 MB at 2 GB/s
    assert r.block_read_s("a") == pytest.approx(1e-3) and calls == ["a"]  # cached
    rates["a"] = NodeDiskRate(1e9, 2_000_000)
    now[0] = 11.0
    assert r.block_read_s("a") == pytest.approx(2e-3) and calls == ["a", "a"]  # refreshed
    # a node that has not measured a read yet: the assumed default bandwidth
    assert r.block_read_s("b") == pytest.approx(1_000_000 / DEFAULT_DISK_READ_BYTES_PER_S)
    assert r.block_read_s("down") == 0.0  # no Stats, nothing cached: not priced
    assert r.block_read_s("down") == 0.0 and calls.count("down") == 1  # not retried before the TTL
    now[0] = 22.0
    assert r.block_read_s("down") == 0.0 and calls.count("down") == 2
    with pytest.raises(ValueError):
        DiskReadRates(fetch, default_bytes_per_s=0.0)


def _policy() -> GoodputAwarePolicy:
    lat = LinearLatency(
        kv_bytes_per_token=1000,
        prefill_base_s=0.0,
        prefill_per_token_s=MS,
        prefill_per_token_ctx_s=0.0,
        decode_base_s=10 * MS,
        decode_per_seq_s=MS,
        decode_per_ctx_token_s=0.0,
        transfer_latency_s=0.0,
        transfer_bandwidth=1e9,
    )
    return GoodputAwarePolicy(
        clock=ManualClock(), latency=lat, config=GoodputConfig(local_prefill=False, price_handoff=False)
    )  # exact fetch terms


def test_a_store_fetch_pays_the_disk_reads_and_is_skipped_when_recompute_is_faster():
    view = ClusterView(
        [
            InstanceSnapshot("p0", InstanceRole.PREFILL, free_blocks=1000, total_blocks=1000),
            InstanceSnapshot("d0", InstanceRole.DECODE, free_blocks=1000, total_blocks=1000),
        ]
    )
    base = RequestInfo("r", 640, (), predicted_output_tokens=4, store_prefix_blocks=32)
    # all in DRAM: fetching 512 tokens (0.5 ms) beats recomputing them (512 ms)
    d = _policy().place(base, view)
    assert (d.fetch_from, d.fetch_blocks) == (STORE_SOURCE, 32)
    assert d.estimated_ttft_s == pytest.approx(512_000 / 1e9 + 128 * MS)
    # 20 of the blocks on a disk tier at 5 ms a block: the fetch costs 100 ms more, still faster
    from dataclasses import replace

    d = _policy().place(replace(base, store_prefix_disk_blocks=20, store_disk_block_s=5 * MS), view)
    assert d.fetch_from == STORE_SOURCE
    assert d.estimated_ttft_s == pytest.approx(512_000 / 1e9 + 20 * 5 * MS + 128 * MS)
    # at 30 ms a block (600 ms of reads) recomputing the 512 tokens (512 ms) is faster
    d = _policy().place(replace(base, store_prefix_disk_blocks=20, store_disk_block_s=30 * MS), view)
    assert d.fetch_from is None and d.reused_blocks == 0
    assert d.estimated_ttft_s == pytest.approx(640 * MS)
