"""A parallel-sampling request through the router (``SamplingParams.n > 1`` or ``best_of > 1``).

The group travels as one request: its prefill worker prefills the prompt once, all but its last
token (``PrefillResponse.prompt_tail_pending``), and ONE decode worker forks the choices over the
handed-off blocks (or, for a one-token prompt or a ``local_prefill`` placement, runs the whole
group); the decode stream's messages carry ``choice_index``, relayed to the client as they come,
each choice detokenized on its own, each with its own finish (its usage counts its completion
tokens). The stream ends after every choice finished.

Placement counts the group as ``num_candidates`` sequences: the policy sees ``max_tokens`` and
the predicted output length times the candidates (decode tokens), and the decode worker's KV in
flight is the prompt plus one block's worth per candidate (:func:`placement_args`). A group placed
for a handoff on a decode worker whose pool could never adopt it at once (the prefix's blocks plus
one per candidate beyond the pool: :func:`router.pool_fit.adopts_group`) runs there whole instead
(a local prefill, choices short of a block waiting their turn), at placement and at a re-dispatch:
the worker would refuse the handoff (INVALID_ARGUMENT) after the prefill was spent.

Failover (exact): the router fixes the base seed before the first dispatch (a random one when
the client sent none; the engine would pick one the same way), so a re-run of the group samples
every choice exactly as before (choice ``i`` == the request alone with ``seed + i``). When a
worker of the group is lost (UNAVAILABLE, the KV gone), the whole group is re-dispatched to
replacement workers (``RouterConfig.max_redispatches`` bounds it, as for single requests) and
each choice's replayed tokens are checked against those already delivered (a mismatch fails the
request loudly) and not sent again; choices already finished are dropped from the re-run's
stream. Cancellation cancels the worker calls, which aborts the request id on the workers and
frees every choice's blocks; a handoff lease not yet taken by a decode worker is released here.

Progress deadlines as for single requests (:mod:`router.progress`): a Prefill that does not
answer within its bound, or a Decode stream silent past its bound, is a stalled worker
(quarantined, the group re-dispatched) -- except a ``best_of > n`` stream, which sends nothing
until every candidate finished (no stream deadline then).

Chunk-wise KV streaming (the router's ``--kv-stream``, :mod:`router.lifecycle.stream_mode`
``group_streams``): a group prefilled on a prefill worker streams the blocks of every prompt token
but the last, as a single request does. The Decode (``kv_stream_address`` + ``prompt_tail_pending``)
is sent first and the Prefill (``kv_stream``) next; the decode worker assembles and verifies the
KV while the prompt is computed and forks the choices once it is complete. Failures are
classified as for a streamed single request (:mod:`router.lifecycle.stream_legs`): a lost
prefill worker re-dispatches the prefill (the Decode is cancelled: its assembly fails and frees
what it pulled); a Decode that fails first gives the prefill a short grace for its own outcome,
then the Prefill is cancelled (the worker aborts it and drops its chunks) and the decode's
failure is what counts; a Prefill failing because its stream was cancelled reports the decode
side's failure; a client that leaves cancels both, and a Decode ended before its first message
also aborts the request on the prefill worker (a finished stream nobody reads is dropped at once),
as does any failure that ends the group before the decode worker's first message (a Decode
refused RESOURCE_EXHAUSTED for want of room, or INVALID_ARGUMENT; a failed store): only a lost
worker is re-dispatched, and only then may the prefill worker see the same id again.

Not covered for groups: live migration (a group is not registered for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer
from pdserve.errors import CancelledError as RequestCancelledError
from pdserve.errors import InternalError, InvalidRequestError, PdserveError
from pdserve.proto_convert import name_logprob_tokens
from pdserve.status import raise_from_rpc_error
from pdserve.tracing import log_event
from pdserve.v1 import client_pb2, common_pb2, worker_pb2
from router.failover import LostPhase, LostWorker, Redispatches
from router.lifecycle.cluster import release_lease_now, unreserve
from router.lifecycle.grpc_calls import Guarded, call_metadata, gone, raise_store_failure, remaining
from router.lifecycle.grpc_legs import RequestRun, finish_message
from router.lifecycle.grpc_stream_legs import ABORT_TIMEOUT_S, TRANSPORTS, _Prefetched
from router.lifecycle.ports import WorkerLostError
from router.lifecycle.stream_legs import DECODE_GRACE_S, PREFILL_GRACE_S
from router.lifecycle.stream_mode import group_streams
from router.pool_fit import adopts_group
from router.progress import ProgressWatch
from router.registry import WorkerEntry, WorkerKind

if TYPE_CHECKING:
    from router.policy import Placement, RequestInfo
    from router.service import GenerateServicer

log = logging.getLogger("router.service")  # the router's log records keep their logger name


def _retrieve(f: asyncio.Future) -> None:
    """Mark a read-ahead task's failure as seen (it is raised where it matters, or moot)."""
    if not f.cancelled():
        f.exception()


