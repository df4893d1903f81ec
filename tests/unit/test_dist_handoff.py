"""Direct prefill -> decode handoff, in process with fakes: the KVHandle dist fields (validation,
proto round trip), the prefill outbox (TTL, capacity), DistPublisher, the KVPeer servicer and
DistPuller wired to each other through a fake transfer pipe (no torch.distributed here; the
real gloo path is tests/integration/test_dist_worker_path.py)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from decode_worker.dist_puller import DistPuller
from decode_worker.spill_puller import SpillPuller
from engine.block_hash import chain_hashes
from engine.llm_engine import KVExport
from engine.model_runner import KVShape
from kv_store import convert
from kv_store.dist_transport import TransferHeader
from kv_store.handle import BlockLocation, KVHandle, dist_location
from kv_store.layout import KVLayout
from pdserve.errors import (
    InvalidRequestError,
    PdserveError,
    RequestNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from pdserve.status import status_for
from pdserve.v1 import worker_pb2
from prefill_worker.dist_outbox import DistOutbox, DistPublisher, KVPeerServicer

L = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)  # 1 KiB
BLOCK_BYTES = L.block_nbytes


def hashes(n: int, salt: str = "") -> list[bytes]:
    return chain_hashes(list(range(n * L.block_size)), L.block_size, "m", salt=salt)


def export(n_blocks: int, rid: str = "r1", seed: int = 0) -> KVExport:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn((n_blocks, *L.block_shape), generator=g, dtype=torch.float32)
    shape = KVShape(L.num_layers, L.num_kv_heads, L.head_dim, L.block_size, torch.float32)
    ntok = n_blocks * L.block_size - 1  # last block partial
    return KVExport(rid, "m", list(range(ntok)), 0, hashes(n_blocks, rid), blocks, shape)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeGroup:
    def __init__(self, rank: int, world_size: int = 3, failed: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device("cpu")
        self._failed = failed

    @property
    def failed(self) -> bool:
        return self._failed

    def wait_ready(self, timeout_s: float) -> torch.device:
        if self._failed:
            raise UnavailableError("process group failed to form")
        return self.device


class Pipe:
    """Fake transport between one sender and one receiver: what is sent is received, in order."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[int, int, str, torch.Tensor]] = queue.Queue()
        self.sent = 0

    def send(self, dst: int, request_id: str, blocks: torch.Tensor) -> TransferHeader:
        self.q.put((0, dst, request_id, blocks.clone()))
        self.sent += 1
        return TransferHeader(request_id, blocks.dtype, tuple(blocks.shape))

    def recv_into(self, src: int, out: torch.Tensor) -> TransferHeader:
        _src, _dst, rid, blocks = self.q.get(timeout=10)
        out[: blocks.shape[0]] = blocks
        return TransferHeader(rid, blocks.dtype, tuple(blocks.shape))


class FakeRpcError(grpc.RpcError):
    def __init__(self, exc: BaseException) -> None:
        st = status_for(exc)
        self._st = st

    def code(self) -> grpc.StatusCode:
        return self._st.code

    def details(self) -> str:
        return self._st.details

    def trailing_metadata(self) -> tuple:
        return self._st.metadata


class FakeCall:
    """A server stream as a client sees it: the servicer generator runs on its own thread."""

    def __init__(self, gen: Iterator[Any]) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        self.cancelled = False

        def run() -> None:
            try:
                for m in gen:
                    self.q.put(m)
            except PdserveError as e:
                self.q.put(FakeRpcError(e))
            self.q.put(StopIteration())

        threading.Thread(target=run, daemon=True).start()

    def __iter__(self) -> FakeCall:
        return self

    def __next__(self) -> Any:
        m = self.q.get(timeout=10)
        if isinstance(m, BaseException):
            raise m
        return m

    def cancel(self) -> None:
        self.cancelled = True


class FakeStub:
    def __init__(self, servicer: KVPeerServicer) -> None:
        self.servicer = servicer
        self.calls: list[worker_pb2.PushKVRequest] = []

    def PushKV(self, request: worker_pb2.PushKVRequest, timeout: float | None = None) -> FakeCall:
        self.calls.append(request)
        return FakeCall(self.servicer.push_kv(request))


