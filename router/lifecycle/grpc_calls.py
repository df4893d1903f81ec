"""The router's gRPC edge towards workers and stores: channels and stubs, call metadata, the
mapping of worker-call failures (a lost worker, a store failure, KV that was gone), and a Decode
stream under its progress deadline (:class:`Guarded`). Used by :mod:`router.lifecycle.grpc_legs`
and the servicer; the lifecycle's pure part never imports it."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from kv_store.client import KVStoreClient
from pdserve.errors import ModelNotFoundError, StoreUnavailableError
from pdserve.limits import grpc_options
from pdserve.security import TOKEN_METADATA_KEY, current, internal_channel
from pdserve.status import MD_ERROR_CLASS, error_from_rpc_error
from pdserve.tracing import log_event, traced_channel
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from router.deadline import LazyDeadline
from router.failover import LostPhase, LostWorker
from router.lifecycle.ports import WorkerLostError
from router.progress import ProgressWatch
from router.registry import WorkerEntry

log = logging.getLogger("router.service")  # the router's log records keep their logger name

LOOKUP_TIMEOUT_S = 0.5  # a placement-time prefix lookup gives up after this (then: no prefix)


def remaining(ctx: grpc.aio.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline; None when it has none (gRPC reports a huge number)."""
    r = ctx.time_remaining()
    return None if r is None or r > 1e7 else max(r, 0.0)


def gone(ctx: grpc.aio.ServicerContext) -> bool:
    """The client is not waiting any more: it cancelled, or its deadline passed."""
    r = remaining(ctx)
    return ctx.cancelled() or (r is not None and r <= 0)


class Stubs:
    """One channel per worker address, reused: workers over ``grpc.aio`` (created on the event
    loop that uses them), stores over sync clients (called from worker threads)."""

    def __init__(self) -> None:
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._stores: dict[str, KVStoreClient] = {}

    def worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        s = self._stubs.get(address)
        if s is None:
            s = self._stubs[address] = worker_pb2_grpc.WorkerStub(aio_internal_channel(address))
        return s

    def store(self, address: str) -> KVStoreClient:
        c = self._stores.get(address)
        if c is None:
            ch = traced_channel(internal_channel(address))
            c = self._stores[address] = KVStoreClient(address, timeout_s=5, channel=ch)
        return c

    def lookup(self, address: str) -> KVStoreClient:
        """A store client for placement-time prefix lookups: a short timeout (they are optional)."""
        key = "lookup:" + address
        c = self._stores.get(key)
        if c is None:
            ch = traced_channel(internal_channel(address))
            c = self._stores[key] = KVStoreClient(address, timeout_s=LOOKUP_TIMEOUT_S, channel=ch)
        return c


def refused_model(e: grpc.RpcError) -> bool:
    """A NOT_FOUND that names the request's model or adapter (ModelNotFoundError), which no
    re-dispatch can cure, as opposed to KV blocks that were gone."""
    md = e.trailing_metadata() or () if callable(getattr(e, "trailing_metadata", None)) else ()
    return any(k == MD_ERROR_CLASS and v == ModelNotFoundError.__name__ for k, v in md)


def raise_store_failure(e: grpc.RpcError) -> None:
    """Raise :class:`StoreUnavailableError` when the failed worker call says the worker's KV
    store was unreachable (the worker is alive: it must not be dropped or re-dispatched from)."""
    err = error_from_rpc_error(e)
    if isinstance(err, StoreUnavailableError):
        raise err from None


