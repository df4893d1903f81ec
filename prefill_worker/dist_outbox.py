"""Prefill side of the direct KV handoff over torch.distributed (gloo on CPU, NCCL on GPU).

Instead of putting a prefilled request's blocks to a store node, :class:`DistPublisher` keeps
them in this process's :class:`DistOutbox` (in memory, keyed by request id, under a TTL and a
byte capacity) and returns a :class:`~kv_store.handle.KVHandle` that says "direct from rank R,
ask the worker at address A" (``dist_rank`` / ``dist_address``, no lease). The decode worker then
calls ``KVPeer.PushKV(request_id, its rank)`` on A (:class:`KVPeerServicer`, served on the prefill
worker's gRPC server next to ``Worker``); the handler takes the entry out of the outbox and sends
it with :class:`~kv_store.dist_transport.DistBlockSender` while the decode side receives it
(:mod:`decode_worker.dist_puller`). The transfer is pull-triggered: the prefill side never needs
to know the decode rank in advance.

Contracts:

* An entry lives until it is pushed, it expires (``lease_ttl_s`` of the publish, like a store
  lease), or it is evicted (oldest first) to make room for a newer one under ``capacity_bytes``.
  Expired and evicted entries are dropped and counted (:class:`OutboxStats`); a push for them
  answers NOT_FOUND, which the decode worker turns into a clear error naming the cause.
* ``PushKV`` streams exactly two messages: ACCEPTED once the entry is taken out of the outbox
  (every check that could refuse the transfer is done before it, so that after ACCEPTED the
  bytes always follow and the pair of ranks stays in step), then DONE once the receiver
  confirmed it holds the blocks. Sends to one destination rank are serialized (a lock per rank).
* When the process group failed to form, or an entry can never fit the outbox, the publisher
  falls back to its ``fallback`` publisher (the store) when it has one.
* ``SpillKV`` serves a decode worker outside the process group (it joined the cluster later, was
  restarted, or its group failed to form): the entry is taken out of the outbox and put on this
  worker's store node through the same fallback publisher, and the store handle is returned (the
  caller pulls and releases it like any store handle). Without a fallback: UNAVAILABLE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import grpc
import torch

from engine.llm_engine import KVExport
from kv_store.convert import handle_to_proto
from kv_store.dist_transport import DistBlockSender, TransferHeader
from kv_store.handle import KVHandle, dist_location
from kv_store.layout import KVLayout
from pdserve.errors import (
    InvalidRequestError,
    PdserveError,
    RequestNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from pdserve.thread_iter import iterate_on_threads
from pdserve.tracing import log_event
from pdserve.v1 import worker_pb2
from prefill_worker.publisher import KVPublisher
from prefill_worker.sweeper import Sweeper

log = logging.getLogger(__name__)

DEFAULT_OUTBOX_BYTES = 1 << 30  # 1 GiB


class PeerGroup(Protocol):
    """This process's place in the workers' process group (``pdserve.worker_main.DistGroup``)."""

    rank: int
    world_size: int
    device: torch.device  # where this rank's transfer tensors live (gloo: cpu, nccl: cuda)

    def wait_ready(self, timeout_s: float) -> torch.device:
        """Block until the group is formed; UnavailableError when it failed or took too long."""
        ...

    @property
    def failed(self) -> bool:
        """True once forming the group failed (it never becomes usable)."""
        ...


class PeerLocks:
    """One lock per peer rank of the process group, held for a whole transfer with that rank.

    ``shared``: the same locks serialize this process's sends to a rank and its receives from it
    (a worker that does both, see :class:`KVPeerServicer`); the sending side then only tries to
    take a lock for a while, so that two ranks pulling from each other never deadlock."""

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def lock_for(self, rank: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(rank, threading.Lock())


class BlockSender(Protocol):
    def send(self, dst: int, request_id: str, blocks: torch.Tensor) -> TransferHeader: ...


@dataclass(frozen=True)
class OutboxStats:
    """Counters of a :class:`DistOutbox` (cumulative, except ``entries`` and ``bytes``)."""

    entries: int
    bytes: int
    capacity_bytes: int
    puts: int
    taken: int  # entries handed to a push
    expired: int  # dropped after their TTL, never pushed
    evicted: int  # dropped to make room for newer entries, never pushed
    replaced: int  # a put for a request id that already had an entry (the old one dropped)


@dataclass(frozen=True)
class SpillInfo:
    """What publishing an outbox entry to the store needs besides its blocks: the export's
    metadata (its ``blocks`` field is left empty: the entry holds them), layout, lease TTL and
    the tenant its store lease is charged to."""

    kv: KVExport
    layout: KVLayout
    lease_ttl_s: float
    tenant: str = ""


@dataclass
class _Entry:
    blocks: torch.Tensor
    nbytes: int
    expires_at: float  # monotonic seconds
    spill: SpillInfo | None = None


class DistOutbox:
    """Thread-safe in-memory store of exported blocks awaiting a push, keyed by request id.

    ``put`` never exceeds ``capacity_bytes``: it first drops expired entries, then evicts the
    oldest ones; an entry larger than the whole capacity is refused (ResourceExhaustedError).
    ``take`` removes and returns a live entry (None when absent or expired). Expiry is checked on
    every call and by :meth:`sweep` (run periodically by :meth:`start_sweeper`), so that memory
    is returned even without traffic. ``clock`` is injectable (monotonic seconds) for tests.
    """

    def __init__(
        self, capacity_bytes: int = DEFAULT_OUTBOX_BYTES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"outbox capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest put first
        self._bytes = 0
        self._puts = self._taken = self._expired = self._evicted = self._replaced = 0
        self._sweeper = Sweeper(self.sweep, "dist-outbox-sweeper")

    def _drop(self, rid: str) -> None:
        e = self._entries.pop(rid)
        self._bytes -= e.nbytes

    def _sweep_locked(self, now: float) -> int:
        dead = [rid for rid, e in self._entries.items() if e.expires_at <= now]
        for rid in dead:
            self._drop(rid)
        self._expired += len(dead)
        return len(dead)

    def put(
        self, request_id: str, blocks: torch.Tensor, ttl_s: float, spill: SpillInfo | None = None
    ) -> None:
        """Hold ``blocks`` for ``ttl_s`` seconds under ``request_id`` (replacing an older entry);
        ``spill``: what :meth:`take_entry` hands back so that the entry can go to a store instead."""
        if not ttl_s > 0:
            raise InvalidRequestError(f"outbox TTL must be > 0 seconds, got {ttl_s}")
        nbytes = blocks.numel() * blocks.element_size()
        if nbytes > self.capacity_bytes:
            raise ResourceExhaustedError(
                f"request {request_id!r}: {nbytes} bytes of KV exceed the whole direct-transfer "
                f"outbox ({self.capacity_bytes} bytes); raise --dist-outbox-bytes"
            )
        with self._lock:
            now = self._clock()
            self._sweep_locked(now)
            if request_id in self._entries:
                self._drop(request_id)
                self._replaced += 1
            while self._bytes + nbytes > self.capacity_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self._evicted += 1
                log_event(log, "outbox eviction", logging.WARNING, evicted_request_id=oldest)
            self._entries[request_id] = _Entry(blocks, nbytes, now + ttl_s, spill)
            self._bytes += nbytes
            self._puts += 1

    def take(self, request_id: str) -> torch.Tensor | None:
        """Remove and return the entry's blocks; None when there is no live entry."""
        got = self.take_entry(request_id)
        return None if got is None else got[0]

    def take_entry(self, request_id: str) -> tuple[torch.Tensor, SpillInfo | None] | None:
        """Remove and return the entry's blocks and spill info; None when there is no live entry."""
        with self._lock:
            self._sweep_locked(self._clock())
            e = self._entries.pop(request_id, None)
            if e is None:
                return None
            self._bytes -= e.nbytes
            self._taken += 1
            return e.blocks, e.spill

    def sweep(self) -> int:
        """Drop expired entries now; returns how many."""
        with self._lock:
            return self._sweep_locked(self._clock())

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            e = self._entries.get(request_id)
            return e is not None and e.expires_at > self._clock()

    def stats(self) -> OutboxStats:
        with self._lock:
            self._sweep_locked(self._clock())
            return OutboxStats(
                entries=len(self._entries),
                bytes=self._bytes,
                capacity_bytes=self.capacity_bytes,
                puts=self._puts,
                taken=self._taken,
                expired=self._expired,
                evicted=self._evicted,
                replaced=self._replaced,
            )

    def start_sweeper(self, interval_s: float = 1.0) -> None:
        """Sweep every ``interval_s`` seconds on a daemon thread until :meth:`close`."""
        self._sweeper.start(interval_s)

    def close(self) -> None:
        """Stop the sweeper and drop every entry."""
        self._sweeper.stop()
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class DistPublisher:
    """:class:`~prefill_worker.publisher.KVPublisher` that keeps blocks in a :class:`DistOutbox`
    for a direct push (see module docstring).

    ``address`` returns this worker's gRPC address (where its ``KVPeer`` service is; read at each
    publish, since it is known only once the server is bound). ``fallback`` (e.g. a
    :class:`~prefill_worker.publisher.StorePublisher`) takes a request when the process group
    failed to form or its blocks can never fit the outbox; without one those publishes raise
    (UnavailableError / ResourceExhaustedError). Counter: ``fallbacks``.
    """

    def __init__(
        self,
        outbox: DistOutbox,
        group: PeerGroup,
        address: Callable[[], str],
        fallback: KVPublisher | None = None,
    ) -> None:
        self.outbox = outbox
        self.group = group
        self.address = address
        self.fallback = fallback
        self.fallbacks = 0

    def _fall_back(
        self, kv: KVExport, layout: KVLayout, lease_ttl_s: float, why: PdserveError, tenant: str = ""
    ) -> KVHandle:
        if self.fallback is None:
            raise why
        self.fallbacks += 1
        log_event(log, "direct handoff fallback to store", logging.WARNING, reason=why.message)
        return self.fallback.publish(kv, layout, lease_ttl_s, tenant)

    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float, tenant: str = "") -> KVHandle:
        """Hold ``kv.blocks`` in the outbox for ``lease_ttl_s`` seconds; returns a direct handle.
        ``tenant``: whom a store lease (fallback, spill) is charged to."""
        addr = self.address()
        if not addr:
            raise UnavailableError(
                "direct handoff: this worker's gRPC address is not known yet (not serving)"
            )
        if self.group.failed:
            return self._fall_back(
                kv,
                layout,
                lease_ttl_s,
                UnavailableError("direct handoff: the process group failed to form"),
                tenant,
            )
        blocks = kv.blocks
        if blocks.device != self.group.device:
            blocks = blocks.to(self.group.device)
        blocks = blocks.contiguous()
        try:  # everything the transfer header checks, before a decode worker is told to expect it
            TransferHeader(kv.request_id, blocks.dtype, tuple(blocks.shape)).encode()
            spill = SpillInfo(replace(kv, blocks=blocks[:0]), layout, lease_ttl_s, tenant)
            self.outbox.put(kv.request_id, blocks, lease_ttl_s, spill)
        except (InvalidRequestError, ResourceExhaustedError) as e:
            return self._fall_back(kv, layout, lease_ttl_s, e, tenant)
        rank = self.group.rank
        n = len(kv.block_hashes)
        return KVHandle(
            request_id=kv.request_id,
            block_hashes=tuple(kv.block_hashes),
            locations=(dist_location(rank, addr),) * n,
            layout=layout,
            num_tokens=len(kv.token_ids),
            dist_address=addr,
            dist_rank=rank,
        )


