"""Live migration's DIST transport (decode_worker/migration_transport.py): each stage waits in the
source's direct-transfer outbox, the destination pulls it through the source's KVPeer service with
its DistPuller, as in the prefill -> decode direct handoff.

Two in-process decode workers over gRPC on 127.0.0.1, with the real outbox, DistPublisher,
KVPeerServicer and DistPuller; only the process group is replaced by an in-process pipe between
the two ranks (one process holds one rank of a real group; the real gloo path between worker
processes is tests/integration/test_migration_gloo.py). Outputs equal an unmigrated run, and every
abort (destination full, destination dying mid-copy, the request finishing or cancelled mid-copy)
leaves no block held on either side and no outbox entry on the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time

import grpc
import pytest
import torch

from decode_worker.dist_puller import DistPuller
from kv_store.dist_transport import TransferHeader
from kv_store.handle import KVHandle
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from prefill_worker.dist_outbox import DistOutbox, DistPublisher, KVPeerServicer, PeerLocks
from router.migration_client import MigrationResult, MigrationTransport, migrate
from tests.test_migration_worker import (
    CALL_S,
    GREEDY,
    LONG,
    SEEDED,
    _decode_req,
    _migrate_after_first_tokens,
    _migrated_run,
    _reference,
    _wait_idle,
)
from tests.workers import InProcDecodeWorker

DIST = MigrationTransport.DIST


class _Group:
    """A rank of a formed process group (CPU device, as with gloo)."""

    def __init__(self, rank: int, world_size: int = 4) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        self.failed = False

    def wait_ready(self, timeout_s: float) -> torch.device:
        return self.device


class _Pipes:
    """The ranks' point-to-point channels, in process: what a send posts, the matching receive
    takes (one queue per ordered pair, as P2P between a pair is ordered); the sender returns once
    the receiver holds the blocks (the dist transport's reply)."""

    def __init__(self) -> None:
        self._q: dict[tuple[int, int], queue.SimpleQueue] = {}
        self._guard = threading.Lock()

    def q(self, src: int, dst: int) -> queue.SimpleQueue:
        with self._guard:
            return self._q.setdefault((src, dst), queue.SimpleQueue())


class _Sender:
    def __init__(self, pipes: _Pipes, me: int) -> None:
        self.pipes, self.me = pipes, me

    def send(self, dst: int, request_id: str, blocks: torch.Tensor) -> TransferHeader:
        header = TransferHeader(request_id, blocks.dtype, tuple(blocks.shape))
        done = threading.Event()
        self.pipes.q(self.me, dst).put((header, blocks.clone(), done))
        if not done.wait(CALL_S):
            raise UnavailableError(f"send to rank {dst}: no receive")
        return header


class _Receiver:
    """Receives from the pipes; ``before(n)`` runs before the n-th receive (0-based): a test's
    hook to slow the copy down or kill the worker mid-copy."""

    def __init__(self, pipes: _Pipes, me: int) -> None:
        self.pipes, self.me = pipes, me
        self.before = lambda n: None
        self.received = 0

    def recv_into(self, src: int, out: torch.Tensor) -> TransferHeader:
        self.before(self.received)
        self.received += 1
        header, blocks, done = self.pipes.q(src, self.me).get(timeout=CALL_S)
        out[: blocks.shape[0]].copy_(blocks)
        done.set()
        return header


class _NoStore:
    """The DistPuller's fallback: every handle here is direct."""

    def pull(self, handle: KVHandle) -> torch.Tensor:
        raise AssertionError(f"a store pull of {handle.request_id!r}: the DIST transport must not use one")

    def release(self, handle: KVHandle) -> None:
        return None


class _DistWorker(InProcDecodeWorker):
    """A decode worker in the (piped) process group: an outbox and KVPeer for its outgoing
    migrations, a DistPuller for incoming ones, under shared peer locks."""

    def __init__(self, path, name: str, blocks: int, rank: int, pipes: _Pipes) -> None:
        super().__init__(path, name, blocks=blocks)
        group = _Group(rank)
        locks = PeerLocks(shared=True)
        self.outbox = DistOutbox(64 << 20)
        self.peer = KVPeerServicer(self.outbox, group, sender=_Sender(pipes, rank), locks=locks)
        self.receiver = _Receiver(pipes, rank)
        self.puller = DistPuller(group, _NoStore(), receiver=self.receiver, timeout_s=CALL_S, locks=locks)
        # the KVPeer service on a server of its own at the worker's address' side: the handle
        # names it (a real worker serves it on its own port next to Worker)
        from pdserve.worker_base import Role
        from pdserve.worker_main import serve_worker

        services = [(worker_pb2.DESCRIPTOR.services_by_name["KVPeer"], self.peer)]
        self.peer_server, port = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, f"{name}-peer")
        peer_address = f"127.0.0.1:{port}"
        self.svc.migration.dist_publisher = DistPublisher(self.outbox, group, lambda: peer_address)
        self.svc.migration.peer_locks = locks
        self.svc.migration.puller = self.puller

    def stop(self) -> None:
        self.peer_server.stop(0)
        super().stop()
        self.puller.close()


