"""The KV-store attacks of issue #13, replayed over real gRPC on loopback; each must now fail to harm.

* a non-member (no or a wrong cluster token) can neither read (Exists/Lookup/Get: "was this
  prompt sent?"), nor write, delete, lease, release or look at stats: UNAUTHENTICATED, nothing
  changed;
* poisoning: junk put under a prompt's keys before its owner publishes. Layer 1: a non-member's
  Put is refused. Layer 2: a member's junk cannot reach the owner's decode: write-once keys keep
  stored bytes, the owner's publisher replaces unpinned junk, and the owner's checksums (carried
  by the KVHandle) turn junk that stays pinned into a miss, never into KV;
* lease exhaustion: long leases are clamped, one owner cannot pin the store, others still lease;
* a corrupted arena slot (one flipped byte in shared memory) is a miss on every read path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from decode_worker.puller import StorePuller
from engine.block_hash import chain_hashes
from engine.llm_engine import KVExport
from engine.model_runner import KVShape
from kv_store.auth import ENV_TOKEN, TokenAuthorizer
from kv_store.checksum import KVChecksumError, block_checksum
from kv_store.client import KVStoreClient
from kv_store.layout import KVLayout
from kv_store.service import StoreServer, serve
from kv_store.store import StoreConfig
from kv_store.tensors import tensor_bytes
from kv_store.transport import AutoTransport, GrpcTransport, ShmTransport
from pdserve import security
from pdserve.errors import InvalidRequestError, ResourceExhaustedError, UnauthenticatedError
from pdserve.metrics import StoreMetrics
from prefill_worker.publisher import StorePublisher

L = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)  # 1 KiB
TOKEN = "cluster-secret-token"
REG = CollectorRegistry()


def integrity_events(event: str) -> float | None:
    """The node's ``pdserve_kv_integrity_events_total{reason}`` as Prometheus would scrape it."""
    return REG.get_sample_value("pdserve_kv_integrity_events_total", {"node_id": "sec-node", "reason": event})


def prompt_keys(n_blocks: int, salt: str = "") -> list[bytes]:
    """What anyone can compute from a guessed prompt: its block keys."""
    return chain_hashes(list(range(100, 100 + n_blocks * L.block_size)), L.block_size, "m", salt=salt)


def kv_blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *L.block_shape), generator=g)


def export(hs: list[bytes], blocks: torch.Tensor) -> KVExport:
    n = len(hs)
    shape = KVShape(L.num_layers, L.num_kv_heads, L.head_dim, L.block_size, torch.float32)
    return KVExport("owner-req", "m", list(range(n * L.block_size)), 7, hs, blocks, shape)


@pytest.fixture(scope="module")
def node() -> Iterator[StoreServer]:
    """A node requiring the token; this process is a member (the environment gives every store
    client it makes, the pullers' included, the token, as in a deployed cluster)."""
    old = os.environ.get(ENV_TOKEN)
    os.environ[ENV_TOKEN] = TOKEN
    srv = serve(
        StoreConfig("sec-node", L, capacity_blocks=16, max_lease_ttl_s=60.0),
        authorizer=TokenAuthorizer(TOKEN),
        metrics=StoreMetrics(REG, "sec-node"),
    )
    yield srv
    srv.stop(0)
    if old is None:
        del os.environ[ENV_TOKEN]
    else:
        os.environ[ENV_TOKEN] = old
    security.reset()  # a configuration read from the environment above must not outlive this module


def outsider_client(address: str, token: str) -> KVStoreClient:
    """A client on a plain channel sending ``token`` ("" = none): not a cluster process."""
    return KVStoreClient(
        address, timeout_s=10, channel=grpc.insecure_channel(address), own_channel=True, cluster_token=token
    )


@pytest.fixture(scope="module")
def member(node: StoreServer) -> Iterator[KVStoreClient]:
    c = KVStoreClient(node.address, timeout_s=20, cluster_token=TOKEN)
    yield c
    c.close()


