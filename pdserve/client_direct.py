"""The asyncio SDK's side of direct token streams (issue #12; protocol in proto/pdserve/v1/direct.proto).

:class:`DirectMux` keeps one ``DirectStream.Attach`` call per decode worker address (on a channel
with the client's TLS settings) and routes each delta to the request it belongs to.
:func:`direct_messages` turns one Generate call sent with ``direct_stream`` into the message
sequence a relayed call would have given: the router's first token, then the worker's deltas
(converted to GenerateResponse), then the router's Finish, which is held until the worker's last
delta (``done``) has come, and checked: the tokens received must be the Finish's
``completion_tokens`` (else InternalError: never silently short output). When the router says
the worker was lost (``DirectRedirect.lost``), the worker's deltas for the request are no longer
taken, the tokens and text received so far go to the router (``ResumeDirect``), and the router
relays the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from pdserve.errors import InternalError, UnavailableError, error_class_for
from pdserve.status import from_grpc_code
from pdserve.v1 import client_pb2, direct_pb2, direct_pb2_grpc

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Conn:
    """One Attach call to the decode worker at ``address``; deltas go to the queue of their
    request as ``("direct", conn, delta)``; the call's end as ``("direct_closed", conn, error)``."""

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.routes: dict[str, asyncio.Queue] = {}
        self._out: asyncio.Queue[direct_pb2.AttachRequest | None] = asyncio.Queue()
        self.closed = False
        self.call = direct_pb2_grpc.DirectStreamStub(channel).Attach(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[direct_pb2.AttachRequest]:
        while (m := await self._out.get()) is not None:
            yield m

    async def _read(self) -> None:
        err: BaseException | None = None
        try:
            async for resp in self.call:
                for d in resp.deltas:
                    q = self.routes.get(d.request_id)
                    if q is not None:
                        q.put_nowait(("direct", self, d))
                        if d.done:
                            self.routes.pop(d.request_id, None)
        except grpc.RpcError as e:
            err = e
        except asyncio.CancelledError:
            err = UnavailableError(f"direct stream to {self.address} closed")
        finally:
            self.closed = True
            routes, self.routes = self.routes, {}
            for q in routes.values():
                q.put_nowait(("direct_closed", self, err))

    def attach(self, rid: str, ticket: str, q: asyncio.Queue) -> None:
        self.routes[rid] = q
        self._out.put_nowait(
            direct_pb2.AttachRequest(attach=direct_pb2.DirectAttach(request_id=rid, ticket=ticket))
        )

    def detach(self, rid: str, tell_worker: bool) -> None:
        """Stop routing ``rid``'s deltas; ``tell_worker``: the worker aborts it (the client gave up)."""
        if self.routes.pop(rid, None) is not None and tell_worker and not self.closed:
            self._out.put_nowait(direct_pb2.AttachRequest(detach=rid))

    async def close(self) -> None:
        self._out.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        await self.channel.close()


class DirectMux:
    """The direct connections of one AsyncClient: one Attach call per decode worker address,
    opened on first use (``channel``: the client's channel factory: same TLS settings as its
    router channels) and reopened after it ended."""

    def __init__(self, channel: Callable[[str], grpc.aio.Channel]) -> None:
        self._channel = channel
        self._conns: dict[str, _Conn] = {}

    def get(self, address: str) -> _Conn:
        c = self._conns.get(address)
        if c is None or c.closed:
            c = self._conns[address] = _Conn(address, self._channel(address))
        return c

    async def close(self) -> None:
        conns, self._conns = self._conns, {}
        for c in conns.values():
            await c.close()


def _delta_error(d: direct_pb2.DirectDelta) -> Exception:
    code = _CODES.get(d.error_code, grpc.StatusCode.UNKNOWN)
    return error_class_for(from_grpc_code(code))(d.error or f"direct stream failed ({code.name})")


def _cut_short(shown_id: str, redirect: direct_pb2.DirectRedirect) -> UnavailableError:
    return UnavailableError(
        f"request {shown_id}: the direct stream from decode worker {redirect.worker_id} "
        f"({redirect.address}) ended before all tokens arrived"
    )


async def _pump(call: Any, q: asyncio.Queue) -> None:
    try:
        async for m in call:
            q.put_nowait(("router", None, m))
        q.put_nowait(("router_end", None, None))
    except grpc.RpcError as e:
        q.put_nowait(("router_error", None, e))


async def direct_messages(
    call: Any,
    mux: DirectMux,
    resume: Callable[[direct_pb2.ResumeDirectRequest], Any],
) -> AsyncIterator[client_pb2.GenerateResponse]:
    """The messages of Generate ``call`` (sent with ``direct_stream``) as a relayed call gives them
    (module doc). ``resume``: sends a ResumeDirectRequest to the router serving ``call`` (an
    awaitable). Raises the router's grpc.RpcError as the call would; a refused attach (ticket) as
    its typed error; InternalError when the Finish's token count is not what arrived."""
    q: asyncio.Queue = asyncio.Queue()
    pump = asyncio.ensure_future(_pump(call, q))
    redirect: direct_pb2.DirectRedirect | None = None
    conn: _Conn | None = None
    direct_done = False
    conn_lost = False  # the current worker's connection ended before its last delta
    direct_error: Exception | None = None
    held_finish: client_pb2.GenerateResponse | None = None
    shown_id = ""
    tokens: list[int] = []
    chars = 0

    def finished(m: client_pb2.GenerateResponse) -> client_pb2.GenerateResponse:
        if direct_error is not None:
            raise direct_error
        n = m.finish.usage.completion_tokens
        if n != len(tokens):
            raise InternalError(
                f"request {shown_id}: the router's finish counts {n} output tokens but {len(tokens)} arrived"
            )
        return m

    try:
        while True:
            kind, src, x = await q.get()
            if kind == "router":
                m: client_pb2.GenerateResponse = x
                shown_id = shown_id or m.request_id
                if m.HasField("direct"):
                    if not m.direct.lost:
                        redirect, direct_done, direct_error, conn_lost = m.direct, False, None, False
                        conn = mux.get(redirect.address)
                        conn.attach(redirect.request_id, redirect.ticket, q)
                        continue
                    # the worker was lost: take nothing more from it, tell the router what we have
                    if conn is not None and redirect is not None:
                        conn.detach(redirect.request_id, tell_worker=True)
                    redirect = conn = None
                    await resume(
                        direct_pb2.ResumeDirectRequest(
                            request_id=m.direct.request_id,
                            ticket=m.direct.ticket,
                            token_ids=tokens,
                            text_chars=chars,
                        )
                    )
                    continue
                if m.HasField("finish") and redirect is not None and not direct_done:
                    if conn_lost:
                        raise _cut_short(shown_id, redirect)
                    held_finish = m  # the worker's last delta has not come yet
                    continue
                tokens.extend(m.token_ids)
                chars += len(m.text)
                if m.HasField("finish"):
                    yield finished(m) if redirect is not None else m
                    return
                yield m
            elif kind == "direct":
                if src is not conn or redirect is None:
                    continue  # a worker this request left
                d: direct_pb2.DirectDelta = x
                if d.error_code:
                    err = _delta_error(d)
                    if d.error_code == grpc.StatusCode.PERMISSION_DENIED.value[0]:
                        raise err  # a refused attach: nothing comes from there
                    direct_done, direct_error = True, err  # the router's verdict decides
                    if held_finish is not None:
                        raise err
                    continue
                if d.token_ids or d.text:
                    tokens.extend(d.token_ids)
                    chars += len(d.text)
                    yield client_pb2.GenerateResponse(
                        request_id=shown_id, token_ids=d.token_ids, text=d.text, logprobs=d.logprobs
                    )
                if d.done:
                    direct_done = True
                    if held_finish is not None:
                        yield finished(held_finish)
                        return
            elif kind == "direct_closed":
                if src is conn and redirect is not None and not direct_done:
                    if held_finish is not None:
                        raise _cut_short(shown_id, redirect)
                    conn_lost = True  # the router says what happened (lost, or an error)
            elif kind == "router_end":
                if held_finish is None:
                    return  # the stream ended without a result (as a relayed one may)
            else:  # router_error
                raise x
    finally:
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump
        if conn is not None and redirect is not None:
            conn.detach(redirect.request_id, tell_worker=not direct_done)