@pytest.fixture(scope="module")
def pipes():
    return _Pipes()


@pytest.fixture(scope="module")
def workers(tiny_models, pipes):
    path = tiny_models["llama"]
    a = _DistWorker(path, "dist-a", 64, 0, pipes)
    b = _DistWorker(path, "dist-b", 64, 1, pipes)
    small = _DistWorker(path, "dist-small", 3, 2, pipes)
    yield a, b, small
    for w in (a, b, small):
        w.stop()


def _no_entries(*ws: _DistWorker) -> None:
    for w in ws:
        assert w.outbox.stats().entries == 0, "an outbox entry left behind"


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_dist_transport_output_equals_an_unmigrated_run(workers, params):
    a, b, _ = workers
    ref = asyncio.run(_reference(a, f"dref-{params.temperature}", params))
    pushes, pulls = a.peer.pushes, b.puller.direct_pulls
    out, result, k = asyncio.run(_migrated_run(a, b, f"dmig-{params.temperature}", params, 8, DIST))
    assert result is MigrationResult.MIGRATED and k >= 8
    assert out == ref
    assert a.peer.pushes > pushes and b.puller.direct_pulls - pulls == a.peer.pushes - pushes
    assert a.outbox.stats().taken >= 1
    _no_entries(a, b)
    _wait_idle(a, b)


def test_dist_transport_back_the_other_way(workers):
    """b -> a after a -> b: both directions between one pair of ranks work."""
    a, b, _ = workers
    ref = asyncio.run(_reference(b, "dref-back", GREEDY))
    out, result, _ = asyncio.run(_migrated_run(b, a, "dmig-back", GREEDY, 5, DIST))
    assert result is MigrationResult.MIGRATED and out == ref
    _no_entries(a, b)
    _wait_idle(a, b)


def test_dist_destination_full_aborts_and_leaks_nothing(workers):
    a, _, small = workers
    ref = asyncio.run(_reference(a, "dref-full", GREEDY))
    out, result, _ = asyncio.run(_migrated_run(a, small, "dfull", GREEDY, 4, DIST))
    assert result is MigrationResult.ABORTED_DEST_FULL
    assert out == ref
    _no_entries(a, small)  # the stage the destination could not take was dropped by the source
    _wait_idle(a, small)


def test_dist_destination_failing_mid_copy_aborts_and_leaks_nothing(workers):
    """The destination's receive fails on the second transfer (its side of the group broke, as
    when the process dies mid-copy: the source sees its MigrateIn end UNAVAILABLE)."""
    a, b, _ = workers

    def die(n: int) -> None:
        if n == 1:
            raise UnavailableError("receive from rank 0 failed: the destination is going away")

    b.receiver.before = die
    b.receiver.received = 0
    try:
        ref = asyncio.run(_reference(a, "dref-dying", LONG))
        out, result, _ = asyncio.run(_migrated_run(a, b, "ddying", LONG, 4, DIST))
    finally:
        b.receiver.before = lambda n: None
    assert result is MigrationResult.ABORTED_PEER_DIED
    assert out == ref  # the request finished on the source
    # the failed transfer's bytes were posted by the source before the receive failed: a real
    # pair would then be out of step; here, drop them so the pipe is clean for the next test
    with contextlib.suppress(queue.Empty):
        while True:
            _, _, done = b.receiver.pipes.q(0, 1).get_nowait()
            done.set()
    _no_entries(a, b)
    _wait_idle(a, b)  # the destination freed what the copy had allocated


