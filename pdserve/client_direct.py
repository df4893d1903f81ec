"""The SDK's side of direct token streams (issue #12; protocol in proto/pdserve/v1/direct.proto).

One direct Generate call becomes the message sequence a relayed call would have given: the router's
first token, then the worker's deltas (converted to GenerateResponse), then the router's Finish,
which is held until the worker's last delta (``done``) has come and goes out in one message with
that delta's tokens (as a relay's last message carries the last tokens and the finish), and checked: the tokens received
must be the Finish's ``completion_tokens`` (else InternalError: never silently short output). When
the router says the worker was lost (``DirectRedirect.lost``), the worker's deltas for the request
are no longer taken, the tokens and text received so far go to the router (``ResumeDirect``), and
the router relays the rest. A live migration of the request (a drain, a rebalance) looks the same
to the client: the source ends the request's deltas after its last token (an ABORTED delta, which
waits for the router's word), the router sends the ``lost`` redirect, and the destination's tokens
come relayed from the index the client reports (router.lifecycle.direct_legs ``DirectLegs.moved``).
A router that does not offer direct streams relays: its messages pass through unchanged.

:class:`_Flow` is that merge as pure code (events in, messages out); two drivers run it:

* asyncio (:class:`AsyncClient`): :class:`DirectMux` keeps one ``DirectStream.Attach`` call per
  decode worker address and :func:`direct_messages` merges the router's call with its deltas;
* sync (:class:`Client`): :class:`SyncDirectMux` (one Attach call and one reader thread per
  worker address) and :func:`direct_messages_sync`, which reads the router's call in the caller's
  thread until a redirect comes (a relayed call costs no thread) and then from one pump thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from pdserve.errors import InternalError, UnavailableError, error_class_for
from pdserve.status import from_grpc_code
from pdserve.v1 import client_pb2, direct_pb2, direct_pb2_grpc

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Routing:
    """What both drivers' connections share: the queues of the requests attached there (by
    request id), each delta put on its request's queue as ``("direct", conn, delta)`` (a request
    whose last delta came is forgotten), and the connection's end told to every request still
    attached as ``("direct_closed", conn, error)``. The sync connection calls these under its
    lock (its reader thread and the callers' threads share ``routes``)."""

    routes: dict[str, Any]
    closed: bool

    def _route(self, resp: direct_pb2.AttachResponse) -> None:
        for d in resp.deltas:
            q = self.routes.get(d.request_id)
            if q is not None:
                q.put_nowait(("direct", self, d))
                if d.done:
                    self.routes.pop(d.request_id, None)

    def _close_routes(self) -> list[Any]:
        """Mark the connection closed; the queues of the requests still attached."""
        self.closed = True
        routes, self.routes = self.routes, {}
        return list(routes.values())

    def _tell_closed(self, queues: list[Any], err: BaseException | None) -> None:
        for q in queues:
            q.put_nowait(("direct_closed", self, err))


class _Conn(_Routing):
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
                self._route(resp)
        except grpc.RpcError as e:
            err = e
        except asyncio.CancelledError:
            err = UnavailableError(f"direct stream to {self.address} closed")
        finally:
            self._tell_closed(self._close_routes(), err)

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


async def _pump(it: AsyncIterator[client_pb2.GenerateResponse], q: asyncio.Queue) -> None:
    try:
        async for m in it:
            q.put_nowait(("router", None, m))
        q.put_nowait(("router_end", None, None))
    except grpc.RpcError as e:
        q.put_nowait(("router_error", None, e))


class _Flow:
    """The merge of one direct Generate call (module doc), pure: :meth:`step` takes one event of
    the driver's queue, ``(kind, source, payload)``: ``router`` (a GenerateResponse),
    ``router_end``, ``router_error`` (the call's grpc.RpcError), ``direct`` (a DirectDelta of the
    connection ``source``), ``direct_closed`` (connection ``source`` ended). Deltas are routed to
    ``q`` (the driver's queue) by ``mux``'s connections."""

    def __init__(self, mux: Any, q: Any) -> None:
        self.mux, self.q = mux, q
        self.redirect: direct_pb2.DirectRedirect | None = None
        self.conn: Any = None
        self.direct_done = False
        self.conn_lost = False  # the current worker's connection ended before its last delta
        self.direct_error: Exception | None = None
        self.held_finish: client_pb2.GenerateResponse | None = None
        # the worker's last delta's message, held for the Finish: they go out as one message, as a
        # relay's last message carries both (a caller may look at the tokens of the finish's chunk)
        self.held_last: client_pb2.GenerateResponse | None = None
        self.shown_id = ""
        self.tokens: list[int] = []
        self.chars = 0
        self.ended = False  # the sequence is complete (after the messages of the last step)

    def _finished(self, m: client_pb2.GenerateResponse) -> client_pb2.GenerateResponse:
        if self.direct_error is not None:
            raise self.direct_error
        n = m.finish.usage.completion_tokens
        if n != len(self.tokens):
            raise InternalError(
                f"request {self.shown_id}: the router's finish counts {n} output tokens but "
                f"{len(self.tokens)} arrived"
            )
        if self.held_last is not None:  # the worker's last tokens with the router's finish
            last, self.held_last = self.held_last, None
            merged = client_pb2.GenerateResponse()
            merged.CopyFrom(m)
            merged.token_ids[:0] = last.token_ids
            merged.text = last.text + m.text
            merged.logprobs.extend(last.logprobs)
            return merged
        return m

    def _flush_last(self) -> list[client_pb2.GenerateResponse]:
        last, self.held_last = self.held_last, None
        return [last] if last is not None else []

    def step(
        self, kind: str, src: Any, x: Any
    ) -> tuple[list[client_pb2.GenerateResponse], direct_pb2.ResumeDirectRequest | None]:
        """The messages event ``(kind, src, x)`` releases, in order, and a ResumeDirectRequest the
        driver must send the router first (or None). Raises what ends the call: the router's
        grpc.RpcError, a refused attach's typed error, InternalError (a count mismatch),
        UnavailableError (the worker's stream ended short)."""
        if kind == "router":
            m: client_pb2.GenerateResponse = x
            self.shown_id = self.shown_id or m.request_id
            if m.HasField("direct"):
                if not m.direct.lost:
                    self.redirect, self.direct_done, self.direct_error, self.conn_lost = (
                        m.direct,
                        False,
                        None,
                        False,
                    )
                    self.conn = self.mux.get(m.direct.address)
                    self.conn.attach(m.direct.request_id, m.direct.ticket, self.q)
                    return [], None
                # the worker was lost: take nothing more from it, tell the router what we have
                if self.conn is not None and self.redirect is not None:
                    self.conn.detach(self.redirect.request_id, tell_worker=True)
                self.redirect = self.conn = None
                return self._flush_last(), direct_pb2.ResumeDirectRequest(
                    request_id=m.direct.request_id,
                    ticket=m.direct.ticket,
                    token_ids=self.tokens,
                    text_chars=self.chars,
                )
            if m.HasField("finish") and self.redirect is not None and not self.direct_done:
                if self.conn_lost:
                    raise _cut_short(self.shown_id, self.redirect)
                self.held_finish = m  # the worker's last delta has not come yet
                return [], None
            self.tokens.extend(m.token_ids)
            self.chars += len(m.text)
            if m.HasField("finish"):
                if self.redirect is None:  # relayed: the call's end ends the sequence (a group
                    return [m], None  # relays one finish per choice)
                self.ended = True
                return [self._finished(m)], None
            return [m], None
        if kind == "direct":
            if src is not self.conn or self.redirect is None:
                return [], None  # a worker this request left
            d: direct_pb2.DirectDelta = x
            if d.error_code:
                err = _delta_error(d)
                if d.error_code == grpc.StatusCode.PERMISSION_DENIED.value[0]:
                    raise err  # a refused attach: nothing comes from there
                self.direct_done, self.direct_error = True, err  # the router's verdict decides
                if self.held_finish is not None:
                    raise err
                return [], None
            out: list[client_pb2.GenerateResponse] = []
            if d.token_ids or d.text:
                self.tokens.extend(d.token_ids)
                self.chars += len(d.text)
                m = client_pb2.GenerateResponse(
                    request_id=self.shown_id, token_ids=d.token_ids, text=d.text, logprobs=d.logprobs
                )
                if d.done:
                    self.held_last = m  # goes out with the router's finish
                else:
                    out.append(m)
            if d.done:
                self.direct_done = True
                if self.held_finish is not None:
                    out.append(self._finished(self.held_finish))
                    self.ended = True
            return out, None
        if kind == "direct_closed":
            if src is self.conn and self.redirect is not None and not self.direct_done:
                if self.held_finish is not None:
                    raise _cut_short(self.shown_id, self.redirect)
                self.conn_lost = True  # the router says what happened (lost, or an error)
            return [], None
        if kind == "router_end":
            if self.held_finish is None:
                self.ended = True  # the stream ended without a result (as a relayed one may)
                return self._flush_last(), None
            return [], None
        raise x  # router_error

    def close(self) -> None:
        """Let go of the request's direct stream (the worker aborts it unless it was done)."""
        if self.conn is not None and self.redirect is not None:
            self.conn.detach(self.redirect.request_id, tell_worker=not self.direct_done)
            self.conn = None


async def direct_messages(
    call: Any,
    mux: DirectMux,
    resume: Callable[[direct_pb2.ResumeDirectRequest], Any],
) -> AsyncIterator[client_pb2.GenerateResponse]:
    """The messages of Generate ``call`` (sent with ``direct_stream``) as a relayed call gives them
    (module doc). ``resume``: sends a ResumeDirectRequest to the router serving ``call`` (an
    awaitable). Raises the router's grpc.RpcError as the call would; a refused attach (ticket) as
    its typed error; InternalError when the Finish's token count is not what arrived.

    As the sync driver, it reads the router's messages itself until the redirect (nothing else
    can come before it: a relayed call is read only here) and only then hands the call to a pump
    task, whose messages and the worker's deltas meet on one queue: two messages of every direct
    request, and every message of a relayed one, cost no task switch and no queue hop (#12)."""
    q: asyncio.Queue = asyncio.Queue()
    flow = _Flow(mux, q)
    it = aiter(call)
    pump: asyncio.Future | None = None
    try:
        while not flow.ended:
            if flow.redirect is None and pump is None:  # before the redirect: read here
                try:
                    ev: tuple[str, Any, Any] = ("router", None, await anext(it))
                except StopAsyncIteration:
                    ev = ("router_end", None, None)
                except grpc.RpcError as e:
                    ev = ("router_error", None, e)
            else:
                if pump is None:
                    pump = asyncio.ensure_future(_pump(it, q))
                ev = await q.get()
            out, r = flow.step(*ev)
            if r is not None:
                await resume(r)
            for m in out:
                yield m
    finally:
        if pump is not None:
            pump.cancel()  # its read cancelled cancels the call
            with contextlib.suppress(BaseException):
                await pump
        else:  # the call's message iterator, read here: closed in this task, not by the loop's hook
            close = getattr(it, "aclose", None)
            if close is not None:
                with contextlib.suppress(BaseException):
                    await close()
        flow.close()


# ---------------------------------------------------------------- sync


class _SyncConn(_Routing):
    """:class:`_Conn` on a sync channel: one Attach call to the decode worker at ``address`` and
    a reader thread routing its deltas to the queues of their requests."""

    def __init__(self, address: str, channel: grpc.Channel) -> None:
        self.address = address
        self.channel = channel
        self.routes: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._out: queue.Queue[direct_pb2.AttachRequest | None] = queue.Queue()
        self.closed = False
        self.call = direct_pb2_grpc.DirectStreamStub(channel).Attach(self._requests())
        self._reader = threading.Thread(target=self._read, name=f"pdserve-direct-{address}", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[direct_pb2.AttachRequest]:
        while (m := self._out.get()) is not None:
            yield m

    def _read(self) -> None:
        err: BaseException | None = None
        try:
            for resp in self.call:
                with self._lock:
                    self._route(resp)
        except grpc.RpcError as e:
            err = e
        finally:
            with self._lock:
                queues = self._close_routes()
            self._out.put_nowait(None)  # ends the request iterator (gRPC's thread waits on it)
            self._tell_closed(queues, err)

    def attach(self, rid: str, ticket: str, q: Any) -> None:
        with self._lock:
            closed = self.closed
            if not closed:
                self.routes[rid] = q
                self._out.put_nowait(
                    direct_pb2.AttachRequest(attach=direct_pb2.DirectAttach(request_id=rid, ticket=ticket))
                )
        if closed:
            q.put_nowait(("direct_closed", self, UnavailableError(f"direct stream to {self.address} closed")))

    def detach(self, rid: str, tell_worker: bool) -> None:
        """As :meth:`_Conn.detach`."""
        with self._lock:
            if self.routes.pop(rid, None) is not None and tell_worker and not self.closed:
                self._out.put_nowait(direct_pb2.AttachRequest(detach=rid))

    def close(self) -> None:
        self._out.put_nowait(None)
        self.call.cancel()
        self._reader.join(10)
        self.channel.close()


class SyncDirectMux:
    """:class:`DirectMux` of a sync :class:`Client` (thread-safe): one :class:`_SyncConn` per
    decode worker address, opened on first use (``channel``: the client's sync channel factory)
    and reopened after it ended."""

    def __init__(self, channel: Callable[[str], grpc.Channel]) -> None:
        self._channel = channel
        self._conns: dict[str, _SyncConn] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> _SyncConn:
        with self._lock:
            c = self._conns.get(address)
            if c is None or c.closed:
                c = self._conns[address] = _SyncConn(address, self._channel(address))
            return c

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, {}
        for c in conns.values():
            c.close()


def _pump_sync(it: Iterator[client_pb2.GenerateResponse], q: queue.Queue) -> None:
    try:
        for m in it:
            q.put_nowait(("router", None, m))
        q.put_nowait(("router_end", None, None))
    except grpc.RpcError as e:
        q.put_nowait(("router_error", None, e))


def direct_messages_sync(
    call: Any,
    mux: SyncDirectMux,
    resume: Callable[[direct_pb2.ResumeDirectRequest], Any],
) -> Iterator[client_pb2.GenerateResponse]:
    """:func:`direct_messages` for a sync Generate ``call`` (``resume`` blocks). The router's
    messages are read in the caller's thread until its redirect (a relayed call, from a router
    without direct streams, is only read here), then by one pump thread while the worker's
    deltas come through ``mux``. Cancelling ``call`` ends it with the call's CANCELLED error."""
    q: queue.Queue = queue.Queue()
    flow = _Flow(mux, q)
    it = iter(call)
    try:
        for m in it:  # until the redirect: nothing else can come
            out, r = flow.step("router", None, m)
            if r is not None:
                resume(r)
            yield from out
            if flow.ended:
                return
            if flow.redirect is not None:
                break
        else:
            flow.step("router_end", None, None)
            return
        threading.Thread(target=_pump_sync, args=(it, q), name="pdserve-direct-router", daemon=True).start()
        while not flow.ended:
            kind, src, x = q.get()
            out, r = flow.step(kind, src, x)
            if r is not None:
                resume(r)
            yield from out
    finally:
        if not flow.ended:
            call.cancel()  # the pump thread, if any, ends with the call
        flow.close()
