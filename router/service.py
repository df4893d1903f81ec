"""Router: the client-facing Generate API and the worker Registry (gRPC edge).

Generate: tokenize and validate, ask the placement policy (``RouterConfig.policy``, pure code in
``router.policy``) for a (prefill, decode) pair over a view of the registry, or refuse the request
at once (RESOURCE_EXHAUSTED with the policy's retry-after) before any compute is spent; call
Prefill, stream the first token, call Decode with the KVHandle and relay its stream. A placement
with ``local_prefill`` (conditional disaggregation, colocated serving) skips Prefill: the decode
worker runs the whole request (``DecodeRequest.local_prefill``). Measured TTFT/TPOT and output
length of every finished request go back to the policy (online correction, length predictor). Client cancellation and deadlines
propagate downstream (the downstream calls are cancelled, which aborts the request in the
workers and frees its blocks); a lease not consumed by a decode worker is released here.
A worker lost mid-request (its call fails UNAVAILABLE) is dropped and the request re-dispatched,
at most ``RouterConfig.max_redispatches`` times, without losing or repeating a token
(:mod:`router.failover`, :meth:`GenerateServicer._serve`).
Every failure leaves as a gRPC status mapped by ``pdserve.status``.

Asynchronous data plane (issue #12): Generate runs on ``grpc.aio`` (the router serves it with
:func:`pdserve.grpc_server.start_aio_server`): a request is a task on one event loop, and a
stream waiting on tokens costs memory, not a thread. Worker calls use ``grpc.aio`` channels;
store calls (lease release, re-lease, placement-time prefix lookups) run on worker threads
(``asyncio.to_thread``) so they never block the loop. Flow control: a response is written only
when the client's HTTP/2 window has room; while it has none, the relay stops reading the decode
worker's stream (which backs up, to the worker), and a client that has not taken a response for
``RouterConfig.stall_timeout_s`` is cancelled with RESOURCE_EXHAUSTED naming the stall. A
worker's stream is also proof of life (:meth:`router.registry.Registry.seen`): a worker that
streams is not dropped for a late heartbeat. A KV store failure reported by a worker
(:class:`pdserve.errors.StoreUnavailableError`) fails the request naming the store; the worker
is neither dropped nor blamed.

Hung (not dead) workers: every worker call has a progress deadline (:mod:`router.progress`,
``RouterConfig.progress``): a Prefill that does not answer in time, a Decode stream whose next
message does not come in time, is cancelled (the worker, should it wake up, aborts the request
and frees its blocks) and re-dispatched like a lost worker. The worker is quarantined
(:meth:`Registry.quarantine`: no new traffic, logged, ``pdserve_router_quarantined_workers``)
until it answers a ``Stats`` probe with a short deadline; a task on the event loop probes the
quarantined workers (off the data path) while there are any.

The worker Registry (the control plane) is :mod:`router.registry_service`, on its own server
(``RegistryServicer`` is importable from here for compatibility).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from engine.block_hash import chain_hashes
from engine.models.config import ModelConfig
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kv_store.auth import tenant_owner
from kv_store.client import KVStoreClient
from kv_store.index import KVIndex, locate_prefix
from pdserve.auth import EdgeAuth
from pdserve.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ResourceExhaustedError,
    StoreUnavailableError,
    UnavailableError,
)
from pdserve.limits import grpc_options
from pdserve.metrics import FinishedRequest, RouterMetrics, outcome_for, slo_class, tpot_of
from pdserve.proto_convert import finish_to_proto, name_logprob_tokens, sampling_from_proto
from pdserve.security import TOKEN_METADATA_KEY, current, internal_channel
from pdserve.status import MD_ERROR_CLASS, error_from_rpc_error, raise_from_rpc_error
from pdserve.tracing import current_request_id, log_event, request_scope, traced_channel
from pdserve.v1 import client_pb2, common_pb2, worker_pb2, worker_pb2_grpc
from router.cluster_view import OutstandingTokens, ViewBuilder, first_block_size
from router.deadline import LazyDeadline
from router.failover import LostPhase, LostWorker, Redispatches, TokenStop, check_stop, resume_limits
from router.health import needed_kinds
from router.policy import (
    SLO,
    ClusterView,
    GoodputAwarePolicy,
    GoodputConfig,
    InstanceRole,
    Observation,
    Phase,
    Placement,
    PolicyKind,
    Rejection,
    RejectReason,
    RequestInfo,
)
from router.policy_factory import build_policy, uses_prefix_lookup
from router.progress import ProgressConfig, ProgressWatch
from router.quarantine import QuarantineReason, QuarantineRecord
from router.registry import Registry, WorkerEntry, WorkerKind
from router.registry_service import RegistryServicer, load_from_proto

__all__ = ["GenerateServicer", "RegistryServicer", "RouterConfig", "load_from_proto"]

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 0.5  # a placement-time prefix lookup gives up after this (then: no prefix)


@dataclass(frozen=True)
class RouterConfig:
    model_path: str
    model_id: str
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 3.0
    # Placement (router.policy). Default least_loaded: it needs no latency model and never
    # refuses work; goodput predicts latency (seeded from ``latency_profile`` when given,
    # corrected online) and refuses requests it predicts would miss their SLO.
    policy: PolicyKind = PolicyKind.LEAST_LOADED
    goodput: GoodputConfig = GoodputConfig()
    latency_profile: str | None = None  # ``pdserve profile`` JSON seeding latency predictions
    store_address: str | None = None  # KV store for prefix lookups (else learnt from KV handles)
    # The cluster's shared KV index (a redis:// URL, as the store nodes use): when set, the router
    # finds cached prefixes there itself (kv_store.index.locate_prefix) instead of a store Lookup.
    index_url: str | None = None
    # A request whose worker dies (a call fails UNAVAILABLE) is re-dispatched to another worker at
    # most this many times (router.failover); then it fails UNAVAILABLE naming the lost workers.
    max_redispatches: int = 2
    # Flow control: a client that has not taken a response for this long (its HTTP/2 window full:
    # it does not read) is cancelled with RESOURCE_EXHAUSTED; meanwhile its stream is paused.
    stall_timeout_s: float = 30.0
    # Hung workers: progress deadlines of worker calls (router.progress); a call that misses its
    # deadline is cancelled and re-dispatched, and its worker quarantined until a probe answers.
    progress: ProgressConfig = ProgressConfig()

    def __post_init__(self) -> None:
        if self.max_redispatches < 0:
            raise ValueError(f"max_redispatches must be >= 0, got {self.max_redispatches}")
        if self.stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if self.index_url == "memory":
            raise ValueError(
                "index_url 'memory' would be a private, empty index: give the cluster's redis:// URL"
            )


def _remaining(ctx: grpc.aio.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline; None when it has none (gRPC reports a huge number)."""
    r = ctx.time_remaining()
    return None if r is None or r > 1e7 else max(r, 0.0)


def _gone(ctx: grpc.aio.ServicerContext) -> bool:
    """The client is not waiting any more: it cancelled, or its deadline passed."""
    r = _remaining(ctx)
    return ctx.cancelled() or (r is not None and r <= 0)


