"""The store's per-handoff shortcuts (#12: CPU per request) keep every check they stand in for.

* The servicer's layout check passes a layout message equal to the last accepted one without
  rebuilding it: any other layout (after an accepted one, on every rpc that checks it) is still
  refused naming the field, and a missing layout is still INVALID_ARGUMENT.
* ``BlockStore.leased_slots_and_expiry`` answers what ``leased_slots`` and
  ``lease_expires_at_unix`` answer, under one lock.
* ``KVStoreClient`` keeps the serialised PutBlocks header per (layout, lease ttl): the bytes are
  protobuf's, every ttl gets its own, and the cache stays bounded.
* Release's shm-read counters (looked up once) still count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from engine.block_hash import chain_hashes
from kv_store import client as client_mod
from kv_store import convert
from kv_store.checksum import block_checksum
from kv_store.client import KVStoreClient
from kv_store.layout import KVLayout
from kv_store.service import KVStoreServicer, StoreServer, serve
from kv_store.store import BlockStore, StoreConfig
from kv_store.wire import encode_put_blocks
from pdserve.errors import InvalidRequestError, LayoutMismatchError
from pdserve.metrics import StoreMetrics
from pdserve.v1 import kv_store_pb2

LAYOUT = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4)  # 256 B
OTHER = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_size=4)
OTHER_MODEL = KVLayout("n", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4)


class Ctx:
    """A servicer context: metadata and a loopback peer (what the default authorizer reads)."""

    def __init__(self, md: tuple[tuple[str, str], ...] = ()) -> None:
        self._md = md

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def auth_context(self) -> dict:
        return {}

    def is_active(self) -> bool:
        return True


def keys(n: int, salt: str) -> list[bytes]:
    return chain_hashes(list(range(n * LAYOUT.block_size)), LAYOUT.block_size, "m", salt=salt)


def put_msg(layout: KVLayout | None, salt: str, ttl: float = 0.0) -> kv_store_pb2.PutBlocksRequest:
    nbytes = (layout or LAYOUT).block_nbytes
    data = os.urandom(nbytes)
    msg = kv_store_pb2.PutBlocksRequest(lease_ttl_s=ttl)
    if layout is not None:
        msg.layout.CopyFrom(convert.layout_to_proto(layout))
    msg.blocks.add(block_hash=keys(1, salt)[0], checksum=block_checksum(data), data=data)
    return msg


@pytest.fixture
def servicer() -> Iterator[KVStoreServicer]:
    store = BlockStore(StoreConfig("hot", LAYOUT, capacity_blocks=16, use_shm=True, prefault=False))
    yield KVStoreServicer(store, StoreMetrics(CollectorRegistry(), "hot"))
    store.close()


def test_an_accepted_layout_is_remembered_and_others_are_still_refused(servicer: KVStoreServicer) -> None:
    ctx = Ctx()
    assert servicer._layout_ok is None
    assert servicer.PutBlocks(put_msg(LAYOUT, "a"), ctx).num_stored == 1
    assert servicer._layout_ok == convert.layout_to_proto(LAYOUT)
    assert servicer.PutBlocks(put_msg(LAYOUT, "b"), ctx).num_stored == 1  # the shortcut
    for other, field in ((OTHER, "head_dim"), (OTHER_MODEL, "model_id")):
        with pytest.raises(LayoutMismatchError, match=field):
            servicer.PutBlocks(put_msg(other, f"x-{field}"), ctx)
        with pytest.raises(LayoutMismatchError, match=field):
            servicer._check_layout(
                kv_store_pb2.GetRequest(block_hashes=keys(1, "a"), layout=convert.layout_to_proto(other)),
                "Get",
                required=True,
            )
    # a refused layout never becomes the remembered one
    assert servicer._layout_ok == convert.layout_to_proto(LAYOUT)
    with pytest.raises(InvalidRequestError, match="layout is required"):
        servicer.PutBlocks(put_msg(None, "c"), ctx)
    with pytest.raises(InvalidRequestError, match="Get: layout is required"):
        servicer._check_layout(kv_store_pb2.GetRequest(), "Get", required=True)
    servicer._check_layout(kv_store_pb2.LeaseRequest(), "Lease", required=False)  # optional: absent is fine
    assert servicer.store.exists(keys(1, "x-head_dim")) == [False]


def test_a_streamed_put_checks_its_layout_through_the_same_shortcut(servicer: KVStoreServicer) -> None:
    data = os.urandom(LAYOUT.block_nbytes)
    chunk = kv_store_pb2.PutChunk(
        block_hash=keys(1, "s")[0], total_bytes=LAYOUT.block_nbytes, checksum=block_checksum(data), data=data
    )
    chunk.layout.CopyFrom(convert.layout_to_proto(OTHER))
    with pytest.raises(LayoutMismatchError, match="head_dim"):
        servicer.Put(iter([chunk]), Ctx())
    chunk.layout.CopyFrom(convert.layout_to_proto(LAYOUT))
    assert servicer.Put(iter([chunk]), Ctx()).num_stored == 1
    chunk.layout.CopyFrom(convert.layout_to_proto(OTHER))  # after the accepted one: still refused
    chunk.block_hash = keys(1, "s2")[0]
    with pytest.raises(LayoutMismatchError, match="head_dim"):
        servicer.Put(iter([chunk]), Ctx())


def test_leased_slots_and_expiry_answer_as_the_two_reads(servicer: KVStoreServicer) -> None:
    store = servicer.store
    hs = keys(2, "lease")
    for h in hs:
        store.put_block(h, os.urandom(LAYOUT.block_nbytes))
    grant = store.lease(hs, 10.0)
    both = store.leased_slots_and_expiry(grant.lease_id, hs, grant.slots)
    assert both[0] == store.leased_slots(grant.lease_id, hs, grant.slots)
    # unix time of a monotonic expiry: read with the clocks of the moment (microseconds apart)
    assert both[1] == pytest.approx(store.lease_expires_at_unix(grant.lease_id), abs=1e-3)
    assert both[0] == grant.slots and both[1] == pytest.approx(grant.expires_at_unix_s, abs=0.05)
    # a slot that is not the expected one, or a block not on the lease: no slots, the expiry stays
    assert store.leased_slots_and_expiry(grant.lease_id, hs, (grant.slots[1], grant.slots[0]))[0] == ()
    extra = keys(3, "lease")[2:]
    store.put_block(extra[0], os.urandom(LAYOUT.block_nbytes))
    slots, expires = store.leased_slots_and_expiry(grant.lease_id, [*hs, *extra])
    assert slots == () and expires == pytest.approx(both[1], abs=1e-3)
    assert store.leased_slots_and_expiry("no-such-lease", hs) == ((), 0.0)
    with pytest.raises(ValueError, match="expected slots"):
        store.leased_slots_and_expiry(grant.lease_id, hs, grant.slots[:1])
    assert store.release(grant.lease_id)
    assert store.leased_slots_and_expiry(grant.lease_id, hs) == ((), 0.0)


def test_a_put_answer_names_its_slots_and_lease_expiry(servicer: KVStoreServicer) -> None:
    resp = servicer.PutBlocks(put_msg(LAYOUT, "answer", ttl=10.0), Ctx())
    assert resp.lease_id and len(resp.slots) == 1 and resp.slot_nbytes == LAYOUT.block_nbytes
    assert resp.lease_expires_at_unix_s == pytest.approx(
        servicer.store.lease_expires_at_unix(resp.lease_id), abs=1e-6
    )


def test_release_counts_shm_reads(servicer: KVStoreServicer) -> None:
    resp = servicer.PutBlocks(put_msg(LAYOUT, "shm", ttl=10.0), Ctx())
    m = servicer.metrics
    blocks = m.blocks.labels(m.node_id, "shm", "out")
    nbytes = m.bytes.labels(m.node_id, "shm", "out")
    b0, n0 = blocks._value.get(), nbytes._value.get()
    req = kv_store_pb2.ReleaseRequest(lease_id=resp.lease_id, shm_read_blocks=5)  # capped at the lease's 1
    assert servicer.Release(req, Ctx()).released
    assert (blocks._value.get() - b0, nbytes._value.get() - n0) == (1, LAYOUT.block_nbytes)
    assert not servicer.Release(req, Ctx()).released  # gone: counted once
    assert blocks._value.get() - b0 == 1


# ----------------------------------------------------------------- the client's header cache
@pytest.fixture(scope="module")
def node() -> Iterator[StoreServer]:
    srv = serve(StoreConfig("hot-node", LAYOUT, capacity_blocks=32, max_leased_blocks_per_owner=32))
    yield srv
    srv.stop(0)


def test_encode_put_blocks_takes_a_serialised_header() -> None:
    header = kv_store_pb2.PutBlocksRequest(layout=convert.layout_to_proto(LAYOUT), lease_ttl_s=3.0)
    data = [memoryview(os.urandom(LAYOUT.block_nbytes))]
    hs, sums = keys(1, "enc"), [block_checksum(data[0])]
    assert encode_put_blocks(header.SerializeToString(), hs, sums, data) == encode_put_blocks(
        header, hs, sums, data
    )


def test_the_client_keeps_one_header_per_layout_and_ttl(node: StoreServer, monkeypatch) -> None:
    with KVStoreClient(node.address, timeout_s=20) as c:
        for ttl in (0.0, 5.0, 5.0, 7.5):
            data = [os.urandom(LAYOUT.block_nbytes)]
            res = c.put_blocks(LAYOUT, keys(1, f"hdr-{ttl}-{len(c._put_headers)}"), data, lease_ttl_s=ttl)
            assert res.num_stored == 1 and bool(res.lease_id) == (ttl > 0)
            assert res.lease_ttl_s == ttl
            if res.lease_id:
                assert c.release(res.lease_id)
        assert sorted(ttl for _, ttl in c._put_headers) == [0.0, 5.0, 7.5]
        for (layout, ttl), raw in c._put_headers.items():
            assert (
                raw
                == kv_store_pb2.PutBlocksRequest(
                    layout=convert.layout_to_proto(layout), lease_ttl_s=ttl
                ).SerializeToString()
            )
        with pytest.raises(LayoutMismatchError):  # another layout: its own header, refused by the node
            c.put_blocks(OTHER, keys(1, "hdr-other"), [os.urandom(OTHER.block_nbytes)])
        assert (OTHER, 0.0) in c._put_headers
        monkeypatch.setattr(client_mod, "MAX_PUT_HEADERS", 2)
        c.put_blocks(LAYOUT, keys(1, "hdr-bound"), [os.urandom(LAYOUT.block_nbytes)], lease_ttl_s=9.0)
        assert len(c._put_headers) <= 2 and (LAYOUT, 9.0) in c._put_headers