def _failed(first: asyncio.Future) -> bool:
    """A Decode's read-ahead first message ended without a message (failed, cancelled, or the
    stream ended empty)."""
    return first.done() and (first.cancelled() or first.exception() is not None or first.result() is None)


def check_group_request(
    params: SamplingParams, req: client_pb2.GenerateRequest, kv_window: int | None
) -> None:
    """Refuse at the edge (InvalidRequestError -> INVALID_ARGUMENT, naming the field) what the
    engine cannot run with ``n > 1`` / ``best_of > 1``: a LoRA ``adapter``, a sliding-window model
    (``kv_window``). ``SamplingParams`` itself refuses ``n < 1``, ``best_of < n``, and greedy
    (``temperature`` 0) choices."""
    if params.num_candidates < 2:
        return
    name = f"n={params.n}, best_of={params.best_of}"
    if req.adapter:
        raise InvalidRequestError(
            f"{name} is not supported with a LoRA adapter (adapter {req.adapter!r}) yet: send n=1"
        )
    if kv_window is not None:
        raise InvalidRequestError(
            f"{name} is not supported for this sliding-window model (window {kv_window}) yet: send n=1"
        )


def placement_args(
    params: SamplingParams, req: client_pb2.GenerateRequest
) -> tuple[SamplingParams, client_pb2.GenerateRequest]:
    """``(params, req)`` as the placement policy should see a group: ``max_tokens`` and
    ``predicted_output_tokens`` times the candidates (n x decode tokens and KV growth). A single
    request is returned unchanged."""
    k = params.num_candidates
    if k < 2:
        return params, req
    shown = client_pb2.GenerateRequest()
    shown.CopyFrom(req)
    shown.predicted_output_tokens = req.predicted_output_tokens * k
    return dataclasses.replace(params, max_tokens=params.max_tokens * k, n=1, best_of=None), shown


@dataclass
class _Choice:
    """What the client has of one choice."""

    detok: IncrementalDetokenizer
    sent: list[int] = field(default_factory=list)  # tokens delivered
    seen: int = 0  # tokens of the current attempt's stream so far
    token_times: list[float] = field(default_factory=list)
    done: bool = False


