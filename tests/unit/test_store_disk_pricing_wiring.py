"""The router's price of a KV-store prefix on a node's SSD tier comes from that node's own measured
read bandwidth (#15), end to end: a real store node with a disk tier demotes blocks and reads some
back (measuring its bandwidth); its Stats cross the wire's converters; the router's placer
(``Placer.prefix_blocks``: the shared index's tiers, ``DiskReadRates`` over ``grpc_node_rate``) hands
the policy the prefix's disk blocks and one block's read time = block bytes / the measured rate.

test_store_disk_pricing.py checks each piece with fakes; this checks they are wired together."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kv_store.convert import stats_from_proto, stats_to_proto
from kv_store.disk_tier import DiskTierConfig
from kv_store.index import InMemoryIndex, prompt_prefix_hashes
from kv_store.layout import KVLayout
from kv_store.segment import RECORD_HEADER_NBYTES
from kv_store.store import BlockStore, StoreConfig
from pdserve.v1 import client_pb2
from router.lifecycle.placing import Placer
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad
from router.store_disk import DEFAULT_DISK_READ_BYTES_PER_S, DiskReadRates, grpc_node_rate

BS = 4
L = KVLayout("m", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", block_size=BS)
NB = L.block_nbytes
ADDR = "127.0.0.1:7001"


class _StatsOverTheWire:
    """What ``KVStoreClient.stats()`` returns: the node's Stats through the proto converters."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.calls = 0

    def stats(self):
        self.calls += 1
        return stats_from_proto(stats_to_proto(self.store.stats()))


def _placer(index: InMemoryIndex, client: _StatsOverTheWire) -> Placer:
    reg = Registry(heartbeat_timeout_s=1e9)
    reg.register("p0", WorkerKind.PREFILL, "127.0.0.1:1", "m", WorkerLoad(kv_blocks_total=64, block_size=BS))
    svc = SimpleNamespace(
        config=SimpleNamespace(policy=PolicyKind.GOODPUT, model_id="m"),
        registry=reg,
        index=index,
        _store_address="",
        disk_rates=DiskReadRates(grpc_node_rate(lambda addr: client if addr == ADDR else None)),
    )
    return Placer(svc)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path):
    index = InMemoryIndex()
    cfg = StoreConfig(
        "kv0",
        L,
        4,  # a 4-block arena: older blocks are demoted to the disk tier
        use_shm=False,
        disk_tier=DiskTierConfig(str(tmp_path), 64 << 10, segment_bytes=8 * (RECORD_HEADER_NBYTES + NB)),
    )
    s = BlockStore(cfg, index)
    s.set_address(ADDR)
    try:
        yield s, index
    finally:
        s.close()


def test_placer_prices_the_disk_part_of_the_prefix_at_the_nodes_measured_bandwidth(store) -> None:
    s, index = store
    ids = list(range(100, 100 + 10 * BS + 1))  # 10 full blocks before the last token
    hashes = prompt_prefix_hashes(ids, BS, "m")
    assert len(hashes) == 10
    for h in hashes:
        s.put_block(h, os.urandom(NB))
    assert s.disk is not None and s.disk.flush()
    client = _StatsOverTheWire(s)
    placer = _placer(index, client)
    req = client_pb2.GenerateRequest()

    # no disk read measured yet: the assumed default bandwidth, not 0 and not a guess from elsewhere
    got = placer.prefix_blocks(ids, req)
    assert (got.blocks, got.disk_blocks) == (10, 6)  # the 6 oldest are only on the disk tier
    assert got.disk_block_s == pytest.approx(NB / DEFAULT_DISK_READ_BYTES_PER_S)

    # the node reads blocks back from disk (promotion): it has measured its read bandwidth now
    placer = _placer(index, client)  # a router whose rate cache is empty (the TTL expired)
    s.get_block(hashes[0])
    s.get_block(hashes[1])
    measured = s.stats().disk.read_bytes_per_s  # type: ignore[union-attr]
    assert measured > 0
    got = placer.prefix_blocks(ids, req)
    assert (got.blocks, got.disk_blocks) == (10, 6)  # two promoted, two more demoted by them
    assert got.disk_block_s == pytest.approx(NB / measured, rel=1e-9)
    # a prefix wholly in DRAM (block 0, promoted above) costs no disk read and no Stats call
    dram = placer.prefix_blocks(ids[: BS + 1], req)
    assert (dram.blocks, dram.disk_blocks, dram.disk_block_s) == (1, 0, 0.0)
    assert client.calls == 2  # one Stats call per router (cached within the TTL)