class KVPeerServicer:
    """The ``KVPeer`` gRPC service of a prefill worker (see module docstring for the contract).

    ``sender`` defaults to a :class:`~kv_store.dist_transport.DistBlockSender` on the group's
    device, made once the group is ready. ``ready_timeout_s`` bounds the wait for the group.
    ``spill_to`` (the store publisher) serves ``SpillKV``. Counters: ``pushes`` (completed),
    ``push_failures`` (failed after the entry was taken: the entry is gone, the decode side gets
    the error), ``spills`` (entries handed to the store by SpillKV). ``push_threads``: PushKV
    calls making progress at once (each step of one runs on a thread of :attr:`executor`).
    """

    def __init__(
        self,
        outbox: DistOutbox,
        group: PeerGroup,
        sender: BlockSender | None = None,
        ready_timeout_s: float = 60.0,
        spill_to: KVPublisher | None = None,
        locks: PeerLocks | None = None,
        busy_wait_s: float = 2.0,
        push_threads: int = 16,
    ) -> None:
        self.outbox = outbox
        self.group = group
        self._sender = sender
        self.ready_timeout_s = ready_timeout_s
        self.spill_to = spill_to
        self.spills = 0
        self.locks = locks if locks is not None else PeerLocks()
        self.busy_wait_s = busy_wait_s
        self._count_lock = threading.Lock()
        self.pushes = 0
        self.push_failures = 0
        # PushKV's steps (the group's wait, the peer lock, the send) run here (PushKV)
        self.executor = ThreadPoolExecutor(max_workers=push_threads, thread_name_prefix="kv-peer")

    def _sender_for(self, device: torch.device) -> BlockSender:
        if self._sender is None:
            self._sender = DistBlockSender(device)
        return self._sender

    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + 1)

    async def PushKV(
        self, req: worker_pb2.PushKVRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.PushKVResponse]:
        """:meth:`push_kv` served on a worker's ``grpc.aio`` server: each step on a thread of
        :attr:`executor` (:func:`pdserve.thread_iter.iterate_on_threads`; a sync streaming handler
        there would leave its thread blocked for good if the server stopped mid-stream)."""
        async for m in iterate_on_threads(self.push_kv(req), self.executor):
            yield m

    def push_kv(self, req: worker_pb2.PushKVRequest) -> Iterator[worker_pb2.PushKVResponse]:
        """The messages of ``PushKV(req)``: accepted (the receiver posts its receive), then done
        once the blocks were sent over the process group."""
        rid, dst, me = req.request_id, req.dst_rank, self.group.rank
        if not rid:
            raise InvalidRequestError("PushKV: request_id is required")
        if not (0 <= dst < self.group.world_size) or dst == me:
            raise InvalidRequestError(
                f"PushKV: dst_rank {dst} is not another rank of the process group "
                f"(world size {self.group.world_size}, this worker is rank {me})"
            )
        device = self.group.wait_ready(self.ready_timeout_s)
        sender = self._sender_for(device)
        lock = self.locks.lock_for(dst)
        if not lock.acquire(timeout=self.busy_wait_s if self.locks.shared else -1):
            raise UnavailableError(
                f"PushKV: rank {me} is receiving a transfer from rank {dst} now (the two ranks must not "
                "transfer both ways at once); try again"
            )
        try:
            blocks = self.outbox.take(rid)
            if blocks is None:
                raise RequestNotFoundError(
                    f"request {rid!r} has no KV in the outbox of rank {me}: it expired (TTL), was evicted "
                    "to make room, or was already pushed"
                )
            nbytes = blocks.numel() * blocks.element_size()
            base = {"request_id": rid, "src_rank": me, "num_blocks": blocks.shape[0], "nbytes": nbytes}
            # after this message the receiver posts its receive: the bytes must follow, whatever happens
            yield worker_pb2.PushKVResponse(phase=worker_pb2.PUSH_KV_PHASE_ACCEPTED, **base)
            t0 = time.monotonic()
            try:
                sender.send(dst, rid, blocks)
            except Exception as e:
                self._count("push_failures")
                log_event(
                    log, "direct push failed", logging.WARNING, request_id=rid, dst_rank=dst, error=str(e)
                )
                raise
        finally:
            lock.release()
        self._count("pushes")
        log_event(
            log,
            "direct push",
            request_id=rid,
            dst_rank=dst,
            blocks=blocks.shape[0],
            seconds=round(time.monotonic() - t0, 6),
        )
        yield worker_pb2.PushKVResponse(phase=worker_pb2.PUSH_KV_PHASE_DONE, **base)

    def SpillKV(
        self, req: worker_pb2.SpillKVRequest, ctx: grpc.ServicerContext
    ) -> worker_pb2.SpillKVResponse:
        rid, me = req.request_id, self.group.rank
        if not rid:
            raise InvalidRequestError("SpillKV: request_id is required")
        if self.spill_to is None:
            raise UnavailableError(
                f"SpillKV: prefill worker rank {me} has no store to spill to; the decode worker must "
                "join the process group to pull direct KV handles"
            )
        got = self.outbox.take_entry(rid)
        if got is None:
            raise RequestNotFoundError(
                f"request {rid!r} has no KV in the outbox of rank {me}: it expired (TTL), was evicted "
                "to make room, or was already pushed"
            )
        blocks, info = got
        if info is None:
            raise UnavailableError(f"SpillKV: the outbox entry of {rid!r} carries no metadata to store it")
        t0 = time.monotonic()
        handle = self.spill_to.publish(
            replace(info.kv, blocks=blocks.cpu()), info.layout, info.lease_ttl_s, info.tenant
        )
        self._count("spills")
        log_event(
            log,
            "outbox entry spilled to store",
            request_id=rid,
            blocks=blocks.shape[0],
            seconds=round(time.monotonic() - t0, 6),
        )
        return worker_pb2.SpillKVResponse(handle=handle_to_proto(handle))