class _ClientWriter:
    """Writes a request's responses to its client, in the request's task. A write waits while
    the client's window is full (it reads slowly: the caller's stream pauses). A client that
    takes nothing for ``stall_timeout_s`` seconds is given up on: ResourceExhaustedError naming
    the stall (the request is cancelled downstream as the caller unwinds).

    The stall deadline is a :class:`router.deadline.LazyDeadline` (one timer per stream, not one
    per message as ``asyncio.timeout`` would schedule: #12's token path). :meth:`close` at the
    end of the request."""

    __slots__ = ("_ctx", "_deadline", "_stall_timeout_s")

    def __init__(self, ctx: grpc.aio.ServicerContext, stall_timeout_s: float) -> None:
        self._ctx = ctx
        self._stall_timeout_s = stall_timeout_s
        self._deadline: LazyDeadline | None = None

    async def write(self, msg: object) -> None:
        dl = self._deadline
        if dl is None:
            dl = self._deadline = LazyDeadline()
        dl.start(self._stall_timeout_s)
        exc: BaseException | None = None
        try:
            await self._ctx.write(msg)
        except BaseException as e:  # noqa: BLE001 - re-raised below unless it is the stall
            exc = e
        if dl.expired(exc):
            raise ResourceExhaustedError(
                f"the client did not read its stream for {self._stall_timeout_s:g}s (its "
                "flow-control window stayed full): the request was cancelled; read responses as "
                "they come",
                retry_after_s=None,
            ) from None
        if exc is not None:
            raise exc

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.close()


class _Stubs:
    """One channel per worker address, reused: workers over ``grpc.aio`` (created on the event
    loop that uses them), stores over sync clients (called from worker threads)."""

    def __init__(self) -> None:
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._stores: dict[str, KVStoreClient] = {}

    def worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        s = self._stubs.get(address)
        if s is None:
            s = self._stubs[address] = worker_pb2_grpc.WorkerStub(_aio_internal_channel(address))
        return s

    def store(self, address: str) -> KVStoreClient:
        c = self._stores.get(address)
        if c is None:
            ch = traced_channel(internal_channel(address))
            c = self._stores[address] = KVStoreClient(address, timeout_s=5, channel=ch)
        return c

    def lookup(self, address: str) -> KVStoreClient:
        """A store client for placement-time prefix lookups: a short timeout (they are optional)."""
        key = "lookup:" + address
        c = self._stores.get(key)
        if c is None:
            ch = traced_channel(internal_channel(address))
            c = self._stores[key] = KVStoreClient(address, timeout_s=LOOKUP_TIMEOUT_S, channel=ch)
        return c


