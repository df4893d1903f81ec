"""A handoff admitted on the decode worker's event loop (#12: per-request cost at short outputs).

:func:`admit_on_loop` does what :meth:`decode_worker.service.DecodeServicer._admit_handoff` does on
an admission thread, with no thread hop, when the KV can be read with no rpc: the pull (a memcpy
from the store's arena through the handle's leased slots, :meth:`decode_worker.puller.StorePuller.on_loop`),
the release of the producer's lease on ``grpc.aio`` (:meth:`StorePuller.release_async`, awaited as
before: a store that fails it fails the request, naming the store), and the import handed to the
engine thread (:meth:`engine.engine_loop.EngineLoop.add_submit`), awaited with one wake-up. Without
room it retries every :data:`ROOM_POLL_S` up to the same admission deadline and fails with the
same error. Every other Decode (local prefill, streamed KV, parallel sampling, a direct handle, a
pull that needs an rpc or a large copy, a stand-in engine loop) returns None: the caller admits it
on its thread pool as before.

A caller that goes away (the task is cancelled) leaves nothing behind: the release goes on as its
own task, and an import that ran (or runs later) is aborted.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import grpc

from decode_worker.groups import is_group
from decode_worker.handoff import check_handoff, importer
from pdserve.errors import ResourceExhaustedError
from pdserve.v1 import worker_pb2

if TYPE_CHECKING:
    from decode_worker.service import AsyncDecodeServicer, _LoopQueue

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
    blocks, pull_s = await _pull(svc, store, h.handle)
    add, rid, ids = importer(h, req, blocks), h.rid, h.ids

    while True:
        try:
            immediate = await _added(svc, rid, add, out)
            return rid, immediate, pull_s
        except ResourceExhaustedError:
            if time.monotonic() >= deadline:
                raise svc._no_room(len(ids), req.adapter) from None
        await asyncio.sleep(ROOM_POLL_S)


async def _pull(svc: AsyncDecodeServicer, store: Any, handle: Any) -> tuple[Any, float]:
    """:meth:`DecodeServicer._pull` on the loop: timed, counted, the lease released after (also
    on failure, and when the caller goes away meanwhile)."""
    transport = svc._pull_transport(handle)
    t0 = time.monotonic()
    try:
        with svc.pull_metrics.pull(transport):
            blocks = store.pull(handle)
        return blocks, time.monotonic() - t0
    finally:
        with svc._fallbacks_lock:
            now = svc._transport_fallbacks()
            new, svc._fallbacks_seen = now - svc._fallbacks_seen, now
        svc.pull_metrics.count_shm_fallbacks(new)
        await asyncio.shield(asyncio.ensure_future(store.release_async(handle)))


async def _added(svc: AsyncDecodeServicer, rid: str, add: Any, out: _LoopQueue) -> bool:
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
