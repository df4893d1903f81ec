"""The gRPC Decode call of a streamed handoff (:mod:`router.lifecycle.stream_legs`) for
:class:`~router.lifecycle.grpc_legs.GrpcLegs`: a ``DecodeRequest`` with ``kv_stream_address``
(the prefill worker's address), started at once, its first message (or failure) read ahead so
the leg learns early that the decode side failed; relayed through :class:`Guarded` (progress
deadline, lost-worker mapping) like any decode leg once the prefill answered.

A direct token stream's streamed Decode (:class:`DirectGrantLeg`, made by
:meth:`router.lifecycle.direct_legs.DirectLegs.start_streamed_decode`) carries the direct grant
too (``DecodeRequest.direct``): the decode worker assembles the streamed KV, then sends its
admission message (no tokens) and streams the tokens to the client; its messages go through the
direct leg's own handling (the redirect, progress and finish, the client's resume after a lost
worker) under a direct progress deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from pdserve.status import error_from_rpc_error
from pdserve.v1 import direct_pb2, worker_pb2
from router.failover import LostPhase, LostWorker
from router.lifecycle.grpc_calls import (
    Guarded,
    call_metadata,
    gone,
    raise_store_failure,
    refused_model,
    remaining,
)
from router.lifecycle.ports import Chunk, ClientGoneError, WorkerLostError
from router.lifecycle.stream_mode import KVStreamMode
from router.progress import ProgressWatch

if TYPE_CHECKING:
    from router.lifecycle.grpc_legs import GrpcLegs
    from router.registry import WorkerEntry

ABORT_TIMEOUT_S = 5.0  # the prefill worker's Abort of a stream nobody will consume

TRANSPORTS = {
    KVStreamMode.GRPC: worker_pb2.KV_STREAM_TRANSPORT_GRPC,
    KVStreamMode.STORE: worker_pb2.KV_STREAM_TRANSPORT_STORE,
    KVStreamMode.DIST: worker_pb2.KV_STREAM_TRANSPORT_DIST,
}


@dataclass(frozen=True)
class DirectGrantLeg:
    """What makes a streamed Decode a direct token stream: ``grant``, the ``DecodeRequest.direct``
    it carries (the ticket minted for its decode worker, the progress interval); ``watch()``,
    its progress deadline (a direct worker sends a message per progress interval, not per
    token); ``wrap(worker, chunks, cancel)``, the chunks the lifecycle relays, made from the
    call's (the redirect note, progress and the finish; the worker lost after the redirect: the
    lost note and the client's resumed tokens, then the loss raised; ``cancel`` cancels the
    call)."""

    grant: direct_pb2.DirectGrant
    watch: Callable[[], ProgressWatch]
    wrap: Callable[[WorkerEntry, AsyncIterator[Chunk], Callable[[], Any]], AsyncIterator[Chunk]]


class _Prefetched:
    """A Decode call whose first message (or failure) was read ahead: iterating yields it first,
    then the rest; ``cancel`` cancels the call (what :class:`Guarded` wraps). ``overlap_s``: the
    time the prefill ran alongside the stream's reading, taken off the first message's
    ``kv_pull_s`` (which spans the whole streamed prefill) so that the request's transfer phase
    counts only the wait left after the prefill, as a whole-KV pull does."""

    def __init__(self, call: Any, it: AsyncIterator[Any], first: asyncio.Future, overlap_s: float) -> None:
        self._call, self._it, self._first, self._overlap_s = call, it, first, overlap_s

    async def __aiter__(self) -> AsyncIterator[Any]:
        m = await self._first  # raises the call's failure (a grpc.RpcError)
        if m is None:
            return
        if m.kv_pull_s > 0:
            m.kv_pull_s = max(1e-9, m.kv_pull_s - self._overlap_s)
        yield m
        async for m in self._it:
            yield m

    def cancel(self) -> bool:
        return self._call.cancel()


class GrpcStreamedDecode:
    """The Decode of a streamed handoff on decode worker ``worker_id`` of ``legs``'s request:
    prompt + ``num_output`` output tokens, ``kv_stream_address`` = the prefill worker
    ``prefill_id``'s address; started at construction, its first message read ahead.
    ``direct``: a direct token stream's grant and handling (None: relayed)."""

    def __init__(
        self,
        legs: GrpcLegs,
        worker_id: str,
        prefill_id: str,
        num_output: int,
        direct: DirectGrantLeg | None = None,
    ) -> None:
        svc, req = legs.svc, legs.req
        self.legs = legs
        self.dw = legs._entry(worker_id)
        common = legs._leg_request(num_output)
        self.fresh = num_output == 0  # the decode engine renders the whole output's text
        self.direct = direct
        request = worker_pb2.DecodeRequest(
            **common, slo=req.slo, kv_stream_address=legs._entry(prefill_id).address
        )
        if direct is not None:
            request.direct.CopyFrom(direct.grant)
        self.call = svc.stubs.worker(self.dw.address).Decode(
            request, timeout=remaining(legs.ctx), metadata=call_metadata()
        )
        self._it = aiter(self.call)
        self._first: asyncio.Future = asyncio.ensure_future(anext(self._it, None))
        self._used = False
        self._t_start = time.monotonic()
        self._prefill_address = legs._entry(prefill_id).address
        self._dropping: asyncio.Task | None = None

    @property
    def settled(self) -> asyncio.Future:
        return self._first

    def failure(self) -> BaseException | None:
        if not self._first.done():
            return None
        if self._first.cancelled():
            return ClientGoneError("the streamed Decode was cancelled")
        e = self._first.exception()
        if e is None:
            return None
        if not isinstance(e, grpc.RpcError):
            return e
        wid = self.dw.worker_id
        try:
            raise_store_failure(e)  # the worker is fine: its store is not
        except Exception as store:  # noqa: BLE001 - returned, not raised
            return store
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            return WorkerLostError(LostWorker(wid, LostPhase.DECODE, e.details() or ""))
        if e.code() == grpc.StatusCode.NOT_FOUND and not refused_model(e):
            # the stream it was to read was gone (never opened in time, failed, expired)
            return WorkerLostError(LostWorker(wid, LostPhase.KV, e.details() or ""))
        if gone(self.legs.ctx):
            return ClientGoneError(e.details() or "")
        return error_from_rpc_error(e)

    def chunks(self, first_index: int) -> AsyncIterator[Chunk]:
        if self._used:
            raise RuntimeError("a streamed Decode is relayed once")
        self._used = True
        svc, legs, direct = self.legs.svc, self.legs, self.direct
        if direct is not None:
            watch = direct.watch()
        else:
            watch = ProgressWatch(svc.config.progress, legs.run.predicted_tpot_s)
        overlap = time.monotonic() - self._t_start  # called once the prefill answered
        guarded = Guarded(
            _Prefetched(self.call, self._it, self._first, overlap),
            self.dw,
            watch=watch,
            streamed=svc._streamed_at,
        )
        if direct is None:
            return self._stream(legs.stream(guarded, self.dw, first_index, worker_text=self.fresh))
        # a direct worker's messages carry no text: the client has it from the worker
        chunks = legs.stream(guarded, self.dw, first_index, worker_text=False)
        return self._stream(direct.wrap(self.dw, chunks, self.call.cancel))

    async def _stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        try:
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for c in chunks:
                    yield c
        finally:
            self.call.cancel()  # the client went away (or the relay ended it): abort it downstream
            self._drop_stream()

    def cancel(self) -> None:
        self.call.cancel()
        self._drop_stream()
        if not self._first.done():
            self._first.cancel()

    def _ended(self) -> bool:
        """The Decode failed before its first message with a failure that ends the request: any
        but a lost decode worker or KV (:class:`WorkerLostError`, re-dispatched, maybe to the same
        prefill worker under the same id) and a cancelled call (the router's own cancel: the
        client left, or a re-dispatch). The refusals (RESOURCE_EXHAUSTED: no KV blocks or LoRA
        slot within the decode worker's admission timeout; INVALID_ARGUMENT; a failed store ...)
        go to the client as they are, so the prefill worker's stream of the request will never be
        consumed."""
        f = self.failure()  # None while pending or after a message; a cancel is ClientGoneError
        return f is not None and not isinstance(f, (WorkerLostError, ClientGoneError))

    def _drop_stream(self) -> None:
        """The client left, or the Decode failed in a way that ends the request (:meth:`_ended`),
        before the decode worker sent a token (so before it had the whole streamed KV): abort the
        request on the prefill worker, whose finished stream would otherwise wait its TTL (60 s) for a consumer that
        never subscribes (the client left, or the decode worker gave up waiting for room,
        between the prefill's answer and the decode worker's subscription), its store chunks
        leased meanwhile. Fire and forget: the stream expires anyway."""
        first = self._first
        if (
            self._dropping is not None
            # a re-dispatch may prefill the same id there again: only a client gone, or a
            # Decode failure that ends the request (never re-dispatched), drops it
            or not (gone(self.legs.ctx) or self._ended())
            or (
                first.done()
                and not first.cancelled()
                and first.exception() is None
                and first.result() is not None
            )
        ):
            return
        stub = self.legs.svc.stubs.worker(self._prefill_address)
        rid = self.legs.req.request_id

        async def abort() -> None:
            with contextlib.suppress(Exception):  # the prefill worker is gone: nothing is left there
                await stub.Abort(
                    worker_pb2.AbortRequest(request_id=rid), timeout=ABORT_TIMEOUT_S, metadata=call_metadata()
                )

        self._dropping = asyncio.ensure_future(abort())
