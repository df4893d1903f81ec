"""PutBlocks (the unary Put of KV that fits one message): wire encoding, size rule, and its
checks and effects on a real node over loopback gRPC, against the streaming Put's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from engine.block_hash import chain_hashes
from kv_store import convert
from kv_store.checksum import block_checksum
from kv_store.client import PUT_BLOCKS_MAX_BYTES, KVStoreClient, put_blocks_fits
from kv_store.layout import KVLayout
from kv_store.service import SERVICE, KVStoreServicer, StoreServer, serve
from kv_store.store import BlockStore, StoreConfig
from kv_store.wire import PUT_BLOCK_OVERHEAD, encode_put_blocks
from pdserve.errors import InvalidRequestError, LayoutMismatchError
from pdserve.limits import MAX_MESSAGE_BYTES, grpc_options
from pdserve.status import add_servicer
from pdserve.v1 import kv_store_pb2

LAYOUT = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4)  # 256 B
OTHER = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_size=4)


def keys(n: int, salt: str = "") -> list[bytes]:
    return chain_hashes(list(range(n * LAYOUT.block_size)), LAYOUT.block_size, "m", salt=salt)


def blocks(n: int) -> list[bytes]:
    return [os.urandom(LAYOUT.block_nbytes) for _ in range(n)]


# ----------------------------------------------------------------- pure: wire and size rule
def test_encode_put_blocks_is_protobufs_encoding() -> None:
    hs, data = keys(3), blocks(3)
    sums = [block_checksum(d) for d in data]
    header = kv_store_pb2.PutBlocksRequest(layout=convert.layout_to_proto(LAYOUT), lease_ttl_s=2.5)
    raw = encode_put_blocks(header, hs, sums, [memoryview(d) for d in data])
    ref = kv_store_pb2.PutBlocksRequest()
    ref.CopyFrom(header)
    for h, c, d in zip(hs, sums, data, strict=True):
        ref.blocks.add(block_hash=h, checksum=c, data=d)
    assert raw == ref.SerializeToString()
    back = kv_store_pb2.PutBlocksRequest.FromString(raw)
    assert back == ref
    assert [b.data for b in back.blocks] == data


def test_encode_put_blocks_without_blocks_is_the_header() -> None:
    header = kv_store_pb2.PutBlocksRequest(layout=convert.layout_to_proto(LAYOUT))
    assert encode_put_blocks(header, [], [], []) == header.SerializeToString()


def test_put_blocks_overhead_bounds_a_real_block() -> None:
    h, d = keys(1), blocks(1)
    header = kv_store_pb2.PutBlocksRequest()
    raw = encode_put_blocks(header, h, [(1 << 64) - 1], d)  # the longest checksum encoding
    assert len(raw) - len(d[0]) <= PUT_BLOCK_OVERHEAD


def test_put_blocks_fits() -> None:
    assert not put_blocks_fits(0, 256)  # no blocks: the streaming Put validates the layout alone
    assert put_blocks_fits(1, 256)
    per = 1_000_000 + PUT_BLOCK_OVERHEAD
    n = PUT_BLOCKS_MAX_BYTES // per
    assert put_blocks_fits(n, 1_000_000) and not put_blocks_fits(n + 1, 1_000_000)
    assert PUT_BLOCKS_MAX_BYTES < MAX_MESSAGE_BYTES
    assert not put_blocks_fits(1, MAX_MESSAGE_BYTES)


# ----------------------------------------------------------------- a node over loopback
@pytest.fixture(scope="module")
def node() -> Iterator[StoreServer]:
    srv = serve(StoreConfig("node-pb", LAYOUT, capacity_blocks=32, max_leased_blocks_per_owner=32))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def client(node: StoreServer) -> Iterator[KVStoreClient]:
    c = KVStoreClient(node.address, timeout_s=20)
    yield c
    c.close()


def raw_put_blocks(client: KVStoreClient, msg: kv_store_pb2.PutBlocksRequest) -> kv_store_pb2.PutResponse:
    return client._channel.unary_unary(
        "/pdserve.v1.KVStore/PutBlocks",
        request_serializer=kv_store_pb2.PutBlocksRequest.SerializeToString,
        response_deserializer=kv_store_pb2.PutResponse.FromString,
    )(msg, timeout=10)


def test_unary_put_stores_leases_and_reads_back(node: StoreServer, client: KVStoreClient) -> None:
    hs, data = keys(3, "unary"), blocks(3)
    before = node.store.stats().node.puts
    res = client.put_blocks(LAYOUT, hs, data, lease_ttl_s=5.0)
    assert client.unary_put  # went as PutBlocks
    assert (res.num_blocks, res.num_stored, res.num_existing) == (3, 3, 0)
    assert res.lease_id and len(res.slots) == 3 and res.slot_nbytes == LAYOUT.block_nbytes
    assert node.store.stats().node.puts == before + 3
    assert client.get_blocks(LAYOUT, hs, [block_checksum(d) for d in data]) == data
    again = client.put_blocks(LAYOUT, hs, data)  # idempotent
    assert (again.num_stored, again.num_existing, again.lease_id) == (0, 3, "")
    assert client.release(res.lease_id)


def test_unary_and_streaming_put_answer_alike(client: KVStoreClient) -> None:
    """The same Put (new blocks, a dedup, a write-once conflict) through PutBlocks and through
    the streaming Put gives the same result fields."""
    out = []
    for salt, unary in (("alike-u", True), ("alike-s", False)):
        hs, data = keys(2, salt), blocks(2)
        client.put_blocks(LAYOUT, hs[:1], data[:1])
        other = blocks(1)[0]
        client.unary_put = unary
        try:
            res = client.put_blocks(LAYOUT, hs, [other, data[1]])
        finally:
            client.unary_put = True
        assert res.conflict_checksums == (block_checksum(data[0]),)
        out.append((res.num_blocks, res.num_stored, res.num_existing, res.conflicts, res.lease_id))
    assert out[0] == out[1] == (2, 1, 1, (0,), "")


def test_unary_put_refuses_a_bad_checksum_and_stores_nothing(
    node: StoreServer, client: KVStoreClient
) -> None:
    hs, data = keys(2, "badsum"), blocks(2)
    leases = node.store.stats().node.num_leases
    failures = node.store.stats().node.checksum_failures
    with pytest.raises(InvalidRequestError, match="does not match its checksum"):
        client.put_blocks(LAYOUT, hs, data, lease_ttl_s=5.0, checksums=[block_checksum(data[0]), 12345])
    assert client.exists(hs) == [True, False]  # the first block was good and committed, as with Put
    assert node.store.stats().node.num_leases == leases  # the call's lease was released
    assert node.store.stats().node.checksum_failures == failures + 1


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.ClearField("layout"), "layout is required"),
        (lambda m: m.blocks[1].ClearField("checksum"), "block 1 has no checksum"),
        (lambda m: setattr(m.blocks[0], "data", m.blocks[0].data[:-1]), "block 0 has 255 bytes"),
        (lambda m: setattr(m.blocks[1], "block_hash", b"short"), "block_hash"),
    ],
)
def test_unary_put_refuses_malformed_requests_before_storing(client: KVStoreClient, edit, match: str) -> None:
    hs, data = keys(2, f"malformed-{match}"), blocks(2)
    msg = kv_store_pb2.PutBlocksRequest(layout=convert.layout_to_proto(LAYOUT))
    for h, d in zip(hs, data, strict=True):
        msg.blocks.add(block_hash=h, checksum=block_checksum(d), data=d)
    edit(msg)
    with pytest.raises(grpc.RpcError) as ei:
        raw_put_blocks(client, msg)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in ei.value.details()
    assert client.exists(hs) == [False, False]


def test_unary_put_refuses_another_layout(client: KVStoreClient) -> None:
    data = [os.urandom(OTHER.block_nbytes)]
    with pytest.raises(LayoutMismatchError):
        client.put_blocks(OTHER, keys(1, "other"), data)


def test_a_node_without_put_blocks_gets_streamed_puts() -> None:
    """An older node (PutBlocks UNIMPLEMENTED): the client falls back to the streaming Put, for
    this call and the next ones."""

    class OldServicer(KVStoreServicer):
        PutBlocks = None  # type: ignore[assignment]

    store = BlockStore(StoreConfig("node-old", LAYOUT, capacity_blocks=8, max_leased_blocks_per_owner=8))
    server = grpc.server(futures.ThreadPoolExecutor(4), options=grpc_options())
    add_servicer(server, SERVICE, OldServicer(store))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    store.set_address(f"127.0.0.1:{port}")
    client = KVStoreClient(f"127.0.0.1:{port}", timeout_s=10)
    try:
        hs, data = keys(2, "old"), blocks(2)
        res = client.put_blocks(LAYOUT, hs, data, lease_ttl_s=5.0)
        assert not client.unary_put
        assert (res.num_stored, bool(res.lease_id)) == (2, True)
        assert client.get_blocks(LAYOUT, hs) == data
        assert client.put_blocks(LAYOUT, hs, data).num_existing == 2
    finally:
        client.close()
        server.stop(0).wait()
        store.close()
