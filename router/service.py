"""Router: the client-facing Generate API and the worker Registry (gRPC edge).

Generate: tokenize and validate, pick a (prefill, decode) pair, call Prefill, stream the first
token, call Decode with the KVHandle and relay its stream. Client cancellation and deadlines
propagate downstream (the downstream calls are cancelled, which aborts the request in the
workers and frees its blocks); a lease not consumed by a decode worker is released here.
Every failure leaves as a gRPC status mapped by ``pdserve.status``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from engine.models.config import ModelConfig
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kv_store.client import KVStoreClient
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.limits import grpc_options
from pdserve.metrics import FinishedRequest, RouterMetrics, outcome_for, slo_class
from pdserve.proto_convert import finish_to_proto, sampling_from_proto
from pdserve.status import raise_from_rpc_error
from pdserve.tracing import log_event, request_scope, traced_channel
from pdserve.v1 import client_pb2, common_pb2, router_pb2, worker_pb2, worker_pb2_grpc
from router.registry import Registry, WorkerKind, WorkerLoad, least_loaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    model_path: str
    model_id: str
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 3.0


def _remaining(ctx: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline; None when it has none (gRPC reports a huge number)."""
    r = ctx.time_remaining()
    return None if r is None or r > 1e7 else max(r, 0.0)


def load_from_proto(s: worker_pb2.WorkerStats) -> WorkerLoad:
    return WorkerLoad(s.num_waiting, s.num_running, s.kv_blocks_total, s.kv_blocks_used)


class RegistryServicer:
    def __init__(self, registry: Registry, config: RouterConfig) -> None:
        self.registry = registry
        self.config = config

    def Register(self, req: router_pb2.RegisterRequest, ctx) -> router_pb2.RegisterResponse:
        kind = {
            worker_pb2.WORKER_ROLE_PREFILL: WorkerKind.PREFILL,
            worker_pb2.WORKER_ROLE_DECODE: WorkerKind.DECODE,
        }
        if req.role not in kind:
            raise InvalidRequestError("role must be PREFILL or DECODE")
        if not req.worker_id or not req.address:
            raise InvalidRequestError("worker_id and address are required")
        self.registry.register(
            req.worker_id, kind[req.role], req.address, req.model, load_from_proto(req.stats)
        )
        log.info("registered %s worker %s at %s", kind[req.role].value, req.worker_id, req.address)
        return router_pb2.RegisterResponse(
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            heartbeat_timeout_s=self.config.heartbeat_timeout_s,
        )

    def Heartbeat(self, req: router_pb2.HeartbeatRequest, ctx) -> router_pb2.HeartbeatResponse:
        return router_pb2.HeartbeatResponse(
            known=self.registry.heartbeat(req.worker_id, load_from_proto(req.stats))
        )

    def Deregister(self, req: router_pb2.DeregisterRequest, ctx) -> router_pb2.DeregisterResponse:
        return router_pb2.DeregisterResponse(found=self.registry.deregister(req.worker_id))


class _Stubs:
    """One channel per worker address, reused."""

    def __init__(self) -> None:
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._stores: dict[str, KVStoreClient] = {}

    def worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        s = self._stubs.get(address)
        if s is None:
            s = self._stubs[address] = worker_pb2_grpc.WorkerStub(
                grpc.insecure_channel(address, options=grpc_options())
            )
        return s

    def store(self, address: str) -> KVStoreClient:
        c = self._stores.get(address)
        if c is None:
            ch = traced_channel(grpc.insecure_channel(address, options=grpc_options()))
            c = self._stores[address] = KVStoreClient(address, timeout_s=5, channel=ch)
        return c


