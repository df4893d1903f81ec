"""Direct token streams on a decode worker (issue #12; protocol in proto/pdserve/v1/direct.proto).

A Decode call whose request carries ``direct`` (a :class:`DirectGrant` from the router; a fresh
handoff or local_prefill) is served by
:meth:`DirectStreams.serve`: after admission it sends the router one message with no tokens (the
request is here: the router redirects the client now), then streams the request's deltas (token
ids, the engine's text, logprobs) to the client's :meth:`DirectStreams.Attach` call, and sends the
router only progress messages (the token ids since the last one, at most
``DirectGrant.progress_interval_s`` apart, with when each token was produced:
``token_offsets_s``) and the finish; with local_prefill, the first of them
that carries tokens also carries ``num_cached_tokens``. Text and logprobs never go to the router.

Attach: one bidirectional call per client connection multiplexes every request the client attached
there; deltas of all of them go out in one message per wake-up (the engine's step hands all its
outputs to the event loop at once) and at most one message per ``window_s``. Tickets: a presented
ticket must equal the one the router granted for the request (constant time), bind this worker,
the request and its tenant, be unexpired, and carry the cluster key's signature when this worker
holds the key (a cluster token); otherwise the attach is refused for that request alone with
PERMISSION_DENIED (the call and the request go on). Bounds: a request not attached by its
ticket's expiry is aborted (the router's call fails DEADLINE_EXCEEDED); a connection whose client
takes no message for ``stall_timeout_s`` is cancelled (RESOURCE_EXHAUSTED) and its requests
aborted; a client that detaches a request, or whose connection ends, aborts it (its blocks are
freed; the router's call fails CANCELLED). A request's deltas wait in its slot until its
connection writes them (at most its ``max_tokens`` tokens). A request live-migrated away
(``MigrateOut``) ends at the switch like an aborted one: after its last token the client gets an
ABORTED delta and the router's call ends ABORTED, and the router has the client resume on the
destination (router.lifecycle.direct_legs ``DirectLegs.moved``). A request migrated here whose
``ResumeStream`` carries ``direct`` (the client's index, text length and the stop strings) is
streamed to its client from this worker (:meth:`DirectStreams.serve_resumed`): its text rendered
here from the client's index, the router getting the admission message, progress and the finish.

Where it is served (:func:`needs_own_port`): on the worker's port, except under mutual TLS, where
the worker's port requires cluster client certificates that clients do not hold: then on a port of
its own (:func:`serve_direct_port`: TLS, no client certificate, DirectStream and health only),
which each admission message names to the router (``DecodeResponse.direct_address``), so the
worker's internal services stay closed to clients and no cluster token is needed (the granted
ticket, received over the router's authenticated channel, is what a client must present).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine.engine_loop import OutputItem
from pdserve.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    PdserveError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from pdserve.proto_convert import finish_to_proto, logprob_to_proto, name_logprob_tokens
from pdserve.status import status_for
from pdserve.ticket import TicketSigner, check_claims, decode_unverified
from pdserve.tracing import log_event
from pdserve.v1 import common_pb2, direct_pb2, worker_pb2

log = logging.getLogger(__name__)

DEFAULT_PROGRESS_INTERVAL_S = 1.0


@dataclass
class _Slot:
    """One direct request: what its client has not been sent yet, and where it goes."""

    rid: str
    ticket: str
    tenant: str
    expires_at: float  # wall clock: attach by then (the ticket's expiry, shifted: DirectStreams._register)
    abort: Callable[[BaseException], None]  # ends the request's Decode (event loop)
    ticket_expires_at: float  # wall clock: the expiry the ticket itself carries
    conn: _Conn | None = None
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    done: bool = False  # its last delta is queued (finish or error)
    error: tuple[int, str] | None = None
    sent_done: bool = False
    expiry: asyncio.TimerHandle | None = None

    def take(self) -> direct_pb2.DirectDelta:
        d = direct_pb2.DirectDelta(
            request_id=self.rid, token_ids=self.tokens, text="".join(self.text), logprobs=self.logprobs
        )
        self.tokens, self.text, self.logprobs = [], [], []
        if self.done:
            d.done = True
            self.sent_done = True
            if self.error is not None:
                d.error_code, d.error = self.error
        return d


class _Conn:
    """One Attach call: its requests with deltas to send, and its writer."""

    def __init__(self, ctx: grpc.aio.ServicerContext) -> None:
        self.ctx = ctx
        self.dirty: dict[str, _Slot] = {}
        self.refusals: list[direct_pb2.DirectDelta] = []
        self.wake = asyncio.Event()
        self.slots: dict[str, _Slot] = {}
        self.closed = False

    def mark(self, slot: _Slot) -> None:
        self.dirty[slot.rid] = slot
        self.wake.set()


def _code_of(exc: BaseException) -> tuple[int, str]:
    st = status_for(exc)
    return st.code.value[0], st.details


class _Feed:
    """The engine outputs of one direct request, taken as the decode worker's inbox hands them
    to the event loop (``_LoopQueue.divert``; called once per output, never blocks): tokens, text
    and logprobs go into the request's slot (its connection is marked: one write per wake-up for
    all of its requests), token ids and their times into the router's next progress message, and
    :meth:`DirectStreams.serve` is woken only when it has something to send or raise: the finish,
    a failure, or tokens once ``interval`` has passed since the last progress message (checked as
    tokens come, as a message-per-token loop would). Outputs after the finish or a failure, or
    once ``closed``, are dropped."""

    def __init__(
        self,
        streams: DirectStreams,
        slot: _Slot,
        loop: asyncio.AbstractEventLoop,
        count_finished: Callable[[], None],
        with_text: bool,
        token_bytes: Callable[[int], bytes] | None,
        interval: float,
    ) -> None:
        self.streams, self.slot, self.loop = streams, slot, loop
        self.count_finished, self.with_text, self.token_bytes = count_finished, with_text, token_bytes
        self.t_admitted = loop.time()
        self.due = self.t_admitted + interval  # progress goes when tokens are here by then
        self.progress: list[int] = []
        self.offsets: list[float] = []  # of the progress tokens, seconds after admission
        self.cached: int | None = None  # num_cached_tokens of the first output with tokens
        self.sent_cached = True  # local_prefill: False until a message carried num_cached_tokens
        self.finish: common_pb2.Finish | None = None
        self.failure: BaseException | None = None
        self.closed = False
        self._wake: asyncio.Future[None] | None = None

    def progress_due(self) -> bool:
        return bool(self.progress) and self.loop.time() >= self.due

    def wait(self) -> asyncio.Future[None]:
        self._wake = self.loop.create_future()
        return self._wake

    def _signal(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def __call__(self, item: OutputItem) -> None:
        if self.closed or self.finish is not None or self.failure is not None:
            return
        slot = self.slot
        if isinstance(item, BaseException):
            self.failure = item
            self.streams._push(slot, None, item)
            self._signal()
            return
        toks = item.new_token_ids
        if not toks and not item.finished:
            return
        if self.cached is None:
            self.cached = max(0, item.num_cached_tokens)
        if toks:
            slot.tokens.extend(toks)
            self.progress.extend(toks)
            now = self.loop.time()
            self.offsets.extend([now - self.t_admitted] * len(toks))
        if self.with_text:
            slot.text.append(item.text_delta)
        if item.logprobs:
            lps = [logprob_to_proto(lp) for lp in item.logprobs]
            if self.token_bytes is not None:
                name_logprob_tokens(lps, self.token_bytes)  # as the router does for a relay
            slot.logprobs.extend(lps)
        if item.finished:
            self.count_finished()
            f = common_pb2.Finish(reason=finish_to_proto(item.finish_reason))
            if item.stop_reason is not None:
                f.stop = str(item.stop_reason)
            self.finish = f
            slot.done = True
            self._signal()
        elif toks and now >= self.due:
            self._signal()
        if slot.conn is not None:
            slot.conn.mark(slot)


class DirectStreams:
    """The direct streams of one decode worker (its event loop only). ``signer``: the cluster's
    ticket key when this worker holds it (a cluster token), None otherwise (presented tickets are
    then checked against the granted ones only). ``window_s``: at most one message per connection
    per window (0: none); ``stall_timeout_s``: a connection whose client takes nothing that long is
    cancelled."""

    def __init__(
        self,
        worker_id: str,
        signer: TicketSigner | None,
        *,
        window_s: float = 0.0,
        stall_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.worker_id = worker_id
        self.signer = signer
        self.window_s = window_s
        self.stall_timeout_s = stall_timeout_s
        self.clock = clock
        # host:port of DirectStream when it has a port of its own (serve_direct_port), told to
        # the router in each admission message; "": served on the worker's own address
        self.address = ""
        self._slots: dict[str, _Slot] = {}

    # ------------------------------------------------------------------ the router's side
    def check(self, req: worker_pb2.DecodeRequest) -> None:
        """Refuse a direct Decode this worker cannot serve (before admission)."""
        if req.resume_token_ids or req.prompt_tail_pending:
            raise InvalidRequestError(
                "a direct stream serves a fresh request only (a handoff or local_prefill): "
                "resume_token_ids and prompt_tail_pending are not supported with DecodeRequest.direct"
            )
        if not req.direct.ticket:
            raise InvalidRequestError("DecodeRequest.direct has no ticket")

    def _register(
        self,
        rid: str,
        ticket: str,
        tenant: str | None,
        abort: Callable[[BaseException], None],
        arrived: float | None = None,
    ) -> _Slot:
        """The slot of direct request ``rid`` granted ``ticket`` for ``tenant`` (None: the
        ticket's own, for a migrated request whose tenant the call does not name). ``arrived``
        (wall clock): when the Decode call carrying the grant reached this worker (None: now).

        The client can only attach after the redirect, which follows this registration, so the
        time this worker itself took to admit the request (waiting for free blocks, or for an
        admission thread, under a burst) is added to the attach window: the client must attach
        by the ticket's expiry or by now plus the validity the ticket had when the call came,
        whichever is later. Without it, a burst of 1,000 requests through the OpenAI server
        (whose admissions here waited up to ~100 s) failed 208 of them PERMISSION_DENIED
        "ticket refused: expired" at this check. The ticket must have been valid when the call
        came (an expired grant is a router bug or a replay) and must name this request, this
        worker and the tenant."""
        claims = decode_unverified(ticket)
        tenant = claims.tenant if tenant is None else tenant
        now = self.clock()
        arrived = now if arrived is None else min(arrived, now)
        # the router's own grant must hold here (a mismatch is a router bug or a misroute)
        check_claims(claims, request_id=rid, worker_id=self.worker_id, tenant=tenant, now=arrived)
        attach_by = max(claims.expires_at, now + (claims.expires_at - arrived))
        old = self._slots.get(rid)
        if old is not None and old.done and old.conn is None:
            self._drop(old)  # it ended here unattached (migrated away) and now comes back
        elif old is not None:
            raise InvalidRequestError(f"request {rid!r} already streams directly from this worker")
        slot = _Slot(rid, ticket, tenant, attach_by, abort, claims.expires_at)
        loop = asyncio.get_running_loop()
        slot.expiry = loop.call_later(max(0.0, attach_by - now), self._expired, slot)
        self._slots[rid] = slot
        return slot

    def _expired(self, slot: _Slot) -> None:
        if slot.conn is not None:
            return
        if self._slots.get(slot.rid) is slot:
            del self._slots[slot.rid]
        if not slot.done:
            slot.abort(
                DeadlineExceededError(
                    f"request {slot.rid}: the client did not attach to its direct stream before its ticket expired"
                )
            )

    def _drop(self, slot: _Slot) -> None:
        if self._slots.get(slot.rid) is slot:
            del self._slots[slot.rid]
        if slot.expiry is not None:
            slot.expiry.cancel()
        if slot.conn is not None:
            slot.conn.slots.pop(slot.rid, None)

    def _push(self, slot: _Slot, msg: worker_pb2.DecodeResponse | None, error: BaseException | None) -> None:
        if msg is not None:
            slot.tokens.extend(msg.token_ids)
            if msg.has_text:
                slot.text.append(msg.text)
            slot.logprobs.extend(msg.logprobs)
            if msg.HasField("finish"):
                slot.done = True
        if error is not None and not slot.done:
            slot.done, slot.error = True, _code_of(error)
        if slot.conn is not None:
            slot.conn.mark(slot)

    async def serve(
        self,
        rid: str,
        req: worker_pb2.DecodeRequest,
        out: Any,
        pull_s: float,
        count_finished: Callable[[], None],
        with_text: bool,
        token_bytes: Callable[[int], bytes] | None = None,
        arrived: float | None = None,
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """The router's side of direct request ``rid`` (admitted; ``out``: its output queue, a
        ``_LoopQueue``): one message with no tokens (admitted), progress messages, the finish
        (with the last token ids). The deltas go to the client's connection: after the admission
        message ``out`` is diverted to a :class:`_Feed`, which puts each engine output in the
        request's slot as the inbox hands it over (no task wakes per token); this generator wakes
        only to send the router progress, the finish, or to raise the failure that ended the
        request (engine error, not attached in time, client detached). ``arrived``: when the
        call came (wall clock; :meth:`_register`)."""
        slot = self._register(rid, req.direct.ticket, req.tenant, lambda e: out.put_nowait(e), arrived)
        interval = req.direct.progress_interval_s or DEFAULT_PROGRESS_INTERVAL_S
        loop = asyncio.get_running_loop()
        feed = _Feed(self, slot, loop, count_finished, with_text, token_bytes, interval)
        feed.sent_cached = not req.local_prefill
        ended = False
        try:
            yield worker_pb2.DecodeResponse(request_id=rid, kv_pull_s=pull_s, direct_address=self.address)
            feed.t_admitted = loop.time()
            feed.due = feed.t_admitted + interval
            out.divert(feed)
            while True:
                if feed.finish is None and feed.failure is None and not feed.progress_due():
                    await feed.wait()
                if feed.finish is not None:
                    ended = True
                    m = worker_pb2.DecodeResponse(
                        request_id=rid,
                        token_ids=feed.progress,
                        token_offsets_s=feed.offsets,
                        finish=feed.finish,
                    )
                    if not feed.sent_cached:
                        m.num_cached_tokens = feed.cached or 0
                    yield m
                    return
                if feed.failure is not None:
                    ended = True
                    raise feed.failure
                if feed.progress_due():
                    m = worker_pb2.DecodeResponse(
                        request_id=rid, token_ids=feed.progress, token_offsets_s=feed.offsets
                    )
                    if not feed.sent_cached:
                        m.num_cached_tokens, feed.sent_cached = feed.cached or 0, True
                    feed.progress, feed.offsets = [], []
                    # before the yield: tokens the feed takes while this generator is suspended
                    # are then seen by progress_due() when it resumes (set after, they waited for
                    # a later token's wake-up, or forever at a pause)
                    feed.due = loop.time() + interval
                    yield m
        finally:
            feed.closed = True  # later outputs (the request is being aborted) are dropped
            if not ended:  # the router's call ended first (cancelled, its deadline): tell the client
                self._push(slot, None, CancelledError(f"request {rid}: its router call ended"))
            if slot.conn is None and slot.done and not self._waits_attach(slot):
                self._drop(slot)

    async def serve_resumed(
        self,
        req: worker_pb2.ResumeStreamRequest,
        messages: AsyncIterator[worker_pb2.DecodeResponse],
        tokenizer: Any,
        count_finished: Callable[[], None] = lambda: None,
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """The router's side of a migrated request streamed to its client (``ResumeStream`` with
        ``direct``): ``messages`` is the request's ResumeStream from output index 0 (the tokens it
        had when it migrated, then the new ones); the tokens from ``req.start_index`` (what the
        client has) go to the client's connection with their text, rendered here as the router
        renders a relayed leg (an :class:`IncrementalDetokenizer` over every output token, the
        request's stop strings ``req.direct_stop``, continuing the client's
        ``req.direct_text_chars`` characters: no gap, no duplicate). The router gets what a direct
        Decode sends it: one message with no tokens, progress from ``start_index`` and the finish
        (a stop string matched here ends the request: STOP naming it). Raises the failure that
        ended the request (the stream's, not attached in time, client detached)."""
        from engine.tokenizer import IncrementalDetokenizer

        rid = req.request_id
        q: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for m in messages:
                    q.put_nowait(m)
                q.put_nowait(None)
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
                q.put_nowait(e)

        slot = self._register(rid, req.direct.ticket, None, q.put_nowait)
        task = asyncio.ensure_future(pump())
        interval = req.direct.progress_interval_s or DEFAULT_PROGRESS_INTERVAL_S
        loop = asyncio.get_running_loop()
        detok = IncrementalDetokenizer(tokenizer, tuple(req.direct_stop))
        client_has = req.start_index
        index = 0  # output index of the next token of ``messages``
        caught_up = False  # ``detok`` holds the client's tokens and text
        ended = False
        try:
            yield worker_pb2.DecodeResponse(request_id=rid, direct_address=self.address)
            progress: list[int] = []
            offsets: list[float] = []
            t_admitted = last = loop.time()
            while True:
                item = await q.get()
                if item is None:
                    ended = True  # the stream ended without a finish: the router says why
                    self._push(slot, None, CancelledError(f"request {rid}: its resumed stream ended"))
                    return
                if isinstance(item, BaseException):
                    ended = True
                    self._push(slot, None, item)
                    raise item
                toks = list(item.token_ids)
                cut = min(len(toks), max(0, client_has - index))
                index += len(toks)
                if cut:
                    detok.add(toks[:cut])
                new = toks[cut:]
                final = item.HasField("finish")
                if not (new or final):
                    continue
                if not caught_up:
                    if index - len(new) != client_has:
                        raise InvalidRequestError(
                            f"request {rid}: the client has {client_has} output tokens but the "
                            f"migrated request only {index - len(new)}"
                        )
                    detok.emitted, caught_up = req.direct_text_chars, True
                visible = new
                if final and visible and item.finish.stop == str(visible[-1]):
                    visible = visible[:-1]  # the stop token that ended it is not rendered
                text, matched = detok.add(visible, final=final)
                msg = worker_pb2.DecodeResponse(request_id=rid, token_ids=new, text=text, has_text=True)
                lps = list(item.logprobs)
                if len(lps) == len(toks):
                    msg.logprobs.extend(lps[cut:])
                    if msg.logprobs:
                        name_logprob_tokens(msg.logprobs, tokenizer.token_bytes)
                if final:
                    msg.finish.CopyFrom(item.finish)
                elif matched is not None:  # a stop string the engine did not end on: ended here
                    msg.text += detok.add([], final=True)[0]
                    msg.finish.reason, msg.finish.stop = common_pb2.FINISH_REASON_STOP, matched
                    count_finished()
                self._push(slot, msg, None)
                progress.extend(new)
                offsets.extend([loop.time() - t_admitted] * len(new))
                if msg.HasField("finish"):
                    ended = True
                    yield worker_pb2.DecodeResponse(
                        request_id=rid, token_ids=progress, token_offsets_s=offsets, finish=msg.finish
                    )
                    return
                if progress and loop.time() - last >= interval:
                    yield worker_pb2.DecodeResponse(
                        request_id=rid, token_ids=progress, token_offsets_s=offsets
                    )
                    progress, offsets = [], []
                    last = loop.time()
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(BaseException):
                await messages.aclose()  # type: ignore[attr-defined]  # not finished: aborted there
            if not ended:  # the router's call ended first: tell the client
                self._push(slot, None, CancelledError(f"request {rid}: its router call ended"))
            if slot.conn is None and slot.done and not self._waits_attach(slot):
                self._drop(slot)

    def _waits_attach(self, slot: _Slot) -> bool:
        """A request that ended (finished, failed or migrated away) before its client attached
        keeps its slot until the ticket expires: its deltas, or the verdict that ended it (an
        ABORTED "migrated" delta, which the client holds until the router's word), wait there.
        Dropped at once, a late attach would be refused PERMISSION_DENIED ("no request") and the
        client would fail a request the router is resuming elsewhere (a drain's migration)."""
        return slot.conn is None and self.clock() <= slot.expires_at

    # ------------------------------------------------------------------ the client's side
    def _attach(self, conn: _Conn, a: direct_pb2.DirectAttach) -> None:
        slot = self._slots.get(a.request_id)
        try:
            if slot is None:
                raise PermissionDeniedError(
                    f"direct-stream ticket refused: no request {a.request_id!r} streams directly from "
                    f"decode worker {self.worker_id}"
                )
            if not hmac.compare_digest(a.ticket.encode(), slot.ticket.encode()):
                raise PermissionDeniedError("direct-stream ticket refused: not the ticket of this request")
            now = self.clock()
            if now > slot.expires_at:  # the attach window (the ticket's expiry, shifted: _register)
                raise PermissionDeniedError(
                    f"direct-stream ticket refused: expired {now - slot.expires_at:.1f}s ago"
                )
            # within the window: the rest of the ticket's claims (and its signature) must hold
            at = min(now, slot.ticket_expires_at)
            if self.signer is not None:
                self.signer.verify(
                    a.ticket, request_id=slot.rid, worker_id=self.worker_id, tenant=slot.tenant, now=at
                )
            else:
                check_claims(
                    decode_unverified(a.ticket),
                    request_id=slot.rid,
                    worker_id=self.worker_id,
                    tenant=slot.tenant,
                    now=at,
                )
            if slot.conn is not None:
                raise PermissionDeniedError(f"request {slot.rid} is already attached")
        except PdserveError as e:
            code, msg = _code_of(e)
            conn.refusals.append(
                direct_pb2.DirectDelta(request_id=a.request_id, done=True, error_code=code, error=msg)
            )
            conn.wake.set()
            log_event(log, "direct attach refused", logging.WARNING, request=a.request_id, error=msg)
            return
        slot.conn = conn
        conn.slots[slot.rid] = slot
        if slot.expiry is not None:
            slot.expiry.cancel()
        conn.mark(slot)  # what is already waiting goes out now

    def _detach(self, conn: _Conn, rid: str, why: str) -> None:
        slot = conn.slots.pop(rid, None)
        if slot is None:
            return
        slot.conn = None
        self._drop(slot)
        if not slot.done:
            slot.done = True
            slot.abort(CancelledError(f"request {rid}: {why}"))

    async def _read(self, conn: _Conn, requests: AsyncIterator[direct_pb2.AttachRequest]) -> None:
        async for r in requests:
            op = r.WhichOneof("op")
            if op == "attach":
                self._attach(conn, r.attach)
            elif op == "detach":
                self._detach(conn, r.detach, "the client detached it")
            else:
                raise InvalidRequestError("AttachRequest sets neither attach nor detach")

    async def Attach(
        self, requests: AsyncIterator[direct_pb2.AttachRequest], ctx: grpc.aio.ServicerContext
    ) -> None:
        """One client connection (see the module doc). Ends when the client half-closes and none
        of its requests is left, or fails (the client stalled, a malformed message)."""
        conn = _Conn(ctx)
        loop = asyncio.get_running_loop()
        reader = asyncio.ensure_future(self._read(conn, requests))
        reader.add_done_callback(lambda _: conn.wake.set())
        sent_at = 0.0
        try:
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
                if self.window_s > 0:
                    wait = sent_at + self.window_s - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                deltas = conn.refusals
                conn.refusals = []
                dirty, conn.dirty = conn.dirty, {}
                deltas.extend(s.take() for s in dirty.values())
                if deltas:
                    try:
                        async with asyncio.timeout(self.stall_timeout_s):
                            await ctx.write(direct_pb2.AttachResponse(deltas=deltas))
                    except TimeoutError:
                        raise ResourceExhaustedError(
                            f"direct stream stalled: the client took no message for {self.stall_timeout_s:g}s"
                        ) from None
                    sent_at = loop.time()
                for s in dirty.values():
                    if s.sent_done:
                        conn.slots.pop(s.rid, None)
                        s.conn = None
                        self._drop(s)
                if reader.done() and not conn.slots and not conn.dirty and not conn.refusals:
                    return
        finally:
            conn.closed = True
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            for rid in list(conn.slots):
                self._detach(conn, rid, "its client's direct connection ended")

    def close(self) -> None:
        for slot in list(self._slots.values()):
            if slot.expiry is not None:
                slot.expiry.cancel()
        self._slots.clear()


def needs_own_port(sec: Any = None) -> bool:
    """Whether DirectStream must be served on a port of its own: the worker's port requires
    CA-signed client certificates (TLS with mutual TLS, :meth:`SecurityConfig.require_client_certs`),
    which clients do not hold. The worker's port then keeps requiring them (its internal
    services are never opened to clients), and the DirectStream port (TLS, no client
    certificate: each attach is authorised by its ticket alone) serves nothing else but health.
    ``sec``: default :func:`pdserve.security.current`."""
    from pdserve.security import current

    return (sec if sec is not None else current()).require_client_certs(internal_only=True)


def enable_direct_streams(
    svc: Any, services: list[tuple[Any, Any]], *, own_port: bool = False
) -> DirectStreams:
    """Serve direct streams on decode servicer ``svc`` (an ``AsyncDecodeServicer``): its
    :class:`DirectStreams` (window: the worker's ``stream_window_s``; tickets verified with the
    cluster key when a cluster token is configured, else against the granted ticket, which the
    router sent over its authenticated channel) is set on ``svc``; without ``own_port`` its
    ``DirectStream`` service is appended to ``services`` (the worker's port), with ``own_port``
    the caller serves it with :func:`serve_direct_port` (see :func:`needs_own_port`)."""
    from pdserve.security import current
    from pdserve.ticket import ticket_key

    token = current().cluster_token
    ds = DirectStreams(
        svc.state.config.worker_id,
        TicketSigner(ticket_key(token)) if token else None,
        window_s=svc.stream_window_s,
    )
    svc.direct = ds
    if not own_port:
        services.append((direct_pb2.DESCRIPTOR.services_by_name["DirectStream"], ds))
    return ds


class DirectPort:
    """DirectStream on a port of its own (:func:`serve_direct_port`), on the decode worker's
    event loop; ``address``: host:port; :meth:`stop` ends it (before the worker's server)."""

    def __init__(self, aio: Any, server: grpc.aio.Server, address: str) -> None:
        self._aio, self._server, self.address = aio, server, address

    def stop(self, grace_s: float = 0.0) -> None:
        if self._aio.loop.is_running():
            self._aio.run(self._server.stop(grace_s), timeout_s=grace_s + 10)


def serve_direct_port(aio: Any, ds: DirectStreams, host: str, port: int = 0) -> DirectPort:
    """Serve ``ds`` (DirectStream) and health on ``host:port`` (0: any free port) from the
    worker's asyncio server ``aio`` (:class:`pdserve.grpc_server.AioServer`: the same event loop
    as its Decode streams, which the slots of ``ds`` need), with the worker's TLS settings but no
    client certificate required. Sets ``ds.address``."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from pdserve.grpc_server import _AioInterceptor, add_aio_servicer
    from pdserve.keepalive import KEEPALIVE
    from pdserve.limits import grpc_options
    from pdserve.security import bind, server_security

    desc = direct_pb2.DESCRIPTOR.services_by_name["DirectStream"]
    sec = server_security([desc.full_name])  # no internal service: no client certificates
    sec.config.check_bind(host)

    async def build() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-health"),
            options=[*grpc_options(), *KEEPALIVE.server_options()],
            interceptors=[_AioInterceptor(i) for i in sec.interceptors],
        )
        add_aio_servicer(server, desc, ds)
        hs = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        for n in ("", desc.full_name):
            hs.set(n, health_pb2.HealthCheckResponse.SERVING)
        bound = bind(server, host, port, sec)  # type: ignore[arg-type]
        await server.start()
        return server, bound

    server, bound = aio.run(build(), timeout_s=30)
    ds.address = f"{host}:{bound}"
    return DirectPort(aio, server, ds.address)
