"""Router: the client-facing Generate API and the worker Registry (gRPC edge).

This module is the thin gRPC adapter around a request's lifecycle (:mod:`router.lifecycle`):
Generate authenticates and admits the request at the edge, tokenizes and validates it, asks the
placement policy (``RouterConfig.policy``, pure code in ``router.policy``) for a (prefill,
decode) pair over a view of the registry or refuses it at once (RESOURCE_EXHAUSTED with the
policy's retry-after) before any compute is spent, then hands it to
:class:`router.lifecycle.driver.LifecycleDriver`, which runs the pure state machine
:class:`router.lifecycle.machine.RequestLifecycle` (placed → prefilling → handing off →
decoding ⇄ migrating → finished / failed, re-dispatch back to placement) over this servicer's
ports: worker calls (:mod:`router.lifecycle.grpc_legs`), bookkeeping, worker health and
replacements (:mod:`router.lifecycle.cluster`, :mod:`router.lifecycle.placing`,
:mod:`router.lifecycle.quarantine_probe`). A placement with ``local_prefill`` (conditional
disaggregation, colocated serving) skips Prefill: the decode worker runs the whole request.
Measured TTFT/TPOT and output length of every finished request go back to the policy.

Client cancellation and deadlines propagate downstream (the downstream calls are cancelled,
which aborts the request in the workers and frees its blocks); whatever the request holds (the
tenant's in-flight slot, the stream's stall deadline, placement reservations, KV leases) is
released exactly once however it ends. A worker lost mid-request (its call fails UNAVAILABLE,
or misses its progress deadline, :mod:`router.progress`) is dropped (or quarantined until it
answers a probe) and the request re-dispatched, at most ``RouterConfig.max_redispatches`` times,
without losing or repeating a token (:mod:`router.failover`). A KV store failure reported by a
worker (:class:`pdserve.errors.StoreUnavailableError`) fails the request naming the store.
Every failure leaves as a gRPC status mapped by ``pdserve.status``.

Asynchronous data plane (issue #12): Generate runs on ``grpc.aio``: a request is a task on one
event loop, and a stream waiting on tokens costs memory, not a thread. Flow control: a response
is written only when the client's HTTP/2 window has room; while it has none, the relay stops
reading the decode worker's stream, and a client that has not taken a response for
``RouterConfig.stall_timeout_s`` is cancelled with RESOURCE_EXHAUSTED naming the stall.

The worker Registry (the control plane) is :mod:`router.registry_service`, on its own server
(``RegistryServicer`` is importable from here for compatibility).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from engine.models.config import ModelConfig
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kv_store.index import KVIndex
from pdserve.auth import EdgeAuth
from pdserve.choices import num_choices
from pdserve.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from pdserve.metrics import FinishedRequest, RouterMetrics, outcome_for, slo_class
from pdserve.proto_convert import sampling_from_proto
from pdserve.tracing import current_request_id, log_event, request_scope
from pdserve.v1 import client_pb2, common_pb2
from router.adapters import AdapterCatalog, list_models_response
from router.cluster_view import OutstandingTokens, ViewBuilder
from router.deadline import LazyDeadline
from router.groups import GroupRelay, check_group_request, placement_args
from router.health import needed_kinds
from router.lifecycle.cluster import RouterCluster
from router.lifecycle.direct_legs import DirectBook, DirectConfig, DirectLegs
from router.lifecycle.driver import LifecycleDriver
from router.lifecycle.events import Placed
from router.lifecycle.grpc_calls import Stubs, remaining
from router.lifecycle.grpc_legs import GrpcLegs, RequestRun
from router.lifecycle.grpc_migrator import GrpcLegsMigrator, MigrationBook
from router.lifecycle.machine import RequestLifecycle
from router.lifecycle.migrator import Migrator
from router.lifecycle.placing import Placer
from router.lifecycle.quarantine_probe import QuarantineProber
from router.lifecycle.resources import OnceReleases, Resource, ResourceKind
from router.lifecycle.stream_mode import KVStreamMode, stream_eligible
from router.migration_client import GrpcMigrator, MigrationTransport
from router.policy import GoodputConfig, Placement, PolicyKind, RequestInfo
from router.policy.migration import MigrationReason
from router.policy_factory import build_policy, uses_prefix_lookup
from router.pool_fit import PoolFit
from router.progress import ProgressConfig
from router.registry import Registry, WorkerEntry, WorkerKind
from router.registry_service import RegistryServicer, load_from_proto
from router.store_disk import DiskReadRates, grpc_node_rate

__all__ = ["GenerateServicer", "RegistryServicer", "RouterConfig", "load_from_proto"]

log = logging.getLogger(__name__)

# makes a request's Migrator from its legs (which turn the destination's stream into chunks)
MigratorFactory = Callable[[GrpcLegs], Migrator]


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
    # Live migration of running requests between decode workers (Llumnix; the workers' MigrateOut
    # / ResumeStream): used by drains and the rebalancer (router.rebalancer). Off: a drain waits
    # for its worker's requests to finish, and GenerateServicer.migrate is refused.
    migration: bool = True
    migration_timeout_s: float = 30.0  # one migration's MigrateOut, staged copy to switch
    # how a migration's KV travels between the decode workers (GRPC: in the worker-to-worker
    # stream; STORE: through the source's store node; DIST: over the workers' process group)
    migration_transport: MigrationTransport = MigrationTransport.GRPC
    # Direct token streams (router.lifecycle.direct_legs): a request whose client offers one
    # (GenerateRequest.direct_stream) gets its tokens from its decode worker (which must serve
    # DirectStream: --direct-streams), the router out of the token path. Off: every request relayed.
    direct_streams: bool = False
    direct: DirectConfig = DirectConfig()
    # Chunk-wise KV streaming (#14 part 2; router.lifecycle.stream_legs): an eligible request's
    # Prefill streams its KV (over the prefill worker's StreamKV: inline gRPC, or its store node)
    # while its Decode, sent at the same time, assembles it. Off: the whole KV after the prefill.
    kv_stream: KVStreamMode = KVStreamMode.OFF
    # The prefill workers' chunk (their --chunk): what TtftEstimator.handoff_time(chunk_tokens=)
    # needs to predict a streamed handoff (python -m router passes it to the goodput policy as
    # GoodputConfig.handoff_chunk_tokens when --kv-stream is on).
    kv_stream_chunk_tokens: int = 512

    def __post_init__(self) -> None:
        if self.migration_timeout_s <= 0:
            raise ValueError(f"migration_timeout_s must be > 0, got {self.migration_timeout_s}")
        if self.kv_stream_chunk_tokens <= 0:
            raise ValueError(f"kv_stream_chunk_tokens must be > 0, got {self.kv_stream_chunk_tokens}")
        if self.max_redispatches < 0:
            raise ValueError(f"max_redispatches must be >= 0, got {self.max_redispatches}")
        if self.stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if self.index_url == "memory":
            raise ValueError(
                "index_url 'memory' would be a private, empty index: give the cluster's redis:// URL"
            )


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


class GenerateServicer:
    def __init__(
        self,
        registry: Registry,
        config: RouterConfig,
        metrics: RouterMetrics | None = None,
        index: KVIndex | None = None,
        edge: EdgeAuth | None = None,
        migrator: MigratorFactory | None = None,
        track_gauges: bool = True,
    ) -> None:
        """``index``: the KV index for prefix lookups (default: opened from ``config.index_url``;
        none: ask a store node's Lookup). ``edge``: API keys, tenants, quotas, request ids and
        cache salts (:mod:`pdserve.auth`; default: dev mode, the tenant is the request's field).
        ``migrator``: makes the :class:`~router.lifecycle.migrator.Migrator` of a request from
        its legs (live migration between decode workers, :meth:`migrate`; None: the decode
        workers' migration RPCs when ``config.migration`` is on, else not served).
        ``track_gauges``: export the worker and quarantine gauges from this servicer (off for
        the per-model servicers of a router serving several base models, whose
        :class:`router.multi_model.ModelDispatcher` exports them over all its models)."""
        self._drivers: dict[str, LifecycleDriver] = {}  # running requests by cluster id
        self.edge = edge if edge is not None else EdgeAuth(None)
        self.registry = registry
        self.config = config
        self.metrics = metrics if metrics is not None else RouterMetrics(CollectorRegistry())
        self.migrations = MigrationBook(self.metrics, config.model_id)  # migrations in flight; their metrics
        if migrator is None and config.migration:
            rpcs = GrpcMigrator(  # channels opened on the loop
                timeout_s=config.migration_timeout_s, transport=config.migration_transport
            )

            def migrator(legs: GrpcLegs) -> Migrator:
                return GrpcLegsMigrator(legs, rpcs, self.migrations)

        self.migrator = migrator
        self.prober = QuarantineProber(self)  # probes quarantined workers while there are any
        self.placer = Placer(self)
        self.pool_fit = PoolFit(registry, config.model_id)  # no decode pool could hold it: refused first
        self.prefill_fit = PoolFit(registry, config.model_id, WorkerKind.PREFILL)  # mixed prefill pools
        if track_gauges:
            self.metrics.track_workers(
                lambda: {k.value: len(self.registry.alive(k, config.model_id)) for k in WorkerKind}
            )
            self.metrics.track_quarantined(self.prober.counts)
        path = Path(config.model_path)
        self.tokenizer = Tokenizer(path)
        self.model_config = ModelConfig.from_path(path)
        self.max_model_len = self.model_config.max_position_embeddings
        self.eos = set(self.model_config.eos_token_ids) or (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.stubs = Stubs()
        # store nodes' disk-tier read cost, for prefixes partly on a node's SSD tier (issue #15)
        self.disk_rates = DiskReadRates(grpc_node_rate(self.stubs.lookup))
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
        # direct streams: the ticket signer and awaited ResumeDirect calls (serves DirectResume)
        self.direct = DirectBook(config.direct) if config.direct_streams else None

    # ----------------------------------------------------------------- helpers
    def _check_model(self, model: str) -> None:
        """Raises ModelNotFoundError (NOT_FOUND) when ``model`` names a model this router does not
        serve (empty = the served one)."""
        if model and model != self.config.model_id:
            raise ModelNotFoundError(f"unknown model {model!r}; this cluster serves {self.config.model_id!r}")

    def _check_adapter(self, adapter: str) -> None:
        """A request naming a LoRA adapter that no live worker of each kind the placement policy
        needs (:func:`router.health.needed_kinds`: prefill and decode; decode only under
        ``colocated``) serves (their ``--lora``) is refused (NOT_FOUND) rather than silently
        answered by the base model."""
        if adapter:
            AdapterCatalog.from_registry(self.registry, model=self.config.model_id).check(
                adapter, needed_kinds(self.config.policy)
            )

    def _served_adapter(self, adapter: str) -> str:
        """``adapter`` when some live worker of this router's model serves it, else "" (a failed
        request naming an unknown adapter is not given a metric label of the client's choosing)."""
        if not adapter:
            return ""
        served = any(adapter in w.adapters for w in self.registry.alive(model=self.config.model_id))
        return adapter if served else ""

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
        """Refuses (INVALID_ARGUMENT) an empty prompt, a prompt whose tokens plus ``max_tokens``
        do not fit the model's context (as OpenAI and vLLM do: no silent cut), and one that no
        registered decode worker's KV pool could hold to its end (:mod:`router.pool_fit`: before
        it is prefilled, not at the decode worker's adoption)."""
        if not ids:
            raise InvalidRequestError("prompt is empty: send at least one token")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens + max_tokens {params.max_tokens} > context "
                f"{self.max_model_len}: shorten the prompt or lower max_tokens"
            )
        self.pool_fit.check(len(ids), params.max_tokens)

    def _place(
        self,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        req: client_pb2.GenerateRequest,
        store_prefix_blocks: int | None = None,
        candidates: int = 1,
    ) -> tuple[Placement, WorkerEntry, WorkerEntry, RequestInfo]:
        """:meth:`router.lifecycle.placing.Placer.place`."""
        return self.placer.place(rid, ids, params, req, store_prefix_blocks, candidates)

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
        """The served model with the adapters its live workers serve."""
        catalog = AdapterCatalog.from_registry(self.registry, model=self.config.model_id)
        return list_models_response(self.config.model_id, self.max_model_len, catalog)

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
            self.metrics.observe_failed(cls, outcome, self.config.model_id)
            self.metrics.observe_adapter(self._served_adapter(req.adapter), outcome, self.config.model_id)
            with request_scope(req.request_id):
                log_event(log, "request failed", slo_class=cls, outcome=outcome, error=type(e).__name__)
            raise
        held = OnceReleases()  # what the edge holds for the request, released once at its end
        held.hold(Resource(ResourceKind.TENANT_SLOT, req.request_id), admitted.close)
        try:
            shown_id = admitted.apply_to(req)
            await self._measured(req, ctx, shown_id, admitted.lease_ttl_s, held)
        finally:
            held.release_all()

    async def _measured(
        self,
        req: client_pb2.GenerateRequest,
        ctx: grpc.aio.ServicerContext,
        shown_id: str,
        lease_ttl_s: float,
        held: OnceReleases,
    ) -> None:
        """Write the responses of ``req`` (:class:`_ClientWriter`: flow control) and measure it.
        The writer's stall deadline is held in ``held`` and released when the stream ends.

        A request whose every choice's finish was written to the client counts as served (outcome
        ok) even when the call is then cancelled or times out before its status: the SDK's direct
        streams end their call as soon as they hold the finish and the worker's last delta, while
        the router may still be closing the request's legs."""
        cls = slo_class(req.slo.ttft_s, req.slo.tpot_s)
        m = self.metrics
        finish: common_pb2.Finish | None = None
        completion_tokens = 0  # every choice's (a parallel-sampling group ends with a finish per choice)
        finishes_sent = 0
        with request_scope(shown_id):  # logs name the id the client sees (workers get req's)
            m.inflight_of(self.config.model_id).inc()
            writer = _ClientWriter(ctx, self.config.stall_timeout_s)
            deadline = Resource(ResourceKind.STREAM_DEADLINE, shown_id)
            held.hold(deadline, writer.close)
            try:
                async with contextlib.aclosing(self._generate(req, ctx, lease_ttl_s)) as responses:
                    async for resp in responses:
                        if resp is None:  # a direct stream's progress: nothing for the client
                            continue
                        has_finish = resp.HasField("finish")
                        if has_finish:
                            finish = resp.finish
                            completion_tokens += finish.usage.completion_tokens
                        resp.request_id = shown_id
                        await writer.write(resp)
                        finishes_sent += has_finish
            except BaseException as e:
                served = finishes_sent >= num_choices(req.sampling.n)  # every choice's finish
                if isinstance(e, asyncio.CancelledError) and served and finish is not None:
                    self._observe_done(req, cls, finish, completion_tokens)
                    raise
                if isinstance(e, asyncio.CancelledError):  # the client went away, or its deadline
                    r = remaining(ctx)
                    outcome = "timeout" if r is not None and r <= 0 else "cancelled"
                else:
                    outcome = outcome_for(e)
                m.observe_failed(cls, outcome, self.config.model_id)
                m.observe_adapter(self._served_adapter(req.adapter), outcome, self.config.model_id)
                log_event(log, "request failed", slo_class=cls, outcome=outcome, error=type(e).__name__)
                raise
            finally:
                held.release(deadline)
                m.inflight_of(self.config.model_id).dec()
            if finish is None:  # the stream ended without a result: the client went away
                m.observe_failed(cls, "cancelled", self.config.model_id)
                m.observe_adapter(self._served_adapter(req.adapter), "cancelled", self.config.model_id)
                log_event(log, "request failed", slo_class=cls, outcome="cancelled", error="")
                return
            self._observe_done(req, cls, finish, completion_tokens)

    def _observe_done(
        self, req: client_pb2.GenerateRequest, cls: str, finish: common_pb2.Finish, completion_tokens: int
    ) -> None:
        """Record served request ``req`` (its last ``finish``; ``completion_tokens`` of every
        choice): latencies, phases, SLO result, and one "request done" log line."""
        m = self.metrics
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
            completion_tokens=completion_tokens,
        )
        met = m.observe_finished(cls, req.slo.ttft_s, req.slo.tpot_s, rec, self.config.model_id)
        m.observe_adapter(req.adapter, "ok", self.config.model_id, rec)  # served: it completed
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
        """Validate and place ``req``, then run its lifecycle to its end (the responses)."""
        t0 = time.monotonic()
        self._check_model(req.model)
        self._check_adapter(req.adapter)
        params = sampling_from_proto(req.sampling)
        ids = self._tokens(req)
        self._validate(ids, params)
        check_group_request(params, req, self.model_config.kv_window)  # n > 1 / best_of: router.groups
        rid = req.request_id or uuid.uuid4().hex
        t_route = time.perf_counter()
        run = RequestRun(rid, ids, params, t0, IncrementalDetokenizer(self.tokenizer, params.stop))
        run.lease_ttl_s = lease_ttl_s
        stored = 0
        if uses_prefix_lookup(self.config.policy) and self.placer.may_hold_prefix(ids):
            # I/O: off the loop, before the placement lock
            stored = await asyncio.to_thread(self.placer.prefix_blocks, ids, req)
        with self._place_lock:
            placement, pw, dw, info = self._place(
                rid, ids, *placement_args(params, req), stored, candidates=params.num_candidates
            )
            # the prompt is queued on the worker that prefills it from now on, not from when its
            # Prefill call starts: the next placement must see it
            run.reserved = (dw if placement.local_prefill else pw).worker_id, len(ids)
            self.outstanding.add(*run.reserved)
            # and it is in flight on its decode worker from now on: a drain (scale down) that
            # waits for the worker to be idle cannot remove it before the request commits there
            run.reserved_decode = dw.worker_id
            self.registry.add_inflight(dw.worker_id, 1)
        run.workers = {pw.worker_id: pw, dw.worker_id: dw}
        run.predicted_ttft_s = placement.estimated_ttft_s
        run.predicted_tpot_s = placement.estimated_tpot_s
        local = placement.local_prefill
        self.metrics.routing.observe(time.perf_counter() - t_route)
        log_event(
            log,
            "routed",
            cluster_request_id=rid,  # the id the workers and the store log this request under
            prefill=pw.worker_id,
            decode=dw.worker_id,
            policy=self.config.policy.value,
            local_prefill=local,
            store_prefix_blocks=info.store_prefix_blocks,
            predicted_ttft_s=placement.estimated_ttft_s,
            predicted_tpot_s=placement.estimated_tpot_s,
            predicted_output_tokens=placement.predicted_output_tokens or None,
        )
        if params.num_candidates > 1:  # parallel sampling: the group's own relay (router.groups)
            group = GroupRelay(self, req, ctx, run, info, placement, pw, dw)
            async with contextlib.aclosing(group.responses()) as served:
                async for resp in served:
                    yield resp
            return
        machine = RequestLifecycle(
            rid,
            prefill_id=None if local else pw.worker_id,
            decode_id=dw.worker_id,
            clock=time.monotonic,
            max_redispatches=self.config.max_redispatches,
            # errors name the id the client knows (bound by request_scope in _measured)
            client_id=current_request_id() or rid,
            prompt_tokens=len(ids),
            kv_stream=stream_eligible(
                self.config.kv_stream,
                local_prefill=local,
                num_candidates=params.num_candidates,
            ),
        )
        cluster = RouterCluster(self, req, run, info, machine.budget, ctx)
        if self.direct is not None and req.direct_stream:  # tokens from the worker (DirectLegs.moved)
            legs: GrpcLegs = DirectLegs(self, req, run, ctx, self.direct)
        else:
            legs = GrpcLegs(self, req, run, ctx)
        migrator = self.migrator(legs) if self.migrator is not None else None
        driver = LifecycleDriver(machine, legs, cluster, migrator)
        self._drivers[rid] = driver
        try:
            async with contextlib.aclosing(driver.run(Placed(machine.prefill_id, dw.worker_id))) as served:
                async for resp in served:
                    yield resp
        finally:
            self._drivers.pop(rid, None)
            self.migrations.request_ended(rid)

    def migrate(
        self, request_id: str, destination: str, reason: MigrationReason | None = None
    ) -> asyncio.Future:
        """Start moving running request ``request_id`` (its cluster id) to decode worker
        ``destination`` for ``reason`` (a migration policy's or a drain's call; None: manual), on
        the servicer's event loop. Returns a future of its
        :class:`~router.lifecycle.grpc_migrator.MigrationOutcome` (never an exception; with a
        migrator factory other than the default, it resolves when the request ends at the
        latest). Raises RequestNotFoundError when no such request runs here, LifecycleError when
        no migrator is configured, MigrationInFlightError when one runs for the request,
        InvalidTransition when the request is not decoding."""
        driver = self._drivers.get(request_id)
        if driver is None:
            raise RequestNotFoundError(f"no request {request_id!r} is running on this router")
        fut = self.migrations.start(request_id, reason.value if reason is not None else "manual")
        try:
            driver.migrate(destination)
        except BaseException:
            self.migrations.discard(request_id)
            raise
        return fut

    def running(self) -> dict[str, LifecycleDriver]:
        """The requests running on this router by cluster id (a snapshot)."""
        return dict(self._drivers)