@pytest.fixture
def clean(node: StoreServer, member: KVStoreClient) -> Iterator[None]:
    """Every test starts and ends with an empty node and no lease."""
    yield
    store = node.store
    with store._lock:  # test cleanup: drop every lease, then every block
        for lid in list(store.node._leases):
            store.node.release(lid)
    store.delete(store.node.stored_hashes())
    assert member.stats().node.num_blocks == 0


# ------------------------------------------------------------------ non-members are refused


@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_non_member_can_neither_read_nor_change_anything(
    node: StoreServer, member: KVStoreClient, clean: None, token: str
) -> None:
    hs = prompt_keys(2)
    data = [os.urandom(L.block_nbytes) for _ in hs]
    member.put_blocks(L, hs, data)
    denied0 = member.stats().node.denied_calls
    with outsider_client(node.address, token) as outsider:
        calls = {
            "Exists": lambda: outsider.exists(hs),  # "was this prompt ever sent?"
            "Lookup": lambda: outsider.lookup(hs),
            "Get": lambda: outsider.get_blocks(L, hs),
            "Put": lambda: outsider.put_blocks(L, hs, [b"\0" * L.block_nbytes] * 2),  # poison
            "Delete": lambda: outsider.delete(hs),
            "Lease": lambda: outsider.lease(hs, ttl_s=1e9),  # pin the store
            "Release": lambda: outsider.release("any"),
            "Stats": lambda: outsider.stats(),
        }
        for name, call in calls.items():
            with pytest.raises(UnauthenticatedError, match=f"KVStore.{name} is for pdserve cluster members"):
                call()
    st = member.stats().node
    assert st.denied_calls == denied0 + len(calls) == integrity_events("denied_call")
    assert (st.num_blocks, st.num_leases) == (2, 0)
    assert member.get_blocks(L, hs) == data  # untouched


# ------------------------------------------------------------------ poisoning


def test_poison_by_non_member_is_refused_and_owner_gets_its_kv(
    node: StoreServer, member: KVStoreClient, clean: None
) -> None:
    hs = prompt_keys(3)
    with outsider_client(node.address, "") as outsider, pytest.raises(UnauthenticatedError):
        outsider.put_blocks(L, hs, [os.urandom(L.block_nbytes) for _ in hs])
    blocks = kv_blocks(3, seed=1)
    handle = StorePublisher(member).publish(export(hs, blocks), L, 30.0)
    puller = StorePuller(AutoTransport(node.store.location.host_id))
    out = puller.pull(handle)
    puller.release(handle)
    assert torch.equal(out, blocks)


def test_member_junk_put_first_is_replaced_by_the_owner(
    node: StoreServer, member: KVStoreClient, clean: None
) -> None:
    hs = prompt_keys(3)
    junk = [os.urandom(L.block_nbytes) for _ in hs]
    member.put_blocks(L, hs[:2], junk[:2])  # junk under the prompt's first keys, before its owner
    blocks = kv_blocks(3, seed=2)
    publisher = StorePublisher(member)
    handle = publisher.publish(export(hs, blocks), L, 30.0)
    assert publisher.conflicts_replaced == 2 and publisher.conflicts_kept == 0
    assert handle.block_checksums == tuple(block_checksum(tensor_bytes(b)) for b in blocks)
    for transport in (AutoTransport(node.store.location.host_id), GrpcTransport()):
        puller = StorePuller(transport)
        assert torch.equal(puller.pull(handle), blocks)  # the owner's KV, not the junk
    StorePuller(GrpcTransport()).release(handle)
    assert member.stats().node.put_conflicts >= 2