class FakeFallback:
    """Store-path puller/publisher stand-in."""

    def __init__(self) -> None:
        self.pulled: list[str] = []
        self.released: list[str] = []
        self.published: list[str] = []
        self.tenants: list[str] = []  # whom each published store lease is charged to
        self.transport = object()

    def pull(self, handle: KVHandle) -> torch.Tensor:
        self.pulled.append(handle.request_id)
        return torch.zeros((len(handle.block_hashes), *handle.layout.block_shape))

    def release(self, handle: KVHandle) -> None:
        self.released.append(handle.request_id)

    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float, tenant: str = "") -> KVHandle:
        self.published.append(kv.request_id)
        self.tenants.append(tenant)
        loc = BlockLocation("kv0", "127.0.0.1:1")
        return KVHandle(
            kv.request_id,
            tuple(kv.block_hashes),
            (loc,) * len(kv.block_hashes),
            layout,
            len(kv.token_ids),
            lease_id="lease-1",
        )


# ------------------------------------------------------------------ handle fields


def test_direct_handle_round_trip_and_validation() -> None:
    hs = hashes(3)
    loc = dist_location(1, "127.0.0.1:7001")
    assert loc == BlockLocation("dist-rank-1", "127.0.0.1:7001")
    h = KVHandle("r1", tuple(hs), (loc,) * 3, L, num_tokens=10, dist_address="127.0.0.1:7001", dist_rank=1)
    assert h.is_direct
    msg = convert.handle_to_proto(h)
    assert msg.dist_address == "127.0.0.1:7001" and msg.dist_rank == 1
    assert convert.handle_from_proto(msg) == h
    # a store handle keeps the defaults, also through the proto
    s = KVHandle("r1", tuple(hs), (BlockLocation("kv0", "a:1"),) * 3, L, num_tokens=10, lease_id="l")
    assert not s.is_direct and s.dist_rank == 0
    assert convert.handle_from_proto(convert.handle_to_proto(s)) == s
    with pytest.raises(InvalidRequestError, match="no store lease"):
        KVHandle("r1", tuple(hs), (loc,) * 3, L, 10, lease_id="l", dist_address="a:1", dist_rank=1)
    with pytest.raises(InvalidRequestError, match="without dist_address"):
        KVHandle("r1", tuple(hs), (loc,) * 3, L, 10, dist_rank=2)
    with pytest.raises(InvalidRequestError, match="dist_rank must be >= 0"):
        KVHandle("r1", tuple(hs), (loc,) * 3, L, 10, dist_address="a:1", dist_rank=-1)
    bad = convert.handle_to_proto(h)
    bad.lease_id = "x"
    with pytest.raises(InvalidRequestError):
        convert.handle_from_proto(bad)


# ------------------------------------------------------------------ outbox


def test_outbox_ttl_expires_entries_and_counts_them() -> None:
    clock = Clock()
    ob = DistOutbox(10 * BLOCK_BYTES, clock=clock)
    ob.put("a", export(2).blocks, ttl_s=5)
    ob.put("b", export(1).blocks, ttl_s=50)
    assert "a" in ob and ob.stats().bytes == 3 * BLOCK_BYTES
    clock.t += 6
    assert "a" not in ob
    assert ob.take("a") is None
    st = ob.stats()
    assert (st.entries, st.bytes, st.expired, st.taken) == (1, BLOCK_BYTES, 1, 0)
    got = ob.take("b")
    assert got is not None and got.shape[0] == 1
    assert ob.take("b") is None  # taken once
    clock.t += 100
    assert ob.sweep() == 0
    st = ob.stats()
    assert (st.entries, st.bytes, st.puts, st.taken, st.expired) == (0, 0, 2, 1, 1)
    with pytest.raises(InvalidRequestError, match="TTL"):
        ob.put("c", export(1).blocks, ttl_s=0)


