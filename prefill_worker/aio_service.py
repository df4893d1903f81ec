"""The prefill worker's Worker service on ``grpc.aio`` (#12 §1: no thread per call).

:class:`AsyncPrefillServicer` is the :class:`~prefill_worker.service.PrefillServicer` a worker
process serves (:func:`pdserve.worker_main.serve_worker`). A ``Prefill`` is a task of the server's
event loop, not a thread of a pool, so the requests a prefill worker batches are not capped by a
thread count (the sync server's 32 threads held a burst of 64 prefills to 32 in the engine at a
time, the rest queued in gRPC):

* the request's checks run on the loop (:meth:`PrefillServicer._accept`, the same errors);
* a prompt with a full block before its last token probes the local prefix cache on the engine
  thread (awaited, one wake-up); only when the store may hold more does the rest of the pull
  (store lookup and fetch: blocking calls) run on a thread of :attr:`blocking`;
* the request is handed to the engine thread (``EngineLoop.add_submit``); its finished output is
  exported and its blocks released right there (as the sync servicer does) and handed to the
  awaiting task (``call_soon_threadsafe``);
* the KV is published from the loop: one ``PutBlocks`` on a ``grpc.aio`` store client
  (:meth:`prefill_worker.publisher.StorePublisher.publish_async`); a publisher or put that cannot
  (an outbox, blocks beyond one message, an older store, a store client that follows a moving
  node) publishes on a thread;
* a streamed prefill (``kv_stream``) runs the sync path on a thread of :attr:`blocking` (its
  chunks are polled; as many at once as that pool has threads, as before).

Cancellation: a caller that goes away cancels the task. Before the export the request is aborted
in the engine (not waited for); during the publish the put goes on and its lease is released
when it is done (no one will ever learn the handle), as the sync servicer does. Every other
method (``Abort``, ``Stats``, ``Decode``) is the sync servicer's, run on the server's threads.
The worker's ``KVStream`` service (:attr:`AsyncPrefillServicer.stream_service`,
:mod:`prefill_worker.kv_stream_service`) is served on the same loop and closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from engine.llm_engine import KVExport, LLMEngine
from kv_store.aio_client import AsyncKVStoreClient
from kv_store.client import KVStoreClient
from kv_store.handle import KVHandle
from pdserve.errors import InternalError
from pdserve.tracing import log_event, request_scope
from pdserve.v1 import worker_pb2
from prefill_worker.kv_stream_service import KVStreamServicer
from prefill_worker.publisher import StorePublisher
from prefill_worker.service import PrefillServicer, _ExportOnFinish, log_done, prefill_response

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCKING_THREADS = 32  # prefix pulls, streamed prefills and thread publishes at once (as the sync pool)


class _AwaitExport(_ExportOnFinish):
    """:class:`prefill_worker.service._ExportOnFinish` for a task on ``loop``: the first output is
    exported and its blocks released on the engine thread as there, and ``fut`` gets
    ``(output, KVExport)``, a failure ``(exception, None)``, an output that did not finish the
    prefill ``(output, None)``."""

    def __init__(self, engine: LLMEngine, rid: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(engine, rid)
        self._loop = loop
        self.fut: asyncio.Future[tuple[object, KVExport | None]] = loop.create_future()

    def _settle(self, value: tuple[object, KVExport | None]) -> None:  # event loop
        if not self.fut.done():
            self.fut.set_result(value)

    def _hand(self, value: tuple[object, KVExport | None]) -> None:  # engine thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: no one waits any more
            self._loop.call_soon_threadsafe(self._settle, value)


class _ThreadCallContext:
    """What the sync prefill path reads of its servicer context, for a call served on the event
    loop and run on a thread: whether the caller is still there, and callbacks run when it
    goes (``add_callback``). :meth:`gone` (event loop) runs them once."""

    def __init__(self) -> None:
        self._gone = False
        self._callbacks: list[Callable[[], object]] = []

    def is_active(self) -> bool:
        return not self._gone

    def add_callback(self, fn: Callable[[], object]) -> bool:
        self._callbacks.append(fn)
        return True

    def gone(self) -> None:
        self._gone = True
        for fn in self._callbacks:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a callback's failure must not hide the others
                log.warning("a prefill's termination callback failed: %s", e)


class AsyncPrefillServicer(PrefillServicer):
    """:class:`PrefillServicer` whose ``Prefill`` is a coroutine (module doc). ``blocking``: the
    threads its blocking parts run on (``blocking_threads`` of them)."""

    def __init__(self, *args: Any, blocking_threads: int = BLOCKING_THREADS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blocking = ThreadPoolExecutor(
            max_workers=blocking_threads, thread_name_prefix="prefill-blocking"
        )
        self._astore: AsyncKVStoreClient | None = None  # made on the server's loop at first use
        self.stream_service = KVStreamServicer(self.streams)  # this worker's KVStream service
        self.publishes_on_loop = 0  # publishes made with one grpc.aio PutBlocks (tests, benches)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread of :attr:`blocking`, with this task's context (request id)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.blocking, ctx.run, fn, *args)

    async def Decode(self, req, ctx) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """Refused: a streaming method on the aio server must be async (it never yields)."""
        super().Decode(req, ctx)
        yield  # pragma: no cover - unreachable: the line above raises

    async def Prefill(
        self, req: worker_pb2.PrefillRequest, ctx: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        """Traced entry, as :meth:`PrefillServicer.Prefill`."""
        with request_scope(req.request_id):
            try:
                resp = await self._prefill_async(req)
            except Exception as e:
                log_event(log, "prefill failed", error=type(e).__name__)
                raise
            log_done(req, resp)
            return resp

    async def _prefill_async(self, req: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        t_arrive = time.monotonic()
        if req.kv_stream:  # chunk-wise KV streaming: the sync path, on a thread
            return await self._prefill_on_thread(req)
        rid, ids, run_ids, group, add = self._accept(req)
        try:
            store_tokens = await self._pull_prefix_async(ids, req.adapter, req.cache_salt) if ids else 0
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the store is an optimisation: recompute on any failure
            log.warning("prefix pull from store failed (%s); recomputing", e)
            store_tokens = 0
        self.store_prefix_tokens_total += store_tokens
        engine = self.state.engine
        c0, t_added = engine.prefill_tokens_computed, time.monotonic()
        sink = _AwaitExport(engine, rid, asyncio.get_running_loop())
        self.state.loop.add_submit(rid, add, sink).add_done_callback(sink.add_failed)
        try:
            item, kv = await sink.fut
        except asyncio.CancelledError:
            self.state.loop.abort_soon(rid)  # not waited for
            raise
        if isinstance(item, BaseException):
            raise item
        if kv is None:  # an output that did not finish the prefill: none is expected
            raise InternalError(f"prefill of {rid!r}: the engine's first output did not finish it")
        self.prefix_policy.observe_prefill(engine.prefill_tokens_computed - c0, time.monotonic() - t_added)
        t_prefilled = time.monotonic()
        publish = asyncio.ensure_future(self._publish(kv, req))
        try:
            handle = await asyncio.shield(publish)
        except asyncio.CancelledError:
            # the caller went away while the blocks were published: no one will ever learn this
            # handle, so its lease is released once the put is done, not left pinned to its TTL
            publish.add_done_callback(lambda t: self._release_when_published(t, rid))
            raise
        self.state.count_finished()
        return prefill_response(rid, item, kv, handle, len(run_ids), group, t_arrive, t_prefilled)

    async def _prefill_on_thread(self, req: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        """The sync servicer's whole prefill on a thread; a caller that goes away is seen by it
        as an inactive context (and its termination callbacks run)."""
        tctx = _ThreadCallContext()
        try:
            return await self._in_thread(self._prefill, req, tctx)
        except asyncio.CancelledError:
            tctx.gone()
            raise

    async def _pull_prefix_async(self, ids: list[int], adapter: str, salt: str) -> int:
        """:meth:`PrefillServicer._pull_prefix_from_store` from the loop: the probe awaited on the
        engine thread; the store's part (lookup, fetch) on a thread only when some block is not
        held here."""
        if not self._wants_store_prefix(ids):
            return 0
        probe = self.state.loop.submit(self._prefix_probe(ids, adapter, salt))
        hashes, local = await asyncio.wrap_future(probe)
        if local == len(hashes):
            return 0
        return await self._in_thread(self._pull_missing_prefix, hashes, local)

    async def _publish(self, kv: KVExport, req: worker_pb2.PrefillRequest) -> KVHandle:
        """Publish ``kv`` under a lease charged to the request's tenant: from the loop when the
        publisher and its store client can (module doc), else on a thread."""
        layout, ttl = self.state.layout, req.lease_ttl_s or self.state.config.lease_ttl_s
        pub = self.publisher
        if isinstance(pub, StorePublisher) and type(pub.client) is KVStoreClient:
            handle = await pub.publish_async(kv, layout, ttl, req.tenant, self._aio_store(pub.client))
            if handle is not None:
                self.publishes_on_loop += 1
                return handle
        return await self._in_thread(pub.publish, kv, layout, ttl, req.tenant)

    def _aio_store(self, client: KVStoreClient) -> AsyncKVStoreClient:
        """The ``grpc.aio`` client beside ``client`` (same node, metadata and deadline), made on
        the running loop at first use."""
        if self._astore is None or self._astore.address != client.address:
            self._astore = AsyncKVStoreClient(client.address, client.call_metadata, client.timeout_s)
        return self._astore

    def _release_when_published(self, publish: asyncio.Future[KVHandle], rid: str) -> None:
        """Done-callback of the publish of a prefill whose caller went away: its lease released
        on a thread (:meth:`PrefillServicer._release_orphan`)."""
        if not publish.cancelled() and publish.exception() is None:
            self.blocking.submit(self._release_orphan, publish.result(), rid)

    def close(self) -> None:
        """After the server stopped: cancel the live KV streams (a thread waiting on one wakes)
        and stop the blocking threads and the KVStream service's."""
        self.streams.stop()
        self.stream_service.close()
        self.blocking.shutdown(wait=False, cancel_futures=True)