def _slow(w: _DistWorker, seconds: float) -> None:
    w.receiver.before = lambda n: time.sleep(seconds)


def test_dist_request_finishing_mid_copy_aborts_and_leaks_nothing(workers):
    a, b, _ = workers
    _slow(b, 1.0)  # the copy outlasts the request's remaining tokens
    try:
        short = GREEDY.__class__(max_tokens=24, temperature=0.0, ignore_eos=True)
        ref = asyncio.run(_reference(a, "dref-short", short))
        out, result, _ = asyncio.run(_migrated_run(a, b, "dshort", short, 2, DIST))
        assert result is MigrationResult.ABORTED_SOURCE_FINISHED, result
        assert out == ref
    finally:
        b.receiver.before = lambda n: None
    _no_entries(a, b)
    _wait_idle(a, b)


def test_dist_request_cancelled_mid_copy_aborts_and_leaks_nothing(workers):
    a, b, _ = workers
    started = threading.Event()

    def slow(n: int) -> None:
        started.set()
        time.sleep(1.0)

    b.receiver.before = slow

    async def run() -> MigrationResult:
        async with grpc.aio.insecure_channel(a.address) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            call = stub.Decode(_decode_req("dcancel", LONG), timeout=CALL_S)
            it = call.__aiter__()
            await it.__anext__()
            task = asyncio.create_task(migrate(stub, "dcancel", b.address, max_stages=3, transport=DIST))
            while not started.is_set():
                await asyncio.sleep(0.01)
            call.cancel()  # the client leaves while a stage is in flight
            return (await task).result

    try:
        result = asyncio.run(run())
    finally:
        b.receiver.before = lambda n: None
    assert result in (MigrationResult.ABORTED_CANCELLED, MigrationResult.ABORTED_SOURCE_FINISHED), result
    _no_entries(a, b)
    _wait_idle(a, b)


def test_dist_transport_is_refused_without_a_process_group(workers):
    a, b, _ = workers
    pub = a.svc.migration.dist_publisher
    a.svc.migration.dist_publisher = None
    try:
        with pytest.raises(InvalidRequestError, match="not in a torch.distributed process group"):
            asyncio.run(_migrate_after_first_tokens(a, b, "dno-group", GREEDY, DIST))
    finally:
        a.svc.migration.dist_publisher = pub
    _wait_idle(a, b)


def test_a_push_the_other_way_is_refused_while_receiving_from_that_rank():
    """Shared peer locks: a rank receiving from a peer refuses (before ACCEPTED, nothing posted)
    to send to it meanwhile, so the pair's messages never cross."""
    locks = PeerLocks(shared=True)
    outbox = DistOutbox(1 << 20)
    outbox.put("k", torch.zeros(1, 1, 2, 1, 1, 1), ttl_s=30)
    peer = KVPeerServicer(outbox, _Group(0), sender=_Sender(_Pipes(), 0), locks=locks, busy_wait_s=0.05)
    with locks.lock_for(1), pytest.raises(UnavailableError, match="receiving a transfer from rank 1"):
        next(peer.push_kv(worker_pb2.PushKVRequest(request_id="k", dst_rank=1)))
    assert "k" in outbox  # not taken: the peer may pull it again


def test_router_migration_transport_flag():
    import router.__main__ as router_main

    assert (
        MigrationTransport.parse("dist") is DIST
        and MigrationTransport.parse(" GRPC ") is MigrationTransport.GRPC
    )
    with pytest.raises(ValueError, match="grpc, store, dist"):
        MigrationTransport.parse("nccl")
    a = router_main.build_parser().parse_args(["--model", "m", "--migration-transport", "dist"])
    assert MigrationTransport.parse(a.migration_transport) is DIST