def test_outbox_sweep_frees_memory_without_traffic() -> None:
    clock = Clock()
    ob = DistOutbox(10 * BLOCK_BYTES, clock=clock)
    ob.put("a", export(2).blocks, ttl_s=1)
    clock.t += 2
    assert ob.sweep() == 1
    assert ob.stats().bytes == 0
    real = DistOutbox(10 * BLOCK_BYTES)
    real.put("x", export(1).blocks, ttl_s=0.05)
    real.start_sweeper(interval_s=0.02)
    try:
        for _ in range(200):
            if real.stats().expired == 1:
                break
            threading.Event().wait(0.01)
        assert real.stats().expired == 1 and real.stats().bytes == 0
    finally:
        real.close()


def test_outbox_capacity_evicts_oldest_and_refuses_oversized() -> None:
    clock = Clock()
    ob = DistOutbox(4 * BLOCK_BYTES, clock=clock)
    ob.put("a", export(2).blocks, ttl_s=60)
    ob.put("b", export(1).blocks, ttl_s=60)
    ob.put("c", export(2).blocks, ttl_s=60)  # needs 5 blocks: "a" (oldest) goes
    assert "a" not in ob and "b" in ob and "c" in ob
    st = ob.stats()
    assert (st.evicted, st.bytes, st.entries) == (1, 3 * BLOCK_BYTES, 2)
    ob.put("b", export(1, seed=9).blocks, ttl_s=60)  # replaces b, no eviction
    assert ob.stats().replaced == 1 and ob.stats().bytes == 3 * BLOCK_BYTES
    with pytest.raises(ResourceExhaustedError, match="--dist-outbox-bytes"):
        ob.put("huge", export(5).blocks, ttl_s=60)
    assert ob.stats().entries == 2  # nothing dropped for a refused entry
    with pytest.raises(ValueError):
        DistOutbox(0)


# ------------------------------------------------------------------ publisher


def test_dist_publisher_returns_direct_handle_and_falls_back() -> None:
    ob = DistOutbox(4 * BLOCK_BYTES)
    fb = FakeFallback()
    pub = DistPublisher(ob, FakeGroup(0), lambda: "127.0.0.1:7001", fallback=fb)  # type: ignore[arg-type]
    kv = export(3, "r1")
    h = pub.publish(kv, L, 30.0)
    assert h.is_direct and h.dist_rank == 0 and h.dist_address == "127.0.0.1:7001"
    assert h.lease_id == "" and h.shm_slots == ()
    assert h.locations == (BlockLocation("dist-rank-0", "127.0.0.1:7001"),) * 3
    assert h.block_hashes == tuple(kv.block_hashes) and h.num_tokens == len(kv.token_ids)
    assert "r1" in ob and fb.published == []
    # too big for the whole outbox: the store takes it
    h2 = pub.publish(export(5, "big"), L, 30.0, "acme")
    assert not h2.is_direct and fb.published == ["big"] and pub.fallbacks == 1
    assert fb.tenants == ["acme"]  # the store lease is charged to the request's tenant
    # the group failed: the store takes everything
    pub_failed = DistPublisher(ob, FakeGroup(0, failed=True), lambda: "a:1", fallback=fb)  # type: ignore[arg-type]
    assert not pub_failed.publish(export(1, "r2"), L, 30.0).is_direct
    # no fallback: a clear error
    bare = DistPublisher(ob, FakeGroup(0), lambda: "a:1")  # type: ignore[arg-type]
    with pytest.raises(ResourceExhaustedError):
        bare.publish(export(5, "big"), L, 30.0)
    with pytest.raises(InvalidRequestError, match="at most"):
        bare.publish(export(1, "x" * 300), L, 30.0)  # request id too long for the header


# ------------------------------------------------------------------ servicer + puller