def aio_internal_channel(address: str) -> grpc.aio.Channel:
    """:func:`pdserve.security.internal_channel` for ``grpc.aio``: TLS (and this process's client
    certificate) when TLS is on; the cluster token goes with every call (:func:`call_metadata`)."""
    cfg = current()
    opts = [*grpc_options(), *cfg.channel_options()]
    if cfg.tls_on:
        return grpc.aio.secure_channel(address, cfg.channel_credentials(), options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


async def close_iterator(it: object) -> None:
    """Close ``it`` now, in this task, when it has an ``aclose`` (an async generator, such as a
    call's message iterator read only up to its finish); otherwise do nothing. Left open, an
    async generator is closed later by the event loop's finalizer hook: a thread-safe wake-up of
    the loop and a task for each one (four per direct request before, #12)."""
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


def call_metadata() -> tuple[tuple[str, str], ...] | None:
    """Metadata of every worker call: the cluster token when one is configured."""
    token = current().cluster_token
    return ((TOKEN_METADATA_KEY, token),) if token else None


class Guarded:
    """A Decode call as :class:`router.lifecycle.grpc_legs.GrpcLegs` consumes it (iterate, ``cancel``), whose
    UNAVAILABLE failure is raised as :class:`WorkerLostError` instead of ending the request, and so
    is a NOT_FOUND before the first message (the KV it was handed was gone: ``LostPhase.KV``).

    ``keep_cached``: a resumed local-prefill leg reports the cached tokens of its extended prompt;
    the request keeps the count of its first leg (its usage describes the client's prompt).

    ``watch``: the stream's progress deadline (:class:`router.progress.ProgressWatch`): a message
    that does not come within its bound (counted only while this iterator waits on the worker,
    not while the consumer holds a message) cancels the call and raises :class:`WorkerLostError`
    with ``stalled`` set. A message may carry several tokens. ``streamed``: when each worker last
    sent a message on any stream (the router's relays fill it in): a wait that reaches its bound
    while its worker sent another stream a message within that bound goes on (the worker is busy,
    the request queued or preempted there, e.g. under KV pressure; quarantining a busy worker
    stopped all traffic to it), so only a worker silent on every stream is taken for hung."""

    def __init__(
        self,
        call,
        worker: WorkerEntry,
        keep_cached: int | None = None,
        watch: ProgressWatch | None = None,
        streamed: dict[str, float] | None = None,
    ) -> None:
        self._call = call
        self._worker = worker
        self._keep_cached = keep_cached
        self._watch = watch
        self._streamed = streamed
        self._bound: float | None = None  # the current wait's bound
        self._deadline: LazyDeadline | None = None  # made in the consuming task

    def _busy(self) -> bool:
        """At the deadline: whether the worker sent a message on another stream within the
        wait's bound (it is alive and decoding; this request waits in its queue, e.g. preempted
        under KV pressure): then the wait goes on. A hung worker streams nothing."""
        if self._streamed is None or self._bound is None:
            return False
        last = self._streamed.get(self._worker.worker_id)
        return last is not None and time.monotonic() - last < self._bound

    async def _next(self, it: AsyncIterator[worker_pb2.DecodeResponse]) -> worker_pb2.DecodeResponse | None:
        """The next message of ``it`` (the call's iterator; None at the end of the stream),
        within the progress deadline (a :class:`router.deadline.LazyDeadline`: one timer per
        stream, not one per message)."""
        watch = self._watch
        t = time.monotonic()
        bound = watch.waiting(t) if watch is not None else None
        dl = self._deadline
        if dl is None:
            dl = self._deadline = LazyDeadline(spare=self._busy)
        self._bound = bound
        dl.start(bound)  # None: no deadline
        exc: BaseException | None = None
        try:
            d = await anext(it)
        except BaseException as e:  # noqa: BLE001 - re-raised below unless it is the deadline
            exc = e
        if dl.expired(exc):
            assert watch is not None  # only a bound expires
            detail = watch.describe(time.monotonic() - t)
            self._call.cancel()  # the worker, should it wake up, aborts the request and frees its blocks
            log_event(
                log,
                "stream stalled",
                logging.WARNING,
                worker=self._worker.worker_id,
                waiting_for=watch.phase.value,
                detail=detail,
            )
            lost = LostWorker(self._worker.worker_id, LostPhase.DECODE, detail, stalled=True)
            raise WorkerLostError(lost) from None
        if isinstance(exc, StopAsyncIteration):
            return None
        if exc is not None:
            raise exc
        if watch is not None:
            watch.received(len(d.token_ids))
        return d

    async def __aiter__(self) -> AsyncIterator[worker_pb2.DecodeResponse]:
        started = False
        it = None
        try:
            it = aiter(self._call)
            while (d := await self._next(it)) is not None:
                if self._keep_cached is not None:
                    d.num_cached_tokens = self._keep_cached
                started = True
                yield d
        except grpc.RpcError as e:
            raise_store_failure(e)  # the worker is fine: its store is not
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise WorkerLostError(
                    LostWorker(self._worker.worker_id, LostPhase.DECODE, e.details() or "")
                ) from None
            if e.code() == grpc.StatusCode.NOT_FOUND and not started and not refused_model(e):
                # its KV was gone (not: the worker refused the request's model or adapter)
                raise WorkerLostError(
                    LostWorker(self._worker.worker_id, LostPhase.KV, e.details() or "")
                ) from None
            raise
        finally:
            if self._deadline is not None:
                self._deadline.close()
            await close_iterator(it)  # the call's messages, read up to the finish: closed here

    def cancel(self) -> bool:
        return self._call.cancel()
