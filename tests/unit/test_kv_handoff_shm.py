"""Zero-rpc shared-memory KV handoff: a leased Put returns the blocks' arena slots, the KVHandle
carries them, and the decode side reads them with no Lease rpc (issue #3).

Real in-process store node (gRPC on loopback + shared-memory arena); the Lease / Get rpcs a
reader issues are counted by wrapping :class:`KVStoreClient`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import CollectorRegistry

from decode_worker.puller import StorePuller
from engine.block_hash import chain_hashes
from engine.llm_engine import KVExport
from engine.model_runner import KVShape
from kv_store import convert
from kv_store.arena import host_id
from kv_store.checksum import block_checksum
from kv_store.client import KVStoreClient
from kv_store.handle import BlockLocation, KVHandle
from kv_store.layout import KVLayout
from kv_store.service import StoreServer, serve
from kv_store.store import PutResult, StoreConfig
from kv_store.tensors import block_tensor
from kv_store.transport import AutoTransport, FakeTransport, GrpcTransport, ShmTransport
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.metrics import StoreMetrics
from prefill_worker.publisher import StorePublisher

L = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)  # 1 KiB


def hashes(n: int, salt: str = "") -> list[bytes]:
    return chain_hashes(list(range(n * L.block_size)), L.block_size, "m", salt=salt)


def payloads(n: int) -> list[bytes]:
    return [os.urandom(L.block_nbytes) for _ in range(n)]


class RpcCounter:
    """Counts the Lease and Get rpcs made through any KVStoreClient while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lease = 0
        self.get = 0
        lease, iter_chunks = KVStoreClient.lease, KVStoreClient.iter_chunks

        def counted_lease(client, *a, **kw):  # type: ignore[no-untyped-def]
            self.lease += 1
            return lease(client, *a, **kw)

        def counted_iter_chunks(client, *a, **kw):  # type: ignore[no-untyped-def]
            self.get += 1
            return iter_chunks(client, *a, **kw)

        monkeypatch.setattr(KVStoreClient, "lease", counted_lease)
        monkeypatch.setattr(KVStoreClient, "iter_chunks", counted_iter_chunks)


@pytest.fixture
def node() -> Iterator[tuple[StoreServer, KVStoreClient]]:
    srv = serve(StoreConfig("node-h", L, capacity_blocks=16))
    client = KVStoreClient(srv.address, timeout_s=20)
    yield srv, client
    client.close()
    srv.stop(0)


def _export(n_blocks: int, rid: str = "r1") -> KVExport:
    blocks = torch.randn((n_blocks, *L.block_shape), dtype=torch.float32)
    shape = KVShape(L.num_layers, L.num_kv_heads, L.head_dim, L.block_size, torch.float32)
    ntok = n_blocks * L.block_size - 1  # last block partial
    return KVExport(rid, "m", list(range(ntok)), 0, hashes(n_blocks, rid), blocks, shape)


