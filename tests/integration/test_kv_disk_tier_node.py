"""The disk tier end to end: ``python -m kv_store --disk-tier PATH --disk-tier-gib N`` as its own
process (gRPC Put/Get/Lookup/Stats, /metrics), restarted on the same directory; and the tier as
recorded by the Redis index (register / lookup / resync / drop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.block_hash import chain_hashes
from kv_store.client import KVStoreClient
from kv_store.disk_tier import DiskTierConfig
from kv_store.handle import BlockLocation
from kv_store.index import Tier
from kv_store.layout import KVLayout
from kv_store.redis_index import RedisIndex
from kv_store.redis_server import find_redis_server, start_redis
from kv_store.store import BlockStore, StoreConfig

ROOT = Path(__file__).resolve().parents[2]
L = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4)  # 256 B


def chain(n: int, salt: str = "") -> list[bytes]:
    return chain_hashes(list(range(n * 4)), 4, "m", salt=salt)


def _start(tier: Path) -> tuple[subprocess.Popen[str], dict]:
    args = [sys.executable, "-m", "kv_store", "--node-id", "disk-node", "--capacity-blocks", "4"]
    args += ["--model-id", "m", "--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "4"]
    args += ["--dtype", "float16", "--block-size", "4", "--port", "0", "--no-shm"]
    args += ["--disk-tier", str(tier), "--disk-tier-gib", "0.001"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"store node did not start: {err}")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def test_store_process_with_a_disk_tier_serves_evicted_blocks_and_survives_a_restart(tmp_path: Path) -> None:
    tier = tmp_path / "tier"
    hs = chain(10)
    data = [os.urandom(L.block_nbytes) for _ in hs]
    proc, info = _start(tier)
    try:
        with KVStoreClient(info["address"]) as c:
            c.put_blocks(L, hs, data)  # 4 DRAM slots: the first 6 go to disk
            found = c.lookup(hs)
            assert found.num_prefix_blocks == 10
            assert found.tiers and [t[0] for t in found.tiers[:6]] == [Tier.DISK] * 6
            assert c.get_blocks(L, hs[:2]) == data[:2]  # promoted back over gRPC, identical
            s = c.stats()
            assert s.disk is not None and s.promotions == 2 and s.disk.read_bytes_per_s > 0
            assert s.disk.capacity_bytes == int(0.001 * (1 << 30))
        with urllib.request.urlopen(f"http://{info['metrics']}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'pdserve_kv_tier_hits_total{node_id="disk-node",source="disk"} 2.0' in text
        assert 'pdserve_kv_disk_full{node_id="disk-node"} 0.0' in text
    finally:
        if proc.poll() is None:
            _stop(proc)
    proc, info = _start(tier)  # same directory: the disk blocks are found again
    try:
        with KVStoreClient(info["address"]) as c:
            on_disk = [h for h, ok in zip(hs, c.exists(hs), strict=True) if ok]
            assert len(on_disk) >= 6
            for i in range(0, len(on_disk), 2):  # a Get pins its blocks in the 4 DRAM slots
                part = on_disk[i : i + 2]
                assert c.get_blocks(L, part) == [data[hs.index(h)] for h in part]
    finally:
        if proc.poll() is None:
            _stop(proc)


def test_bad_disk_tier_flags_exit_with_the_flag_named(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "kv_store", "--node-id", "x", "--capacity-blocks", "4", "--model-id", "m"]
    args += ["--num-layers", "1", "--num-kv-heads", "1", "--head-dim", "4", "--disk-tier", str(tmp_path)]
    res = subprocess.run(
        [*args, "--disk-tier-gib", "-2"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "--disk-tier-gib must be a number > 0" in res.stderr
    (tmp_path / "000000000001.kvseg").write_bytes(b"garbage under a segment's name")
    res = subprocess.run(
        [*args, "--disk-tier-gib", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "--disk-tier:" in res.stderr and "not a pdserve KV segment" in res.stderr


# ---------------------------------------------------------------------------- Redis index
@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = os.environ.get("PDSERVE_TEST_REDIS")
    if url:
        yield url
        return
    if find_redis_server() is None:
        pytest.fail("no redis-server: install the Debian package redis-server")
    with start_redis() as srv:
        yield srv.url


def test_redis_index_records_tiers(redis_url: str, tmp_path: Path) -> None:
    idx = RedisIndex.from_url(redis_url, prefix=f"t-{uuid.uuid4().hex[:8]}:")
    try:
        a, b = BlockLocation("a", "x:1"), BlockLocation("b", "x:2")
        idx.add_node(a)
        idx.add_node(b)
        hs = chain(3)
        idx.register("a", hs)
        idx.register("b", hs[:2], Tier.DISK)
        r = idx.lookup(hs)
        assert r.num_prefix_blocks == 3
        assert r.tiers == ((Tier.DRAM, Tier.DISK), (Tier.DRAM, Tier.DISK), (Tier.DRAM,))
        idx.register("b", hs[:1])  # promoted
        assert idx.lookup(hs[:1]).tiers == ()
        idx.unregister("b", hs[1:2])
        assert idx.lookup(hs[1:2]).tiers == ()
        idx.register("b", hs[1:2], Tier.DISK)
        assert idx.sync_node(b, [hs[0]], [hs[2]]) == 1  # hs[1] stale
        assert idx.lookup(hs[2:]).tiers == ((Tier.DRAM, Tier.DISK),)
        idx.drop_node("b")
        assert idx.lookup(hs).tiers == ()
        # a store node with a disk tier on the Redis index: demoted blocks are DISK there
        cfg = StoreConfig(
            "n",
            L,
            2,
            use_shm=False,
            disk_tier=DiskTierConfig(str(tmp_path), 1 << 20),
            index_sync_interval_s=0,
        )
        store = BlockStore(cfg, idx)
        try:
            more = chain(4, salt="s")
            for h in more:
                store.put_block(h, os.urandom(L.block_nbytes))
            assert store.disk is not None and store.disk.flush()
            got = idx.lookup(more)
            assert [got.tier_of(i, "n") for i in range(4)] == [Tier.DISK, Tier.DISK, Tier.DRAM, Tier.DRAM]
            assert store.resync_index() == 4
            got = idx.lookup(more)
            assert [got.tier_of(i, "n") for i in range(4)] == [Tier.DISK, Tier.DISK, Tier.DRAM, Tier.DRAM]
        finally:
            store.close()
    finally:
        idx.clear()
        idx.close()