class GenerateServicer:
    def __init__(
        self,
        registry: Registry,
        config: RouterConfig,
        metrics: RouterMetrics | None = None,
        index: KVIndex | None = None,
        edge: EdgeAuth | None = None,
    ) -> None:
        """``index``: the KV index for prefix lookups (default: opened from ``config.index_url``;
        none: ask a store node's Lookup). ``edge``: API keys, tenants, quotas, request ids and
        cache salts (:mod:`pdserve.auth`; default: dev mode, the tenant is the request's field)."""
        self.edge = edge if edge is not None else EdgeAuth(None)
        self.registry = registry
        self.config = config
        self.metrics = metrics if metrics is not None else RouterMetrics(CollectorRegistry())
        self.metrics.track_workers(
            lambda: {k.value: len(self.registry.alive(k, config.model_id)) for k in WorkerKind}
        )
        self.metrics.track_quarantined(self._quarantined_counts)
        self._prober: asyncio.Task | None = None  # probes quarantined workers while there are any
        path = Path(config.model_path)
        self.tokenizer = Tokenizer(path)
        self.model_config = ModelConfig.from_path(path)
        self.max_model_len = self.model_config.max_position_embeddings
        self.eos = set(self.model_config.eos_token_ids) or (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.stubs = _Stubs()
        self.policy = build_policy(config.policy, profile_path=config.latency_profile, goodput=config.goodput)
        self.outstanding = OutstandingTokens()  # prompt tokens sent, first token not back yet
        self.kv_tokens = OutstandingTokens()  # KV tokens of requests in flight per decode worker
        # placement + reserving the chosen worker's queue is atomic, so that requests arriving
        # together each see the ones placed just before them (else a burst lands on one worker)
        self._place_lock = threading.Lock()
        self._views = ViewBuilder()  # per-request cluster views, reusing unchanged workers' snapshots
        # when each decode worker last sent a message on any stream (monotonic): a stream past its
        # progress deadline at a worker that streams others is queued or preempted there, not hung
        self._streamed_at: dict[str, float] = {}
        self._store_address = config.store_address
        if index is None and config.index_url:
            from kv_store.redis_index import make_index  # redis only when an index URL is given

            index = make_index(config.index_url)
        self.index = index

    # ----------------------------------------------------------------- helpers
    def _check_model(self, model: str) -> None:
        """Raises ModelNotFoundError (NOT_FOUND) when ``model`` names a model this router does not
        serve (empty = the served one)."""
        if model and model != self.config.model_id:
            raise ModelNotFoundError(f"unknown model {model!r}; this cluster serves {self.config.model_id!r}")

    def _check_adapter(self, adapter: str) -> None:
        """LoRA adapters are not served yet: a request naming one is refused (NOT_FOUND) rather than
        silently answered by the base model."""
        if adapter:
            raise ModelNotFoundError(
                f"LoRA adapter {adapter!r} is not served: this cluster serves only the base model "
                f"{self.config.model_id!r} (send an empty adapter)"
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
        """Refuses (INVALID_ARGUMENT) an empty prompt, and a prompt whose tokens plus
        ``max_tokens`` do not fit the model's context (as OpenAI and vLLM do: no silent cut)."""
        if not ids:
            raise InvalidRequestError("prompt is empty: send at least one token")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens + max_tokens {params.max_tokens} > context "
                f"{self.max_model_len}: shorten the prompt or lower max_tokens"
            )

    def _worker(self, worker_id: str | None, kind: WorkerKind) -> WorkerEntry:
        w = self.registry.get(worker_id) if worker_id else None
        if w is None:
            raise UnavailableError(
                f"no {kind.value} worker is registered for {self.config.model_id!r}; retry shortly"
            )
        return w

    def _prefix_blocks(self, ids: list[int], req: client_pb2.GenerateRequest) -> int:
        """Leading prompt blocks the KV store holds (0 when unknown, not needed by the policy, or
        the lookup fails): from the shared index when the router has one (the longest prefix one
        store node holds, what a prefill worker pulls), else from a store node's Lookup. Runs
        outside the placement lock (a lookup may take up to ``LOOKUP_TIMEOUT_S``)."""
        if not uses_prefix_lookup(self.config.policy) or len(ids) < 2:
            return 0
        bs = first_block_size(self.registry, self.config.model_id)
        if bs is None:
            return 0
        if self.index is not None:
            try:
                found = locate_prefix(self.index, ids, bs, self.config.model_id, req.adapter, req.cache_salt)
            except Exception as e:  # noqa: BLE001 - the lookup only sharpens an estimate
                log.debug("prefix lookup in the KV index failed: %s", e)
                return 0
            return found[1] if found is not None else 0
        addr = self._store_address
        if not addr:
            return 0
        hashes = chain_hashes(ids, bs, self.config.model_id, req.adapter, req.cache_salt)
        hashes = hashes[: (len(ids) - 1) // bs]
        if not hashes:
            return 0
        try:
            return self.stubs.lookup(addr).lookup(hashes).num_prefix_blocks
        except Exception as e:  # noqa: BLE001 - the lookup only sharpens an estimate
            log.debug("prefix lookup at %s failed: %s", addr, e)
            return 0

    def _may_hold_prefix(self, ids: list[int]) -> bool:
        """Whether the KV store could hold a prefix of prompt ``ids``: it has a full block before
        its last token (what :meth:`_prefix_blocks` looks up). A shorter prompt skips the lookup
        and its thread hop (a request's router CPU, #12)."""
        bs = first_block_size(self.registry, self.config.model_id)
        return bs is not None and len(ids) - 1 >= bs

    def _place(
        self,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        req: client_pb2.GenerateRequest,
        store_prefix_blocks: int | None = None,
    ) -> tuple[Placement, WorkerEntry, WorkerEntry, RequestInfo]:
        """Ask the policy for (prefill, decode) workers, or refuse before any compute is spent.
        ``store_prefix_blocks``: the prompt's prefix in the KV store (None: looked up here).

        Raises UnavailableError when a needed kind of worker is missing, ResourceExhaustedError
        (with the policy's retry-after) when the policy rejects the request early.
        """
        view = self._views.build(self.registry, self.config.model_id, self.outstanding, self.kv_tokens)
        roles = {WorkerKind.DECODE: InstanceRole.DECODE, WorkerKind.PREFILL: InstanceRole.PREFILL}
        for kind in needed_kinds(self.config.policy):  # the condition the router's health reports
            if not view.with_role(roles[kind]):
                raise UnavailableError(
                    f"no {kind.value} worker is registered for {self.config.model_id!r}; retry shortly"
                )
        inf = float("inf")
        slo = None
        if req.slo.ttft_s > 0 or req.slo.tpot_s > 0:
            slo = SLO(
                req.slo.ttft_s if req.slo.ttft_s > 0 else inf, req.slo.tpot_s if req.slo.tpot_s > 0 else inf
            )
        info = RequestInfo(
            rid,
            len(ids),
            max_output_tokens=params.max_tokens,
            slo=slo,
            arrival_time=self.policy.clock.now(),
            priority=req.priority,
            tenant=req.tenant,
            predicted_output_tokens=req.predicted_output_tokens,
            store_prefix_blocks=(
                self._prefix_blocks(ids, req) if store_prefix_blocks is None else store_prefix_blocks
            ),
        )
        d = self.policy.place(info, view)
        if isinstance(d, Rejection):
            if d.reason is RejectReason.NO_INSTANCE:
                raise UnavailableError(f"{d.message}; retry shortly")
            raise ResourceExhaustedError(f"request refused ({d.reason.value}): {d.message}", d.retry_after_s)
        try:
            dec_id = d.decode_instance_id
            if dec_id is None:
                bs = view.instances[0].block_size
                dec_id = self.policy.choose_decode(info, view, -(-(len(ids) + 1) // bs))
            dw = self._worker(dec_id, WorkerKind.DECODE)
            pw = dw if d.local_prefill else self._worker(d.instance_id, WorkerKind.PREFILL)
        except BaseException:
            self.policy.release(rid)  # placed, but the worker vanished meanwhile
            raise
        return d, pw, dw, info

    async def _release_lease(self, kv: common_pb2.KVHandle) -> None:
        """Release the lease of ``kv`` at its store (on a worker thread; failures are logged: the
        lease expires anyway)."""
        if kv.lease_id and kv.locations:
            await asyncio.to_thread(self._release_lease_now, kv)

    def _release_lease_now(self, kv: common_pb2.KVHandle) -> None:
        if kv.lease_id and kv.locations:
            try:
                self.stubs.store(kv.locations[0].address).release(kv.lease_id)
            except Exception as e:  # noqa: BLE001 - the lease expires anyway
                log.warning("could not release lease %s: %s", kv.lease_id, e)

    # ----------------------------------------------------------------- rpcs
    def Tokenize(self, req: client_pb2.TokenizeRequest, ctx) -> client_pb2.TokenizeResponse:
        self.edge.principal_from_metadata(ctx.invocation_metadata())  # a key store: needs a key
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

    async def Generate(self, req: client_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext) -> None:
        """Traced, measured entry: authenticates and admits the request at the edge
        (:meth:`pdserve.auth.EdgeAuth.admit_generate`: tenant, input limits, quota, the client's id
        claimed as an idempotency key, the tenant's cache salt; the request runs under a cluster
        id, and responses carry the client's own id when it sent one), records outcome,
        latencies, phases and SLO result (:class:`RouterMetrics`) and logs one structured line per
        request."""
        try:
            admitted = await self.edge.admit_generate_async(req, ctx.invocation_metadata())
        except Exception as e:  # refused at the edge (key, limits, quota, id): counted like the rest
            cls, outcome = slo_class(req.slo.ttft_s, req.slo.tpot_s), outcome_for(e)
            self.metrics.observe_failed(cls, outcome)
            with request_scope(req.request_id):
                log_event(log, "request failed", slo_class=cls, outcome=outcome, error=type(e).__name__)
            raise
        try:
            shown_id = admitted.apply_to(req)
            await self._measured(req, ctx, shown_id, admitted.lease_ttl_s)
        finally:
            admitted.close()

    async def _measured(
        self,
        req: client_pb2.GenerateRequest,
        ctx: grpc.aio.ServicerContext,
        shown_id: str,
        lease_ttl_s: float,
    ) -> None:
        """Write the responses of ``req`` (:class:`_ClientWriter`: flow control) and measure it."""
        cls = slo_class(req.slo.ttft_s, req.slo.tpot_s)
        m = self.metrics
        finish: common_pb2.Finish | None = None
        with request_scope(shown_id):  # logs name the id the client sees (workers get req's)
            m.inflight.inc()
            writer = _ClientWriter(ctx, self.config.stall_timeout_s)
            try:
                async with contextlib.aclosing(self._generate(req, ctx, lease_ttl_s)) as responses:
                    async for resp in responses:
                        if resp.HasField("finish"):
                            finish = resp.finish
                        resp.request_id = shown_id
                        await writer.write(resp)
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):  # the client went away, or its deadline
                    r = _remaining(ctx)
                    outcome = "timeout" if r is not None and r <= 0 else "cancelled"
                else:
                    outcome = outcome_for(e)
                m.observe_failed(cls, outcome)
                log_event(log, "request failed", slo_class=cls, outcome=outcome, error=type(e).__name__)
                raise
            finally:
                writer.close()
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
                kv_pull_s=round(t.kv_pull_s, 6),  # the decode-side part of transfer_s
            )

    async def _generate(
        self, req: client_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext, lease_ttl_s: float = 0.0
    ) -> AsyncIterator[client_pb2.GenerateResponse]:
        t0 = time.monotonic()
        self._check_model(req.model)
        self._check_adapter(req.adapter)
        params = sampling_from_proto(req.sampling)
        ids = self._tokens(req)
        self._validate(ids, params)
        rid = req.request_id or uuid.uuid4().hex
        t_route = time.perf_counter()
        run = _Run(rid, ids, params, t0, IncrementalDetokenizer(self.tokenizer, params.stop))
        run.lease_ttl_s = lease_ttl_s
        stored = 0
        if uses_prefix_lookup(self.config.policy) and self._may_hold_prefix(ids):
            # I/O: off the loop, before the placement lock
            stored = await asyncio.to_thread(self._prefix_blocks, ids, req)
        with self._place_lock:
            placement, pw, dw, info = self._place(rid, ids, params, req, stored)
            # the prompt is queued on the worker that prefills it from now on, not from when its
            # Prefill call starts: the next placement must see it
            run.reserved = (dw if placement.local_prefill else pw).worker_id, len(ids)
            self.outstanding.add(*run.reserved)
            # and it is in flight on its decode worker from now on: a drain (scale down) that
            # waits for the worker to be idle cannot remove it before the request commits there
            run.reserved_decode = dw.worker_id
            self.registry.add_inflight(dw.worker_id, 1)
        run.predicted_ttft_s = placement.estimated_ttft_s
        run.predicted_tpot_s = placement.estimated_tpot_s
        self.metrics.routing.observe(time.perf_counter() - t_route)
        log_event(
            log,
            "routed",
            cluster_request_id=rid,  # the id the workers and the store log this request under
            prefill=pw.worker_id,
            decode=dw.worker_id,
            policy=self.config.policy.value,
            local_prefill=placement.local_prefill,
            store_prefix_blocks=info.store_prefix_blocks,
            predicted_ttft_s=placement.estimated_ttft_s,
            predicted_tpot_s=placement.estimated_tpot_s,
            predicted_output_tokens=placement.predicted_output_tokens or None,
        )
        done = False
        try:
            async with contextlib.aclosing(self._serve(req, run, placement, pw, dw, info, ctx)) as served:
                async for resp in served:
                    if resp.HasField("finish"):
                        done = True
                        self._feedback(run, resp.finish)
                    yield resp
        finally:
            self._unreserve(run)
            if not done:
                self.policy.release(rid)

    def _unreserve(self, run: _Run) -> None:
        """Drop the placement-time queue reservation of ``run`` (once; its first call's own
        accounting has taken over, or it never started)."""
        if run.reserved is not None:
            worker_id, n = run.reserved
            run.reserved = None
            self.outstanding.add(worker_id, -n)
        if run.reserved_decode is not None:
            worker_id, run.reserved_decode = run.reserved_decode, None
            self.registry.add_inflight(worker_id, -1)

    def _feedback(self, run: _Run, finish: common_pb2.Finish) -> None:
        """Measured TTFT/TPOT and output length of a finished request, to the policy."""
        t = finish.timing
        self.policy.on_finished(
            Observation(
                run.rid,
                ttft_s=t.ttft_s,
                tpot_s=tpot_of(list(t.token_times_s)) or 0.0,
                output_tokens=finish.usage.completion_tokens,
                num_prompt_tokens=len(run.ids),
                max_output_tokens=run.params.max_tokens,
            )
        )
        if isinstance(self.policy, GoodputAwarePolicy):
            c, acc = self.policy.corrected, self.policy.lengths.online
            log_event(
                log,
                "policy feedback",
                ttft_factor=round(c.factor(Phase.TTFT), 4),
                tpot_factor=round(c.factor(Phase.TPOT), 4),
                ttft_samples=c.samples(Phase.TTFT),
                tpot_samples=c.samples(Phase.TPOT),
                length_samples=self.policy.lengths.num_samples,
                length_mae=round(acc.mae, 2) if acc.n else None,
                length_within_2x=round(acc.within_2x, 3) if acc.n else None,
            )

    def _common(self, req: client_pb2.GenerateRequest, run: _Run) -> dict:
        return dict(
            request_id=run.rid,
            model=self.config.model_id,
            prompt_token_ids=run.ids,
            sampling=req.sampling,
            adapter=req.adapter,
            cache_salt=req.cache_salt,
            tenant=req.tenant,
            priority=req.priority,
        )

    async def _serve(
        self,
        req: client_pb2.GenerateRequest,
        run: _Run,
        placement: Placement,
        pw: WorkerEntry,
        dw: WorkerEntry,
        info: RequestInfo,
        ctx: grpc.aio.ServicerContext,
    ) -> AsyncIterator[client_pb2.GenerateResponse]:
        """Serve ``run`` on its placement, re-dispatching it when a worker is lost (DESIGN
        lifecycle step 5, :mod:`router.failover`).

        Contract: every output token reaches the client exactly once, in order, whatever fails. A
        worker whose call fails UNAVAILABLE is dropped from the registry and never used again by
        this request; a lost prefill is sent to another prefill worker, a decode lost before its
        first token hands the same KV (re-leased) to another decode worker, a decode lost
        mid-stream is resumed from prompt + tokens so far. At most ``config.max_redispatches``
        re-dispatches, then :class:`UnavailableError` naming the lost workers. Nothing is
        re-dispatched once the client has gone or its deadline passed (``ctx`` inactive).
        """
        # errors name the id the client knows (bound by request_scope in _measured), not the cluster's
        budget = Redispatches(current_request_id() or run.rid, self.config.max_redispatches)
        local = placement.local_prefill
        handoff: _Handoff | None = None  # the prefilled state a decode worker takes over
        while True:
            produced = len(run.out_ids)
            try:
                with self._committed(dw, run):
                    if local:
                        async with contextlib.aclosing(self._local_decode(req, run, dw, ctx)) as relayed:
                            async for r in relayed:
                                yield r
                    else:
                        if handoff is None:
                            first, handoff = await self._prefill(req, run, pw, ctx)
                            try:
                                yield first
                            except BaseException:  # the client went away before a decode worker took the KV
                                if handoff is not None:
                                    await asyncio.shield(self._release_lease(handoff.kv))
                                raise
                            if handoff is None:
                                return  # its first token ended it
                        produced = len(run.out_ids)  # relayed before this decode
                        async with contextlib.aclosing(self._decode(req, run, handoff, dw, ctx)) as relayed:
                            async for r in relayed:
                                yield r
                return
            except _WorkerLost as e:
                lost = e.lost
            if lost.stalled:  # hung, not dead: out of service until it answers a probe
                self._quarantine(lost)
            elif lost.phase is not LostPhase.KV:  # a worker whose KV handoff was gone is alive
                self.registry.drop(lost.worker_id)
            reuse = lost.phase is LostPhase.DECODE and len(run.out_ids) == produced
            try:
                if _gone(ctx):  # cancelled or past its deadline: the client is not waiting
                    if handoff is not None:
                        await self._release_lease(handoff.kv)
                    return
                budget.record(lost)  # raises once over the bound
                if lost.phase is LostPhase.KV and handoff is not None:
                    await self._release_lease(handoff.kv)
                    handoff = None  # prefill prompt + tokens so far again, same decode worker
                if lost.phase is LostPhase.DECODE and handoff is not None:
                    relet = await asyncio.to_thread(self._relet, handoff, req.tenant) if reuse else None
                    if relet is None:
                        await self._release_lease(handoff.kv)
                    handoff = relet  # None: prefill prompt + tokens so far again
                n_ctx = len(run.ids) + len(run.out_ids)
                if lost.phase is LostPhase.PREFILL or (not local and handoff is None):
                    pw = await self._replacement_or_wait(WorkerKind.PREFILL, info, n_ctx, budget, ctx)
                if lost.phase is LostPhase.DECODE:
                    dw = await self._replacement_or_wait(WorkerKind.DECODE, info, n_ctx, budget, ctx)
            except BaseException:
                if handoff is not None:
                    await asyncio.shield(self._release_lease(handoff.kv))
                raise
            self.metrics.redispatches.labels(lost.phase.value).inc()
            log_event(
                log,
                "redispatch",
                logging.WARNING,
                cluster_request_id=run.rid,  # the record's request_id is the client's (request_scope)
                lost_phase=lost.phase.value,
                lost_worker=lost.worker_id,
                stalled=lost.stalled,
                error=lost.detail,
                redispatch=budget.count,
                produced_tokens=len(run.out_ids),
                kv_reused=handoff is not None,
                prefill=None if local else pw.worker_id,
                decode=dw.worker_id,
            )

    async def _replacement_or_wait(
        self,
        kind: WorkerKind,
        info: RequestInfo,
        n_ctx: int,
        budget: Redispatches,
        ctx: grpc.aio.ServicerContext,
    ) -> WorkerEntry:
        """:meth:`_replacement`; when there is none but a quarantined ``kind`` worker is
        registered (it stalled: maybe slow, not hung), wait for the prober to restore it, for at
        most two probe rounds (or until the client is gone), then give up as
        :meth:`_replacement` does."""
        qcfg = self.registry.quarantined.config
        deadline = time.monotonic() + 2 * (qcfg.max_probe_interval_s + qcfg.probe_timeout_s)
        while True:
            try:
                return self._replacement(kind, info, n_ctx, budget)
            except UnavailableError:
                waiting = any(
                    (w := self.registry.get(wid)) is not None and w.kind is kind
                    for wid in self.registry.quarantined.ids()
                )
                if not waiting or time.monotonic() >= deadline or _gone(ctx):
                    raise
            await asyncio.sleep(qcfg.probe_interval_s)

    # ----------------------------------------------------------------- quarantine
    def _quarantine(self, lost: LostWorker) -> None:
        """Quarantine the stalled worker of ``lost`` (logged once) and make sure it is probed."""
        reason = (
            QuarantineReason.STALLED_PREFILL
            if lost.phase is LostPhase.PREFILL
            else QuarantineReason.STALLED_DECODE
        )
        if self.registry.quarantine(lost.worker_id, reason, lost.detail):
            log_event(
                log,
                "worker quarantined",
                logging.WARNING,
                worker=lost.worker_id,
                reason=reason.value,
                detail=lost.detail,
            )
        self._ensure_prober()

    def _ensure_prober(self) -> None:
        """Start the probe task on the running loop unless one runs."""
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_quarantined())

    async def _probe_quarantined(self) -> None:
        """Probe quarantined workers as they fall due until none is left (the task then ends;
        the next quarantine starts another)."""
        book = self.registry.quarantined
        while True:
            wait = book.next_due_in()
            if wait is None:
                return
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                await asyncio.gather(*(self._probe(r) for r in book.due()))
            except Exception:  # noqa: BLE001 - the prober must outlive a bad moment
                log.exception("quarantine probe failed")
                await asyncio.sleep(book.config.probe_interval_s)

    async def _probe(self, r: QuarantineRecord) -> None:
        """One health probe of quarantined worker ``r``: its ``Stats`` within the probe timeout.
        A worker not registered (it went silent and expired) fails the probe: it registers
        again when it wakes up, and is probed then."""
        w = self.registry.get(r.worker_id)
        ok, why = False, "not registered"
        if w is not None:
            try:
                await self.stubs.worker(w.address).Stats(
                    worker_pb2.StatsRequest(),
                    timeout=self.registry.quarantined.config.probe_timeout_s,
                    metadata=_call_metadata(),
                )
                ok, why = True, ""
            except grpc.RpcError as e:
                why = f"{e.code().name}: {e.details() or ''}"
        lifted = self.registry.probe_result(r.worker_id, ok)
        if lifted is not None:
            log_event(
                log,
                "worker restored",
                worker=r.worker_id,
                reason=lifted.reason.value,
                quarantined_s=round(self.registry.clock() - lifted.since, 3),
            )
        elif not ok:
            log.debug("quarantined worker %s failed its probe: %s", r.worker_id, why)

    def _quarantined_counts(self) -> dict[str, int]:
        """Quarantined workers by role (gauge); a worker not registered counts under its
        quarantine's role guess: decode for a stalled stream, prefill for a stalled Prefill."""
        out = {k.value: 0 for k in WorkerKind}
        for rec in self.registry.quarantined.records():
            w = self.registry.get(rec.worker_id)
            if w is not None:
                role = w.kind.value
            else:
                role = (
                    WorkerKind.PREFILL
                    if rec.reason is QuarantineReason.STALLED_PREFILL
                    else WorkerKind.DECODE
                ).value
            out[role] += 1
        return out

    def _replacement(
        self, kind: WorkerKind, info: RequestInfo, n_ctx: int, budget: Redispatches
    ) -> WorkerEntry:
        """A ``kind`` worker for a re-dispatch, chosen by the placement policy among the live
        workers this request has not lost (no admission check: the request is already accepted).
        Raises the budget's UnavailableError when there is none."""
        full = self._views.build(self.registry, self.config.model_id, self.outstanding, self.kv_tokens)
        view = ClusterView(i for i in full.instances if i.instance_id not in budget.excluded)
        info = dataclasses.replace(info, num_prompt_tokens=n_ctx)
        wid: str | None = None
        if kind is WorkerKind.PREFILL:
            pool = view.with_role(InstanceRole.PREFILL)
            if pool:
                wid = self.policy.choose_prefill(info, pool, view).instance_id
        elif view.with_role(InstanceRole.DECODE):
            bs = view.instances[0].block_size
            wid = self.policy.choose_decode(info, view, -(-(n_ctx + 1) // bs))
        w = self.registry.get(wid) if wid else None
        if w is None or w.kind is not kind:
            raise budget.exhausted(f"no other {kind.value} worker is available")
        return w

    def _relet(self, h: _Handoff, tenant: str) -> _Handoff | None:
        """``h`` under a fresh store lease: the lost decode worker may have released the old one
        after its pull (the blocks are then unpinned) or never released it (its TTL keeps running).
        The old lease is released. None when the store no longer holds every block (or the
        handle spans several nodes): the caller then prefills again. Blocking (store calls): run
        it on a worker thread. The new lease is charged to the request's ``tenant`` (its quota
        of leased blocks, as the prefill worker's lease was)."""
        kv = h.kv
        if not kv.locations or len({loc.node_id for loc in kv.locations}) != 1:
            return None
        store = self.stubs.store(kv.locations[0].address)
        try:
            grant = store.lease(list(kv.block_hashes), owner=tenant_owner(tenant))
        except Exception as e:  # noqa: BLE001 - evicted or store trouble: prefill again
            log.info("could not re-lease the KV of %s (%s); prefilling again", kv.request_id, e)
            return None
        new = common_pb2.KVHandle()
        new.CopyFrom(kv)
        new.lease_id = grant.lease_id
        new.lease_expires_at_unix_s = grant.expires_at_unix_s  # the shm slots' validity: the new lease's
        del new.shm_slots[:]
        if len(grant.slots) == len(kv.block_hashes):
            new.shm_slots.extend(grant.slots)
        self._release_lease_now(kv)
        return dataclasses.replace(h, kv=new)

    def _leg_input(
        self, req: client_pb2.GenerateRequest, run: _Run
    ) -> tuple[list[int], common_pb2.SamplingParams]:
        """Prompt and sampling of the next call for ``run``: the client's, or after ``k`` output
        tokens (a resumed request) prompt + those tokens with max/min_tokens reduced by ``k`` and
        sampling positions shifted by ``k`` (so a seeded request samples as if never moved)."""
        k = len(run.out_ids)
        if k == 0:
            return run.ids, req.sampling
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(req.sampling)
        sampling.max_tokens, sampling.min_tokens = resume_limits(
            run.params.max_tokens, run.params.min_tokens, k
        )
        sampling.seed_position_offset = req.sampling.seed_position_offset + k  # seeded: continues exactly
        return run.ids + run.out_ids, sampling

    def _leg_request(self, req: client_pb2.GenerateRequest, run: _Run) -> dict:
        """Fields common to the Prefill/Decode request of the next call (see :meth:`_leg_input`)."""
        prompt, sampling = self._leg_input(req, run)
        return {**self._common(req, run), "prompt_token_ids": prompt, "sampling": sampling}

    async def _local_decode(
        self, req: client_pb2.GenerateRequest, run: _Run, dw: WorkerEntry, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[client_pb2.GenerateResponse]:
        """Conditional disaggregation: the decode worker runs the whole request (or, resumed, the
        prompt + tokens so far) and streams every token, its first included."""
        common = self._leg_request(req, run)
        n = len(common["prompt_token_ids"])
        resumed = bool(run.out_ids)
        self.outstanding.add(dw.worker_id, n)
        self._unreserve(run)
        queued = [True]

        def first_token() -> None:
            if queued[0]:
                queued[0] = False
                self.outstanding.add(dw.worker_id, -n)

        call = None
        try:
            call = self.stubs.worker(dw.address).Decode(
                worker_pb2.DecodeRequest(**common, slo=req.slo, local_prefill=True),
                timeout=_remaining(ctx),
                metadata=_call_metadata(),
            )
            watch = ProgressWatch(
                self.config.progress,
                run.predicted_tpot_s,
                first_message_tokens=self.outstanding.get(dw.worker_id),
            )
            guarded = _Guarded(
                call,
                dw,
                keep_cached=run.cached_tokens if resumed else None,
                watch=watch,
                streamed=self._streamed_at,
            )
            async with contextlib.aclosing(
                self._relay(guarded, run, dw, ctx, on_first=first_token, worker_text=not resumed)
            ) as relayed:
                async for r in relayed:
                    yield r
        finally:
            if call is not None:
                call.cancel()  # the client went away (or the relay ended it): abort it downstream
            first_token()

    @contextlib.contextmanager
    def _committed(self, dw: WorkerEntry, run: _Run) -> Iterator[None]:
        """Count the request on decode worker ``dw`` (in flight, and its prompt + first token of KV)
        from placement until it ends (or leaves ``dw``), however it ends; so a burst does not pile
        onto one decode worker before heartbeats report it."""
        self.registry.add_inflight(dw.worker_id, 1)
        self.kv_tokens.add(dw.worker_id, len(run.ids) + 1)
        try:
            yield
        finally:
            self.kv_tokens.add(dw.worker_id, -(len(run.ids) + 1))
            self.registry.add_inflight(dw.worker_id, -1)

    async def _prefill(
        self, req: client_pb2.GenerateRequest, run: _Run, pw: WorkerEntry, ctx: grpc.aio.ServicerContext
    ) -> tuple[client_pb2.GenerateResponse, _Handoff | None]:
        """Prefill the request's known tokens on ``pw`` (the prompt, or resumed: prompt + output so
        far); returns the response relaying the token it samples (the next output token) and what
        a decode worker needs to continue, or None when that token ended the request (its lease
        released then). Raises :class:`_WorkerLost` when ``pw`` is unreachable (UNAVAILABLE), and
        :class:`StoreUnavailableError` when ``pw`` could not reach its KV store."""
        params, rid, detok = run.params, run.rid, self._detok(run)
        common = self._leg_request(req, run)
        prompt = common["prompt_token_ids"]
        resumed = bool(run.out_ids)
        self.registry.add_inflight(pw.worker_id, 1)
        self.outstanding.add(pw.worker_id, len(prompt))
        self._unreserve(run)
        try:
            call = self.stubs.worker(pw.address).Prefill(
                worker_pb2.PrefillRequest(**common, slo=req.slo, lease_ttl_s=run.lease_ttl_s),
                timeout=_remaining(ctx),
                metadata=_call_metadata(),
            )
            bound = self.config.progress.prefill_deadline_s(
                run.predicted_ttft_s, self.outstanding.get(pw.worker_id)
            )
            t_call = time.monotonic()
            try:
                async with asyncio.timeout(bound):  # None: no progress deadline
                    pre: worker_pb2.PrefillResponse = await call
            except TimeoutError:
                waited = time.monotonic() - t_call
                detail = f"no progress: no Prefill answer after {waited:.1f}s (bound {bound or 0:.1f}s)"
                raise _WorkerLost(LostWorker(pw.worker_id, LostPhase.PREFILL, detail, stalled=True)) from None
            except grpc.RpcError as e:
                _raise_store_failure(e)  # the worker is fine: its store is not
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    lost = LostWorker(pw.worker_id, LostPhase.PREFILL, e.details() or "")
                    raise _WorkerLost(lost) from None
                raise_from_rpc_error(e)
            finally:
                call.cancel()  # the client went away meanwhile: abort the prefill (no-op when done)
        finally:
            self.outstanding.add(pw.worker_id, -len(prompt))
            self.registry.add_inflight(pw.worker_id, -1)
        self.registry.seen(pw.worker_id)  # it answered: alive
        if pre.kv.locations and not pre.kv.dist_address and not self.config.store_address:
            # the store prefix lookups go to: where the last handoff was published (follows a
            # store node that restarted on a new port); a direct handle names a prefill worker
            self._store_address = pre.kv.locations[0].address
        if not resumed:  # usage and phases describe the client's prompt, not a resumed one
            run.cached_tokens = pre.num_cached_tokens
            run.pre_timing = pre.timing
        t_first = time.monotonic()
        run.token_times.append(t_first - run.t0)
        first = pre.first_token
        delta, matched = detok.add([first])
        run.out_ids.append(first)
        run.detok_fed = len(run.out_ids)
        hit = check_stop(
            first,
            len(run.out_ids),
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop_token_ids=params.stop_token_ids,
            eos_token_ids=self.eos,
            ignore_eos=params.ignore_eos,
        )
        stop_now = matched is not None or hit is not None
        reason = (
            common_pb2.FINISH_REASON_LENGTH
            if matched is None and hit is TokenStop.LENGTH
            else common_pb2.FINISH_REASON_STOP
        )
        if stop_now:
            await self._release_lease(pre.kv)
            if matched is None and hit is TokenStop.STOP:
                delta = ""  # a stop token is not rendered
            else:
                delta += detok.add([], final=True)[0]
        run.sent_chars += len(delta)
        resp = client_pb2.GenerateResponse(request_id=rid, token_ids=[first], text=delta)
        if pre.HasField("first_token_logprob"):
            resp.logprobs.append(pre.first_token_logprob)
            name_logprob_tokens(resp.logprobs, self.tokenizer.token_bytes)
        if stop_now:
            stop = str(first) if matched is None and hit is TokenStop.STOP else matched
            resp.finish.CopyFrom(self._finish(reason, stop, run, 0.0))
            return resp, None
        return resp, _Handoff(
            prompt=list(prompt),
            sampling=common["sampling"],
            kv=pre.kv,
            first_token=first,
            first_logprob=pre.first_token_logprob if pre.HasField("first_token_logprob") else None,
        )

    async def _decode(
        self,
        req: client_pb2.GenerateRequest,
        run: _Run,
        h: _Handoff,
        dw: WorkerEntry,
        ctx: grpc.aio.ServicerContext,
    ) -> AsyncIterator[client_pb2.GenerateResponse]:
        """Hand ``h`` to decode worker ``dw`` and relay its stream; raises :class:`_WorkerLost`
        when ``dw`` is unreachable (UNAVAILABLE), before or during the stream.

        The handoff lease: a decode worker releases it after its pull, before its first message.
        When the call ends before any message (the client cancelled, the call was cancelled before
        the worker ran it, the worker refused it), nobody took the KV: its lease is released here
        (idempotent). A lost worker (:class:`_WorkerLost`) leaves it to :meth:`_serve`."""
        call = self.stubs.worker(dw.address).Decode(
            worker_pb2.DecodeRequest(
                **{**self._common(req, run), "prompt_token_ids": h.prompt, "sampling": h.sampling},
                slo=req.slo,
                kv=h.kv,
                first_token=h.first_token,
                first_token_logprob=h.first_logprob,
            ),
            timeout=_remaining(ctx),
            metadata=_call_metadata(),
        )
        taken = False  # a message came: the decode worker pulled the KV and released the lease
        try:
            watch = ProgressWatch(self.config.progress, run.predicted_tpot_s)
            guarded = _Guarded(call, dw, watch=watch, streamed=self._streamed_at)
            # the decode engine's detokenizer has seen the request's whole output (the first
            # token) unless this leg resumes it: then its text would lack the output before
            fresh = len(h.prompt) == len(run.ids) and len(run.out_ids) == 1
            relay = self._relay(guarded, run, dw, ctx, worker_text=fresh)
            async with contextlib.aclosing(relay) as relayed:
                async for r in relayed:
                    taken = True
                    yield r
        except _WorkerLost:
            raise  # _serve re-lets the KV for another decode worker or releases it
        except BaseException:
            if not taken:
                call.cancel()
                await asyncio.shield(self._release_lease(h.kv))
            raise
        finally:
            call.cancel()  # the client went away (or the relay ended it): abort it downstream
        if not taken:
            await self._release_lease(h.kv)

    async def _relay(
        self,
        call,
        run: _Run,
        dw: WorkerEntry,
        ctx: grpc.aio.ServicerContext,
        on_first: Callable[[], None] | None = None,
        worker_text: bool = False,
    ) -> AsyncIterator[client_pb2.GenerateResponse]:
        """Relay a Decode stream to the client (text deltas, stop strings, the finish message).
        Each message the worker sends (one or several tokens) becomes one client message; the
        next one is read only once the client took this one (flow control). Every message
        counts as the worker's heartbeat (:meth:`Registry.seen`).

        Text: ``worker_text`` (the worker's engine rendered this leg from the request's first
        output token, so its text continues the client's) and a message with ``has_text``: its
        text delta is relayed as it is (the engine's detokenizer is the router's: same stop
        strings, same hold-back; the engine ends the request on a stop string itself). Else the
        router renders the tokens (:meth:`_detok`, caught up with the output so far).

        The worker's KV pull time (``kv_pull_s`` of its first message) is added to
        ``run.kv_pull_s`` (transfer) and left out of this call's decode time."""
        t_dec = time.monotonic()
        pull_s = 0.0
        seen = self.registry.seen
        streamed_at = self._streamed_at
        try:
            async for d in call:
                seen(dw.worker_id)
                streamed_at[dw.worker_id] = time.monotonic()
                if d.kv_pull_s > 0:
                    pull_s += d.kv_pull_s
                    run.kv_pull_s += d.kv_pull_s
                if on_first is not None:
                    on_first()
                    on_first = None
                    run.cached_tokens = d.num_cached_tokens
                now = time.monotonic() - run.t0
                run.token_times.extend([now] * len(d.token_ids))
                final = d.HasField("finish")
                if worker_text and d.has_text:
                    text, matched = d.text, None
                    run.out_ids.extend(d.token_ids)
                else:
                    detok = self._detok(run)
                    visible = list(d.token_ids)
                    if final and visible and d.finish.stop == str(visible[-1]):
                        visible = visible[:-1]  # the stop token that ended it is not rendered
                    text, matched = detok.add(visible, final=final)
                    run.out_ids.extend(d.token_ids)
                    run.detok_fed = len(run.out_ids)
                r = client_pb2.GenerateResponse(
                    request_id=run.rid, token_ids=d.token_ids, text=text, logprobs=d.logprobs
                )
                if r.logprobs:
                    name_logprob_tokens(r.logprobs, self.tokenizer.token_bytes)
                if final or matched is not None:
                    if matched is not None and not final:
                        call.cancel()
                        text += run.detok.add([], final=True)[0]
                        r.text = text
                    run.sent_chars += len(text)
                    fr = d.finish.reason if final else common_pb2.FINISH_REASON_STOP
                    stop = matched if matched is not None else (d.finish.stop or None)
                    decode_s = max(0.0, time.monotonic() - t_dec - pull_s)
                    r.finish.CopyFrom(self._finish(fr, stop, run, decode_s))
                    yield r
                    return
                run.sent_chars += len(text)
                yield r
        except grpc.RpcError as e:
            _raise_store_failure(e)  # the worker is fine: its store is not
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.registry.drop(dw.worker_id)
            if not _gone(ctx):
                raise_from_rpc_error(e)
            return

    def _detok(self, run: _Run) -> IncrementalDetokenizer:
        """``run``'s detokenizer, caught up with its output: when decode workers rendered part of
        it (their text relayed as it was), a new one is fed the output so far and told how much
        text the client already has (``sent_chars``), so what it renders next continues exactly
        (a held-back stop-string prefix or incomplete character included)."""
        if run.detok_fed != len(run.out_ids):
            d = IncrementalDetokenizer(self.tokenizer, run.params.stop)
            d.add(list(run.out_ids))
            d.emitted = run.sent_chars
            run.detok, run.detok_fed = d, len(run.out_ids)
        return run.detok

    def _finish(self, reason, stop, run: _Run, decode_s: float) -> common_pb2.Finish:
        """The closing Finish of ``run``. Timing: queue/prefill from the prefill worker; transfer =
        the prefill worker's KV publish + ``run.kv_pull_s`` (the decode workers' pulls, also
        reported alone as ``kv_pull_s``); ``decode_s`` as measured by the relay (pull excluded)."""
        if isinstance(reason, int) and not isinstance(reason, bool):
            fr = reason
        else:
            fr = finish_to_proto(reason)
        n_in, n_out = len(run.ids), len(run.out_ids)
        e2e = time.monotonic() - run.t0
        pre = run.pre_timing
        return common_pb2.Finish(
            reason=fr,
            stop="" if stop is None else str(stop),
            usage=common_pb2.Usage(
                prompt_tokens=n_in,
                completion_tokens=n_out,
                cached_prompt_tokens=run.cached_tokens,
                total_tokens=n_in + n_out,
            ),
            timing=common_pb2.Timing(
                ttft_s=run.token_times[0] if run.token_times else e2e,
                e2e_s=e2e,
                token_times_s=run.token_times,
                queue_s=pre.queue_s if pre is not None else 0.0,
                prefill_s=pre.prefill_s if pre is not None else 0.0,
                transfer_s=(pre.transfer_s if pre is not None else 0.0) + run.kv_pull_s,
                decode_s=decode_s,
                kv_pull_s=run.kv_pull_s,
            ),
        )


@dataclass
class _Run:
    """Per-request state shared by the prefill, relay and finish steps of one Generate."""

    rid: str
    ids: list[int]
    params: SamplingParams
    t0: float
    detok: IncrementalDetokenizer
    out_ids: list[int] = field(default_factory=list)
    # ``detok`` has rendered ``out_ids[:detok_fed]``; the text of the rest came from decode
    # workers (DecodeResponse.text): :meth:`GenerateServicer._detok` catches it up when needed
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


@dataclass(frozen=True)
class _Handoff:
    """A prefilled request as a decode worker takes it over: ``prompt`` (the tokens the KV covers:
    the client's prompt, or resumed, prompt + output before ``first_token``), the sampling of
    this leg, the KV handle and the token the prefill sampled (already relayed to the client)."""

    prompt: list[int]
    sampling: common_pb2.SamplingParams
    kv: common_pb2.KVHandle
    first_token: int
    first_logprob: common_pb2.TokenLogprob | None = None


class _WorkerLost(Exception):
    """A worker call failed UNAVAILABLE: the worker is presumed dead and the request is
    re-dispatched (internal to the router; never leaves :meth:`GenerateServicer._serve`)."""

    def __init__(self, lost: LostWorker) -> None:
        super().__init__(lost.describe())
        self.lost = lost


def _refused_model(e: grpc.RpcError) -> bool:
    """A NOT_FOUND that names the request's model or adapter (ModelNotFoundError), which no
    re-dispatch can cure, as opposed to KV blocks that were gone."""
    md = e.trailing_metadata() or () if callable(getattr(e, "trailing_metadata", None)) else ()
    return any(k == MD_ERROR_CLASS and v == ModelNotFoundError.__name__ for k, v in md)


def _raise_store_failure(e: grpc.RpcError) -> None:
    """Raise :class:`StoreUnavailableError` when the failed worker call says the worker's KV
    store was unreachable (the worker is alive: it must not be dropped or re-dispatched from)."""
    err = error_from_rpc_error(e)
    if isinstance(err, StoreUnavailableError):
        raise err from None


def _aio_internal_channel(address: str) -> grpc.aio.Channel:
    """:func:`pdserve.security.internal_channel` for ``grpc.aio``: TLS (and this process's client
    certificate) when TLS is on; the cluster token goes with every call (:func:`_call_metadata`)."""
    cfg = current()
    opts = [*grpc_options(), *cfg.channel_options()]
    if cfg.tls_on:
        return grpc.aio.secure_channel(address, cfg.channel_credentials(), options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


def _call_metadata() -> tuple[tuple[str, str], ...] | None:
    """Metadata of every worker call: the cluster token when one is configured."""
    token = current().cluster_token
    return ((TOKEN_METADATA_KEY, token),) if token else None


class _Guarded:
    """A Decode call as :meth:`GenerateServicer._relay` consumes it (iterate, ``cancel``), whose
    UNAVAILABLE failure is raised as :class:`_WorkerLost` instead of ending the request, and so
    is a NOT_FOUND before the first message (the KV it was handed was gone: ``LostPhase.KV``).

    ``keep_cached``: a resumed local-prefill leg reports the cached tokens of its extended prompt;
    the request keeps the count of its first leg (its usage describes the client's prompt).

    ``watch``: the stream's progress deadline (:class:`router.progress.ProgressWatch`): a message
    that does not come within its bound (counted only while this iterator waits on the worker,
    not while the consumer holds a message) cancels the call and raises :class:`_WorkerLost`
    with ``stalled`` set. A message may carry several tokens. ``streamed``: when each worker last
    sent a message on any stream (the router's relays fill it in): a wait that reaches its bound
    while its worker sent another stream a message within that bound goes on (the worker is busy,
    the request queued or preempted there, e.g. under KV pressure; quarantining a busy worker
    stopped all traffic to it), so only a worker silent on every stream is taken for hung."""

    def __init__(
        self,
        call,
        worker: WorkerEntry,
        keep_cached: int | None = None,
        watch: ProgressWatch | None = None,
        streamed: dict[str, float] | None = None,
    ) -> None:
        self._call = call
        self._worker = worker
        self._keep_cached = keep_cached
        self._watch = watch
        self._streamed = streamed
        self._bound: float | None = None  # the current wait's bound
        self._deadline: LazyDeadline | None = None  # made in the consuming task

    def _busy(self) -> bool:
        """At the deadline: whether the worker sent a message on another stream within the
        wait's bound (it is alive and decoding; this request waits in its queue, e.g. preempted
        under KV pressure): then the wait goes on. A hung worker streams nothing."""
        if self._streamed is None or self._bound is None:
            return False
        last = self._streamed.get(self._worker.worker_id)
        return last is not None and time.monotonic() - last < self._bound

    async def _next(self, it: AsyncIterator[worker_pb2.DecodeResponse]) -> worker_pb2.DecodeResponse | None:
        """The next message of ``it`` (the call's iterator; None at the end of the stream),
        within the progress deadline (a :class:`router.deadline.LazyDeadline`: one timer per
        stream, not one per message)."""
        watch = self._watch
        t = time.monotonic()
        bound = watch.waiting(t) if watch is not None else None
        dl = self._deadline
        if dl is None:
            dl = self._deadline = LazyDeadline(spare=self._busy)
        self._bound = bound
        dl.start(bound)  # None: no deadline
        exc: BaseException | None = None
        try:
            d = await anext(it)
        except BaseException as e:  # noqa: BLE001 - re-raised below unless it is the deadline
            exc = e
        if dl.expired(exc):
            assert watch is not None  # only a bound expires
            detail = watch.describe(time.monotonic() - t)
            self._call.cancel()  # the worker, should it wake up, aborts the request and frees its blocks
            log_event(
                log,
                "stream stalled",
                logging.WARNING,
                worker=self._worker.worker_id,
                waiting_for=watch.phase.value,
                detail=detail,
            )
            lost = LostWorker(self._worker.worker_id, LostPhase.DECODE, detail, stalled=True)
            raise _WorkerLost(lost) from None
        if isinstance(exc, StopAsyncIteration):
            return None
        if exc is not None:
            raise exc
        if watch is not None:
            watch.received(len(d.token_ids))
        return d

    async def __aiter__(self) -> AsyncIterator[worker_pb2.DecodeResponse]:
        started = False
        try:
            it = aiter(self._call)
            while (d := await self._next(it)) is not None:
                if self._keep_cached is not None:
                    d.num_cached_tokens = self._keep_cached
                started = True
                yield d
        except grpc.RpcError as e:
            _raise_store_failure(e)  # the worker is fine: its store is not
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise _WorkerLost(
                    LostWorker(self._worker.worker_id, LostPhase.DECODE, e.details() or "")
                ) from None
            if e.code() == grpc.StatusCode.NOT_FOUND and not started and not _refused_model(e):
                # its KV was gone (not: the worker refused the request's model or adapter)
                raise _WorkerLost(
                    LostWorker(self._worker.worker_id, LostPhase.KV, e.details() or "")
                ) from None
            raise
        finally:
            if self._deadline is not None:
                self._deadline.close()

    def cancel(self) -> bool:
        return self._call.cancel()