def test_write_once_keeps_the_first_bytes_and_pinned_junk_is_a_miss(
    node: StoreServer, member: KVStoreClient, clean: None
) -> None:
    hs = prompt_keys(2)
    junk = [os.urandom(L.block_nbytes) for _ in hs]
    first = member.put_blocks(L, hs, junk, lease_ttl_s=30)  # junk, and pinned: cannot be deleted
    same = member.put_blocks(L, hs, junk)
    assert (same.num_existing, same.conflicts) == (2, ())  # identical bytes: a no-op
    blocks = kv_blocks(2, seed=3)
    r = member.put_blocks(L, hs, list(blocks))
    assert r.conflicts == (0, 1) and r.num_stored == 0
    assert member.get_blocks(L, hs) == junk  # never overwritten
    publisher = StorePublisher(member)
    handle = publisher.publish(export(hs, blocks), L, 30.0)
    assert publisher.conflicts_kept == 2  # pinned junk stays ...
    auto = AutoTransport(node.store.location.host_id)
    for puller in (StorePuller(auto), StorePuller(GrpcTransport())):
        with pytest.raises(KVChecksumError, match="not served"):  # ... but is a miss, never KV
            puller.pull(handle)
    assert auto.shm.checksum_failures >= 1  # type: ignore[attr-defined]
    member.release(first.lease_id)
    member.release(handle.lease_id)


def test_pinned_twin_of_the_same_kv_is_handed_off_as_stored(
    node: StoreServer, member: KVStoreClient, clean: None
) -> None:
    """Two prefill workers prefilling one prompt (a re-dispatched request) write the same keys
    with KV that differs in its last bits; the first one's blocks are pinned by its lease. The
    second worker's handle carries the stored bytes' checksums: its decode worker gets the
    stored KV (equivalent: as a prefix-cache hit), not a checksum miss on every pull."""
    hs = prompt_keys(3, salt="twin")
    blocks = kv_blocks(3, seed=4)
    twin = blocks + 1e-4 * torch.randn_like(blocks)  # the other worker's rounding
    first = member.put_blocks(L, hs, [tensor_bytes(b) for b in twin], lease_ttl_s=30)  # pinned
    publisher = StorePublisher(member)
    handle = publisher.publish(export(hs, blocks), L, 30.0)
    assert (publisher.conflicts_kept, publisher.conflicts_adopted) == (3, 3)
    assert handle.block_checksums == tuple(block_checksum(tensor_bytes(b)) for b in twin)
    for transport in (AutoTransport(node.store.location.host_id), GrpcTransport()):
        out = StorePuller(transport).pull(handle)
        assert torch.equal(out, twin) and torch.allclose(out, blocks, atol=1e-3)
    member.release(first.lease_id)
    member.release(handle.lease_id)


# ------------------------------------------------------------------ lease exhaustion


def test_a_lease_taken_for_a_tenant_counts_against_its_quota(
    node: StoreServer, member: KVStoreClient, clean: None
) -> None:
    """The router re-leases a handoff's blocks after a lost decode worker for the request's
    tenant (KVStoreClient.lease(owner=...)), not for itself."""
    from kv_store.auth import tenant_owner

    hs = prompt_keys(9, salt="relet")
    member.put_blocks(L, hs, [os.urandom(L.block_nbytes) for _ in hs])
    g = member.lease(hs[:8], ttl_s=30, owner=tenant_owner("acme"))
    with pytest.raises(ResourceExhaustedError, match="acme"):
        member.lease(hs[8:], ttl_s=30, owner=tenant_owner("acme"))
    other = member.lease(hs[8:], ttl_s=30)  # the caller's own quota is apart
    member.release(g.lease_id)
    member.release(other.lease_id)


