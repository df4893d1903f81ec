"""The router's leg of a streamed handoff (chunk-wise KV streaming, issue #14 part 2): the
request's Prefill (``kv_stream`` set) and its Decode (``kv_stream_address``: the prefill
worker's address) run at the same time, the decode worker reading the prefill worker's
``KVStream.StreamKV`` and assembling the KV while the prompt is computed
(:mod:`prefill_worker.kv_stream`, :mod:`decode_worker.stream_puller`). The lifecycle's state for
it is ``STREAMING`` (:mod:`router.lifecycle.machine`); the action is
:class:`~router.lifecycle.actions.RunStreamed`.

:func:`run_streamed` (asyncio, no gRPC: the driver's part, unit-tested with fakes) starts the
Decode first and the Prefill next (the prefill worker's registry lets a consumer subscribe before
the stream is opened), waits for the prefill's answer, and classifies failures:

* the prefill answers: :class:`~router.lifecycle.events.Prefilled` with no KV (it went by the
  stream); the Decode's messages are relayed from then on as any decode leg's (a token the
  decode worker sent before the router had the prefill's answer waits for it: partial KV is
  never decoded from, and no token is delivered out of order);
* the prefill worker is lost (dead, stalled): the Decode is cancelled (its assembly fails at
  the decode worker anyway, and the decode worker releases what it pulled) and the loss is
  reported: the request is prefilled again;
* the Decode fails before the prefill's answer: the prefill gets a short grace for its own
  outcome (a prefill worker that died fails both calls: it is the one lost); otherwise the
  Prefill is cancelled (its stream has no consumer: the prefill worker aborts it and releases
  its chunks) and the decode side's failure is reported (a lost decode worker re-dispatches:
  the streamed KV cannot be re-let, so the prompt is prefilled again);
* the prefill fails because its stream was cancelled (``CancelledError``: the decode side went
  away) while the client is still there: the decode side's failure is what is reported;
* the prefill fails on its own (any other error): that error is reported; the decode side's
  failure is its consequence (the stream it read ended early), never a lost decode worker;
* the client leaves: both calls are cancelled (the workers abort, nothing stays behind); a Decode
  ended before its first token also aborts the request on the prefill worker, so a finished
  stream the decode worker never subscribed to is dropped at once, not after its TTL.

Relayed and direct token streams alike: a direct stream's legs
(:class:`~router.lifecycle.direct_legs.DirectLegs`) start a Decode that carries the direct grant,
whose first message (the decode worker holds the whole KV: it is admitted) becomes the client's
redirect, relayed here after the prefill's token as any first decode message is; the failures
above are classified the same way (the client is redirected only once the Decode is relayed).

The gRPC side (the Decode call of :class:`~router.lifecycle.grpc_legs.GrpcLegs`) is
:mod:`router.lifecycle.grpc_stream_legs`; this module imports no gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from pdserve.errors import CancelledError as RequestCancelledError
from router.lifecycle import actions as A
from router.lifecycle import events as E
from router.lifecycle.ports import Chunk, ClientGoneError, PrefillAnswer, WorkerLostError
from router.lifecycle.states import LifecycleError, State

if TYPE_CHECKING:
    from router.lifecycle.driver import LifecycleDriver

# After the Decode failed first: how long the prefill's own outcome is awaited (a prefill worker
# that died fails both calls, and it is the one lost) before the Prefill is cancelled.
PREFILL_GRACE_S = 1.0
# After the Prefill failed because its stream was cancelled: how long the Decode's failure (the
# cause) is awaited before the prefill's error is what the request fails with.
DECODE_GRACE_S = 5.0


class StreamedDecodeCall(Protocol):
    """A streamed handoff's Decode, started (the decode worker assembles the streamed KV)."""

    @property
    def settled(self) -> asyncio.Future:
        """Done when the call sent its first message or failed (never raises)."""
        ...

    def failure(self) -> BaseException | None:
        """Once :attr:`settled`: the call's failure as the lifecycle sees it
        (:class:`WorkerLostError` for a lost decode worker or KV, else the request's error), or
        None when it sent a message."""
        ...

    def chunks(self, first_index: int) -> AsyncIterator[Chunk]:
        """The call's messages as chunks from output index ``first_index`` (its first message
        included), under the decode leg's progress deadline."""
        ...

    def cancel(self) -> None:
        """Cancel the call (no-op when it ended)."""
        ...


