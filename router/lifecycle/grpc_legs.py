"""The worker legs of one request over gRPC (:class:`GrpcLegs`, the
:class:`router.lifecycle.ports.Legs` of the router's servicer): Prefill, Decode of a handed-off
KV, a local-prefill Decode, and the client responses they become (text deltas, stop strings,
logprobs, the closing Finish with its timing).

Text: a leg whose worker rendered its text from the request's first output token
(``worker_text``) has it relayed as it is (the engine's detokenizer is the router's: same stop
strings, same hold-back); otherwise, and for tokens whose message was partly a repeat, the router
renders the tokens itself (:meth:`GrpcLegs.detok`, caught up with the output so far).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer
from pdserve.proto_convert import finish_to_proto, name_logprob_tokens
from pdserve.status import raise_from_rpc_error
from pdserve.v1 import client_pb2, common_pb2, worker_pb2
from router.failover import LostPhase, LostWorker, TokenStop, check_stop, resume_limits
from router.lifecycle.events import KVRef
from router.lifecycle.grpc_calls import (
    Guarded,
    call_metadata,
    close_iterator,
    gone,
    raise_store_failure,
    remaining,
)
from router.lifecycle.grpc_stream_legs import TRANSPORTS, GrpcStreamedDecode
from router.lifecycle.ports import Chunk, ClientGoneError, PrefillAnswer, WorkerLostError
from router.lifecycle.states import LifecycleError
from router.progress import ProgressWatch
from router.registry import WorkerEntry

if TYPE_CHECKING:
    from router.service import GenerateServicer


@dataclass
class RequestRun:
    """Per-request data of one Generate shared by its legs and responses."""

    rid: str
    ids: list[int]
    params: SamplingParams
    t0: float
    detok: IncrementalDetokenizer
    out_ids: list[int] = field(default_factory=list)
    # ``detok`` has rendered ``out_ids[:detok_fed]``; the text of the rest came from decode
    # workers (DecodeResponse.text): :meth:`GrpcLegs.detok` catches it up when needed
    detok_fed: int = 0
    sent_chars: int = 0  # characters of output text sent to the client so far
    token_times: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    pre_timing: common_pb2.Timing | None = None
    kv_pull_s: float = 0.0  # decode workers' KV pull time (DecodeResponse.kv_pull_s), summed
    reserved: tuple[str, int] | None = None  # (worker id, prompt tokens) queued at placement
    reserved_decode: str | None = None  # decode worker counted in flight at placement
    lease_ttl_s: float = 0.0  # the tenant's KV lease TTL (0: the prefill worker's default)
    predicted_ttft_s: float | None = None  # the placement's estimates (None: the policy has none)
    predicted_tpot_s: float | None = None
    finish: common_pb2.Finish | None = None  # the closing Finish, once built
    # a stop string the detokenizer matched when it was last caught up with the output
    # (:func:`caught_up_detok`: output whose text a worker rendered, e.g. a direct client's)
    stop_matched: str | None = None
    workers: dict[str, WorkerEntry] = field(default_factory=dict)  # placed workers by id


@dataclass(frozen=True)
class OutputEnd:
    """How an output ends (:func:`output_end`): ``reason`` (a common_pb2 FinishReason), ``stop``
    (the matched stop string, or the stop token's id as text; None for the length limit),
    ``stop_token``: ended by a stop token / EOS (its text is not rendered)."""

    reason: int
    stop: str | None
    stop_token: bool = False


def output_end(
    out_ids: list[int], params: SamplingParams, eos: set[int] | frozenset[int], matched: str | None
) -> OutputEnd | None:
    """Whether output ``out_ids`` ends with its last token, the router's one finish decision for
    output it did not get a worker's finish for (a prefill's first token; a direct client's
    resumed tokens): a stop string the request's detokenizer ``matched`` (STOP naming it), else
    its last token by :func:`router.failover.check_stop` (a stop token / EOS: STOP naming it;
    ``max_tokens``: LENGTH); None: the request goes on."""
    if matched is not None:
        return OutputEnd(common_pb2.FINISH_REASON_STOP, matched)
    if not out_ids:
        return None
    last = out_ids[-1]
    hit = check_stop(
        last,
        len(out_ids),
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        stop_token_ids=params.stop_token_ids,
        eos_token_ids=eos,
        ignore_eos=params.ignore_eos,
    )
    if hit is TokenStop.STOP:
        return OutputEnd(common_pb2.FINISH_REASON_STOP, str(last), stop_token=True)
    if hit is TokenStop.LENGTH:
        return OutputEnd(common_pb2.FINISH_REASON_LENGTH, None)
    return None


@dataclass(frozen=True)
class Handoff:
    """A prefilled request as a decode worker takes it over: ``prompt`` (the tokens the KV covers:
    the client's prompt, or resumed, prompt + output before ``first_token``), the sampling of
    this leg, the KV handle and the token the prefill sampled (already relayed to the client)."""

    prompt: list[int]
    sampling: common_pb2.SamplingParams
    kv: common_pb2.KVHandle
    first_token: int
    first_logprob: common_pb2.TokenLogprob | None = None


def kv_ref(h: Handoff) -> KVRef:
    return KVRef(h.kv.lease_id, h)


class GrpcLegs:
    """The :class:`~router.lifecycle.ports.Legs` of request ``run`` (``req``: the client's
    request, ``ctx``: its call) on the servicer ``svc``'s stubs, registry and counters."""

    def __init__(
        self, svc: GenerateServicer, req: client_pb2.GenerateRequest, run: RequestRun, ctx: Any
    ) -> None:
        self.svc = svc
        self.req = req
        self.run = run
        self.ctx = ctx
        self._t_dec = 0.0  # the current decode leg's start (monotonic)
        self._pull_s = 0.0  # its KV pull time
        self._worker_text = False  # its worker's text is relayed as it is
        # decode workers a live migration is moving this request off (set by the migrator,
        # router.lifecycle.grpc_migrator): their stream ending ABORTED ("migrated to ...") is the
        # switch, not a failure; the lifecycle goes on with the migration's result
        self.migrating_from: set[str] = set()

    # ------------------------------------------------------------------ requests
    def _common(self) -> dict:
        req, run = self.req, self.run
        return dict(
            request_id=run.rid,
            model=self.svc.config.model_id,
            prompt_token_ids=run.ids,
            sampling=req.sampling,
            adapter=req.adapter,
            cache_salt=req.cache_salt,
            tenant=req.tenant,
            priority=req.priority,
        )

    def _leg_request(self, num_output: int) -> dict:
        """Fields of the next call's request: the client's prompt and sampling, or after ``k``
        output tokens (a resumed request) prompt + those tokens with max/min_tokens reduced by
        ``k`` and sampling positions shifted by ``k`` (a seeded request samples as if never moved)."""
        run, req = self.run, self.req
        k = len(run.out_ids)
        if k != num_output:
            raise LifecycleError(
                f"request {run.rid}: the lifecycle has {num_output} output tokens, the relay {k}"
            )
        if k == 0:
            return self._common()
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(req.sampling)
        sampling.max_tokens, sampling.min_tokens = resume_limits(
            run.params.max_tokens, run.params.min_tokens, k
        )
        sampling.seed_position_offset = req.sampling.seed_position_offset + k  # seeded: continues exactly
        return {**self._common(), "prompt_token_ids": run.ids + run.out_ids, "sampling": sampling}

    def _entry(self, worker_id: str) -> WorkerEntry:
        return self.run.workers[worker_id]

    # ------------------------------------------------------------------ prefill
    async def prefill(self, worker_id: str, num_output: int, kv_stream: int = 0) -> PrefillAnswer:
        """Prefill the request's known tokens on ``worker_id``; the token it samples (the next
        output token), rendered, and the KV a decode worker continues from (``kv_stream``, a
        ``KVStreamTransport``: the KV is streamed, :mod:`router.lifecycle.stream_legs`, and the
        answer has none). Raises
        :class:`WorkerLostError` when the worker is unreachable or stalls,
        :class:`StoreUnavailableError` when it could not reach its KV store."""
        svc, run, req = self.svc, self.run, self.req
        pw = self._entry(worker_id)
        params, detok = run.params, self.detok()
        common = self._leg_request(num_output)
        prompt = common["prompt_token_ids"]
        resumed = bool(run.out_ids)
        svc.registry.add_inflight(pw.worker_id, 1)
        svc.outstanding.add(pw.worker_id, len(prompt))
        try:
            call = svc.stubs.worker(pw.address).Prefill(
                worker_pb2.PrefillRequest(
                    **common, slo=req.slo, lease_ttl_s=run.lease_ttl_s, kv_stream=kv_stream
                ),
                timeout=remaining(self.ctx),
                metadata=call_metadata(),
            )
            bound = svc.config.progress.prefill_deadline_s(
                run.predicted_ttft_s, svc.outstanding.get(pw.worker_id)
            )
            t_call = time.monotonic()
            try:
                async with asyncio.timeout(bound):  # None: no progress deadline
                    pre: worker_pb2.PrefillResponse = await call
            except TimeoutError:
                waited = time.monotonic() - t_call
                detail = f"no progress: no Prefill answer after {waited:.1f}s (bound {bound or 0:.1f}s)"
                raise WorkerLostError(
                    LostWorker(pw.worker_id, LostPhase.PREFILL, detail, stalled=True)
                ) from None
            except grpc.RpcError as e:
                raise_store_failure(e)  # the worker is fine: its store is not
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    raise WorkerLostError(
                        LostWorker(pw.worker_id, LostPhase.PREFILL, e.details() or "")
                    ) from None
                raise_from_rpc_error(e)
            finally:
                call.cancel()  # the client went away meanwhile: abort the prefill (no-op when done)
        finally:
            svc.outstanding.add(pw.worker_id, -len(prompt))
            svc.registry.add_inflight(pw.worker_id, -1)
        svc.registry.seen(pw.worker_id)  # it answered: alive
        if pre.kv.locations and not pre.kv.dist_address and not svc.config.store_address:
            # the store prefix lookups go to: where the last handoff was published (follows a
            # store node that restarted on a new port); a direct handle names a prefill worker
            svc._store_address = pre.kv.locations[0].address
        if not resumed:  # usage and phases describe the client's prompt, not a resumed one
            run.cached_tokens = pre.num_cached_tokens
            run.pre_timing = pre.timing
        run.token_times.append(time.monotonic() - run.t0)
        first = pre.first_token
        delta, matched = detok.add([first])
        run.out_ids.append(first)
        run.detok_fed = len(run.out_ids)
        end = output_end(run.out_ids, params, svc.eos, matched)
        stop_now = end is not None
        if end is not None:
            if end.stop_token:
                delta = ""  # a stop token is not rendered
            else:
                delta += detok.add([], final=True)[0]
        run.sent_chars += len(delta)
        resp = client_pb2.GenerateResponse(request_id=run.rid, token_ids=[first], text=delta)
        if pre.HasField("first_token_logprob"):
            resp.logprobs.append(pre.first_token_logprob)
            name_logprob_tokens(resp.logprobs, svc.tokenizer.token_bytes)
        h = Handoff(
            prompt=list(prompt),
            sampling=common["sampling"],
            kv=pre.kv,
            first_token=first,
            first_logprob=pre.first_token_logprob if pre.HasField("first_token_logprob") else None,
        )
        if end is not None:
            resp.finish.CopyFrom(self.finish(end.reason, end.stop, 0.0))
        return PrefillAnswer(first, None if kv_stream else kv_ref(h), stop_now, resp)

    # ------------------------------------------------------------------ streamed handoff
    def start_streamed_decode(self, worker_id: str, prefill_id: str, num_output: int) -> GrpcStreamedDecode:
        """The Decode of a streamed handoff, started (:mod:`router.lifecycle.stream_legs`)."""
        return GrpcStreamedDecode(self, worker_id, prefill_id, num_output)

    async def streamed_prefill(self, worker_id: str, num_output: int) -> PrefillAnswer:
        """:meth:`prefill` with the KV streamed over the router's ``--kv-stream`` transport."""
        return await self.prefill(worker_id, num_output, TRANSPORTS[self.svc.config.kv_stream])

    # ------------------------------------------------------------------ decode
    async def decode(self, worker_id: str, kv: KVRef, first_index: int) -> AsyncIterator[Chunk]:
        """Hand the KV of ``kv`` (a :class:`Handoff`) to ``worker_id`` and stream its messages.
        The handoff lease: the decode worker releases it after its pull, before its first
        message; until then it is the lifecycle's to release."""
        svc, run, req = self.svc, self.run, self.req
        h: Handoff = kv.handle  # type: ignore[assignment]
        dw = self._entry(worker_id)
        call = svc.stubs.worker(dw.address).Decode(
            worker_pb2.DecodeRequest(
                **{**self._common(), "prompt_token_ids": h.prompt, "sampling": h.sampling},
                slo=req.slo,
                kv=h.kv,
                first_token=h.first_token,
                first_token_logprob=h.first_logprob,
            ),
            timeout=remaining(self.ctx),
            metadata=call_metadata(),
        )
        try:
            watch = ProgressWatch(svc.config.progress, run.predicted_tpot_s)
            guarded = Guarded(call, dw, watch=watch, streamed=svc._streamed_at)
            # the decode engine's detokenizer has seen the request's whole output (the first
            # token) unless this leg resumes it: then its text would lack the output before
            fresh = len(h.prompt) == len(run.ids) and len(run.out_ids) == 1
            chunks = self.stream(guarded, dw, first_index, worker_text=fresh)
            async with contextlib.aclosing(chunks):
                async for c in chunks:
                    yield c
        finally:
            call.cancel()  # the client went away (or the relay ended it): abort it downstream

    async def local_decode(self, worker_id: str, first_index: int) -> AsyncIterator[Chunk]:
        """Conditional disaggregation: the decode worker runs the whole request (or, resumed, the
        prompt + tokens so far) and streams every token, its first included."""
        svc, run, req = self.svc, self.run, self.req
        dw = self._entry(worker_id)
        common = self._leg_request(first_index)
        n = len(common["prompt_token_ids"])
        resumed = bool(run.out_ids)
        svc.outstanding.add(dw.worker_id, n)
        queued = [True]

        def first_token() -> None:
            if queued[0]:
                queued[0] = False
                svc.outstanding.add(dw.worker_id, -n)

        call = None
        try:
            call = svc.stubs.worker(dw.address).Decode(
                worker_pb2.DecodeRequest(**common, slo=req.slo, local_prefill=True),
                timeout=remaining(self.ctx),
                metadata=call_metadata(),
            )
            watch = ProgressWatch(
                svc.config.progress,
                run.predicted_tpot_s,
                first_message_tokens=svc.outstanding.get(dw.worker_id),
            )
            guarded = Guarded(
                call,
                dw,
                keep_cached=run.cached_tokens if resumed else None,
                watch=watch,
                streamed=svc._streamed_at,
            )
            chunks = self.stream(guarded, dw, first_index, on_first=first_token, worker_text=not resumed)
            async with contextlib.aclosing(chunks):
                async for c in chunks:
                    yield c
        finally:
            if call is not None:
                call.cancel()  # the client went away (or the relay ended it): abort it downstream
            first_token()

    async def stream(
        self,
        call,
        dw: WorkerEntry,
        first_index: int,
        on_first: Callable[[], None] | None = None,
        worker_text: bool = False,
    ) -> AsyncIterator[Chunk]:
        """A Decode stream as chunks placed by output index. Each message counts as the worker's
        heartbeat; its KV pull time (``kv_pull_s`` of its first message) is added to
        ``run.kv_pull_s`` (transfer) and left out of this leg's decode time. Raises
        :class:`ClientGoneError` when the call failed because the client is gone."""
        run = self.run
        self._t_dec, self._pull_s, self._worker_text = time.monotonic(), 0.0, worker_text
        seen = self.svc.registry.seen
        streamed_at = self.svc._streamed_at
        index = first_index
        messages = aiter(call)
        try:
            async for d in messages:
                seen(dw.worker_id)
                streamed_at[dw.worker_id] = time.monotonic()
                if d.kv_pull_s > 0:
                    self._pull_s += d.kv_pull_s
                    run.kv_pull_s += d.kv_pull_s
                if on_first is not None:
                    on_first()
                    on_first = None
                    run.cached_tokens = d.num_cached_tokens
                tokens = tuple(d.token_ids)
                yield Chunk(index, tokens, d)
                index += len(tokens)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ABORTED and dw.worker_id in self.migrating_from:
                return  # the source handed the request over (live migration): the stream ends here
            raise_store_failure(e)  # the worker is fine: its store is not
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.svc.registry.drop(dw.worker_id)
            if not gone(self.ctx):
                raise_from_rpc_error(e)
            raise ClientGoneError(e.details() or "") from None
        finally:
            await close_iterator(messages)  # read up to the finish: closed here, not by the loop's hook

    # ------------------------------------------------------------------ responses
    def render(self, chunk: Chunk, skip: int) -> tuple[client_pb2.GenerateResponse, bool]:
        """The client response for ``chunk`` without its first ``skip`` tokens (already
        delivered), and whether it ends the request (the worker's finish, or a stop string the
        router matched: the caller then ends the worker's call)."""
        run = self.run
        d: worker_pb2.DecodeResponse = chunk.message  # type: ignore[assignment]
        tokens = list(chunk.tokens[skip:])
        if skip:
            self._worker_text = False  # the worker's text covers the repeated tokens too
        now = time.monotonic() - run.t0
        run.token_times.extend([now] * len(tokens))
        final = d.HasField("finish")
        if self._worker_text and d.has_text:
            text, matched = d.text, None
            run.out_ids.extend(tokens)
        else:
            detok = self.detok()
            visible = tokens
            if final and visible and d.finish.stop == str(visible[-1]):
                visible = visible[:-1]  # the stop token that ended it is not rendered
            text, matched = detok.add(visible, final=final)
            run.out_ids.extend(tokens)
            run.detok_fed = len(run.out_ids)
        r = client_pb2.GenerateResponse(
            request_id=run.rid, token_ids=tokens, text=text, logprobs=d.logprobs[skip:]
        )
        if r.logprobs:
            name_logprob_tokens(r.logprobs, self.svc.tokenizer.token_bytes)
        if final or matched is not None:
            if matched is not None and not final:
                text += run.detok.add([], final=True)[0]
                r.text = text
            run.sent_chars += len(text)
            fr = d.finish.reason if final else common_pb2.FINISH_REASON_STOP
            stop = matched if matched is not None else (d.finish.stop or None)
            decode_s = max(0.0, time.monotonic() - self._t_dec - self._pull_s)
            r.finish.CopyFrom(self.finish(fr, stop, decode_s))
            return r, True
        run.sent_chars += len(text)
        return r, False

    def render_tokens(self, first_index: int, tokens: tuple[int, ...]) -> client_pb2.GenerateResponse:
        """A response for output tokens no worker message carries (a migration's destination held
        them), rendered by the router."""
        run = self.run
        if first_index != len(run.out_ids):
            raise LifecycleError(f"request {run.rid}: tokens from {first_index} after {len(run.out_ids)}")
        run.token_times.extend([time.monotonic() - run.t0] * len(tokens))
        text, _ = self.detok().add(list(tokens))
        run.out_ids.extend(tokens)
        run.detok_fed = len(run.out_ids)
        run.sent_chars += len(text)
        self._worker_text = False
        return client_pb2.GenerateResponse(request_id=run.rid, token_ids=list(tokens), text=text)

    def detok(self) -> IncrementalDetokenizer:
        """The request's detokenizer, caught up with its output: when decode workers rendered part
        of it (their text relayed as it was), a new one is fed the output so far and told how much
        text the client already has (``sent_chars``), so what it renders next continues exactly
        (a held-back stop-string prefix or incomplete character included)."""
        return caught_up_detok(self.svc.tokenizer, self.run)

    def finish(self, reason, stop, decode_s: float) -> common_pb2.Finish:
        """The closing Finish (kept as ``run.finish``). Timing: queue/prefill from the prefill
        worker; transfer = the prefill worker's KV publish + ``run.kv_pull_s`` (the decode
        workers' pulls, also reported alone as ``kv_pull_s``); ``decode_s`` as measured by the
        relay (pull excluded)."""
        run = self.run
        fr = reason if isinstance(reason, int) and not isinstance(reason, bool) else finish_to_proto(reason)
        run.finish = finish_message(
            run,
            fr,
            "" if stop is None else str(stop),
            len(run.out_ids),
            run.token_times,
            run.pre_timing,
            decode_s,
        )
        return run.finish


def finish_message(
    run: RequestRun,
    reason: int,
    stop: str,
    completion_tokens: int,
    token_times: list[float],
    pre: common_pb2.Timing | None,
    decode_s: float,
) -> common_pb2.Finish:
    """The Finish of a request's output (one choice of a parallel-sampling group, or the whole
    request): its usage (``completion_tokens`` of ``run``'s prompt) and timing (queue/prefill
    from the prefill worker's ``pre``; transfer = the prefill worker's KV publish plus
    ``run.kv_pull_s``, the decode side's pulls, also reported alone; ``decode_s`` as measured
    by the caller, pull excluded)."""
    n_in = len(run.ids)
    e2e = time.monotonic() - run.t0
    return common_pb2.Finish(
        reason=reason,
        stop=stop,
        usage=common_pb2.Usage(
            prompt_tokens=n_in,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=run.cached_tokens,
            total_tokens=n_in + completion_tokens,
        ),
        timing=common_pb2.Timing(
            ttft_s=token_times[0] if token_times else e2e,
            e2e_s=e2e,
            token_times_s=token_times,
            queue_s=pre.queue_s if pre is not None else 0.0,
            prefill_s=pre.prefill_s if pre is not None else 0.0,
            transfer_s=(pre.transfer_s if pre is not None else 0.0) + run.kv_pull_s,
            decode_s=decode_s,
            kv_pull_s=run.kv_pull_s,
        ),
    )


def caught_up_detok(tokenizer, run: RequestRun) -> IncrementalDetokenizer:
    """``run``'s detokenizer, caught up with its output (see :meth:`GrpcLegs.detok`)."""
    if run.detok_fed != len(run.out_ids):
        d = IncrementalDetokenizer(tokenizer, run.params.stop)
        _, run.stop_matched = d.add(list(run.out_ids))
        d.emitted = run.sent_chars
        run.detok, run.detok_fed = d, len(run.out_ids)
    return run.detok