def _wired(ttl_s: float = 30.0, clock: Clock | None = None):
    ob = DistOutbox(64 * BLOCK_BYTES, clock=clock or Clock())
    pipe = Pipe()
    pre = FakeGroup(0)
    pub = DistPublisher(ob, pre, lambda: "127.0.0.1:7001")  # type: ignore[arg-type]
    peer = KVPeerServicer(ob, pre, sender=pipe)  # type: ignore[arg-type]
    stub = FakeStub(peer)
    fb = FakeFallback()
    puller = DistPuller(FakeGroup(1), fb, stub_for=lambda addr: stub, receiver=pipe)  # type: ignore[arg-type]
    return ob, pipe, pub, peer, stub, fb, puller


def test_push_pull_moves_the_blocks_and_empties_the_outbox() -> None:
    ob, pipe, pub, peer, stub, fb, puller = _wired()
    kvs = [export(n, f"r{n}", seed=n) for n in (1, 3, 2)]
    handles = [pub.publish(kv, L, 30.0) for kv in kvs]
    for kv, h in zip(kvs, handles, strict=True):
        got = puller.pull(h)
        assert torch.equal(got, kv.blocks)
        puller.release(h)  # passed on: the fallback has nothing to release for it
    assert [c.dst_rank for c in stub.calls] == [1, 1, 1]
    assert ob.stats().entries == 0 and ob.stats().taken == 3
    assert peer.pushes == 3 and puller.direct_pulls == 3
    assert fb.pulled == [] and fb.released == ["r1", "r3", "r2"]
    assert puller.transport is fb.transport


def test_store_handles_go_to_the_fallback() -> None:
    *_, fb, puller = _wired()
    loc = BlockLocation("kv0", "127.0.0.1:1")
    h = KVHandle("s1", tuple(hashes(2)), (loc,) * 2, L, 7, lease_id="l1")
    assert puller.pull(h).shape == (2, *L.block_shape)
    puller.release(h)
    assert fb.pulled == ["s1"] and fb.released == ["s1"]


def test_expired_entry_gives_not_found_and_leaves_the_pair_in_step() -> None:
    clock = Clock()
    ob, pipe, pub, peer, stub, fb, puller = _wired(clock=clock)
    h_old = pub.publish(export(2, "old"), L, 5.0)
    clock.t += 10  # the decode worker comes too late
    with pytest.raises(RequestNotFoundError, match="expired .*submit the request again"):
        puller.pull(h_old)
    assert ob.stats().expired == 1 and pipe.sent == 0 and pipe.q.empty()
    assert puller.direct_failures == 1
    puller.release(h_old)  # never pulled: release must not crash (the TTL cleaned up)
    # the next transfer between the pair works
    kv = export(1, "new", seed=3)
    assert torch.equal(puller.pull(pub.publish(kv, L, 5.0)), kv.blocks)
    # pushed already: NOT_FOUND too
    h = pub.publish(export(1, "twice"), L, 5.0)
    puller.pull(h)
    with pytest.raises(RequestNotFoundError):
        puller.pull(h)


def test_stale_transfer_is_discarded() -> None:
    ob, pipe, pub, peer, stub, fb, puller = _wired()
    stale = export(2, "stale", seed=1)
    pipe.send(1, "stale", stale.blocks)  # left over by a pull that gave up after ACCEPTED
    kv = export(2, "fresh", seed=2)
    assert torch.equal(puller.pull(pub.publish(kv, L, 30.0)), kv.blocks)
    assert puller.stale_discarded == 1