class GenerateServicer:
    def __init__(
        self, registry: Registry, config: RouterConfig, metrics: RouterMetrics | None = None
    ) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics if metrics is not None else RouterMetrics(CollectorRegistry())
        self.metrics.track_workers(
            lambda: {k.value: len(self.registry.alive(k, config.model_id)) for k in WorkerKind}
        )
        path = Path(config.model_path)
        self.tokenizer = Tokenizer(path)
        self.model_config = ModelConfig.from_path(path)
        self.max_model_len = self.model_config.max_position_embeddings
        self.eos = set(self.model_config.eos_token_ids) or (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.stubs = _Stubs()

    # ----------------------------------------------------------------- helpers
    def _check_model(self, model: str) -> None:
        if model and model != self.config.model_id:
            raise InvalidRequestError(
                f"unknown model {model!r}; this cluster serves {self.config.model_id!r}"
            )

    def _tokens(self, req) -> list[int]:
        which = req.WhichOneof("input")
        if which == "prompt":
            if not req.prompt:
                raise InvalidRequestError("prompt is empty: send at least one token")
            return self.tokenizer.encode(req.prompt)
        if which == "prompt_token_ids":
            ids = list(req.prompt_token_ids.ids)
            v = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < v]
            if bad:
                raise InvalidRequestError(f"token ids out of range [0, {v}): {bad[:5]}")
            return ids
        if which == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in req.chat.messages]
            return self.tokenizer.encode_chat(msgs)
        raise InvalidRequestError("set one of prompt, prompt_token_ids or chat")

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty: send at least one token")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len}: shorten it"
            )

    def _pick(self, kind: WorkerKind):
        w = least_loaded(self.registry.alive(kind, self.config.model_id))
        if w is None:
            raise UnavailableError(
                f"no {kind.value} worker is registered for {self.config.model_id!r}; retry shortly"
            )
        return w

    def _release_lease(self, kv: common_pb2.KVHandle) -> None:
        if kv.lease_id and kv.locations:
            try:
                self.stubs.store(kv.locations[0].address).release(kv.lease_id)
            except Exception as e:  # noqa: BLE001 - the lease expires anyway
                log.warning("could not release lease %s: %s", kv.lease_id, e)

    # ----------------------------------------------------------------- rpcs
    def Tokenize(self, req: client_pb2.TokenizeRequest, ctx) -> client_pb2.TokenizeResponse:
        self._check_model(req.model)
        which = req.WhichOneof("input")
        if which == "prompt":
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        elif which == "chat":
            ids = self.tokenizer.encode_chat(
                [{"role": m.role, "content": m.content} for m in req.chat.messages]
            )
        else:
            raise InvalidRequestError("set prompt or chat")
        return client_pb2.TokenizeResponse(token_ids=ids, max_model_len=self.max_model_len)

    def ListModels(self, req, ctx) -> client_pb2.ListModelsResponse:
        return client_pb2.ListModelsResponse(
            models=[client_pb2.ModelInfo(id=self.config.model_id, max_model_len=self.max_model_len)]
        )

    def Generate(
        self, req: client_pb2.GenerateRequest, ctx: grpc.ServicerContext
    ) -> Iterator[client_pb2.GenerateResponse]:
        """Traced, measured entry: binds the request id (one is assigned if the client sent none),
        records outcome, latencies, phases and SLO result (:class:`RouterMetrics`) and logs one
        structured line per request."""
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        cls = slo_class(req.slo.ttft_s, req.slo.tpot_s)
        m = self.metrics
        finish: common_pb2.Finish | None = None
        with request_scope(req.request_id):
            m.inflight.inc()
            try:
                for resp in self._generate(req, ctx):
                    if resp.HasField("finish"):
                        finish = resp.finish
                    yield resp
            except BaseException as e:
                outcome = outcome_for(e)
                m.observe_failed(cls, outcome)
                log_event(log, "request failed", slo_class=cls, outcome=outcome, error=type(e).__name__)
                raise
            finally:
                m.inflight.dec()
            if finish is None:  # the stream ended without a result: the client went away
                m.observe_failed(cls, "cancelled")
                log_event(log, "request failed", slo_class=cls, outcome="cancelled", error="")
                return
            t = finish.timing
            phases = {
                "queue": t.queue_s,
                "prefill": t.prefill_s,
                "transfer": t.transfer_s,
                "decode": t.decode_s,
            }
            rec = FinishedRequest(
                ttft_s=t.ttft_s,
                e2e_s=t.e2e_s,
                token_times_s=list(t.token_times_s),
                phases=phases,
                prompt_tokens=finish.usage.prompt_tokens,
                cached_prompt_tokens=finish.usage.cached_prompt_tokens,
                completion_tokens=finish.usage.completion_tokens,
            )
            met = m.observe_finished(cls, req.slo.ttft_s, req.slo.tpot_s, rec)
            log_event(
                log,
                "request done",
                slo_class=cls,
                outcome="ok",
                slo_met=met,
                prompt_tokens=rec.prompt_tokens,
                cached_tokens=rec.cached_prompt_tokens,
                completion_tokens=rec.completion_tokens,
                ttft_s=round(rec.ttft_s, 6),
                e2e_s=round(rec.e2e_s, 6),
                **{f"{k}_s": round(v, 6) for k, v in phases.items()},
            )

    def _generate(
        self, req: client_pb2.GenerateRequest, ctx: grpc.ServicerContext
    ) -> Iterator[client_pb2.GenerateResponse]:
        t0 = time.monotonic()
        self._check_model(req.model)
        params = sampling_from_proto(req.sampling)
        ids = self._tokens(req)
        self._validate(ids, params)
        rid = req.request_id or uuid.uuid4().hex
        t_route = time.perf_counter()
        pw = self._pick(WorkerKind.PREFILL)
        dw = self._pick(WorkerKind.DECODE)
        self.metrics.routing.observe(time.perf_counter() - t_route)
        log_event(log, "routed", prefill=pw.worker_id, decode=dw.worker_id)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        common = dict(
            request_id=rid,
            model=self.config.model_id,
            prompt_token_ids=ids,
            sampling=req.sampling,
            adapter=req.adapter,
            cache_salt=req.cache_salt,
            tenant=req.tenant,
            priority=req.priority,
        )
        # ---- prefill
        self.registry.add_inflight(pw.worker_id, 1)
        try:
            fut = self.stubs.worker(pw.address).Prefill.future(
                worker_pb2.PrefillRequest(**common, slo=req.slo), timeout=_remaining(ctx)
            )
            ctx.add_callback(fut.cancel)
            try:
                pre: worker_pb2.PrefillResponse = fut.result()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.registry.drop(pw.worker_id)
                raise_from_rpc_error(e)
        finally:
            self.registry.add_inflight(pw.worker_id, -1)
        t_first = time.monotonic()
        token_times = [t_first - t0]
        first = pre.first_token
        delta, matched = detok.add([first])
        out_ids = [first]
        stop_now = matched is not None or first in params.stop_token_ids or params.max_tokens <= 1
        if not params.ignore_eos and first in self.eos and params.min_tokens == 0:
            stop_now = True
        reason = common_pb2.FINISH_REASON_LENGTH if params.max_tokens <= 1 else common_pb2.FINISH_REASON_STOP
        if stop_now:
            self._release_lease(pre.kv)
            if matched is None and (first in self.eos or first in params.stop_token_ids):
                delta = ""  # a stop token is not rendered
            else:
                delta += detok.add([], final=True)[0]
        resp = client_pb2.GenerateResponse(request_id=rid, token_ids=[first], text=delta)
        if pre.HasField("first_token_logprob"):
            resp.logprobs.append(pre.first_token_logprob)
        if stop_now:
            resp.finish.CopyFrom(self._finish(reason, matched, ids, out_ids, pre, t0, token_times, 0.0))
            yield resp
            return
        yield resp
        # ---- decode
        self.registry.add_inflight(dw.worker_id, 1)
        t_dec = time.monotonic()
        try:
            call = self.stubs.worker(dw.address).Decode(
                worker_pb2.DecodeRequest(
                    **common,
                    slo=req.slo,
                    kv=pre.kv,
                    first_token=first,
                    first_token_logprob=pre.first_token_logprob
                    if pre.HasField("first_token_logprob")
                    else None,
                ),
                timeout=_remaining(ctx),
            )
            ctx.add_callback(call.cancel)
            try:
                for d in call:
                    now = time.monotonic() - t0
                    token_times.extend([now] * len(d.token_ids))
                    out_ids.extend(d.token_ids)
                    visible = list(d.token_ids)
                    final = d.HasField("finish")
                    if final and visible and d.finish.stop == str(visible[-1]):
                        visible = visible[:-1]  # the stop token that ended it is not rendered
                    text, matched = detok.add(visible, final=final)
                    r = client_pb2.GenerateResponse(
                        request_id=rid, token_ids=d.token_ids, text=text, logprobs=d.logprobs
                    )
                    if final or matched is not None:
                        if matched is not None and not final:
                            call.cancel()
                            text += detok.add([], final=True)[0]
                            r.text = text
                        fr = d.finish.reason if final else common_pb2.FINISH_REASON_STOP
                        stop = matched if matched is not None else (d.finish.stop or None)
                        r.finish.CopyFrom(
                            self._finish(
                                fr, stop, ids, out_ids, pre, t0, token_times, time.monotonic() - t_dec
                            )
                        )
                        yield r
                        return
                    yield r
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.registry.drop(dw.worker_id)
                if ctx.is_active():
                    raise_from_rpc_error(e)
                return
        finally:
            self.registry.add_inflight(dw.worker_id, -1)

    def _finish(self, reason, stop, ids, out_ids, pre, t0, token_times, decode_s) -> common_pb2.Finish:
        if isinstance(reason, int) and not isinstance(reason, bool):
            fr = reason
        else:
            fr = finish_to_proto(reason)
        return common_pb2.Finish(
            reason=fr,
            stop="" if stop is None else str(stop),
            usage=common_pb2.Usage(
                prompt_tokens=len(ids),
                completion_tokens=len(out_ids),
                cached_prompt_tokens=pre.num_cached_tokens,
                total_tokens=len(ids) + len(out_ids),
            ),
            timing=common_pb2.Timing(
                ttft_s=token_times[0],
                e2e_s=time.monotonic() - t0,
                token_times_s=token_times,
                queue_s=pre.timing.queue_s,
                prefill_s=pre.timing.prefill_s,
                transfer_s=pre.timing.transfer_s,
                decode_s=decode_s,
            ),
        )
