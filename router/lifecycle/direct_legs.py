"""The router out of the token path (issue #12; protocol in proto/pdserve/v1/direct.proto).

:class:`DirectLegs` are the :class:`~router.lifecycle.grpc_legs.GrpcLegs` of a request whose client
asked for a direct stream (``GenerateRequest.direct_stream``) on a router with ``--direct-streams``.
Placement, Prefill (the first token, relayed as usual) and the handoff are unchanged; the decode leg
of a fresh handoff asks its worker (``DecodeRequest.direct``, with a ticket minted here) to stream
the tokens to the client, and then:

* the worker's first message (no tokens: the request is admitted there) becomes the client's
  :class:`DirectRedirect` (the worker's DirectStream address: its ``direct_address`` when it
  serves DirectStream on a port of its own, under mutual TLS, else its address; cluster request
  id, ticket);
* the worker's progress messages (token ids, no text, at most ``progress_interval_s`` apart) and its
  finish go through the lifecycle as any decode message does (the ledger, the progress deadline,
  the output the router knows), but nothing is written to the client for them but the final
  :class:`Finish` (usage and timing);
* the worker lost (UNAVAILABLE, or its progress deadline): the client is told (``DirectRedirect.lost``)
  and sends every token it has and its text length (``ResumeDirect``, :class:`DirectBook`); those
  tokens join the output (checked against what the router knew: a mismatch fails the request) and
  the request is re-dispatched exactly as a relayed one is (prompt + output so far, seeded
  positions shifted), the rest relayed and rendered by the router, continuing the client's text.
  A client that does not send ``ResumeDirect`` within ``resume_timeout_s`` is taken for gone.

* the request live-migrated (:mod:`router.lifecycle.grpc_migrator`, a drain or a rebalance): the
  source stops it at the switch, and its DirectStream ends the client's stream after the last
  token it made (an ABORTED delta: the client waits for the router's word); the destination's
  stream (:meth:`DirectLegs.moved`) starts with the same ``lost`` redirect and the client's
  ``ResumeDirect`` (its tokens join the output, checked as above); then the router opens the
  destination's ``ResumeStream`` with a direct grant (a new ticket for the destination, the
  client's token index, text length and the request's stop strings): the destination renders
  the text from there as the router would and streams it to the client, which gets a new
  redirect and attaches there (no gap, no duplicate), the router getting progress and the
  finish as for any direct leg. A destination that refuses the grant (no direct streams there:
  INVALID_ARGUMENT before it takes the request) or ignores it (its first message carries
  tokens) is relayed from the client's index instead, rendered by the router.

A client's ResumeDirect tokens that already end the request (the worker sent the client its
last delta but was lost before the router's finish) finish it with the router's one finish
decision (:func:`router.lifecycle.grpc_legs.output_end`: stop strings, stop tokens / EOS, the
length limit), not a re-dispatch.

A streamed handoff (``--kv-stream``: :mod:`router.lifecycle.stream_legs`) streams directly too
(:meth:`DirectLegs.start_streamed_decode`): its Decode, sent with the Prefill, carries the direct
grant; the decode worker assembles the streamed KV, then its admission message becomes the
redirect (after the prefill's first token, relayed as usual) and the leg goes on as above.

A local-prefill placement (conditional disaggregation) streams directly too, every token (the
first included) from the decode worker. Not direct (relayed as before): a leg resumed after a
lost worker, a request with ``n`` or ``best_of`` > 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from pdserve.errors import InternalError, InvalidRequestError, PermissionDeniedError
from pdserve.security import current
from pdserve.ticket import TicketClaims, TicketSigner, ticket_key
from pdserve.v1 import client_pb2, direct_pb2, worker_pb2
from router.lifecycle.events import KVRef
from router.lifecycle.grpc_calls import Guarded, call_metadata, remaining
from router.lifecycle.grpc_legs import GrpcLegs, Handoff, RequestRun, output_end
from router.lifecycle.grpc_migrator import release_destination
from router.lifecycle.grpc_stream_legs import DirectGrantLeg, GrpcStreamedDecode
from router.lifecycle.ports import Chunk, ClientGoneError, WorkerLostError
from router.lifecycle.states import OutputMismatch
from router.progress import ProgressWatch
from router.registry import WorkerEntry

if TYPE_CHECKING:
    from router.service import GenerateServicer


@dataclass(frozen=True)
class DirectConfig:
    """``ticket_ttl_s``: how long a client has to attach to its worker after the redirect (a
    ticket lasts this beyond the time the router allows the worker's admission, and with a
    streamed handoff the prefill's, :meth:`DirectLegs._admission_allowance`);
    ``progress_interval_s``: at most this long between two progress messages of a direct
    worker to the router (well under the progress deadline); ``resume_timeout_s``: how long the
    router waits for a client's ResumeDirect after telling it its worker was lost."""

    ticket_ttl_s: float = 30.0
    progress_interval_s: float = 2.0
    resume_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("ticket_ttl_s", "progress_interval_s", "resume_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class DirectBook:
    """A router's direct-stream state: the ticket signer and the ResumeDirect calls awaited
    (by cluster request id). Serves ``DirectResume`` (:meth:`ResumeDirect`)."""

    def __init__(self, config: DirectConfig = DirectConfig(), signer: TicketSigner | None = None) -> None:
        self.config = config
        self.signer = signer if signer is not None else TicketSigner(ticket_key(current().cluster_token))
        self._waiting: dict[str, tuple[str, asyncio.Future[tuple[list[int], int]]]] = {}

    def expect(self, rid: str, ticket: str) -> asyncio.Future[tuple[list[int], int]]:
        fut: asyncio.Future[tuple[list[int], int]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (ticket, fut)
        return fut

    def forget(self, rid: str) -> None:
        self._waiting.pop(rid, None)

    async def ResumeDirect(
        self, req: direct_pb2.ResumeDirectRequest, ctx: grpc.aio.ServicerContext
    ) -> direct_pb2.ResumeDirectResponse:
        """The client's tokens of a request whose direct worker was lost. PERMISSION_DENIED when
        no such request waits for them here or the ticket is not its ticket."""
        got = self._waiting.get(req.request_id)
        if got is None or not hmac.compare_digest(got[0].encode(), req.ticket.encode()):
            raise PermissionDeniedError(
                f"ResumeDirect refused: request {req.request_id!r} does not wait for a resume with this ticket here"
            )
        ticket, fut = got
        if not fut.done():
            fut.set_result((list(req.token_ids), int(req.text_chars)))
        return direct_pb2.ResumeDirectResponse()


class OpenDestination(Protocol):
    """Opens a migration destination's ResumeStream from output index ``start_index`` as chunks
    (``cancel()`` cancels the call; closing the stream too); ``direct``: the ResumeStreamRequest
    direct fields; ``watch``: its progress deadline (None: a relayed stream's)."""

    def __call__(
        self,
        start_index: int,
        direct: worker_pb2.ResumeStreamRequest | None,
        watch: ProgressWatch | None,
    ) -> Any: ...


class DirectProgressWatch(ProgressWatch):
    """The progress deadline of a direct leg: its worker sends a message per progress interval,
    not per token, so every message counts as one token (else the bound, which grows with the
    tokens per message, would grow with the interval and a hung worker be noticed later)."""

    def received(self, n_tokens: int) -> None:
        super().received(min(n_tokens, 1))


@dataclass(frozen=True)
class _Note:
    """A chunk the direct leg made (not a worker message): ``kind`` redirect | lost | resumed."""

    kind: str
    redirect: direct_pb2.DirectRedirect | None = None
    text_chars: int = 0


class DirectLegs(GrpcLegs):
    """:class:`GrpcLegs` whose fresh handoff decode streams straight to the client (module doc)."""

    def __init__(
        self,
        svc: GenerateServicer,
        req: client_pb2.GenerateRequest,
        run: RequestRun,
        ctx: Any,
        book: DirectBook,
    ) -> None:
        super().__init__(svc, req, run, ctx)
        self.book = book
        self._direct = False  # the current decode leg streams to the client
        self._redirect: direct_pb2.DirectRedirect | None = None  # sent to the client for that leg
        self._t_admitted: float | None = None  # when its worker's admission message came (run.t0 based)

    def _single(self) -> bool:
        s = self.req.sampling
        return getattr(s, "n", 0) <= 1 and getattr(s, "best_of", 0) <= 1

    async def decode(self, worker_id: str, kv: KVRef, first_index: int) -> AsyncIterator[Chunk]:
        h: Handoff = kv.handle  # type: ignore[assignment]
        fresh = len(h.prompt) == len(self.run.ids) and len(self.run.out_ids) == 1
        if not (fresh and self._single()):
            self._direct = False
            async with contextlib.aclosing(super().decode(worker_id, kv, first_index)) as relayed:
                async for c in relayed:
                    yield c
            return
        request = worker_pb2.DecodeRequest(
            **{**self._common(), "prompt_token_ids": h.prompt, "sampling": h.sampling},
            slo=self.req.slo,
            kv=h.kv,
            first_token=h.first_token,
            first_token_logprob=h.first_logprob,
        )
        watch = DirectProgressWatch(self.svc.config.progress, self.run.predicted_tpot_s)
        async with contextlib.aclosing(self._direct_stream(worker_id, first_index, request, watch)) as direct:
            async for c in direct:
                yield c

    async def local_decode(self, worker_id: str, first_index: int) -> AsyncIterator[Chunk]:
        """Conditional disaggregation: as :meth:`GrpcLegs.local_decode`, the decode worker streaming
        every token (the first included) to the client; a resumed request is relayed."""
        svc, run = self.svc, self.run
        if first_index != 0 or run.out_ids or not self._single():
            self._direct = False
            async with contextlib.aclosing(super().local_decode(worker_id, first_index)) as relayed:
                async for c in relayed:
                    yield c
            return
        dw = self._entry(worker_id)
        common = self._leg_request(first_index)
        n = len(common["prompt_token_ids"])
        svc.outstanding.add(dw.worker_id, n)
        queued = [True]

        def first_token(d: worker_pb2.DecodeResponse) -> None:
            if queued[0]:
                queued[0] = False
                svc.outstanding.add(dw.worker_id, -n)
                run.cached_tokens = d.num_cached_tokens

        try:
            request = worker_pb2.DecodeRequest(**common, slo=self.req.slo, local_prefill=True)
            watch = DirectProgressWatch(
                svc.config.progress,
                run.predicted_tpot_s,
                first_message_tokens=svc.outstanding.get(dw.worker_id),
            )
            direct = self._direct_stream(worker_id, first_index, request, watch, first_token)
            async with contextlib.aclosing(direct):
                async for c in direct:
                    yield c
        finally:
            if queued[0]:
                queued[0] = False
                svc.outstanding.add(dw.worker_id, -n)

    def start_streamed_decode(self, worker_id: str, prefill_id: str, num_output: int) -> GrpcStreamedDecode:
        """:meth:`GrpcLegs.start_streamed_decode` (chunk-wise KV streaming) with a direct grant
        for a fresh single request (no output yet): the decode worker assembles the streamed KV
        and then streams the tokens to the client, its messages handled as :meth:`decode`'s. Its
        ticket is minted now, before the prefill: it lasts ``ticket_ttl_s`` plus the prefill's
        progress deadline (else the call's deadline, else ``prefill_floor_s``) plus the decode
        worker's admission allowance (:meth:`_admission_allowance`). A resumed leg is relayed."""
        if num_output != 0 or not self._single():
            self._direct = False
            return super().start_streamed_decode(worker_id, prefill_id, num_output)
        p = self.svc.config.progress
        allowance = p.prefill_deadline_s(self.run.predicted_ttft_s, self.svc.outstanding.get(prefill_id))
        if allowance is None:
            allowance = remaining(self.ctx) or p.prefill_floor_s
        # and then the decode worker's admission of the assembled KV (it may wait for blocks)
        ticket = self._mint(worker_id, allowance + self._admission_allowance())
        grant = direct_pb2.DirectGrant(ticket=ticket, progress_interval_s=self._interval())
        leg = DirectGrantLeg(
            grant,
            lambda: DirectProgressWatch(p, self.run.predicted_tpot_s),
            lambda dw, chunks, cancel: self._direct_chunks(dw, ticket, chunks, cancel),
        )
        return GrpcStreamedDecode(self, worker_id, prefill_id, num_output, leg)

    def _admission_allowance(self, queued_tokens: int = 0) -> float:
        """Seconds a decode worker may take to admit a request before its first message: its
        progress deadline (:meth:`ProgressConfig.first_message_deadline_s`; ``queued_tokens``:
        prompt tokens it prefills itself, a local prefill), else the call's remaining deadline,
        else ``ProgressConfig.first_message_s``. A ticket lasts this on top of ``ticket_ttl_s``:
        the worker checks it when it admits the request and again at the client's attach, and an
        admission waiting for free blocks (backpressure, up to the worker's admission timeout)
        must not expire it. Before, the ticket lasted ``ticket_ttl_s`` from the Decode call: in a
        1,000-request burst on SmolLM2, 227 requests failed PERMISSION_DENIED ("ticket refused:
        expired") after such waits."""
        p = self.svc.config.progress
        bound = p.first_message_deadline_s(queued_tokens)
        if bound is None:
            bound = remaining(self.ctx) or p.first_message_s
        return bound

    def _mint(self, worker_id: str, extra_s: float = 0.0) -> str:
        """A ticket for this request on ``worker_id``, expiring ``ticket_ttl_s`` (+ ``extra_s``)
        from now."""
        run, req, cfg = self.run, self.req, self.book.config
        return self.book.signer.mint(
            TicketClaims(run.rid, worker_id, req.tenant, time.time() + cfg.ticket_ttl_s + extra_s)
        )

    async def _direct_stream(
        self,
        worker_id: str,
        first_index: int,
        request: worker_pb2.DecodeRequest,
        watch: ProgressWatch,
        on_tokens: Callable[[worker_pb2.DecodeResponse], None] | None = None,
    ) -> AsyncIterator[Chunk]:
        """``request`` to ``worker_id`` with a direct grant: :meth:`_direct_chunks` of its call."""
        svc = self.svc
        dw = self._entry(worker_id)
        ticket = self._mint(worker_id, self._admission_allowance(watch.first_message_tokens))
        request.direct.CopyFrom(direct_pb2.DirectGrant(ticket=ticket, progress_interval_s=self._interval()))
        call = svc.stubs.worker(dw.address).Decode(
            request, timeout=remaining(self.ctx), metadata=call_metadata()
        )
        try:
            guarded = Guarded(call, dw, watch=watch, streamed=svc._streamed_at)
            chunks = self.stream(guarded, dw, first_index, worker_text=False)
            direct = self._direct_chunks(dw, ticket, chunks, call.cancel, on_tokens)
            async with contextlib.aclosing(direct):
                async for c in direct:
                    yield c
        finally:
            call.cancel()  # the client went away (or the relay ended it): abort it downstream

    async def _direct_chunks(
        self,
        dw: WorkerEntry,
        ticket: str,
        chunks: AsyncIterator[Chunk],
        cancel: Callable[[], Any],
        on_tokens: Callable[[worker_pb2.DecodeResponse], None] | None = None,
        relay_undirected: bool = False,
    ) -> AsyncIterator[Chunk]:
        """The chunks of a direct call of worker ``dw`` granted ``ticket`` (``cancel`` cancels
        it): the redirect note, its progress and finish chunks, or, the worker lost after the
        redirect, the lost note and the client's resumed tokens, then the loss raised (module
        doc). ``on_tokens``: called with the first message that carries tokens or the finish.
        A first message that carries tokens (a worker that ignored the grant) is InternalError,
        or with ``relay_undirected`` the stream is relayed from there."""
        run = self.run
        redirect = direct_pb2.DirectRedirect(
            address=dw.address, worker_id=dw.worker_id, ticket=ticket, request_id=run.rid
        )
        redirected = False
        self._direct = True
        try:
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for c in chunks:
                    final = c.message.HasField("finish")
                    if not redirected and not final:
                        if c.tokens:  # it streamed as for a relay: its text would be lost
                            if relay_undirected:
                                self._direct = False
                                yield c
                                async for c in chunks:
                                    yield c
                                return
                            raise InternalError(
                                f"decode worker {dw.worker_id} ignored DecodeRequest.direct (its first "
                                "message carried tokens): it does not serve direct streams"
                            )
                        redirected = True
                        self._t_admitted = time.monotonic() - run.t0
                        # DirectStream on a port of its own (mutual TLS): the worker names it
                        redirect.address = c.message.direct_address or dw.address
                        self._redirect = redirect
                        yield Chunk(c.first_index, (), _Note("redirect", redirect))
                        continue
                    if on_tokens is not None and (c.tokens or final):
                        on_tokens(c.message)
                        on_tokens = None
                    yield c
        except WorkerLostError as lost:
            if not redirected:
                raise  # the client was never sent there: an ordinary re-dispatch
            cancel()
            async with contextlib.aclosing(self._lost_then_resumed(redirect, ticket)) as resumed:
                async for c in resumed:
                    yield c
            raise lost

    async def _lost_then_resumed(
        self, redirect: direct_pb2.DirectRedirect, ticket: str
    ) -> AsyncIterator[Chunk]:
        """Tells the client its direct stream is lost (``redirect`` marked ``lost``) and yields that
        note, then the client's ``ResumeDirect`` as the "resumed" chunk (:meth:`_resume`). The
        answer is expected (under ``ticket``) before the client is told, so it cannot come first;
        the expectation is dropped however this ends."""
        run = self.run
        fut = self.book.expect(run.rid, ticket)
        try:
            note = direct_pb2.DirectRedirect()
            note.CopyFrom(redirect)
            note.lost = True
            yield Chunk(len(run.out_ids), (), _Note("lost", note))
            resumed = await self._resume(fut)
        finally:
            self.book.forget(run.rid)
        yield resumed

    def moved(
        self, dest_id: str, resume_index: int, start: int, open_dest: OpenDestination
    ) -> AsyncIterator[Chunk]:
        """The stream of a live migration's destination ``dest_id`` for this request
        (``open_dest(start_index, direct, watch)`` opens its ResumeStream as chunks; the request
        migrated with ``resume_index`` output tokens; ``start``: where a relayed stream starts).
        When the leg it left streamed to the client (redirected): first the ``lost`` redirect of
        the source and the client's ``ResumeDirect`` as the "resumed" chunk (as after a lost
        worker: :class:`ClientGoneError` when it does not come within ``resume_timeout_s``,
        OutputMismatch when its tokens do not extend the output the router knew); then the
        destination's stream opened with a direct grant from the client's index: a new redirect
        (the client streams from the destination: no gap, no duplicate), progress and the
        finish; relayed instead when the destination refuses the grant or ignores it. A leg
        never redirected, or not direct: the destination's stream from ``start``, opened now,
        relayed. Closing it closes the destination's stream."""
        redirect, direct = self._redirect, self._direct
        self._direct, self._redirect = False, None  # nothing is direct until a new redirect
        if not (direct and redirect is not None):
            return open_dest(start, None, None)
        return self._moved_direct(redirect, dest_id, resume_index, start, open_dest)

    async def _moved_direct(
        self,
        redirect: direct_pb2.DirectRedirect,
        dest_id: str,
        resume_index: int,
        start: int,
        open_dest: OpenDestination,
    ) -> AsyncIterator[Chunk]:
        run = self.run
        opened = False
        try:
            async with contextlib.aclosing(self._lost_then_resumed(redirect, redirect.ticket)) as resumed:
                async for c in resumed:
                    yield c  # the lost redirect, then the client's ResumeDirect (its tokens join the output)
            k = len(run.out_ids)  # what the client has
            if k <= resume_index:
                ticket = self._mint(dest_id)
                ask = worker_pb2.ResumeStreamRequest(
                    direct=direct_pb2.DirectGrant(ticket=ticket, progress_interval_s=self._interval()),
                    direct_text_chars=run.sent_chars,
                    direct_stop=list(run.params.stop),
                )
                watch = DirectProgressWatch(self.svc.config.progress, run.predicted_tpot_s)
                chunks = open_dest(k, ask, watch)
                opened = True
                try:
                    direct = self._direct_chunks(
                        self._entry(dest_id), ticket, chunks, chunks.cancel, relay_undirected=True
                    )
                    async with contextlib.aclosing(direct):
                        async for c in direct:
                            yield c
                    return
                except InvalidRequestError:
                    if self._redirect is not None:
                        raise  # after the redirect: the request's own failure
                self._direct = False  # the destination refused the grant: relayed from k
                start = k
            chunks = open_dest(start, None, None)
            opened = True
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for c in chunks:
                    yield c
        finally:
            if not opened:  # ended before the destination's stream opened: let it go now
                release_destination(lambda: open_dest(start, None, None))

    def _interval(self) -> float:
        """The progress interval asked of the worker: the configured one, at most 2/5 of the
        progress deadline's floor (so that progress always comes well within the deadline)."""
        p = self.svc.config.progress
        interval = self.book.config.progress_interval_s
        return min(interval, p.floor_s / 2.5) if p.enabled else interval

    async def _resume(self, fut: asyncio.Future[tuple[list[int], int]]) -> Chunk:
        """The client's ResumeDirect (``fut``) as the chunk of the tokens the router did not know
        (a :class:`_Note` "resumed"): :class:`ClientGoneError` when it does not come within
        ``resume_timeout_s``, OutputMismatch when its tokens do not extend the output the router
        knew."""
        run, cfg = self.run, self.book.config
        try:
            async with asyncio.timeout(cfg.resume_timeout_s):
                tokens, chars = await fut
        except TimeoutError:
            raise ClientGoneError(
                f"request {run.rid}: its direct worker was lost and the client sent no ResumeDirect "
                f"within {cfg.resume_timeout_s:g}s"
            ) from None
        k = len(run.out_ids)
        if tokens[:k] != run.out_ids:
            raise OutputMismatch(
                f"request {run.rid}: the client's ResumeDirect tokens do not extend the {k} output "
                "tokens the router had"
            )
        return Chunk(k, tuple(tokens[k:]), _Note("resumed", text_chars=chars))

    def _complete_on_resume(self) -> client_pb2.GenerateResponse | None:
        """The Finish of a request whose client's resumed tokens already end it (the worker sent
        the client its last delta but the router not its finish), else None (the request goes
        on). The finish decision is the router's own (:func:`output_end`, as for a prefill's
        token): a stop string in the output's text (the request's detokenizer caught up with
        the client's tokens), a stop token / EOS, or ``max_tokens`` reached."""
        run = self.run
        if not run.out_ids:
            return None
        run.stop_matched = None
        if run.params.stop:
            self.detok()  # caught up with the client's tokens: sets run.stop_matched
        end = output_end(run.out_ids, run.params, self.svc.eos, run.stop_matched)
        if end is None:
            return None
        decode_s = max(0.0, time.monotonic() - self._t_dec - self._pull_s)
        r = client_pb2.GenerateResponse(request_id=run.rid)
        r.finish.CopyFrom(self.finish(end.reason, end.stop, decode_s))
        return r

    # ------------------------------------------------------------------ responses
    def render(self, chunk: Chunk, skip: int) -> tuple[client_pb2.GenerateResponse | None, bool]:
        """Direct legs: the redirect and lost notes become their responses; the client's resumed
        tokens and the worker's progress join the output and send nothing; the finish sends the
        Finish alone. Other legs: :meth:`GrpcLegs.render`."""
        m = chunk.message
        run = self.run
        if isinstance(m, _Note):
            if m.kind in ("redirect", "lost"):
                return client_pb2.GenerateResponse(request_id=run.rid, direct=m.redirect), False
            tokens = list(chunk.tokens[skip:])
            run.token_times.extend([time.monotonic() - run.t0] * len(tokens))
            run.out_ids.extend(tokens)
            run.sent_chars = m.text_chars  # the text the client has: the relay continues it
            self._direct = False
            done = self._complete_on_resume()
            return done, done is not None
        if not self._direct:
            return super().render(chunk, skip)
        d: worker_pb2.DecodeResponse = m  # type: ignore[assignment]
        tokens = list(chunk.tokens[skip:])
        offsets = d.token_offsets_s[skip:]
        if len(offsets) == len(tokens) and self._t_admitted is not None:
            base = self._t_admitted  # the worker's clock, from its admission message
            run.token_times.extend([base + o for o in offsets])
        else:  # a worker that does not time its tokens: when the router learnt of them
            run.token_times.extend([time.monotonic() - run.t0] * len(tokens))
        run.out_ids.extend(tokens)
        if not d.HasField("finish"):
            return None, False
        decode_s = max(0.0, time.monotonic() - self._t_dec - self._pull_s)
        r = client_pb2.GenerateResponse(request_id=run.rid)
        r.finish.CopyFrom(self.finish(d.finish.reason, d.finish.stop or None, decode_s))
        return r, True