def test_push_rejects_bad_ranks_and_unready_group() -> None:
    ob = DistOutbox(8 * BLOCK_BYTES)
    peer = KVPeerServicer(ob, FakeGroup(0, world_size=2), sender=Pipe())  # type: ignore[arg-type]
    for dst in (0, 2, -1):
        with pytest.raises(InvalidRequestError, match="dst_rank"):
            list(peer.push_kv(worker_pb2.PushKVRequest(request_id="r", dst_rank=dst)))
    with pytest.raises(RequestNotFoundError, match="expired"):
        list(peer.push_kv(worker_pb2.PushKVRequest(request_id="r", dst_rank=1)))
    failed = KVPeerServicer(ob, FakeGroup(0, 2, failed=True), sender=Pipe())  # type: ignore[arg-type]
    ob.put("r", export(1).blocks, 30)
    with pytest.raises(UnavailableError, match="failed to form"):
        list(failed.push_kv(worker_pb2.PushKVRequest(request_id="r", dst_rank=1)))
    assert "r" in ob  # not taken: nothing was promised to the receiver
    # the puller refuses a handle naming its own rank or a rank outside the group
    puller = DistPuller(FakeGroup(1, 2), FakeFallback(), stub_for=lambda a: None, receiver=Pipe())  # type: ignore[arg-type]
    for rank in (1, 5):
        h = KVHandle(
            "r", tuple(hashes(1)), (dist_location(rank, "a:1"),), L, 3, dist_address="a:1", dist_rank=rank
        )
        with pytest.raises(InvalidRequestError, match="not another rank"):
            puller.pull(h)


# ------------------------------------------------------------------ worker flags and group


def test_dist_flags_parse_and_validate() -> None:
    from pdserve.worker_main import DistBackend, DistOptions, parse_dist_args

    opts, rest = parse_dist_args(
        [
            "--model",
            "m",
            "--dist-init",
            "tcp://127.0.0.1:5",
            "--dist-rank",
            "1",
            "--dist-world",
            "3",
            "--dist-backend",
            "nccl",
            "--port",
            "0",
        ]
    )
    assert rest == ["--model", "m", "--port", "0"]
    assert opts == DistOptions("tcp://127.0.0.1:5", 1, 3, DistBackend.NCCL)
    assert opts.dist_config().backend == "nccl" and opts.dist_config().world_size == 3
    assert parse_dist_args(["--model", "m"]) == (None, ["--model", "m"])
    with pytest.raises(SystemExit):
        parse_dist_args(["--dist-init", "tcp://127.0.0.1:5", "--dist-rank", "0"])  # no world
    with pytest.raises(SystemExit):
        parse_dist_args(["--dist-init", "tcp://127.0.0.1:5", "--dist-rank", "3", "--dist-world", "3"])
    with pytest.raises(ValueError, match="init_method"):
        DistOptions("127.0.0.1:5", 0, 2)
    with pytest.raises(ValueError):
        DistOptions("tcp://127.0.0.1:5", 0, 2, backend="mpi")  # type: ignore[arg-type]


def test_dist_group_that_cannot_form_reports_a_clear_error() -> None:
    import socket

    from pdserve.worker_main import DistGroup, DistOptions

    with socket.socket() as s:  # a port nobody listens on: rank 1 never reaches rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = DistGroup(DistOptions(f"tcp://127.0.0.1:{port}", 1, 2, timeout_s=1.0))
    assert g.device == torch.device("cpu") and not g.failed
    with pytest.raises(UnavailableError, match="not formed after"):
        g.wait_ready(0.01)  # not started: times out
    g.start()
    with pytest.raises(UnavailableError, match="failed to form"):
        g.wait_ready(60)
    assert g.failed and not g.ready


# ------------------------------------------------------------------ spill (decode worker outside the group)


class SpillStub:
    """KVPeer stub calling the servicer's SpillKV in process; its errors as gRPC errors."""

    def __init__(self, servicer: KVPeerServicer) -> None:
        self.servicer = servicer
        self.calls: list[str] = []

    def SpillKV(self, request: worker_pb2.SpillKVRequest, timeout: float | None = None) -> Any:
        self.calls.append(request.request_id)
        try:
            return self.servicer.SpillKV(request, None)  # type: ignore[arg-type]
        except PdserveError as e:
            raise FakeRpcError(e) from None