class GroupRelay:
    """One group request on servicer ``svc`` (``run``: its data, ``info``: its placement's
    request, placed on ``pw`` (prefill) and ``dw`` (decode); ``local``: ``dw`` runs it whole)."""

    def __init__(
        self,
        svc: GenerateServicer,
        req: client_pb2.GenerateRequest,
        ctx: Any,
        run: RequestRun,
        info: RequestInfo,
        placement: Placement,
        pw: WorkerEntry,
        dw: WorkerEntry,
    ) -> None:
        self.svc, self.req, self.ctx, self.run, self.info = svc, req, ctx, run, info
        self.local = placement.local_prefill or len(run.ids) < 2
        self.pw, self.dw = pw, dw
        self.sampling = common_pb2.SamplingParams()
        self.sampling.CopyFrom(req.sampling)
        if not self.sampling.HasField("seed"):  # fixed now: a re-dispatch replays every choice exactly
            self.sampling.seed = random.getrandbits(62)
        p = run.params
        self.choices = [_Choice(IncrementalDetokenizer(svc.tokenizer, p.stop)) for _ in range(p.n)]
        self.budget = Redispatches(run.rid, svc.config.max_redispatches)
        self.pre_timing: common_pb2.Timing | None = None
        self._dropping: asyncio.Future | None = None  # a streamed prefill's Abort, fire and forget

    # ------------------------------------------------------------------ run
    async def responses(self) -> AsyncIterator[client_pb2.GenerateResponse]:
        """The client responses of the group, re-dispatching lost workers within the budget."""
        svc = self.svc
        try:
            while True:
                try:
                    async for r in self._attempt():
                        yield r
                    return
                except WorkerLostError as e:
                    await self._redispatch(e.lost)
        finally:
            unreserve(svc, self.run)
            svc.policy.release(self.run.rid)

    async def _redispatch(self, lost: LostWorker) -> None:
        """Record the loss (UnavailableError past the budget), drop or quarantine the worker and
        choose replacements for the next attempt."""
        svc = self.svc
        self.budget.record(lost)
        if lost.stalled:
            svc.prober.quarantine(lost)
        elif lost.phase is not LostPhase.KV:
            svc.registry.drop(lost.worker_id)
        n_ctx = len(self.run.ids)
        placer = svc.placer
        if not self.local and lost.phase is LostPhase.PREFILL:
            self.pw = await placer.replacement_or_wait(
                WorkerKind.PREFILL, self.info, n_ctx, self.budget, self.ctx
            )
        elif lost.phase is not LostPhase.KV:
            self.dw = await placer.replacement_or_wait(
                WorkerKind.DECODE, self.info, n_ctx, self.budget, self.ctx
            )
            if not self.local and not adopts_group(self.dw, n_ctx, self.run.params.num_candidates):
                self.local = True  # the replacement could never adopt the handoff: it runs the group whole
            if self.local:
                self.pw = self.dw
        svc.metrics.observe_redispatch(lost.phase.value, svc.config.model_id)
        log_event(
            log,
            "redispatch",
            logging.WARNING,
            cluster_request_id=self.run.rid,
            lost_phase=lost.phase.value,
            lost_worker=lost.worker_id,
            error=lost.detail,
            redispatch=self.budget.count,
            produced_tokens=sum(len(c.sent) for c in self.choices),
            choices=len(self.choices),
            prefill=None if self.local else self.pw.worker_id,
            decode=self.dw.worker_id,
        )

    def _common(self) -> dict:
        run, req = self.run, self.req
        return dict(
            request_id=run.rid,
            model=self.svc.config.model_id,
            prompt_token_ids=run.ids,
            sampling=self.sampling,
            cache_salt=req.cache_salt,
            tenant=req.tenant,
            priority=req.priority,
        )

    async def _prefill(self, kv_stream: int = 0) -> worker_pb2.PrefillResponse:
        """The group's Prefill (``kv_stream``: its KV streamed over that transport, no handle)."""
        svc, pw = self.svc, self.pw
        n = len(self.run.ids)
        unreserve(svc, self.run)  # this call's own accounting takes over
        svc.registry.add_inflight(pw.worker_id, 1)
        svc.outstanding.add(pw.worker_id, n)
        call = svc.stubs.worker(pw.address).Prefill(
            worker_pb2.PrefillRequest(
                **self._common(), slo=self.req.slo, lease_ttl_s=self.run.lease_ttl_s, kv_stream=kv_stream
            ),
            timeout=remaining(self.ctx),
            metadata=call_metadata(),
        )
        bound = svc.config.progress.prefill_deadline_s(
            self.run.predicted_ttft_s, svc.outstanding.get(pw.worker_id)
        )
        t_call = time.monotonic()
        try:
            async with asyncio.timeout(bound):  # None: no progress deadline
                pre: worker_pb2.PrefillResponse = await call
        except TimeoutError:
            waited = time.monotonic() - t_call
            detail = f"no progress: no Prefill answer after {waited:.1f}s (bound {bound or 0:.1f}s)"
            raise WorkerLostError(LostWorker(pw.worker_id, LostPhase.PREFILL, detail, stalled=True)) from None
        except grpc.RpcError as e:
            raise_store_failure(e)
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise WorkerLostError(
                    LostWorker(pw.worker_id, LostPhase.PREFILL, e.details() or "")
                ) from None
            raise_from_rpc_error(e)
        finally:
            call.cancel()
            svc.outstanding.add(pw.worker_id, -n)
            svc.registry.add_inflight(pw.worker_id, -1)
        svc.registry.seen(pw.worker_id)
        if not pre.prompt_tail_pending:
            if pre.kv.lease_id:
                await asyncio.to_thread(release_lease_now, svc, pre.kv)
            raise InternalError(
                f"prefill worker {pw.worker_id} does not support parallel sampling (it sampled a token "
                "for a group): upgrade it"
            )
        if self.pre_timing is None:
            self.pre_timing = pre.timing
            self.run.cached_tokens = pre.num_cached_tokens
        return pre

    async def _attempt(self) -> AsyncIterator[client_pb2.GenerateResponse]:
        """One dispatch of the whole group: prefill (unless local), decode, relay."""
        svc, run = self.svc, self.run
        for c in self.choices:
            c.seen = 0
        kv: common_pb2.KVHandle | None = None
        mode = svc.config.kv_stream
        streamed = group_streams(mode, local_prefill=self.local)
        if self.local:
            unreserve(svc, run)
            dreq = worker_pb2.DecodeRequest(**self._common(), slo=self.req.slo, local_prefill=True)
        elif streamed:  # the Decode first: it reads the prefill worker's stream as it is made
            dreq = worker_pb2.DecodeRequest(
                **self._common(),
                slo=self.req.slo,
                kv_stream_address=self.pw.address,
                prompt_tail_pending=True,
            )
        else:
            pre = await self._prefill()
            kv = pre.kv
            dreq = worker_pb2.DecodeRequest(
                **self._common(), slo=self.req.slo, kv=kv, prompt_tail_pending=True
            )
        dw = self.dw
        kv_tokens = len(run.ids) + run.params.num_candidates  # n x KV growth (one token each to start)
        svc.registry.add_inflight(dw.worker_id, 1)
        svc.kv_tokens.add(dw.worker_id, kv_tokens)
        t_dec = time.monotonic()
        started = False
        call = svc.stubs.worker(dw.address).Decode(
            dreq, timeout=remaining(self.ctx), metadata=call_metadata()
        )
        source: Any = call
        p = run.params
        watch = (
            None  # best_of > n: nothing comes until every candidate finished
            if p.num_candidates > p.n
            else ProgressWatch(
                svc.config.progress,
                run.predicted_tpot_s,
                first_message_tokens=len(run.ids) if self.local else 0,
            )
        )
        ended = False  # a failure that ends the group (anything but a lost worker: never re-dispatched)
        try:
            if streamed:
                source = await self._streamed_prefill(call, TRANSPORTS[mode])
                t_dec = time.monotonic()  # the decode phase starts once the prefill answered
            async for d in Guarded(source, dw, watch=watch, streamed=svc._streamed_at):
                if not started:
                    started = True
                    run.kv_pull_s += d.kv_pull_s
                    if self.local and self.pre_timing is None:
                        run.cached_tokens = d.num_cached_tokens
                svc._streamed_at[dw.worker_id] = time.monotonic()
                r = self._relay(d, time.monotonic() - t_dec)
                if r is not None:
                    yield r
                if all(c.done for c in self.choices):
                    return
            missing = [i for i, c in enumerate(self.choices) if not c.done]
            if missing:
                raise InternalError(
                    f"decode worker {dw.worker_id} ended the stream before choices {missing} finished"
                )
        except WorkerLostError:
            raise  # re-dispatched, maybe to the same prefill worker under the same id
        except Exception:
            ended = True  # a refusal (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, a store, ...): the client's
            raise
        finally:
            call.cancel()  # the client went away (or we are done): the worker aborts every choice
            svc.registry.add_inflight(dw.worker_id, -1)
            svc.kv_tokens.add(dw.worker_id, -kv_tokens)
            if kv is not None and not started and kv.lease_id:
                # the decode worker may not have taken the handoff: its lease is ours to release
                await asyncio.to_thread(release_lease_now, svc, kv)
            if streamed and not started and (gone(self.ctx) or ended):
                # nobody will read the prefill worker's (finished) stream: a client gone, or a
                # failure that ends the group (a decode worker without room within its admission
                # timeout, a request it refuses, a store that failed, the prefill's own failure)
                self._drop_stream()

    async def _streamed_prefill(self, call: Any, transport: int) -> _Prefetched:
        """The Prefill of a streamed group, its Decode ``call`` already started (see the module
        docstring): returns the Decode to relay (its first message read ahead); raises the
        prefill's failure, a lost prefill worker's :class:`WorkerLostError`, or, when the decode
        side failed first or cancelled the prefill's stream, nothing: relaying the returned
        Decode raises its failure (a lost decode worker as :class:`WorkerLostError`)."""
        it = aiter(call)
        first: asyncio.Future = asyncio.ensure_future(anext(it, None))
        first.add_done_callback(_retrieve)
        t0 = time.monotonic()
        pre = asyncio.ensure_future(self._prefill(transport))
        pre.add_done_callback(_retrieve)
        try:
            await asyncio.wait({pre, first}, return_when=asyncio.FIRST_COMPLETED)
            if not pre.done() and _failed(first):
                await asyncio.wait({pre}, timeout=PREFILL_GRACE_S)  # a dead prefill worker fails both
                if not pre.done():  # its stream has no reader: cancelled, the worker aborts it
                    pre.cancel()
                    await asyncio.wait({pre})
                    return _Prefetched(call, it, first, time.monotonic() - t0)
            try:
                await pre
            except WorkerLostError:
                raise
            except PdserveError as e:
                if isinstance(e, RequestCancelledError) and not first.done():
                    await asyncio.wait({first}, timeout=DECODE_GRACE_S)
                if not (isinstance(e, RequestCancelledError) and _failed(first)):
                    raise
                # the decode side went away and so cancelled the prefill's stream: its failure counts
            return _Prefetched(call, it, first, time.monotonic() - t0)
        finally:
            if not pre.done():
                pre.cancel()

    def _drop_stream(self) -> None:
        """The client left, or the group failed for good (anything but a lost worker, which is
        re-dispatched), before the decode worker sent a message: abort the request on the
        prefill worker, whose finished stream would otherwise wait its TTL for a reader that
        never comes. Fire and forget: the stream expires anyway."""
        if self._dropping is not None:
            return
        stub = self.svc.stubs.worker(self.pw.address)
        rid = self.run.rid

        async def abort() -> None:
            with contextlib.suppress(Exception):  # the prefill worker is gone: nothing is left there
                await stub.Abort(
                    worker_pb2.AbortRequest(request_id=rid), timeout=ABORT_TIMEOUT_S, metadata=call_metadata()
                )

        self._dropping = asyncio.ensure_future(abort())

    # ------------------------------------------------------------------ relay
    def _relay(self, d: worker_pb2.DecodeResponse, decode_s: float) -> client_pb2.GenerateResponse | None:
        """The client response for one decode message: its choice's tokens not delivered yet
        (replayed ones must equal what was delivered), rendered by that choice's detokenizer."""
        if d.choice_index >= len(self.choices):
            raise InternalError(
                f"decode message for choice {d.choice_index} of a request with n={len(self.choices)}"
            )
        c = self.choices[d.choice_index]
        if c.done:
            return None  # finished in an earlier attempt
        toks = list(d.token_ids)
        skip = 0
        for k, t in enumerate(toks):
            i = c.seen + k
            if i < len(c.sent):
                if c.sent[i] != t:
                    raise InternalError(
                        f"request {self.run.rid} choice {d.choice_index}: re-dispatched output token {i} is {t}, "
                        f"the client already has {c.sent[i]}"
                    )
                skip += 1
        c.seen += len(toks)
        new = toks[skip:]
        final = d.HasField("finish")
        if not new and not final:
            return None
        now = time.monotonic() - self.run.t0
        c.token_times.extend([now] * len(new))
        visible = new
        if final and visible and d.finish.stop == str(visible[-1]):
            visible = visible[:-1]  # the stop token that ended it is not rendered
        text, matched = c.detok.add(visible, final=final)
        c.sent.extend(new)
        r = client_pb2.GenerateResponse(
            request_id=self.run.rid,
            token_ids=new,
            text=text,
            choice_index=d.choice_index,
            logprobs=d.logprobs[skip:],
        )
        if r.logprobs:
            name_logprob_tokens(r.logprobs, self.svc.tokenizer.token_bytes)
        if final or matched is not None:
            if matched is not None and not final:
                r.text += c.detok.add([], final=True)[0]
            c.done = True
            reason = d.finish.reason if final else common_pb2.FINISH_REASON_STOP
            stop = matched if matched is not None else d.finish.stop
            r.finish.CopyFrom(self._finish(c, reason, stop or "", decode_s))
        return r

    def _finish(self, c: _Choice, reason: int, stop: str, decode_s: float) -> common_pb2.Finish:
        run = self.run
        return finish_message(
            run, reason, stop, len(c.sent), c.token_times, self.pre_timing, max(0.0, decode_s - run.kv_pull_s)
        )