def test_long_leases_cannot_fill_the_store(node: StoreServer, member: KVStoreClient, clean: None) -> None:
    hs = prompt_keys(12)  # capacity 16; default quota per owner: 8 leased blocks
    member.put_blocks(L, hs, [os.urandom(L.block_nbytes) for _ in hs])
    refusals0 = member.stats().node.lease_quota_refusals  # the module's node: earlier tests' count
    events0 = integrity_events("lease_quota_refusal") or 0.0
    with KVStoreClient(node.address, timeout_s=10, cluster_token=TOKEN, lease_owner="greedy") as greedy:
        g = greedy.lease(hs[:8], ttl_s=1e9)
        assert g.ttl_s == 60.0 and g.ttl_clamped and g.expires_at_unix_s < time.time() + 61
        with pytest.raises(ResourceExhaustedError, match="lease quota of owner 'greedy'.*at most 8") as ei:
            greedy.lease(hs[8:9], ttl_s=1e9)
        assert 0 < ei.value.retry_after_s <= 60
        with pytest.raises(ResourceExhaustedError, match="quota"):  # also through a leased Put
            greedy.put_blocks(L, prompt_keys(1, "x"), [os.urandom(L.block_nbytes)], lease_ttl_s=1e9)
        put = greedy.put_blocks(L, prompt_keys(1, "y"), [os.urandom(L.block_nbytes)])  # unleased: fine
        assert put.lease_id == ""
    # others still lease and publish: half the store stays theirs
    with KVStoreClient(node.address, timeout_s=10, cluster_token=TOKEN, lease_owner="worker-2") as other:
        o = other.lease(hs[8:12])
        handle = StorePublisher(other).publish(export(prompt_keys(2, "z"), kv_blocks(2, 4)), L, 1e9)
        assert handle.lease_expires_at_unix_s <= time.time() + 61  # the publisher capped its ttl
        other.release(o.lease_id)
        other.release(handle.lease_id)
    st = member.stats().node
    assert st.lease_quota_refusals - refusals0 == 2 and st.lease_ttl_clamps >= 1 and st.num_leases == 1
    assert integrity_events("lease_quota_refusal") - events0 == 2
    member.release(g.lease_id)


# ------------------------------------------------------------------ corrupted arena


def test_flipped_byte_in_the_arena_is_a_miss_on_every_path(
    node: StoreServer, member: KVStoreClient, clean: None
) -> None:
    hs = prompt_keys(2)
    data = [os.urandom(L.block_nbytes) for _ in hs]
    sums = [block_checksum(d) for d in data]
    r = member.put_blocks(L, hs, data, lease_ttl_s=30)
    loc = r.location
    assert loc is not None and len(r.slots) == 2
    node.store.arena.view(r.slots[1])[100] ^= 0x40  # one flipped bit in shared memory
    shm = ShmTransport(my_host_id=loc.host_id)
    try:
        with shm.read_leased(loc, L, r.slots, r.lease_expires_at_unix_s, r.slot_nbytes, sums) as got:
            with pytest.raises(KVChecksumError, match="block 1 failed its checksum"):
                got.copy_into(bytearray(2 * L.block_nbytes))
            with pytest.raises(KVChecksumError):
                _ = got.views
        with pytest.raises(KVChecksumError), shm.fetch(loc, L, hs) as got:  # node's checksums
            _ = got.views
        assert shm.checksum_failures == 3
    finally:
        shm.close()
    with pytest.raises(KVChecksumError, match="does not match the node's checksum"):
        member.get_blocks(L, hs)  # gRPC: verified as it arrives
    with pytest.raises(KVChecksumError):
        GrpcTransport().fetch(loc, L, hs, sums)
    assert member.get_blocks(L, hs[:1]) == data[:1]  # the intact block still reads
    member.release(r.lease_id)


def test_put_bytes_not_matching_their_checksum_are_refused(
    node: StoreServer, member: KVStoreClient, clean: None
) -> None:
    hs = prompt_keys(1)
    good, bad = os.urandom(L.block_nbytes), os.urandom(L.block_nbytes)
    before = member.stats().node.checksum_failures
    with pytest.raises(InvalidRequestError, match="does not match its checksum"):
        member.put_blocks(L, hs, [bad], checksums=[block_checksum(good)])
    st = member.stats().node
    assert st.checksum_failures == before + 1 and st.num_blocks == 0 and st.num_pending == 0
    assert integrity_events("checksum_failure") == st.checksum_failures