def _handle(loc: BlockLocation, hs: list[bytes], **kw: object) -> KVHandle:
    return KVHandle("r", tuple(hs), (loc,) * len(hs), L, len(hs) * L.block_size, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ value types and conversion


def test_handle_validates_shm_slots_and_expiry() -> None:
    loc = BlockLocation("n", "a:1", "pdkv_x", "h")
    hs = hashes(2)
    h = _handle(loc, hs, lease_id="l", shm_slots=[3, 4], lease_expires_at_unix_s=5)
    assert h.shm_slots == (3, 4) and h.lease_expires_at_unix_s == 5.0
    assert _handle(loc, hs).shm_slots == ()
    with pytest.raises(InvalidRequestError, match="shm_slots"):
        _handle(loc, hs, shm_slots=(1,))
    with pytest.raises(InvalidRequestError, match="shm_slots"):
        _handle(loc, hs, shm_slots=(1, -2))
    with pytest.raises(InvalidRequestError, match="lease_expires_at_unix_s"):
        _handle(loc, hs, lease_expires_at_unix_s=-1.0)
    with pytest.raises(InvalidRequestError, match="lease_expires_at_unix_s"):
        _handle(loc, hs, lease_expires_at_unix_s=float("nan"))


def test_convert_round_trips_new_fields() -> None:
    loc = BlockLocation("n", "a:1", "pdkv_x", "h")
    h = _handle(loc, hashes(3), lease_id="l", shm_slots=(7, 8, 2), lease_expires_at_unix_s=1.75e9)
    assert convert.handle_from_proto(convert.handle_to_proto(h)) == h
    bare = _handle(loc, hashes(3))
    assert convert.handle_from_proto(convert.handle_to_proto(bare)) == bare
    msg = convert.handle_to_proto(h)
    del msg.shm_slots[0]
    with pytest.raises(InvalidRequestError, match="shm_slots"):
        convert.handle_from_proto(msg)
    r = PutResult(3, 2, 1, "l", 1.75e9, loc, (7, 8, 2), L.block_nbytes, "pdkv_x")
    assert convert.put_result_from_proto(convert.put_result_to_proto(r)) == r
    with pytest.raises(InvalidRequestError, match="slots"):
        PutResult(3, 3, 0, slots=(1,))


# ------------------------------------------------------------------ the store's Put answer


def test_leased_put_reports_slots_of_every_block(node: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = node
    hs, data = hashes(4), payloads(4)
    plain = client.put_blocks(L, hs[:1], data[:1])  # no lease: no slots
    assert plain.slots == () and plain.slot_nbytes == 0 and plain.shm_name == srv.store.arena.name
    r = client.put_blocks(L, hs, data, lease_ttl_s=30)  # hs[0] deduplicated, still leased
    assert r.lease_id and len(r.slots) == 4 and len(set(r.slots)) == 4
    assert r.slot_nbytes == L.block_nbytes and r.shm_name == r.location.shm_name == srv.store.arena.name
    assert abs(r.lease_expires_at_unix_s - (time.time() + 30)) < 5
    for s, d in zip(r.slots, data, strict=True):
        assert bytes(srv.store.arena.view(s)) == d


def test_put_without_arena_reports_no_slots() -> None:
    srv = serve(StoreConfig("node-heap", L, capacity_blocks=4, use_shm=False))
    try:
        with KVStoreClient(srv.address, timeout_s=20) as client:
            r = client.put_blocks(L, hashes(2), payloads(2), lease_ttl_s=30)
        assert r.lease_id and r.slots == () and r.shm_name == ""
    finally:
        srv.stop(0)


def test_publisher_fills_slots_and_expiry(node: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = node
    kv = _export(3)
    h = StorePublisher(client).publish(kv, L, lease_ttl_s=30)
    assert h.lease_id and len(h.shm_slots) == 3 and h.lease_expires_at_unix_s > time.time() + 20
    assert h.locations[0].shm_name == srv.store.arena.name
    for i, s in enumerate(h.shm_slots):
        assert torch.equal(block_tensor(srv.store.arena.view(s), L), kv.blocks[i])
    client.release(h.lease_id)


# ------------------------------------------------------------------ decode side: zero-rpc pull


def test_pull_of_published_handle_makes_no_lease_rpc(
    node: tuple[StoreServer, KVStoreClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, client = node
    kv = _export(5)
    handle = convert.handle_from_proto(convert.handle_to_proto(StorePublisher(client).publish(kv, L, 30)))
    rpcs = RpcCounter(monkeypatch)
    transport = AutoTransport(host_id())
    puller = StorePuller(transport, {client.address: client})
    try:
        out = puller.pull(handle)
        assert torch.equal(out, kv.blocks)
        assert (rpcs.lease, rpcs.get) == (0, 0)
        assert (puller.leased_reads, puller.leased_refusals, puller.fetches) == (1, 0, 0)
        assert transport.fallbacks == 0
        assert srv.store.stats().node.num_leases == 1  # only the handle's; the read added none
        puller.release(handle)
        assert srv.store.stats().node.num_leases == 0
    finally:
        transport.close()


def test_pull_near_expiry_refuses_and_falls_back_to_leasing_fetch(
    node: tuple[StoreServer, KVStoreClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, client = node
    kv = _export(2)
    published = StorePublisher(client).publish(kv, L, 30)
    # the same lease, but seen 1 s before it expires: under the 2 s margin
    soon = KVHandle(
        published.request_id,
        published.block_hashes,
        published.locations,
        L,
        published.num_tokens,
        published.lease_id,
        published.shm_slots,
        time.time() + 1.0,
    )
    rpcs = RpcCounter(monkeypatch)
    transport = AutoTransport(host_id(), shm=ShmTransport(release_delay_s=0, my_host_id=host_id()))
    puller = StorePuller(transport, {client.address: client})
    try:
        assert torch.equal(puller.pull(soon), kv.blocks)
        assert (puller.leased_reads, puller.leased_refusals, puller.fetches) == (0, 1, 1)
        assert rpcs.lease == 1 and rpcs.get == 0  # the fallback leased and read by shm
        puller.release(soon)
    finally:
        transport.close()


def test_pull_from_other_host_uses_grpc_not_slots(
    node: tuple[StoreServer, KVStoreClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, client = node
    kv = _export(2)
    handle = StorePublisher(client).publish(kv, L, 30)
    rpcs = RpcCounter(monkeypatch)
    transport = AutoTransport("some-other-host")
    puller = StorePuller(transport, {client.address: client})
    try:
        assert torch.equal(puller.pull(handle), kv.blocks)
        assert (puller.leased_reads, puller.leased_refusals, puller.fetches) == (0, 0, 1)
        assert (rpcs.lease, rpcs.get) == (0, 1)
        puller.release(handle)
    finally:
        transport.close()


def test_pull_without_slots_takes_the_fetch_path(node: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = node
    kv = _export(2)
    h = StorePublisher(client).publish(kv, L, 30)
    bare = KVHandle(h.request_id, h.block_hashes, h.locations, L, h.num_tokens, h.lease_id)
    transport = AutoTransport(host_id())
    puller = StorePuller(transport, {client.address: client})
    try:
        assert torch.equal(puller.pull(bare), kv.blocks)
        assert (puller.leased_reads, puller.fetches) == (0, 1)
        puller.release(bare)
    finally:
        transport.close()


# ------------------------------------------------------------------ read_leased refusals


def test_read_leased_refusals(node: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = node
    hs, data = hashes(2), payloads(2)
    r = client.put_blocks(L, hs, data, lease_ttl_s=30)
    loc = srv.store.location
    now = [time.time()]
    shm = ShmTransport(my_host_id=loc.host_id, wall_clock=lambda: now[0])
    exp = r.lease_expires_at_unix_s
    sums = [block_checksum(d) for d in data]
    try:
        with shm.read_leased(loc, L, r.slots, exp, r.slot_nbytes, sums) as got:
            assert [bytes(v) for v in got.views] == data
            buf = bytearray(2 * L.block_nbytes)
            got.copy_into(buf)
            assert bytes(buf) == data[0] + data[1]
        with shm.read_leased(loc, L, [], exp) as got:
            assert len(got) == 0

        def refused(match: str, **kw: object) -> None:
            args = {
                "location": loc,
                "layout": L,
                "slots": r.slots,
                "lease_expires_at_unix_s": exp,
                "checksums": sums,
            }
            args.update(kw)
            with pytest.raises(UnavailableError, match=match):
                shm.read_leased(**args)  # type: ignore[arg-type]

        refused("margin", lease_expires_at_unix_s=0.0)  # expiry unknown
        now[0] = exp - 1.5
        refused("margin")  # 1.5 s left < 2 s
        now[0] = exp + 1
        refused("margin")  # expired
        now[0] = time.time()
        refused("no shared-memory arena", location=BlockLocation(loc.node_id, loc.address, "", loc.host_id))
        refused("no shared-memory arena", location=BlockLocation(loc.node_id, loc.address, loc.shm_name, "x"))
        refused("cannot be attached", location=BlockLocation("n", loc.address, "pdkv_nosuch", loc.host_id))
        refused("not inside", slots=[16], checksums=sums[:1])
        refused("not inside", slots=[-1], checksums=sums[:1])
        refused("one checksum per slot", checksums=[])  # unverifiable: never read
        refused("bytes", slot_nbytes=L.block_nbytes // 2)
        assert srv.store.stats().node.num_leases == 1  # reads neither leased nor released
    finally:
        shm.close()
        client.release(r.lease_id)


# ------------------------------------------------------------------ fallback with fakes (no network)


class _RefusingShm:
    """An shm transport that cannot attach anything: both read paths raise UnavailableError."""

    def __init__(self) -> None:
        self.read_leased_calls = 0

    def read_leased(self, location, layout, slots, lease_expires_at_unix_s, slot_nbytes=0, checksums=()):  # type: ignore[no-untyped-def]
        self.read_leased_calls += 1
        raise UnavailableError("no arena")

    def fetch(self, location, layout, hashes, checksums=()):  # type: ignore[no-untyped-def]
        raise UnavailableError("no arena")

    def close(self) -> None:
        pass


def test_refused_leased_read_falls_back_through_auto_transport_to_grpc() -> None:
    hs = hashes(2)
    grpc_fake = FakeTransport()
    for h, d in zip(hs, (b"a" * L.block_nbytes, b"b" * L.block_nbytes), strict=True):
        grpc_fake.put("n", h, d)
    shm = _RefusingShm()
    auto = AutoTransport("hostA", grpc=grpc_fake, shm=shm)  # type: ignore[arg-type]
    loc = BlockLocation("n", "a:1", "pdkv_x", "hostA")
    puller = StorePuller(auto)
    h = _handle(loc, hs, lease_id="l", shm_slots=(0, 1), lease_expires_at_unix_s=time.time() + 60)
    out = puller.pull(h)
    assert bytes(out[1].numpy().tobytes()) == b"b" * L.block_nbytes
    assert shm.read_leased_calls == 1 and auto.fallbacks == 1 and len(grpc_fake.calls) == 1
    assert (puller.leased_reads, puller.leased_refusals, puller.fetches) == (0, 1, 1)
    assert grpc_fake.open == 0


def test_transports_without_leased_reads_keep_the_fetch_path() -> None:
    fake = FakeTransport()
    hs = hashes(1)
    fake.put("n", hs[0], b"z" * L.block_nbytes)
    puller = StorePuller(fake)
    loc = BlockLocation("n", "a:1", "pdkv_x", "hostA")
    h = _handle(loc, hs, lease_id="l", shm_slots=(0,), lease_expires_at_unix_s=time.time() + 60)
    puller.pull(h)
    assert (puller.leased_reads, puller.fetches) == (0, 1)
    grpc_only = GrpcTransport()
    assert not hasattr(grpc_only, "chooses_shm")
    grpc_only.close()


def test_pull_interleaved_nodes_places_each_block() -> None:
    fake = FakeTransport()
    hs = hashes(3)
    data = [bytes([i + 1]) * L.block_nbytes for i in range(3)]
    nodes = ("n1", "n2", "n1")
    for node_id, h, d in zip(nodes, hs, data, strict=True):
        fake.put(node_id, h, d)
    locs = tuple(BlockLocation(n, "a:1") for n in nodes)
    h = KVHandle("r", tuple(hs), locs, L, 3 * L.block_size)
    out = StorePuller(fake).pull(h)
    assert [out[i].numpy().tobytes() for i in range(3)] == data
    assert fake.open == 0 and [c[0] for c in fake.calls] == ["n1", "n2"]


def test_release_reports_zero_rpc_reads_as_shm_transfers() -> None:
    reg = CollectorRegistry()
    srv = serve(StoreConfig("node-m", L, capacity_blocks=8), metrics=StoreMetrics(reg, "node-m"))
    client = KVStoreClient(srv.address, timeout_s=20)
    transport = AutoTransport(host_id())
    try:
        kv = _export(3)
        handle = StorePublisher(client).publish(kv, L, 30)
        puller = StorePuller(transport, {client.address: client})
        assert torch.equal(puller.pull(handle), kv.blocks) and puller.leased_reads == 1
        puller.release(handle)
        n = {"node_id": "node-m", "transport": "shm", "direction": "out"}
        assert reg.get_sample_value("pdserve_kv_transfer_blocks_total", n) == 3
        assert reg.get_sample_value("pdserve_kv_transfer_bytes_total", n) == 3 * L.block_nbytes
        assert srv.store.stats().node.num_leases == 0
        hits0 = srv.store.stats().node.hits
        assert hits0 >= 3  # the zero-rpc reads count as read hits (the hit-rate panel sees them)
        # capped at the lease's size; an unknown lease counts nothing
        r = client.put_blocks(L, hashes(1, "x"), payloads(1), lease_ttl_s=30)
        assert client.release(r.lease_id, shm_read_blocks=99) is True
        assert client.release(r.lease_id, shm_read_blocks=5) is False
        assert reg.get_sample_value("pdserve_kv_transfer_blocks_total", n) == 4
        assert srv.store.stats().node.hits == hits0 + 1
        empty = client.put_blocks(L, [], [], lease_ttl_s=30)  # a lease of no blocks releases too
        assert empty.lease_id and client.release(empty.lease_id) is True
    finally:
        transport.close()
        client.close()
        srv.stop(0)
