"""A handoff admitted on the decode worker's event loop (#12: per-request cost at short outputs).

:func:`admit_on_loop` does what :meth:`decode_worker.service.DecodeServicer._admit_handoff` does on
an admission thread, with no thread hop, when the KV can be read with no rpc: the pull (a memcpy
from the store's arena through the handle's leased slots, :meth:`decode_worker.puller.StorePuller.on_loop`),
then the import handed to the engine thread (:meth:`engine.engine_loop.EngineLoop.add_submit`),
awaited with one wake-up. Without room it retries every :data:`ROOM_POLL_S` up to the same
admission deadline and fails with the same error. Every other Decode (local prefill, streamed KV,
parallel sampling, a direct handle, a pull that needs an rpc or a large copy, a stand-in engine
loop) returns None: the caller admits it on its thread pool as before.

The release of the producer's lease (:meth:`StorePuller.release_async`, ``grpc.aio``) is off the
critical path (#12): it starts when the pull is done and runs while the request is imported and
decodes, so the aio client batches the releases of several requests over its window
(:mod:`kv_store.aio_client`). The contract is the one of a release awaited first: a store that
fails the release fails the request, naming the store, and the request's end is never delivered
before its release succeeded. The engine's outputs reach the stream through a
:class:`_ReleaseGate`: tokens pass; an output that ends the request (its finish, or a failure)
waits for the release, which is then sent at once rather than at the end of its window; a failed
release puts the store's error in the stream instead (the stream fails and the request is
aborted, as for any failure). A release that failed before the import was accepted fails the
request with nothing imported; a request finished at once is answered after its release.

A caller that goes away (the task is cancelled) leaves nothing behind: the release goes on as its
own task, and an import that ran (or runs later) is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import grpc

from decode_worker.groups import is_group
from decode_worker.handoff import check_handoff, importer
from pdserve.errors import ResourceExhaustedError, StoreUnavailableError
from pdserve.v1 import worker_pb2

if TYPE_CHECKING:
    from decode_worker.service import AsyncDecodeServicer, _LoopQueue
    from engine.engine_loop import OutputItem

ROOM_POLL_S = 0.01  # retry an import refused for lack of blocks this often (as the thread path)


def _eligible(svc: AsyncDecodeServicer, req: worker_pb2.DecodeRequest) -> bool:
    return (
        not req.local_prefill
        and req.HasField("kv")
        and not req.kv_stream_address
        and not req.prompt_tail_pending
        and not is_group(req)
        and hasattr(svc.state.loop, "add_submit")
        and hasattr(svc.puller, "on_loop")
    )


def _ends(item: OutputItem) -> bool:
    """Whether ``item`` ends its request (a failure, or the finished output)."""
    return isinstance(item, BaseException) or bool(getattr(item, "finished", False))


class _ReleaseGate:
    """The engine's output sink for a request whose release is in flight (module doc): ``put``
    (engine thread) hands an output to ``out`` at once, except one that ends the request, which
    is held (with whatever follows it) until :meth:`settle` (event loop, when the release is
    done): on success the held outputs go to ``out`` in order and the gate opens; on failure the
    release's error goes to ``out`` and later outputs are dropped. ``expedite`` is called on the
    event loop when an ending output is first held (send the release now)."""

    def __init__(
        self,
        out: _LoopQueue,
        loop: asyncio.AbstractEventLoop,
        expedite: Callable[[], None] | None,
        store: str,
    ) -> None:
        self._out = out
        self._store = store
        self._loop = loop
        self._expedite = expedite
        self._lock = threading.Lock()
        self._open = False  # the release succeeded: outputs pass with no lock
        self._failed = False
        self._held: list[OutputItem] = []

    def put(self, item: OutputItem) -> None:  # engine thread
        if self._open:
            self._out.put(item)
            return
        with self._lock:
            if self._open:
                self._out.put(item)
            elif self._failed:
                pass  # the request failed with the store's error; the engine is aborting it
            elif self._held or _ends(item):
                self._held.append(item)
                if len(self._held) == 1 and self._expedite is not None:
                    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                        self._loop.call_soon_threadsafe(self._expedite)
            else:
                self._out.put(item)

    def settle(self, release: asyncio.Future[Any]) -> None:  # event loop: the release is done
        err = _failure(release, self._store)
        with self._lock:
            held, self._held = self._held, []
            if err is None:
                for item in held:  # under the lock: before any output the engine puts next
                    self._out.put(item)
                self._open = True
            else:
                self._failed = True
                self._out.put(err)


def _failure(release: asyncio.Future[Any], store: str) -> BaseException | None:
    """The error of a done release (a cancelled one, the loop closing: an interruption naming
    the store, as :class:`kv_store.aio_client.AsyncKVStoreClient` reports one)."""
    if release.cancelled():
        return StoreUnavailableError(f"KV store {store}: the release was interrupted (cancelled)")
    return release.exception()


async def admit_on_loop(
    svc: AsyncDecodeServicer, req: worker_pb2.DecodeRequest, ctx: grpc.aio.ServicerContext, out: _LoopQueue
) -> tuple[str, bool, float] | None:
    """(request id, done at once, pull seconds) of a handoff admitted here, or None: not one this
    path serves (admit it on the thread pool). Raises what the thread path raises."""
    if not _eligible(svc, req):
        return None
    svc.state.engine.check_adapter(req.adapter)  # first, as DecodeServicer._admit does
    h = check_handoff(req, svc.state.layout)  # the thread path's checks, in the same order
    store = svc.puller.on_loop(h.handle)  # type: ignore[attr-defined]
    if store is None:
        return None
    deadline = svc._admission_deadline(ctx)
    blocks, pull_s, release = _pull(svc, store, h.handle)
    rid, ids = h.rid, h.ids
    add = svc._text_here(rid, importer(h, req, blocks), out)  # its text rendered on this loop
    node = h.handle.locations[0].address if h.handle.locations else "(no node)"
    expedite = getattr(store, "flush_releases", None)
    gate = _ReleaseGate(out, asyncio.get_running_loop(), expedite, node)
    release.add_done_callback(gate.settle)

    while True:
        _raise_failed(release, node)  # the store failed it already: fail with nothing imported
        try:
            immediate = await _added(svc, rid, add, gate)
            break
        except ResourceExhaustedError:
            if time.monotonic() >= deadline:
                _raise_failed(release, node)  # the store's failure first, as when it was awaited first
                raise svc._no_room(len(ids), req.adapter) from None
        await asyncio.sleep(ROOM_POLL_S)
    if immediate:  # answered at once: not before the release succeeded
        try:
            if not release.done() and expedite is not None:
                expedite()
            await asyncio.shield(release)
        except BaseException:
            svc._abort_later(rid)  # the caller does not abort a request it never heard of
            raise
    return rid, immediate, pull_s


def _raise_failed(release: asyncio.Future[Any], store: str) -> None:
    if release.done():
        err = _failure(release, store)
        if err is not None:
            raise err


def _pull(svc: AsyncDecodeServicer, store: Any, handle: Any) -> tuple[Any, float, asyncio.Task[Any]]:
    """:meth:`DecodeServicer._pull` on the loop: timed, counted; (blocks, seconds, the release of
    the lease started after it as a task of its own, also on failure: it runs even when the
    caller goes away meanwhile)."""
    transport = svc._pull_transport(handle)
    t0 = time.monotonic()
    try:
        with svc.pull_metrics.pull(transport):
            blocks = store.pull(handle)
        return blocks, time.monotonic() - t0, _release(store, handle)
    except BaseException:
        _release(store, handle).add_done_callback(_retrieved)  # the pull's error is the one raised
        raise
    finally:
        with svc._fallbacks_lock:
            now = svc._transport_fallbacks()
            new, svc._fallbacks_seen = now - svc._fallbacks_seen, now
        svc.pull_metrics.count_shm_fallbacks(new)


def _release(store: Any, handle: Any) -> asyncio.Task[Any]:
    t = asyncio.ensure_future(store.release_async(handle))
    _RELEASES.add(t)  # held until done (the loop keeps only weak references to tasks)
    t.add_done_callback(_RELEASES.discard)
    return t


_RELEASES: set[asyncio.Task[Any]] = set()


def _retrieved(t: asyncio.Future[Any]) -> None:
    if not t.cancelled():
        t.exception()  # seen: no "exception was never retrieved" at exit


async def _added(svc: AsyncDecodeServicer, rid: str, add: Any, out: Any) -> bool:
    """Run ``add`` on the engine thread with ``out`` registered as ``rid``'s queue; its result.
    Cancelled meanwhile: the import is withdrawn if it has not run, aborted if it has."""
    loop = asyncio.get_running_loop()
    cf: Future = svc.state.loop.add_submit(rid, add, out)  # type: ignore[attr-defined]
    try:
        return await asyncio.shield(asyncio.wrap_future(cf))
    except asyncio.CancelledError:
        if not cf.cancel():

            def abort(f: Future) -> None:  # engine thread, or here when already done
                if not f.cancelled() and f.exception() is None:
                    loop.call_soon_threadsafe(svc._abort_later, rid)

            cf.add_done_callback(abort)
        raise