class StreamLegs(Protocol):
    """What :func:`run_streamed` needs of a request's legs, beyond
    :class:`~router.lifecycle.ports.Legs`."""

    def start_streamed_decode(self, worker_id: str, prefill_id: str, num_output: int) -> StreamedDecodeCall:
        """Start the Decode of prompt + ``num_output`` output tokens on ``worker_id``, its KV
        streamed from ``prefill_id``."""
        ...

    async def streamed_prefill(self, worker_id: str, num_output: int) -> PrefillAnswer:
        """:meth:`~router.lifecycle.ports.Legs.prefill` with the KV streamed (``kv`` None)."""
        ...


async def _settle(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def run_streamed(drv: LifecycleDriver, a: A.RunStreamed) -> AsyncIterator[object]:
    """The driver's leg for :class:`~router.lifecycle.actions.RunStreamed` (see the module
    docstring): client responses; ends with both worker calls finished or cancelled."""
    legs: StreamLegs = drv.legs  # type: ignore[assignment]
    dec = legs.start_streamed_decode(a.decode_id, a.prefill_id, a.num_output)
    pre = asyncio.ensure_future(legs.streamed_prefill(a.prefill_id, a.num_output))
    live = True  # the Decode is still ours to cancel

    def cancel_decode() -> None:
        nonlocal live
        if live:
            live = False
            dec.cancel()

    try:
        await asyncio.wait({pre, dec.settled}, return_when=asyncio.FIRST_COMPLETED)
        if not pre.done():
            if dec.failure() is not None:
                await asyncio.wait({pre}, timeout=PREFILL_GRACE_S)
                if not pre.done():
                    await _settle(pre)  # its stream has no consumer: the worker aborts it
            else:  # the decode worker already decodes: its token waits for the prefill's
                await asyncio.wait({pre})
        err = None if pre.cancelled() else pre.exception()
        if isinstance(err, WorkerLostError):  # the prefill worker is lost: re-prefill
            cancel_decode()
            await drv._lost(err)
            return
        if err is not None or pre.cancelled():
            if not dec.settled.done() and isinstance(err, RequestCancelledError):
                await asyncio.wait({dec.settled}, timeout=DECODE_GRACE_S)
            why = dec.failure() if dec.settled.done() else None
            cancel_decode()
            if err is not None and not isinstance(err, RequestCancelledError):
                # the prefill failed on its own (refused, out of blocks, ...): the decode side's
                # failure (its stream ended before the final: UNAVAILABLE) is its consequence, not
                # a lost decode worker
                if isinstance(why, ClientGoneError) or drv.cluster.client_gone():
                    await drv._end(E.Cancelled())
                    return
                raise err
            if isinstance(why, WorkerLostError):  # the decode side went away: re-dispatch
                await drv._lost(why)
                return
            if isinstance(why, ClientGoneError) or drv.cluster.client_gone():
                await drv._end(E.Cancelled())
                return
            if why is not None:
                raise why
            raise (
                err
                if err is not None
                else LifecycleError(
                    f"request {drv.m.request_id}: its streamed Prefill was cancelled with no failure to report"
                )
            )
        ans = pre.result()
        for _ in await drv._apply(drv.m.handle(E.Prefilled(a.prefill_id, ans.token, None, ans.stop))):
            yield ans.response
        if drv.m.state is not State.HANDING_OFF:  # the prefill's token ended it
            return
        live = False  # the relay owns it now (it cancels the call when it ends)
        async with contextlib.aclosing(drv._relay(a.decode_id, dec.chunks(a.num_output + 1))) as rs:
            async for r in rs:
                yield r
    finally:
        if not pre.done():
            await _settle(pre)
        cancel_decode()