class RecordingStore(FakeFallback):
    """Publisher + puller of a fake store: what was published is what is pulled back."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[str, torch.Tensor] = {}

    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float, tenant: str = "") -> KVHandle:
        self.blocks[kv.request_id] = kv.blocks.clone()
        return super().publish(kv, layout, lease_ttl_s, tenant)

    def pull(self, handle: KVHandle) -> torch.Tensor:
        self.pulled.append(handle.request_id)
        assert handle.lease_id == "lease-1" and not handle.is_direct
        return self.blocks[handle.request_id]


def _spill_wired(clock: Clock | None = None):
    ob = DistOutbox(64 * BLOCK_BYTES, clock=clock or Clock())
    store = RecordingStore()
    pre = FakeGroup(0)
    pub = DistPublisher(ob, pre, lambda: "127.0.0.1:7001", fallback=store)  # type: ignore[arg-type]
    peer = KVPeerServicer(ob, pre, sender=Pipe(), spill_to=store)  # type: ignore[arg-type]
    stub = SpillStub(peer)
    return ob, store, pub, peer, stub


def test_spill_puller_pulls_a_direct_handle_through_the_store_and_releases_its_lease() -> None:
    ob, store, pub, peer, stub = _spill_wired()
    puller = SpillPuller(store, stub_for=lambda addr: stub)  # type: ignore[arg-type]
    kv = export(3, "r1", seed=4)
    h = pub.publish(kv, L, 30.0, "acme")
    assert h.is_direct and store.published == []
    got = puller.pull(h)
    assert torch.equal(got, kv.blocks)
    assert stub.calls == ["r1"] and store.published == ["r1"] and store.pulled == ["r1"]
    assert store.tenants == ["acme"]  # the spilled lease too is the tenant's
    assert ob.stats().entries == 0 and peer.spills == 1 and puller.spills == 1
    puller.release(h)
    puller.release(h)  # once only
    assert store.released == ["r1"]
    # store handles pass straight through
    s = store.publish(export(1, "s1"), L, 30.0)
    assert torch.equal(puller.pull(s), store.blocks["s1"])
    puller.release(s)
    assert store.released == ["r1", "s1"] and stub.calls == ["r1"]
    # a direct handle never pulled: release does nothing
    puller.release(pub.publish(export(1, "r9"), L, 30.0))
    assert store.released == ["r1", "s1"]


def test_spill_of_an_expired_entry_is_not_found_naming_the_cause() -> None:
    clock = Clock()
    ob, store, pub, _peer, stub = _spill_wired(clock)
    puller = SpillPuller(store, stub_for=lambda addr: stub)  # type: ignore[arg-type]
    h = pub.publish(export(2, "r1"), L, 5.0)
    clock.t += 6
    with pytest.raises(RequestNotFoundError, match="expired"):
        puller.pull(h)
    puller.release(h)
    assert store.published == [] and store.released == []


def test_spill_without_a_store_is_unavailable() -> None:
    ob = DistOutbox(64 * BLOCK_BYTES)
    pre = FakeGroup(0)
    pub = DistPublisher(ob, pre, lambda: "127.0.0.1:7001")  # type: ignore[arg-type]
    peer = KVPeerServicer(ob, pre, sender=Pipe())  # type: ignore[arg-type]
    puller = SpillPuller(FakeFallback(), stub_for=lambda addr: SpillStub(peer))  # type: ignore[arg-type]
    h = pub.publish(export(1, "r1"), L, 30.0)
    with pytest.raises(UnavailableError, match="no store to spill to"):
        puller.pull(h)
    assert "r1" in ob  # refused before the entry was taken
    with pytest.raises(InvalidRequestError, match="request_id"):
        peer.SpillKV(worker_pb2.SpillKVRequest(), None)  # type: ignore[arg-type]


def test_dist_puller_with_a_failed_group_spills_direct_handles() -> None:
    ob, store, pub, _peer, stub = _spill_wired()
    spill = SpillPuller(store, stub_for=lambda addr: stub)  # type: ignore[arg-type]
    puller = DistPuller(FakeGroup(1, failed=True), spill, stub_for=lambda a: pytest.fail("no push"))  # type: ignore[arg-type]
    kv = export(2, "r1", seed=7)
    h = pub.publish(kv, L, 30.0)
    assert torch.equal(puller.pull(h), kv.blocks)
    puller.release(h)
    assert stub.calls == ["r1"] and store.released == ["r1"] and puller.direct_pulls == 0
