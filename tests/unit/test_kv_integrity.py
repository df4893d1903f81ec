"""KV integrity and access policy without a network: checksums, write-once keys, lease ttl caps and
per-owner quotas (StoreNode, BlockStore), FetchedBlocks verification, the Authorizer."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kv_store import convert
from kv_store.auth import (
    LEASE_OWNER_METADATA_KEY,
    TOKEN_METADATA_KEY,
    AuthConfigError,
    FakeAuthorizer,
    TokenAuthorizer,
    authorizer_for,
    cluster_token_from_env,
    owner_tenant,
    peer_host,
    tenant_owner,
    token_metadata,
)
from kv_store.checksum import (
    KVChecksumError,
    StreamingChecksum,
    block_checksum,
    check_checksum_list,
    verify_blocks,
)
from kv_store.dist_transport import ACCEPT, REJECT_CHECKSUM, DistBlockReceiver, TransferHeader
from kv_store.handle import BlockLocation, KVHandle
from kv_store.layout import KVLayout
from kv_store.node import NodeConfig, StoreNode
from kv_store.store import BlockStore, StoreConfig
from kv_store.tensors import tensor_bytes
from kv_store.transport import FakeTransport, FetchedBlocks
from kv_store.wire import decode_get_chunk, encode_chunk
from pdserve.errors import InvalidRequestError, RequestNotFoundError, ResourceExhaustedError
from pdserve.v1 import kv_store_pb2
from prefill_worker.publisher import capped_lease_ttl

L = KVLayout("m", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", block_size=1)  # 64 B


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def node(capacity: int = 4, quota: int | None = None) -> tuple[StoreNode, Clock]:
    clock = Clock()
    cfg = NodeConfig(
        capacity, 64, default_lease_ttl_s=5, max_lease_ttl_s=60, max_leased_blocks_per_owner=quota
    )
    return StoreNode(cfg, clock=clock), clock


def put(n: StoreNode, i: int, checksum: int) -> None:
    n.commit_put(n.begin_put(h(i), checksum))


# ------------------------------------------------------------------ checksums


def test_checksum_is_xxh3_of_the_bytes_and_streams_equal_whole() -> None:
    data = os.urandom(3000)
    s = StreamingChecksum()
    for off in range(0, len(data), 1000):
        s.update(memoryview(data)[off : off + 1000])
    assert s.value() == block_checksum(data) == block_checksum(memoryview(bytearray(data)))
    flipped = bytearray(data)
    flipped[1234] ^= 0x01
    assert block_checksum(flipped) != block_checksum(data)  # one flipped bit is caught


def test_checksum_lists_are_validated() -> None:
    assert check_checksum_list([], 3, "x") == ()
    assert check_checksum_list([1, 2], 2, "x") == (1, 2)
    with pytest.raises(InvalidRequestError, match="2 checksums for 3 blocks"):
        check_checksum_list([1, 2], 3, "x")
    with pytest.raises(InvalidRequestError, match="unsigned 64-bit"):
        check_checksum_list([-1], 1, "x")
    with pytest.raises(KVChecksumError, match="block 1 failed its checksum") as ei:
        verify_blocks([b"a", b"b"], [block_checksum(b"a"), block_checksum(b"a")], "test read")
    assert isinstance(ei.value, RequestNotFoundError)  # a miss: NOT_FOUND


def test_handle_carries_checksums_through_proto() -> None:
    loc = BlockLocation("n", "a:1")
    hs = (h(1), h(2))
    handle = KVHandle("r", hs, (loc, loc), L, 2, block_checksums=(7, 2**64 - 1))
    assert convert.handle_from_proto(convert.handle_to_proto(handle)) == handle
    with pytest.raises(InvalidRequestError, match="1 checksums for 2 blocks"):
        KVHandle("r", hs, (loc, loc), L, 2, block_checksums=(7,))


def test_get_chunk_checksum_survives_the_hand_encoding() -> None:
    header = kv_store_pb2.GetChunk(block_index=0, block_hash=h(1), total_bytes=64, checksum=2**63 + 5)
    raw = encode_chunk(header, b"x" * 64)
    view = decode_get_chunk(raw)
    assert view.checksum == 2**63 + 5 and bytes(view.data) == b"x" * 64
    assert kv_store_pb2.GetChunk.FromString(raw).checksum == 2**63 + 5


# ------------------------------------------------------------------ write-once keys


def test_same_checksum_is_a_dedup_other_checksum_a_conflict_never_a_write() -> None:
    n, _ = node()
    put(n, 1, 111)
    again = n.begin_put(h(1), 111)
    assert (again.is_new, again.conflict) == (False, False)
    clash = n.begin_put(h(1), 222)
    assert (clash.is_new, clash.conflict) == (False, True)
    n.commit_put(clash)  # a no-op: nothing was written
    assert n.checksum_of(h(1)) == 111
    st = n.stats()
    assert (st.put_dedups, st.put_conflicts, st.puts) == (1, 1, 1)
    # an in-flight key conflicts too
    pending = n.begin_put(h(2), 5)
    assert n.begin_put(h(2), 6).conflict and n.checksum_of(h(2)) is None
    n.commit_put(pending)
    assert n.checksum_of(h(2)) == 5
    # only a delete frees the key for other bytes
    assert n.delete([h(1)]).deleted == (h(1),)
    put(n, 1, 222)
    assert n.checksum_of(h(1)) == 222


def test_block_store_verifies_written_bytes_and_keeps_the_first_ones() -> None:
    with BlockStore(StoreConfig("s", L, capacity_blocks=4, use_shm=False)) as store:
        good, junk = os.urandom(64), os.urandom(64)
        assert store.put_block(h(1), junk) is True  # first writer wins the key
        assert store.put_block(h(1), good) is False  # write-once: ignored
        assert store.get_block(h(1)) == junk and store.checksum_of(h(1)) == block_checksum(junk)
        assert store.stats().node.put_conflicts == 1
        # bytes that do not match the writer's checksum are refused and nothing is stored
        with pytest.raises(InvalidRequestError, match="does not match its checksum"):
            store.put_block(h(2), good, checksum=block_checksum(junk))
        assert store.exists([h(2)]) == [False]
        assert store.stats().node.checksum_failures == 1
        assert store.stats().node.num_pending == 0
        assert store.put_block(h(2), good, checksum=block_checksum(good)) is True
        assert store.checksums([h(2)]) == [block_checksum(good)]
        grant = store.lease([h(1), h(2)], 1.0, owner="t")
        assert grant.checksums == (block_checksum(junk), block_checksum(good))


# ------------------------------------------------------------------ leases: ttl cap, quotas


def test_lease_ttl_is_clamped_and_reported() -> None:
    n, clock = node()
    put(n, 1, 1)
    lease = n.lease([h(1)], ttl_s=10**9, owner="a")
    assert (lease.ttl_s, lease.ttl_clamped, lease.owner) == (60, True, "a")
    assert lease.expires_at == clock.t + 60
    assert n.stats().lease_ttl_clamps == 1


def test_owner_quota_refuses_more_but_others_still_lease() -> None:
    n, clock = node(capacity=4)  # default quota: half the capacity = 2
    assert n.config.owner_quota_blocks == 2
    for i in range(4):
        put(n, i, i + 1)
    n.lease([h(0), h(1)], ttl_s=1e9, owner="greedy")
    with pytest.raises(ResourceExhaustedError, match="lease quota of owner 'greedy'.*at most 2") as ei:
        n.lease([h(2)], owner="greedy")
    assert ei.value.retry_after_s == pytest.approx(60)  # its own leases' expiry (clamped ttl)
    other = n.lease([h(2), h(3)], owner="polite")  # another owner is not affected
    assert n.stats().lease_quota_refusals == 1
    n.release(other.lease_id)
    # a Put under a lease counts block by block
    lid = n.lease([], owner="greedy").lease_id
    t = n.begin_put(h(9), 9)
    with pytest.raises(ResourceExhaustedError, match="quota"):
        n.add_to_lease(lid, h(9))
    n.abort_put(t)
    clock.t += 61  # the greedy owner's leases ran out (at most the max ttl): the quota frees itself
    assert n.lease([h(0), h(1)], owner="greedy").ttl_s == 5


def test_tenant_quota_is_per_tenant_and_apart_from_caller_identities() -> None:
    clock = Clock()
    cfg = NodeConfig(8, 64, default_lease_ttl_s=5, max_lease_ttl_s=60, max_leased_blocks_per_tenant=3)
    n = StoreNode(cfg, clock=clock)
    assert (cfg.tenant_quota_blocks, cfg.owner_quota_blocks) == (3, 4)
    for i in range(8):
        put(n, i, i + 1)
    a = tenant_owner("acme")
    n.lease([h(0), h(1), h(2)], ttl_s=1e9, owner=a)  # tenant acme pins its whole quota
    with pytest.raises(
        ResourceExhaustedError, match="lease quota of tenant 'acme'.*at most 3 .max_leased_blocks_per_tenant"
    ):
        n.lease([h(3)], owner=a)
    # other tenants, and a caller identity spelled like the tenant, have quotas of their own
    n.lease([h(3), h(4), h(5)], owner=tenant_owner("bob"))
    n.lease([h(6), h(7)], owner="acme")  # an owner that is not a tenant: the owner quota (4)
    with pytest.raises(ResourceExhaustedError, match="lease quota of tenant '<anonymous>'"):
        n.lease([h(0), h(1), h(2), h(3)], owner=tenant_owner(""))  # dev mode without a tenant
    assert owner_tenant(a) == "acme" and owner_tenant("127.0.0.1") is None
    with pytest.raises(InvalidRequestError, match="lease owner"):
        tenant_owner("x" * 200)


def test_prefill_lease_ttl_is_capped() -> None:
    assert capped_lease_ttl(10**9, 60.0) == 60.0
    assert capped_lease_ttl(5.0, 60.0) == 5.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidRequestError, match="lease_ttl_s"):
            capped_lease_ttl(bad, 60.0)


# ------------------------------------------------------------------ readers verify


def test_fetched_blocks_verify_views_and_copies() -> None:
    a, b = bytearray(os.urandom(64)), bytearray(os.urandom(64))
    sums = [block_checksum(a), block_checksum(b)]
    ok = FetchedBlocks([memoryview(a), memoryview(b)], checksums=sums)
    out = bytearray(128)
    ok.copy_into(out)
    assert bytes(out) == bytes(a + b) and [bytes(v) for v in ok.views] == [bytes(a), bytes(b)]
    b[5] ^= 0xFF  # corrupted source
    misses: list[int] = []
    bad = FetchedBlocks([memoryview(a), memoryview(b)], checksums=sums, on_mismatch=lambda: misses.append(1))
    with pytest.raises(KVChecksumError, match="block 1 failed"):
        bad.copy_into(bytearray(128))
    with pytest.raises(KVChecksumError):
        _ = bad.views
    assert len(misses) == 2


def test_fake_transport_verifies_expected_checksums() -> None:
    fake = FakeTransport()
    data = os.urandom(L.block_nbytes)
    fake.put("n", h(1), data)
    loc = BlockLocation("n")
    with fake.fetch(loc, L, [h(1)], [block_checksum(data)]) as got:
        assert bytes(got.views[0]) == data
    with pytest.raises(KVChecksumError), fake.fetch(loc, L, [h(1)], [block_checksum(b"other")]) as got:
        _ = got.views


# ------------------------------------------------------------------ who may call


def _ctx(md: dict[str, str], peer: str = "ipv4:10.0.0.7:5555") -> SimpleNamespace:
    return SimpleNamespace(invocation_metadata=lambda: tuple(md.items()), peer=lambda: peer)


def test_token_authorizer() -> None:
    auth = TokenAuthorizer("s3cret")
    assert auth.authorize(_ctx({TOKEN_METADATA_KEY: "s3cret"})).allowed
    missing = auth.authorize(_ctx({}))
    assert not missing.allowed and "no cluster token" in missing.reason and missing.identity == "10.0.0.7"
    assert not auth.authorize(_ctx({TOKEN_METADATA_KEY: "s3cret!"})).allowed
    assert "s3cret" not in repr(auth)
    assert TokenAuthorizer("").authorize(_ctx({})).allowed  # dev mode
    assert peer_host(_ctx({}, "ipv6:[::1]:80")) == "::1"


def test_dev_mode_only_on_loopback() -> None:
    assert authorizer_for("127.0.0.1", "").authorize(_ctx({})).allowed
    assert authorizer_for("localhost", "").token == ""
    with pytest.raises(AuthConfigError, match="without a cluster token"):
        authorizer_for("0.0.0.0", "")
    assert authorizer_for("0.0.0.0", "t").token == "t"


def test_token_from_env_and_metadata(tmp_path) -> None:
    f = tmp_path / "tok"
    f.write_text(" abc \n")
    assert (
        cluster_token_from_env({"PDSERVE_CLUSTER_TOKEN_FILE": str(f), "PDSERVE_CLUSTER_TOKEN": "x"}) == "abc"
    )
    assert cluster_token_from_env({"PDSERVE_CLUSTER_TOKEN": " x "}) == "x"
    assert cluster_token_from_env({}) == ""
    with pytest.raises(AuthConfigError, match="cannot read"):
        cluster_token_from_env({"PDSERVE_CLUSTER_TOKEN_FILE": str(tmp_path / "nope")})
    assert token_metadata("t", "tenant-a") == (
        (TOKEN_METADATA_KEY, "t"),
        (LEASE_OWNER_METADATA_KEY, "tenant-a"),
    )
    assert token_metadata("", "") == ()


def test_fake_authorizer_records_decisions() -> None:
    fake = FakeAuthorizer(allow=lambda md: md.get("who") == "worker")
    assert fake.authorize(_ctx({"who": "worker"})).allowed
    assert not fake.authorize(_ctx({})).allowed
    assert fake.calls == [True, False]


# ------------------------------------------------------------------ direct (gloo) transfers


class _ScriptedReceiver(DistBlockReceiver):
    """A receiver whose peer is a script: ``_recv`` fills the header, then the payload bytes."""

    def __init__(self, header: bytes, payload: bytes) -> None:
        super().__init__(torch.device("cpu"))
        self._incoming = [header, payload]
        self.replies: list[int] = []

    def _recv(self, t: torch.Tensor, src: int) -> None:
        data = self._incoming.pop(0)
        t.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def _reply(self, code: int, dst: int) -> None:
        self.replies.append(code)


def test_direct_transfer_header_carries_the_payload_checksum() -> None:
    blocks = torch.randn((2, 1, 2, 2, 1, 4))
    header = TransferHeader("r", blocks.dtype, tuple(blocks.shape), block_checksum(tensor_bytes(blocks)))
    assert TransferHeader.decode(header.encode()) == header
    unchecked = TransferHeader("r", blocks.dtype, tuple(blocks.shape))  # CUDA tensors: none computed
    assert TransferHeader.decode(unchecked.encode()).checksum is None
    payload = bytes(tensor_bytes(blocks))
    ok = _ScriptedReceiver(header.encode(), payload)
    out = torch.empty_like(blocks)
    ok.recv_into(0, out)
    assert torch.equal(out, blocks) and ok.replies == [ACCEPT]
    corrupted = bytearray(payload)
    corrupted[17] ^= 0x10  # one bit flipped in transit
    bad = _ScriptedReceiver(header.encode(), bytes(corrupted))
    with pytest.raises(KVChecksumError, match="do not match the sender's"):
        bad.recv_into(0, torch.empty_like(blocks))
    assert bad.replies == [REJECT_CHECKSUM]  # the sender is told, and raises the same
