"""KV store node over real gRPC on loopback: round trips, chunking, errors, shm, leases, process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.block_hash import chain_hashes
from kv_store import convert
from kv_store.arena import host_id
from kv_store.client import KVStoreClient
from kv_store.handle import BlockLocation
from kv_store.layout import KVLayout
from kv_store.service import StoreServer, serve
from kv_store.store import StoreConfig
from kv_store.transport import AutoTransport, GrpcTransport, ShmTransport
from pdserve.errors import (
    InvalidRequestError,
    LayoutMismatchError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from pdserve.limits import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES
from pdserve.v1 import kv_store_pb2, kv_store_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
# 4 layers * 2 * 600 tokens * 2 heads * 64 * 4 bytes = 2,457,600 bytes: 3 chunks, the last partial
BIG = KVLayout("m", num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32", block_size=600)
SMALL = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4)  # 256 B


def hashes(n: int, layout: KVLayout, salt: str = "") -> list[bytes]:
    return chain_hashes(list(range(n * layout.block_size)), layout.block_size, "m", salt=salt)


def payloads(n: int, layout: KVLayout) -> list[bytes]:
    return [os.urandom(layout.block_nbytes) for _ in range(n)]


def start(layout: KVLayout, capacity: int = 8, **kw: object) -> StoreServer:
    """A node whose lease quota is its whole capacity (these tests are about eviction and
    transfers; quotas: tests/integration/test_kv_security.py)."""
    kw.setdefault("max_leased_blocks_per_owner", capacity)
    return serve(StoreConfig("node-a", layout, capacity_blocks=capacity, **kw))  # type: ignore[arg-type]


@pytest.fixture
def big() -> Iterator[tuple[StoreServer, KVStoreClient]]:
    srv = start(BIG)
    client = KVStoreClient(srv.address, timeout_s=20)
    yield srv, client
    client.close()
    name = srv.store.arena.name
    srv.stop(0)
    assert not Path("/dev/shm", name).exists(), "store node leaked its shared-memory segment"


@pytest.fixture
def small() -> Iterator[tuple[StoreServer, KVStoreClient]]:
    srv = start(SMALL, capacity=4)
    client = KVStoreClient(srv.address, timeout_s=20)
    yield srv, client
    client.close()
    name = srv.store.arena.name
    srv.stop(0)
    assert not Path("/dev/shm", name).exists()


def raw_stub(
    srv: StoreServer, unlimited_send: bool = False
) -> tuple[grpc.Channel, kv_store_pb2_grpc.KVStoreStub]:
    opts = [("grpc.max_send_message_length", -1)] if unlimited_send else []
    ch = grpc.insecure_channel(srv.address, options=opts)
    return ch, kv_store_pb2_grpc.KVStoreStub(ch)


def assert_still_serving(srv: StoreServer, client: KVStoreClient, layout: KVLayout) -> None:
    (h,) = hashes(1, layout, salt="probe")
    (d,) = payloads(1, layout)
    client.put_blocks(layout, [h], [d])
    assert client.get_blocks(layout, [h]) == [d]
    assert srv.store.stats().node.num_pending == 0  # no reservation leaked by the bad call


# ------------------------------------------------------------------------- round trips


def test_put_get_round_trip_bigger_than_a_chunk(big: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = big
    assert BIG.block_nbytes > 2 * MAX_CHUNK_BYTES
    hs, data = hashes(3, BIG), payloads(3, BIG)
    r = client.put_blocks(BIG, hs, data)
    assert (r.num_blocks, r.num_stored, r.num_existing) == (3, 3, 0)
    assert r.location == srv.store.location and r.location.address == srv.address
    assert client.get_blocks(BIG, hs) == data  # bytes-exact
    assert client.get_blocks(BIG, [hs[2], hs[0]]) == [data[2], data[0]]
    outs = [bytearray(BIG.block_nbytes) for _ in hs]
    client.get_blocks_into(BIG, hs, outs)
    assert [bytes(o) for o in outs] == data
    r = client.put_blocks(BIG, hs[:1], data[:1])  # idempotent
    assert (r.num_stored, r.num_existing) == (0, 1)
    assert client.exists(hs + hashes(1, BIG, salt="x")) == [True, True, True, False]
    st = client.stats()
    assert st.layout == BIG and st.node.num_blocks == 3 and st.node.put_dedups == 1
    assert st.node.bytes_used == 3 * BIG.block_nbytes


def test_put_accepts_tensors_and_memoryviews(small: tuple[StoreServer, KVStoreClient]) -> None:
    import torch

    srv, client = small
    t = torch.randn(SMALL.block_shape).to(torch.float16)
    raw = os.urandom(SMALL.block_nbytes)
    hs = hashes(2, SMALL)
    client.put_blocks(SMALL, hs, [t, memoryview(raw)])
    got = client.get_blocks(SMALL, hs)
    assert got[0] == t.view(torch.uint8).numpy().tobytes() and got[1] == raw


def test_lookup_delete_and_index(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small
    hs, data = hashes(3, SMALL), payloads(3, SMALL)
    client.put_blocks(SMALL, hs[:2], data[:2])
    r = client.lookup(hs)
    assert r.num_prefix_blocks == 2 and r.locations[1] == (srv.store.location,)
    d = client.delete([hs[0], hs[2]])
    assert (d.num_deleted, d.num_missing, d.num_pinned) == (1, 1, 0)
    assert client.lookup(hs).num_prefix_blocks == 0


def test_cancelled_get_unpins_blocks(big: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = big
    hs, data = hashes(3, BIG), payloads(3, BIG)
    client.put_blocks(BIG, hs, data)
    ch, stub = raw_stub(srv)
    with ch:
        call = stub.Get(kv_store_pb2.GetRequest(block_hashes=hs, layout=convert.layout_to_proto(BIG)))
        next(call)  # the server is now streaming with the blocks pinned
        call.cancel()
    deadline = time.monotonic() + 3
    while srv.store.stats().node.num_pinned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.store.stats().node.num_pinned == 0
    assert client.get_blocks(BIG, hs[:1]) == data[:1]


# ------------------------------------------------------------------------- errors


def test_layout_mismatch_is_failed_precondition(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small
    other = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="bfloat16", block_size=4)
    with pytest.raises(LayoutMismatchError, match=r"dtype: 'float16' != 'bfloat16'"):
        client.put_blocks(other, hashes(1, other), payloads(1, other))
    ch, stub = raw_stub(srv)
    with ch, pytest.raises(grpc.RpcError) as ei:
        req = kv_store_pb2.GetRequest(block_hashes=hashes(1, other), layout=convert.layout_to_proto(other))
        list(stub.Get(req))
    assert ei.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "incompatible KV layout" in ei.value.details() and "dtype" in ei.value.details()
    assert_still_serving(srv, client, SMALL)


def test_missing_block_is_typed_not_found(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small
    with pytest.raises(RequestNotFoundError, match="not stored on this node"):
        client.get_blocks(SMALL, hashes(2, SMALL))
    with pytest.raises(RequestNotFoundError):
        client.lease(hashes(1, SMALL))


def test_oversized_chunk_refused_then_serves(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small
    ch, stub = raw_stub(srv)
    big_chunk = kv_store_pb2.PutChunk(
        layout=convert.layout_to_proto(SMALL),
        block_hash=hashes(1, SMALL)[0],
        total_bytes=SMALL.block_nbytes,
        data=b"\0" * (MAX_CHUNK_BYTES + 1),
    )
    with ch, pytest.raises(grpc.RpcError) as ei:
        stub.Put(iter([big_chunk]))
    assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "chunk limit" in ei.value.details()
    assert_still_serving(srv, client, SMALL)


def test_message_over_transport_limit_refused_then_serves(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small
    ch, stub = raw_stub(srv, unlimited_send=True)
    req = kv_store_pb2.ExistsRequest(block_hashes=[b"\1" * (MAX_MESSAGE_BYTES + 1)])
    with ch, pytest.raises(grpc.RpcError) as ei:
        stub.Exists(req)
    assert ei.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own receive limit
    assert_still_serving(srv, client, SMALL)


def test_undecodable_bytes_are_invalid_argument(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small
    with grpc.insecure_channel(srv.address) as ch:
        unary = ch.unary_unary("/pdserve.v1.KVStore/Exists")
        with pytest.raises(grpc.RpcError) as ei:
            unary(b"\xff\xff\xff\xff")
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid pdserve.v1.ExistsRequest" in ei.value.details()
        put = ch.stream_unary("/pdserve.v1.KVStore/Put")
        with pytest.raises(grpc.RpcError) as ei:
            put(iter([b"\x0a\xff"]))
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serving(srv, client, SMALL)


def _chunk(**kw: object) -> kv_store_pb2.PutChunk:
    return kv_store_pb2.PutChunk(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([], "empty stream"),
        ([_chunk(block_hash=b"\1" * 16, total_bytes=256, data=b"\0" * 256)], "layout is required"),
        ([_chunk(layout=convert.layout_to_proto(SMALL), data=b"x")], "before any block_hash"),
        ([_chunk(layout=convert.layout_to_proto(SMALL), block_hash=b"\1" * 15, total_bytes=256)], "16-byte"),
        (
            [_chunk(layout=convert.layout_to_proto(SMALL), block_hash=b"\1" * 16, total_bytes=255)],
            "total_bytes=255",
        ),
        (
            [
                _chunk(
                    layout=convert.layout_to_proto(SMALL),
                    block_hash=b"\1" * 16,
                    total_bytes=256,
                    checksum=1,
                    data=b"\0" * 100,
                )
            ],
            "ended inside block",
        ),
        (
            [
                _chunk(
                    layout=convert.layout_to_proto(SMALL),
                    block_hash=b"\1" * 16,
                    total_bytes=256,
                    checksum=1,
                    data=b"\0" * 200,
                ),
                _chunk(data=b"\0" * 100),
            ],
            "more than its 256 bytes",
        ),
        (
            [
                _chunk(
                    layout=convert.layout_to_proto(SMALL),
                    block_hash=b"\1" * 16,
                    total_bytes=256,
                    checksum=1,
                    data=b"\0" * 100,
                ),
                _chunk(block_hash=b"\2" * 16, total_bytes=256, checksum=1, data=b"\0" * 256),
            ],
            "new block_hash arrived early",
        ),
        ([_chunk(layout=convert.layout_to_proto(SMALL), lease_ttl_s=-3)], "ttl_s"),
        (
            [_chunk(layout=convert.layout_to_proto(SMALL), block_hash=b"\1" * 16, total_bytes=256)],
            "has no checksum",
        ),
        (
            [
                _chunk(
                    layout=convert.layout_to_proto(SMALL),
                    block_hash=b"\1" * 16,
                    total_bytes=256,
                    checksum=12345,
                    data=b"\0" * 256,
                )
            ],
            "does not match its checksum",
        ),
    ],
)
def test_malformed_put_streams(small: tuple[StoreServer, KVStoreClient], chunks: list, message: str) -> None:
    srv, client = small
    assert SMALL.block_nbytes == 256
    ch, stub = raw_stub(srv)
    with ch, pytest.raises(grpc.RpcError) as ei:
        stub.Put(iter(chunks))
    assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert message in ei.value.details()
    assert client.exists([b"\1" * 16, b"\2" * 16]) == [False, False]
    assert client.stats().node.num_leases == 0
    assert_still_serving(srv, client, SMALL)


def test_client_side_validation() -> None:
    client = KVStoreClient("127.0.0.1:1")
    with pytest.raises(InvalidRequestError, match="layout needs"):
        client.put_blocks(SMALL, hashes(1, SMALL), [b"short"])
    with pytest.raises(InvalidRequestError, match="2 blocks for 1 hashes"):
        client.put_blocks(SMALL, hashes(1, SMALL), payloads(2, SMALL))
    client.close()


# ------------------------------------------------------------------------- leases and shm


def test_put_under_lease_blocks_eviction(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small  # capacity 4
    hs, data = hashes(6, SMALL), payloads(6, SMALL)
    r = client.put_blocks(SMALL, hs[:4], data[:4], lease_ttl_s=30)
    assert r.lease_id and r.lease_expires_at_unix_s > 0
    with pytest.raises(ResourceExhaustedError) as ei:
        client.put_blocks(SMALL, hs[4:5], data[4:5])
    assert ei.value.retry_after_s is not None and 0 < ei.value.retry_after_s <= 30
    assert client.release(r.lease_id) is True
    assert client.release(r.lease_id) is False
    client.put_blocks(SMALL, hs[4:6], data[4:6])
    assert client.stats().node.evictions == 2


def test_shm_transport_round_trip_is_exact_and_zero_copy(big: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = big
    hs, data = hashes(3, BIG), payloads(3, BIG)
    client.put_blocks(BIG, hs, data)
    shm = ShmTransport(lease_ttl_s=10)
    try:
        with shm.fetch(srv.store.location, BIG, hs) as got:
            assert [bytes(v) for v in got.views] == data  # exact
            assert client.stats().node.num_leases == 1  # pinned while we read
            # zero copy: the view IS the node's arena slot (a write there shows through)
            slot = srv.store.node.slot_of(hs[1])
            owner = srv.store.arena.view(slot)
            owner[:4] = b"ZERO"
            assert bytes(got.views[1][:4]) == b"ZERO"
            owner[:4] = data[1][:4]
            del owner
            staging = bytearray(3 * BIG.block_nbytes)
            got.copy_into(staging)  # adjacent slots coalesced into one copy
            assert bytes(staging) == b"".join(data)
        assert client.stats().node.num_leases == 1  # release is deferred ...
        with shm.fetch(srv.store.location, BIG, hs[:1]) as again:  # ... and rides on the next Lease
            assert client.stats().node.num_leases == 1
            assert bytes(again.views[0]) == data[0]
        shm.flush()
        assert client.stats().node.num_leases == 0
    finally:
        shm.close()


def test_shm_deferred_release_goes_out_by_itself(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = small
    hs, data = hashes(1, SMALL), payloads(1, SMALL)
    client.put_blocks(SMALL, hs, data)
    shm = ShmTransport(release_delay_s=0.02)
    sync = ShmTransport(release_delay_s=0)
    try:
        with sync.fetch(srv.store.location, SMALL, hs):
            assert client.stats().node.num_leases == 1
        assert client.stats().node.num_leases == 0  # synchronous mode
        with shm.fetch(srv.store.location, SMALL, hs):
            pass
        deadline = time.monotonic() + 3
        while client.stats().node.num_leases and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.stats().node.num_leases == 0  # the background batch released it
    finally:
        shm.close()
        sync.close()


def test_auto_transport_picks_shm_on_same_host(big: tuple[StoreServer, KVStoreClient]) -> None:
    srv, client = big
    hs, data = hashes(2, BIG), payloads(2, BIG)
    client.put_blocks(BIG, hs, data)
    loc = srv.store.location
    assert loc.host_id == host_id() and loc.shm_name
    auto = AutoTransport(host_id())
    try:
        with auto.fetch(loc, BIG, hs) as got:
            assert [bytes(v) for v in got.views] == data
        gone = BlockLocation(loc.node_id, loc.address, "pdkv_gone_000", loc.host_id)
        with auto.fetch(gone, BIG, hs) as got:  # arena missing: falls back to gRPC
            assert [bytes(v) for v in got.views] == data
        assert auto.fallbacks == 0  # the lease named the live arena, so shm still worked
        with GrpcTransport().fetch(loc, BIG, hs[:1]) as got:
            assert bytes(got.views[0]) == data[0]
    finally:
        auto.close()


def test_shm_transport_against_node_without_shm() -> None:
    srv = start(SMALL, use_shm=False)
    try:
        client = KVStoreClient(srv.address)
        hs, data = hashes(1, SMALL), payloads(1, SMALL)
        client.put_blocks(SMALL, hs, data)
        assert srv.store.location.shm_name == ""
        auto = AutoTransport(host_id())
        with auto.fetch(srv.store.location, SMALL, hs) as got:  # chooser picks gRPC
            assert bytes(got.views[0]) == data[0]
        auto.close()
        client.close()
    finally:
        srv.stop(0)


# ------------------------------------------------------------------------- server plumbing


def test_health_and_reflection(small: tuple[StoreServer, KVStoreClient]) -> None:
    srv, _ = small
    with grpc.insecure_channel(srv.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "pdserve.v1.KVStore"):
            assert (
                h.Check(health_pb2.HealthCheckRequest(service=svc)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in resp.list_services_response.service}
        assert {"pdserve.v1.KVStore", "grpc.health.v1.Health"} <= names


def test_store_node_as_its_own_process() -> None:
    args = [sys.executable, "-m", "kv_store", "--node-id", "proc-node", "--capacity-blocks", "4"]
    args += ["--model-id", "m", "--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "4"]
    args += ["--dtype", "float16", "--block-size", "4", "--port", "0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert info["node_id"] == "proc-node" and info["port"] > 0
        assert Path("/dev/shm", info["shm_name"]).exists()
        with KVStoreClient(info["address"]) as client:
            hs, data = hashes(2, SMALL), payloads(2, SMALL)
            client.put_blocks(SMALL, hs, data)
            assert client.get_blocks(SMALL, hs) == data
            shm = ShmTransport()
            loc = BlockLocation(info["node_id"], info["address"], info["shm_name"], info["host_id"])
            with shm.fetch(loc, SMALL, hs) as got:  # cross-process zero-copy read
                assert [bytes(v) for v in got.views] == data
            shm.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "leaked" not in err
        assert not Path("/dev/shm", info["shm_name"]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
