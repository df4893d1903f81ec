"""Every Prometheus metric of pdserve, defined in one place, and the ``/metrics`` HTTP server.

Conventions: ``pdserve_`` prefix, base units (seconds, bytes, tokens, blocks), counters end in
``_total``, latency histograms in ``_seconds``. Label values come from small fixed sets:

* ``slo_class``  :data:`SLO_CLASSES` (see :func:`slo_class`)
* ``outcome``    :data:`OUTCOMES` (see :func:`outcome_for`)
* ``phase``      :data:`PHASES` (:data:`REDISPATCH_PHASES` for re-dispatches)
* ``transport``  grpc | shm;  ``direction`` in | out;  ``op`` put | get | lease
* ``reason``     :data:`PULL_FAILURE_REASONS` (see :func:`pull_failure_reason`)
* ``worker_id``/``role`` (one pair per worker process), ``node_id`` (one per store process)
* ``model``      the served base models, on a router serving several (:class:`RouterMetrics`;
  ``""`` for a request that reached none); absent on a single-model router

Each component object (:class:`RouterMetrics`, :class:`WorkerMetrics`, :class:`KVPullMetrics`,
:class:`StoreMetrics`) registers its metrics in the ``CollectorRegistry`` it is given. A process passes
``prometheus_client.REGISTRY`` and serves it with :func:`serve_metrics`; tests pass a fresh
``CollectorRegistry()`` each, so objects never collide. Known label combinations are created up
front (value 0), so dashboards and alerts see series before the first event.

Prometheus finds the processes through a file_sd file (:func:`write_file_sd`, one
:class:`ScrapeTarget` per process, labels ``component`` and ``process``).
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import itertools
import json
import math
import operator
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.errors import ErrorCode, InvalidRequestError
from pdserve.status import from_grpc_code, status_for

if TYPE_CHECKING:
    from kv_store.node import NodeStats

# counters get no extra ``*_created`` series (they double the series count for nothing here)
prometheus_client.disable_created_metrics()

SLO_CLASSES = ("default", "interactive", "standard", "batch")
OUTCOMES = ("ok", "rejected", "invalid", "cancelled", "timeout", "error")
PHASES = ("queue", "prefill", "transfer", "decode")
REDISPATCH_PHASES = ("prefill", "decode", "kv")
TRANSPORTS = ("grpc", "shm")
KV_OPS = (("grpc", "put", "in"), ("grpc", "get", "out"), ("shm", "lease", "out"))
# why a decode worker's KV pull failed (consumer side); shm_fallback: the same-host shared-memory
# read could not attach the node's arena and the blocks came through gRPC instead
PULL_FAILURE_REASONS = ("unavailable", "not_found", "timeout", "error", "shm_fallback")
# live migration between decode workers (router/lifecycle/grpc_migrator.py): why the router moved
# a request (router.policy.migration.MigrationReason values; manual: an operator's or a test's
# direct call) and how it ended (migrated, or the decode workers' abort reason; unknown_worker: the
# source or destination is not registered; error: the RPC failed otherwise; abandoned: the
# request ended or the router gave the migration up before it finished)
MIGRATION_REASONS = ("load_balance", "drain", "defragment", "priority", "manual")
MIGRATION_RESULTS = (
    "migrated",
    "dest_full",
    "source_finished",
    "cancelled",
    "peer_died",
    "source_preempted",
    "refused",
    "unknown_worker",
    "error",
    "abandoned",
)
MIGRATION_DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

# SLO class boundaries (seconds): the tightest target a request sets decides its class
INTERACTIVE_TTFT_S, INTERACTIVE_TPOT_S = 0.5, 0.05
STANDARD_TTFT_S, STANDARD_TPOT_S = 5.0, 0.2


# ---------------------------------------------------------------------------- pure helpers
def slo_class(ttft_s: float, tpot_s: float) -> str:
    """The bounded class label of a request's SLO (targets <= 0 mean "no target").

    ``default``: no target at all. Otherwise the tightest target decides:
    ``interactive`` if TTFT <= 0.5 s or TPOT <= 0.05 s; ``standard`` if TTFT <= 5 s or
    TPOT <= 0.2 s; ``batch`` for anything looser.
    """
    ttft = ttft_s if ttft_s > 0 and math.isfinite(ttft_s) else math.inf
    tpot = tpot_s if tpot_s > 0 and math.isfinite(tpot_s) else math.inf
    if math.isinf(ttft) and math.isinf(tpot):
        return "default"
    if ttft <= INTERACTIVE_TTFT_S or tpot <= INTERACTIVE_TPOT_S:
        return "interactive"
    if ttft <= STANDARD_TTFT_S or tpot <= STANDARD_TPOT_S:
        return "standard"
    return "batch"


def slo_met(target_ttft_s: float, target_tpot_s: float, ttft_s: float, tpot_s: float | None) -> bool:
    """True when every target that is set (> 0) is met; ``tpot_s`` None (one token) meets any TPOT."""
    if target_ttft_s > 0 and ttft_s > target_ttft_s:
        return False
    return not (target_tpot_s > 0 and tpot_s is not None and tpot_s > target_tpot_s)


def tpot_of(token_times_s: Sequence[float]) -> float | None:
    """Mean inter-token time after the first token; None with fewer than two tokens."""
    if len(token_times_s) < 2:
        return None
    return (token_times_s[-1] - token_times_s[0]) / (len(token_times_s) - 1)


_OUTCOME_BY_CODE = {
    ErrorCode.RESOURCE_EXHAUSTED: "rejected",
    ErrorCode.UNAVAILABLE: "rejected",
    ErrorCode.INVALID_ARGUMENT: "invalid",
    ErrorCode.NOT_FOUND: "invalid",
    ErrorCode.FAILED_PRECONDITION: "invalid",
    # refused at the edge for the caller's own reasons (no/bad key, another tenant's, an id in use):
    # never an SLO miss, or anyone could burn the SLO budget's alerts with bad keys
    ErrorCode.UNAUTHENTICATED: "invalid",
    ErrorCode.PERMISSION_DENIED: "invalid",
    ErrorCode.ALREADY_EXISTS: "invalid",
    ErrorCode.CANCELLED: "cancelled",
    ErrorCode.DEADLINE_EXCEEDED: "timeout",
}


def observe_all(hist: Histogram, amounts: Sequence[float]) -> None:
    """``hist.observe(a)`` for every ``a`` of ``amounts`` (``hist``: a histogram without labels or
    a labelled child): the same buckets and sum, but each bucket touched and the sum incremented
    once for the lot, so a request's inter-token latencies cost a few locked increments, not two
    per token (the router's CPU per request, #12). On a prometheus_client whose histograms lack
    the attributes this relies on it observes them one by one."""
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if not amounts:
        return
    if (
        not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or total is None
        or len(bounds) != len(buckets)
    ):
        for a in amounts:
            hist.observe(a)
        return
    # NaN: observe counts it in no bucket (its sum takes it); dropped before the sort, which NaN breaks
    defined = [a for a in amounts if a == a] if any(map(math.isnan, amounts)) else amounts
    # sorted once, then one bisection per bound (a few, not one per amount): bucket i takes the
    # amounts in (bound[i-1], bound[i]], as observe's "a <= bound"
    ordered = sorted(defined)
    total.inc(math.fsum(amounts))
    below = 0
    for i, bound in enumerate(bounds):
        upto = bisect.bisect_right(ordered, bound)
        if upto > below:
            buckets[i].inc(upto - below)
            below = upto
        if below == len(ordered):
            break


def gaps_of(times: Sequence[float]) -> list[float]:
    """The gaps between consecutive ``times`` (a request's inter-token latencies), each at least
    0.0 (a clock that stepped back gives 0.0, not a negative latency)."""
    gaps = list(map(operator.sub, itertools.islice(times, 1, None), times))
    if gaps and min(gaps) < 0.0:
        gaps = [max(0.0, g) for g in gaps]
    return gaps


def outcome_for(exc: BaseException | None) -> str:
    """Outcome label of a finished request: ``ok`` without exception; otherwise by the status the
    caller receives: RESOURCE_EXHAUSTED/UNAVAILABLE -> rejected (no capacity or no worker),
    INVALID_ARGUMENT/NOT_FOUND/FAILED_PRECONDITION/UNAUTHENTICATED/PERMISSION_DENIED/ALREADY_EXISTS
    -> invalid (the caller's fault),
    CANCELLED (or the stream closed by the client) -> cancelled, DEADLINE_EXCEEDED -> timeout,
    anything else -> error."""
    if exc is None:
        return "ok"
    if isinstance(exc, GeneratorExit):
        return "cancelled"
    return _OUTCOME_BY_CODE.get(from_grpc_code(status_for(exc).code), "error")


# outcomes that count against the SLO (the server failed the request); invalid and cancelled
# requests are the caller's doing and count neither as met nor as missed
SLO_MISS_OUTCOMES = frozenset({"rejected", "timeout", "error"})


# ---------------------------------------------------------------------------- router
@dataclass(frozen=True)
class FinishedRequest:
    """What the router knows about a request that completed (plain values, no protobuf)."""

    ttft_s: float
    e2e_s: float
    token_times_s: Sequence[float]
    phases: Mapping[str, float]  # keys from PHASES
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


class RouterMetrics:
    """Request-level metrics of the router: outcomes, latencies, SLO attainment, routing cost.

    Goodput is ``rate(pdserve_router_slo_requests_total{result="met"})``; attainment is that over
    the rate of all SLO-counted requests. A request counts as ``met`` when it completed (outcome
    ok) within every target it set (a request with no target that completes is met); as
    ``missed`` when it completed late or the server failed it (rejected, timeout, error).
    """

    def __init__(self, registry: CollectorRegistry, models: Sequence[str] = ()) -> None:
        """``models``: the base models the router serves. With two or more, the request-level
        families (requests, SLO results, TTFT/TPOT/ITL/E2E and phase histograms, prompt, prefix-hit
        and generation tokens), the in-flight gauge, the re-dispatch and migration families
        (migrations, downtime, blocks copied) and the workers gauge carry a ``model`` label
        (bounded: one value per served model; an observation for another model raises
        ValueError). With one (or none), no ``model`` label: the series are those of a
        single-model router."""
        self.registry = registry
        r = registry
        self.models: tuple[str, ...] = tuple(models) if len(models) > 1 else ()
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"RouterMetrics: repeated model ids {list(models)}")
        m = ["model"] if self.models else []
        self.requests = Counter(
            "pdserve_router_requests",
            "Generate requests finished, by SLO class and outcome (and model, on a router serving several).",
            ["slo_class", "outcome", *m],
            registry=r,
        )
        self.slo = Counter(
            "pdserve_router_slo_requests",
            "Requests counted for SLO attainment, by class and result (met|missed).",
            ["slo_class", "result", *m],
            registry=r,
        )
        self.ttft = Histogram(
            "pdserve_router_ttft_seconds",
            "Time to first token seen by the router (arrival -> first token).",
            ["slo_class", *m],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pdserve_router_tpot_seconds",
            "Time per output token after the first (mean inter-token gap of one request).",
            ["slo_class", *m],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdserve_router_inter_token_seconds",
            "Gap between consecutive output tokens as the router relays them (TBT; tokens that arrive "
            "in one message have gap 0). Its tail shows stalls that the per-request mean TPOT hides.",
            ["slo_class", *m],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_router_e2e_seconds",
            "End-to-end request latency (arrival -> last token).",
            ["slo_class", *m],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.phase = Histogram(
            "pdserve_request_phase_seconds",
            "Per-request phase time: queue (before prefill), prefill, transfer (KV handoff: the prefill "
            "worker's publish plus the decode worker's pull), decode (after the pull).",
            ["phase", "slo_class", *m],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pdserve_router_prompt_tokens", "Prompt tokens of completed requests.", m, registry=r
        )
        self.prefix_hit_tokens = Counter(
            "pdserve_router_prefix_hit_tokens",
            "Prompt tokens served from a prefix cache (not recomputed).",
            m,
            registry=r,
        )
        self.generation_tokens = Counter(
            "pdserve_router_generation_tokens", "Output tokens of completed requests.", m, registry=r
        )
        self.routing = Histogram(
            "pdserve_router_routing_seconds",
            "Time to choose the (prefill, decode) pair of a request.",
            buckets=ROUTING_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "pdserve_router_inflight_requests",
            "Generate requests in progress (by model, on a router serving several).",
            m,
            registry=r,
        )
        # per LoRA adapter (requests that name one; the label is bounded by the adapters the
        # cluster's workers serve: a request naming an unserved adapter is not counted here)
        self.adapter_requests = Counter(
            "pdserve_router_adapter_requests",
            "Generate requests naming a LoRA adapter, finished, by adapter and outcome.",
            ["adapter", "outcome", *m],
            registry=r,
        )
        self.adapter_ttft = Histogram(
            "pdserve_router_adapter_ttft_seconds",
            "Time to first token of completed requests naming a LoRA adapter, by adapter.",
            ["adapter", *m],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.adapter_generation_tokens = Counter(
            "pdserve_router_adapter_generation_tokens",
            "Output tokens of completed requests naming a LoRA adapter, by adapter.",
            ["adapter", *m],
            registry=r,
        )
        self.redispatches = Counter(
            "pdserve_router_redispatches",
            "Requests re-dispatched to another worker after theirs was lost (UNAVAILABLE), by the "
            "phase the lost worker served (prefill|decode|kv).",
            ["phase", *m],
            registry=r,
        )
        self.migrations = Counter(
            "pdserve_router_migrations",
            "Live migrations of running requests between decode workers, by why the router started "
            "them (load_balance|drain|defragment|priority|manual) and how they ended.",
            ["reason", "result", *m],
            registry=r,
        )
        self.migration_downtime = Histogram(
            "pdserve_router_migration_downtime_seconds",
            "A migrated request's pause as the router sees it: its last token from the source "
            "decode worker to its first new token from the destination.",
            m,
            buckets=MIGRATION_DOWNTIME_BUCKETS,
            registry=r,
        )
        self.migration_blocks = Counter(
            "pdserve_router_migration_blocks_copied",
            "KV blocks copied between decode workers by migrations that moved their request.",
            m,
            registry=r,
        )
        for mv in [(x,) for x in self.models] or [()]:
            for p in REDISPATCH_PHASES:
                self.redispatches.labels(p, *mv)
            for reason in MIGRATION_REASONS:
                for res in MIGRATION_RESULTS:
                    self.migrations.labels(reason, res, *mv)
            for c in SLO_CLASSES:
                for o in OUTCOMES:
                    self.requests.labels(c, o, *mv)
                for res in ("met", "missed"):
                    self.slo.labels(c, res, *mv)
                self.ttft.labels(c, *mv)
                self.tpot.labels(c, *mv)
                self.itl.labels(c, *mv)
                self.e2e.labels(c, *mv)
                for p in PHASES:
                    self.phase.labels(p, c, *mv)
            if mv:
                self.prompt_tokens.labels(*mv)
                self.prefix_hit_tokens.labels(*mv)
                self.generation_tokens.labels(*mv)
                self.inflight.labels(*mv)
                self.migration_downtime.labels(*mv)
                self.migration_blocks.labels(*mv)

    def _model(self, model: str) -> tuple[str, ...]:
        """The ``model`` label values of an observation for ``model`` (none on a single-model
        router; ``""``: a request that reached no model; ValueError for a model this router does
        not serve: the label stays bounded to the served models and ``""``)."""
        if not self.models:
            return ()
        if model and model not in self.models:
            raise ValueError(f"model {model!r} is not one of this router's models {list(self.models)}")
        return (model,)

    def _child(self, metric: Gauge | Counter | Histogram, model: str) -> Gauge | Counter | Histogram:
        """``metric``'s series of ``model`` (the metric itself on a single-model router)."""
        mv = self._model(model)
        return metric.labels(*mv) if mv else metric

    def inflight_of(self, model: str = "") -> Gauge:
        """The in-flight gauge of ``model``'s requests (the one gauge on a single-model router);
        ``inc()`` when a request starts, ``dec()`` when it ends."""
        return self._child(self.inflight, model)  # type: ignore[return-value]

    def observe_redispatch(self, phase: str, model: str = "") -> None:
        """Record one re-dispatch of a request of ``model`` whose ``phase`` worker was lost
        (``phase`` in :data:`REDISPATCH_PHASES`, else ValueError: the labels stay bounded)."""
        if phase not in REDISPATCH_PHASES:
            raise ValueError(f"unknown re-dispatch phase {phase!r}; one of {REDISPATCH_PHASES}")
        self.redispatches.labels(phase, *self._model(model)).inc()

    def observe_migration_downtime(self, seconds: float, model: str = "") -> None:
        """Record a migrated request's pause (``model``: the request's model)."""
        self._child(self.migration_downtime, model).observe(seconds)  # type: ignore[union-attr]

    def track_workers(self, count: Callable[[], Mapping[str, int]]) -> None:
        """Export ``pdserve_router_workers{role}``: live registered workers, read at scrape time
        from ``count()`` (role -> number). Single-model routers only (ValueError on one serving
        several models: :meth:`track_model_workers` labels them by model)."""
        if self.models:
            raise ValueError(
                "a router serving several models exports its workers by model: track_model_workers"
            )
        self.registry.register(_FnCollector(lambda: [_workers_family(count())], [_workers_family({})]))

    def track_model_workers(self, count: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Export ``pdserve_router_workers{role,model}`` on a router serving several models:
        live registered workers, read at scrape time from ``count()`` (model -> role -> number).
        Only the served models are exported (the label stays bounded), each with every role
        ``count()`` gives it (a served model it omits: no series until it does). ValueError on a
        single-model router (:meth:`track_workers`: no model label)."""
        if not self.models:
            raise ValueError("a single-model router exports its workers without a model label: track_workers")

        def collect() -> list[Metric]:
            counts = count()
            return [_model_workers_family({m: counts[m] for m in self.models if m in counts})]

        self.registry.register(_FnCollector(collect, [_model_workers_family({})]))

    def track_quarantined(self, count: Callable[[], Mapping[str, int]]) -> None:
        """Export ``pdserve_router_quarantined_workers{role}``: workers taken out of service
        because a call to them stalled (hung, not dead), until they answer a health probe; read
        at scrape time from ``count()`` (role -> number)."""
        self.registry.register(
            _FnCollector(lambda: [_quarantined_family(count())], [_quarantined_family({})])
        )

    def observe_finished(
        self, cls: str, target_ttft_s: float, target_tpot_s: float, rec: FinishedRequest, model: str = ""
    ) -> bool:
        """Record a completed request (outcome ok) of ``model`` (labelled only on a router serving
        several models); returns whether it met its SLO."""
        mv = self._model(model)
        tpot = tpot_of(rec.token_times_s)
        met = slo_met(target_ttft_s, target_tpot_s, rec.ttft_s, tpot)
        self.requests.labels(cls, "ok", *mv).inc()
        self.slo.labels(cls, "met" if met else "missed", *mv).inc()
        self.ttft.labels(cls, *mv).observe(rec.ttft_s)
        if tpot is not None:
            self.tpot.labels(cls, *mv).observe(tpot)
        observe_all(
            self.itl.labels(cls, *mv),
            gaps_of(rec.token_times_s),
        )
        self.e2e.labels(cls, *mv).observe(rec.e2e_s)
        for p in PHASES:
            self.phase.labels(p, cls, *mv).observe(max(0.0, rec.phases.get(p, 0.0)))
        for counter, n in (
            (self.prompt_tokens, rec.prompt_tokens),
            (self.prefix_hit_tokens, rec.cached_prompt_tokens),
            (self.generation_tokens, rec.completion_tokens),
        ):
            (counter.labels(*mv) if mv else counter).inc(n)
        return met

    def observe_failed(self, cls: str, outcome: str, model: str = "") -> None:
        """Record a request that ended without completing (``outcome`` from :func:`outcome_for`)
        of ``model``. On a router serving several models, a request refused before it reached a
        model (it named none, or one not served) counts with ``model=""`` (which PromQL reads as
        no label)."""
        mv = self._model(model)
        self.requests.labels(cls, outcome, *mv).inc()
        if outcome in SLO_MISS_OUTCOMES:
            self.slo.labels(cls, "missed", *mv).inc()

    def observe_adapter(
        self, adapter: str, outcome: str, model: str = "", rec: FinishedRequest | None = None
    ) -> None:
        """Record a finished request that named LoRA ``adapter`` (one the cluster serves: the
        caller keeps the label bounded) with ``outcome`` ("ok" with ``rec``, else the failure's
        outcome); nothing for ``adapter`` "" (the base model)."""
        if not adapter:
            return
        mv = self._model(model)
        self.adapter_requests.labels(adapter, outcome, *mv).inc()
        if rec is not None:
            self.adapter_ttft.labels(adapter, *mv).observe(rec.ttft_s)
            self.adapter_generation_tokens.labels(adapter, *mv).inc(rec.completion_tokens)

    def observe_migration(self, reason: str, result: str, blocks_copied: int = 0, model: str = "") -> None:
        """Record one ended migration of a request of ``model``: ``reason`` in
        :data:`MIGRATION_REASONS`, ``result`` in :data:`MIGRATION_RESULTS` (anything else raises
        ValueError: the labels stay bounded); ``blocks_copied`` counts only when the request
        moved (``result == "migrated"``)."""
        if reason not in MIGRATION_REASONS:
            raise ValueError(f"unknown migration reason {reason!r}; one of {MIGRATION_REASONS}")
        if result not in MIGRATION_RESULTS:
            raise ValueError(f"unknown migration result {result!r}; one of {MIGRATION_RESULTS}")
        mv = self._model(model)
        self.migrations.labels(reason, result, *mv).inc()
        if result == "migrated" and blocks_copied > 0:
            self._child(self.migration_blocks, model).inc(blocks_copied)  # type: ignore[union-attr]


def _workers_family(counts: Mapping[str, int]) -> Metric:
    g = GaugeMetricFamily(
        "pdserve_router_workers", "Workers registered with the router and alive, by role.", labels=["role"]
    )
    for role, n in sorted(counts.items()):
        g.add_metric([role], n)
    return g


def _model_workers_family(counts: Mapping[str, Mapping[str, int]]) -> Metric:
    g = GaugeMetricFamily(
        "pdserve_router_workers",
        "Workers registered with the router and alive, by role and model.",
        labels=["role", "model"],
    )
    for model, roles in sorted(counts.items()):
        for role, n in sorted(roles.items()):
            g.add_metric([role, model], n)
    return g


def _quarantined_family(counts: Mapping[str, int]) -> Metric:
    g = GaugeMetricFamily(
        "pdserve_router_quarantined_workers",
        "Workers out of service because a call to them stalled, until they answer a health probe, by role.",
        labels=["role"],
    )
    for role, n in sorted(counts.items()):
        g.add_metric([role], n)
    return g


# ---------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class AdapterSnapshot:
    """One LoRA adapter's cumulative counters and residency on a worker at one instant."""

    name: str
    prefill_tokens: int
    decode_tokens: int
    slot_loads: int  # host -> engine slot copies
    disk_loads: int  # disk -> host reads (registration included)
    in_slot: bool  # held in an engine slot now
    in_host: bool  # held in host memory now


@dataclass(frozen=True)
class WorkerSnapshot:
    """A worker engine's state and cumulative counters at one instant."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    token_budget: int
    prefill_tokens_computed: int
    prefill_tokens_reused: int
    decode_tokens: int
    preemptions: int
    requests_finished: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    prefix_evictions: int
    # swap-based preemption (EngineConfig.swap_space_bytes; all 0 without a host pool)
    swapped_requests: int = 0  # requests whose KV is in the host pool now
    swap_outs: int = 0  # preemptions that swapped (cumulative)
    swap_ins: int = 0
    swapped_out_blocks: int = 0  # blocks copied device -> host (cumulative)
    swapped_in_blocks: int = 0
    host_blocks_total: int = 0
    host_blocks_used: int = 0
    swapped_out_bytes: int = 0  # bytes copied device -> host by swap-outs (cumulative)
    swapped_in_bytes: int = 0
    swap_copy_seconds: float = 0.0  # time the swap copies took (cumulative)
    mlfq_promotions: int = 0  # MLFQ anti-starvation promotions (cumulative; 0 under other policies)
    # the disk tier behind the swap pool (EngineConfig.swap_disk_bytes; all 0 without it)
    swap_disk_blocks_total: int = 0
    swap_disk_blocks_used: int = 0
    swap_disk_spilled_blocks: int = 0  # host -> disk (cumulative)
    swap_disk_promoted_blocks: int = 0  # disk -> host
    swap_disk_full: int = 0  # preemptions that recomputed because the disk tier was full
    swap_disk_fallbacks: int = 0  # swapped-out requests recomputed after a disk write/read fault
    swap_disk_write_errors: int = 0  # blocks whose disk write failed
    swap_disk_corrupt_blocks: int = 0  # blocks read back corrupt, short or with an I/O error
    swap_disk_seconds: float = 0.0  # time spent in disk writes and reads
    swap_disk_enabled: bool = False  # spilling on (a write error turns it off)
    swap_prefetches: int = 0  # swap-ins ahead of the request's turn (cumulative; in swap_ins)
    swap_prefetch_evictions: int = 0  # prefetched requests that gave their device blocks back
    # speculative decoding (cumulative; 0 without it)
    spec_draft_tokens: int = 0  # drafted tokens the target verified
    spec_accepted_tokens: int = 0  # of which it kept (also counted in decode_tokens)
    # weight offloading (EngineConfig.weight_memory_budget_bytes; empty / 0 without it)
    weight_bytes: tuple[tuple[str, int], ...] = ()  # (tier, bytes): device, host, disk
    weight_prefetch_bytes: int = 0  # offloaded layer bytes copied in (cumulative)
    weight_prefetch_stall_seconds: float = 0.0  # time forward passes waited for a layer's copy
    # KV offloading (EngineConfig.kv_memory_budget_bytes, engine.kv_offload; empty / 0 without it)
    kv_offload_bytes: tuple[tuple[str, int], ...] = ()  # (tier, bytes): device, host
    kv_offload_read_bytes: int = 0  # offloaded layers' held blocks copied to the device (cumulative)
    kv_offload_write_bytes: int = 0  # new K/V rows written back to the host pool (cumulative)
    kv_offload_stall_seconds: float = 0.0  # time forward passes waited for a layer's KV copy
    adapters: tuple[AdapterSnapshot, ...] = ()  # LoRA adapters served (empty: base model only)


class WorkerMetrics:
    """Engine metrics of one worker, labelled ``worker_id`` and ``role`` (prefill|decode).

    Step time and tokens per step are observed by :meth:`observe_step` (the engine loop's
    ``on_step`` hook). Gauges and cumulative counters are read from ``snapshot()`` at scrape
    time; when it raises (e.g. the engine is busy past a timeout) the last good snapshot is
    served, and nothing before the first one.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        worker_id: str,
        role: str,
        snapshot: Callable[[], WorkerSnapshot] | None = None,
    ) -> None:
        self.labels = (worker_id, role)
        names = ["worker_id", "role"]
        self.step_seconds = Histogram(
            "pdserve_worker_step_seconds",
            "Duration of one engine step (one batched forward pass).",
            names,
            buckets=STEP_BUCKETS,
            registry=registry,
        ).labels(*self.labels)
        self.step_tokens = Histogram(
            "pdserve_worker_step_tokens",
            "Tokens processed in one engine step (prefill + decode); compare with the token budget.",
            names,
            buckets=STEP_TOKEN_BUCKETS,
            registry=registry,
        ).labels(*self.labels)
        self._snapshot = snapshot
        self._last: WorkerSnapshot | None = None
        registry.register(_FnCollector(self._collect, self._families(None)))

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.step_seconds.observe(seconds)
        self.step_tokens.observe(tokens)

    def _collect(self) -> list[Metric]:
        if self._snapshot is not None:
            # on failure serve the last good values rather than fail the whole scrape
            with contextlib.suppress(Exception):
                self._last = self._snapshot()
        return self._families(self._last)

    def _families(self, s: WorkerSnapshot | None) -> list[Metric]:
        lab = ["worker_id", "role"]
        fams: list[tuple[type, str, str, list[str], Callable[[WorkerSnapshot], Iterable[tuple]]]] = [
            (GaugeMetricFamily, "pdserve_worker_running_requests", "Requests in the running batch.", lab,
             lambda s: [((), s.running)]),
            (GaugeMetricFamily, "pdserve_worker_waiting_requests", "Requests queued, not yet scheduled.", lab,
             lambda s: [((), s.waiting)]),
            (GaugeMetricFamily, "pdserve_worker_kv_blocks",
             "KV cache blocks by state: used (held by requests), free, cached (free or used, with a prefix hash).",
             [*lab, "state"],
             lambda s: [(("used",), s.kv_blocks_used), (("free",), s.kv_blocks_total - s.kv_blocks_used),
                        (("cached",), s.kv_blocks_cached)]),
            (GaugeMetricFamily, "pdserve_worker_kv_capacity_blocks", "KV cache blocks in the pool.", lab,
             lambda s: [((), s.kv_blocks_total)]),
            (GaugeMetricFamily, "pdserve_worker_token_budget_tokens", "Most tokens one engine step may process.",
             lab, lambda s: [((), s.token_budget)]),
            (CounterMetricFamily, "pdserve_worker_prefill_tokens",
             "Prompt tokens prefilled, by source: computed, or reused from the prefix cache.", [*lab, "source"],
             lambda s: [(("computed",), s.prefill_tokens_computed), (("reused",), s.prefill_tokens_reused)]),
            (CounterMetricFamily, "pdserve_worker_decode_tokens",
             "Tokens produced by decode steps (with speculative decoding: every kept token).", lab,
             lambda s: [((), s.decode_tokens)]),
            (CounterMetricFamily, "pdserve_worker_spec_draft_tokens",
             "Speculative decoding: drafted tokens the target model verified.", lab,
             lambda s: [((), s.spec_draft_tokens)]),
            (CounterMetricFamily, "pdserve_worker_spec_accepted_tokens",
             "Speculative decoding: drafted tokens the target model kept (acceptance = this / drafted).",
             lab, lambda s: [((), s.spec_accepted_tokens)]),
            (CounterMetricFamily, "pdserve_worker_preemptions", "Requests preempted (blocks reclaimed).", lab,
             lambda s: [((), s.preemptions)]),
            (CounterMetricFamily, "pdserve_worker_requests_finished", "Requests this worker finished.", lab,
             lambda s: [((), s.requests_finished)]),
            (GaugeMetricFamily, "pdserve_worker_swapped_requests",
             "Preempted requests whose KV is in the host swap pool now.", lab, lambda s: [((), s.swapped_requests)]),
            (CounterMetricFamily, "pdserve_worker_swaps", "Preemptions by swap, by direction: out, in.",
             [*lab, "direction"], lambda s: [(("out",), s.swap_outs), (("in",), s.swap_ins)]),
            (CounterMetricFamily, "pdserve_worker_swapped_blocks", "KV blocks copied by swapping, by direction.",
             [*lab, "direction"], lambda s: [(("out",), s.swapped_out_blocks), (("in",), s.swapped_in_blocks)]),
            (GaugeMetricFamily, "pdserve_worker_host_kv_blocks", "Host swap pool blocks by state: used, free.",
             [*lab, "state"],
             lambda s: [(("used",), s.host_blocks_used), (("free",), s.host_blocks_total - s.host_blocks_used)]),
            (CounterMetricFamily, "pdserve_worker_swapped_bytes", "KV bytes copied by swapping, by direction.",
             [*lab, "direction"], lambda s: [(("out",), s.swapped_out_bytes), (("in",), s.swapped_in_bytes)]),
            (CounterMetricFamily, "pdserve_worker_swap_seconds", "Time the KV swap copies took.", lab,
             lambda s: [((), s.swap_copy_seconds)]),
            (GaugeMetricFamily, "pdserve_worker_swap_disk_blocks",
             "Disk tier blocks behind the swap pool by state: used, free (0 without the tier).", [*lab, "state"],
             lambda s: [(("used",), s.swap_disk_blocks_used),
                        (("free",), s.swap_disk_blocks_total - s.swap_disk_blocks_used)]),
            (CounterMetricFamily, "pdserve_worker_swap_disk_transfer_blocks",
             "Swapped-out KV blocks moved by the disk tier, by direction: out (spilled), in (promoted).",
             [*lab, "direction"],
             lambda s: [(("out",), s.swap_disk_spilled_blocks), (("in",), s.swap_disk_promoted_blocks)]),
            (CounterMetricFamily, "pdserve_worker_swap_disk_recomputes",
             "Requests recomputed because of the disk tier, by reason: full (it could not take a victim's "
             "room), fault (a failed write or a corrupt read lost their KV).", [*lab, "reason"],
             lambda s: [(("full",), s.swap_disk_full), (("fault",), s.swap_disk_fallbacks)]),
            (CounterMetricFamily, "pdserve_worker_swap_disk_errors",
             "Disk tier block errors, by reason: write (failed write), corrupt (checksum mismatch, short read).",
             [*lab, "reason"],
             lambda s: [(("write",), s.swap_disk_write_errors), (("corrupt",), s.swap_disk_corrupt_blocks)]),
            (CounterMetricFamily, "pdserve_worker_swap_disk_seconds", "Time the disk tier's writes and reads took.",
             lab, lambda s: [((), s.swap_disk_seconds)]),
            (GaugeMetricFamily, "pdserve_worker_swap_disk_enabled",
             "1 while the disk tier takes spills; 0 without one or after a write error turned it off.", lab,
             lambda s: [((), 1 if s.swap_disk_enabled else 0)]),
            (CounterMetricFamily, "pdserve_worker_swap_prefetches",
             "Swapped-out requests brought back to the device ahead of their turn, by outcome: prefetched, "
             "evicted (gave the blocks back before running).", [*lab, "outcome"],
             lambda s: [(("prefetched",), s.swap_prefetches), (("evicted",), s.swap_prefetch_evictions)]),
            (CounterMetricFamily, "pdserve_worker_mlfq_promotions",
             "MLFQ anti-starvation promotions of queued requests.", lab, lambda s: [((), s.mlfq_promotions)]),
            (GaugeMetricFamily, "pdserve_worker_weight_bytes",
             "Model weight bytes by tier under weight offloading: device, host, disk (absent without it).",
             [*lab, "tier"], lambda s: [((t,), b) for t, b in s.weight_bytes]),
            (CounterMetricFamily, "pdserve_worker_weight_prefetch_bytes",
             "Offloaded weight bytes copied in ahead of their layer.", lab, lambda s: [((), s.weight_prefetch_bytes)]),
            (CounterMetricFamily, "pdserve_worker_weight_prefetch_stall_seconds",
             "Time forward passes waited for an offloaded layer's copy (prefetch stalls).", lab,
             lambda s: [((), s.weight_prefetch_stall_seconds)]),
            (GaugeMetricFamily, "pdserve_worker_kv_offload_bytes",
             "KV pool bytes by tier under KV offloading: device (resident layers and staging buffers), host "
             "(absent without it).", [*lab, "tier"], lambda s: [((t,), b) for t, b in s.kv_offload_bytes]),
            (CounterMetricFamily, "pdserve_worker_kv_offload_copied_bytes",
             "Offloaded KV bytes copied, by direction: in (held blocks to the device staging buffer), out "
             "(new rows written back to the host pool).", [*lab, "direction"],
             lambda s: [(("in",), s.kv_offload_read_bytes), (("out",), s.kv_offload_write_bytes)]),
            (CounterMetricFamily, "pdserve_worker_kv_offload_stall_seconds",
             "Time forward passes waited for an offloaded layer's KV copy.", lab,
             lambda s: [((), s.kv_offload_stall_seconds)]),
            (CounterMetricFamily, "pdserve_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             lab, lambda s: [((), s.prefix_query_tokens)]),
            (CounterMetricFamily, "pdserve_worker_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             lab, lambda s: [((), s.prefix_hit_tokens)]),
            (CounterMetricFamily, "pdserve_worker_prefix_cache_evictions", "Cached blocks overwritten.", lab,
             lambda s: [((), s.prefix_evictions)]),
            (CounterMetricFamily, "pdserve_worker_adapter_tokens",
             "Tokens computed with each LoRA adapter, by phase: prefill (prompt), decode.", [*lab, "adapter", "phase"],
             lambda s: [x for a in s.adapters
                        for x in (((a.name, "prefill"), a.prefill_tokens), ((a.name, "decode"), a.decode_tokens))]),
            (CounterMetricFamily, "pdserve_worker_adapter_loads",
             "LoRA adapter loads, by tier loaded into: slot (host -> engine slot), host (disk -> host memory).",
             [*lab, "adapter", "tier"],
             lambda s: [x for a in s.adapters
                        for x in (((a.name, "slot"), a.slot_loads), ((a.name, "host"), a.disk_loads))]),
            (GaugeMetricFamily, "pdserve_worker_adapter_resident",
             "1 when the LoRA adapter is held in the tier now: slot (engine memory), host (host memory).",
             [*lab, "adapter", "tier"],
             lambda s: [x for a in s.adapters
                        for x in (((a.name, "slot"), int(a.in_slot)), ((a.name, "host"), int(a.in_host)))]),
        ]  # fmt: skip
        out: list[Metric] = []
        for kind, name, doc, labels, values in fams:
            m = kind(name, doc, labels=labels)
            if s is not None:
                for extra, v in values(s):
                    m.add_metric([*self.labels, *extra], v)
            out.append(m)
        return out


_PULL_REASON_BY_CODE = {
    ErrorCode.UNAVAILABLE: "unavailable",
    ErrorCode.NOT_FOUND: "not_found",
    ErrorCode.DEADLINE_EXCEEDED: "timeout",
}


def pull_failure_reason(exc: BaseException) -> str:
    """``reason`` label of a failed KV pull, by the status the exception stands for:
    UNAVAILABLE -> unavailable (store node unreachable), NOT_FOUND -> not_found (blocks evicted,
    lease gone), DEADLINE_EXCEEDED -> timeout, anything else -> error. (``shm_fallback`` is not
    an exception: see :meth:`KVPullMetrics.count_shm_fallbacks`.)"""
    return _PULL_REASON_BY_CODE.get(from_grpc_code(status_for(exc).code), "error")


# (histogram, counter) of the KV pull families per registry: several decode servicers of one
# process (one registry) share them, each with its own worker_id label values
_PULL_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Histogram, Counter]] = (
    weakref.WeakKeyDictionary()
)
_PULL_FAMILIES_LOCK = threading.Lock()


def _pull_families(registry: CollectorRegistry) -> tuple[Histogram, Counter]:
    with _PULL_FAMILIES_LOCK:
        fams = _PULL_FAMILIES.get(registry)
        if fams is None:
            names = ["worker_id", "role", "transport"]
            fams = _PULL_FAMILIES[registry] = (
                Histogram(
                    "pdserve_worker_kv_pull_seconds",
                    "Duration of a decode worker's pull of a request's KV blocks from the store "
                    "(consumer side of the handoff), by the transport chosen for it; failed pulls included.",
                    names,
                    buckets=TRANSFER_BUCKETS,
                    registry=registry,
                ),
                Counter(
                    "pdserve_worker_kv_pull_failures",
                    "KV pulls that failed on the decode worker, by transport and reason; "
                    "shm_fallback: a shared-memory read fell back to gRPC (the pull went on).",
                    [*names, "reason"],
                    registry=registry,
                ),
            )
        return fams


class KVPullMetrics:
    """Consumer-side KV transfer metrics of one decode worker, labelled ``worker_id``, ``role``
    and ``transport`` (the transport chosen for the pull: shm on the store's host, else grpc).

    ``pdserve_worker_kv_pull_seconds`` times every pull (its ``_count`` counts attempts, failed
    ones included); ``pdserve_worker_kv_pull_failures_total{reason}`` counts the failed ones
    (:func:`pull_failure_reason`) and the shared-memory reads that fell back to gRPC
    (``transport="shm", reason="shm_fallback"``: that pull still succeeded). The store counts
    the same transfers on its side (:class:`StoreMetrics`); this side also sees failures the
    store never does (node unreachable, arena not attachable). Every (transport, reason) series
    exists from construction at 0. Objects on one registry share its metric families, so one
    process may hold several (distinct ``worker_id``).
    """

    def __init__(self, registry: CollectorRegistry, worker_id: str, role: str = "decode") -> None:
        self.labels = (worker_id, role)
        self.seconds, self.failures = _pull_families(registry)
        for t in TRANSPORTS:
            self.seconds.labels(*self.labels, t)
            for reason in PULL_FAILURE_REASONS:
                if reason != "shm_fallback" or t == "shm":
                    self.failures.labels(*self.labels, t, reason)

    @contextlib.contextmanager
    def pull(self, transport: str) -> Iterator[None]:
        """Time one pull over ``transport``; on Exception count a failure (reason from
        :func:`pull_failure_reason`) and re-raise. A generator closed early (GeneratorExit)
        counts neither."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:
            self.failures.labels(*self.labels, transport, pull_failure_reason(e)).inc()
            self.seconds.labels(*self.labels, transport).observe(time.perf_counter() - t0)
            raise
        self.seconds.labels(*self.labels, transport).observe(time.perf_counter() - t0)

    def count_shm_fallbacks(self, n: int) -> None:
        """Count ``n`` (>= 0) shared-memory reads that fell back to gRPC."""
        if n > 0:
            self.failures.labels(*self.labels, "shm", "shm_fallback").inc(n)


# ---------------------------------------------------------------------------- KV store


class TransferTally:
    """Handed out by :meth:`StoreMetrics.transfer`; ``add`` what moved."""

    def __init__(self) -> None:
        self.blocks = 0
        self.nbytes = 0

    def add(self, blocks: int, nbytes: int) -> None:
        self.blocks += blocks
        self.nbytes += nbytes


class StoreMetrics:
    """Metrics of one KV store node, labelled ``node_id``.

    Transfers are counted where the node sees them: a gRPC Put (transport grpc, direction in), a
    gRPC Get (grpc, out), a Lease that pins blocks for a same-host zero-copy read (shm, out:
    the bytes are then read straight from shared memory; the latency is that of the Lease call),
    and a Release reporting ``shm_read_blocks`` read from a handoff lease with no rpc at all (shm,
    out; counted, no latency observed: the consumer's side is ``pdserve_worker_kv_pull_seconds``).
    ``pdserve_kv_transfer_seconds_count`` counts attempts, failed ones included.
    """

    def __init__(
        self, registry: CollectorRegistry, node_id: str, stats: Callable[[], NodeStats] | None = None
    ) -> None:
        self.node_id = node_id
        self.bytes = Counter(
            "pdserve_kv_transfer_bytes",
            "KV block bytes moved through this node, by transport and direction.",
            ["node_id", "transport", "direction"],
            registry=registry,
        )
        self.blocks = Counter(
            "pdserve_kv_transfer_blocks",
            "KV blocks moved through this node, by transport and direction.",
            ["node_id", "transport", "direction"],
            registry=registry,
        )
        self.seconds = Histogram(
            "pdserve_kv_transfer_seconds",
            "Duration of a transfer call on the node (put, get, or lease for an shm read).",
            ["node_id", "transport", "op"],
            buckets=TRANSFER_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "pdserve_kv_transfer_failures",
            "Transfer calls that failed (missing block, bad request, node full, ...).",
            ["node_id", "transport", "op"],
            registry=registry,
        )
        self.lookup_blocks = Counter(
            "pdserve_kv_lookup_blocks",
            "Blocks asked for in prefix lookups: hit (in the cached prefix) or miss.",
            ["node_id", "result"],
            registry=registry,
        )
        for transport, op, direction in KV_OPS:
            self.bytes.labels(node_id, transport, direction)
            self.blocks.labels(node_id, transport, direction)
            self.seconds.labels(node_id, transport, op)
            self.failures.labels(node_id, transport, op)
        for res in ("hit", "miss"):
            self.lookup_blocks.labels(node_id, res)
        self._stats = stats
        registry.register(_FnCollector(self._collect, self._families(None)))

    def set_stats_source(self, stats: Callable[[], NodeStats]) -> None:
        """Where scrape-time node state comes from (set once the node exists)."""
        self._stats = stats

    @contextlib.contextmanager
    def transfer(self, transport: str, op: str, direction: str) -> Iterator[TransferTally]:
        """Time one transfer call; count what was ``add``-ed on success, a failure on Exception.

        A generator closed early (GeneratorExit: the caller went away) counts neither."""
        tally = TransferTally()
        t0 = time.perf_counter()
        try:
            yield tally
        except Exception:
            self.failures.labels(self.node_id, transport, op).inc()
            self.seconds.labels(self.node_id, transport, op).observe(time.perf_counter() - t0)
            raise
        self.seconds.labels(self.node_id, transport, op).observe(time.perf_counter() - t0)
        self.bytes.labels(self.node_id, transport, direction).inc(tally.nbytes)
        self.blocks.labels(self.node_id, transport, direction).inc(tally.blocks)

    def observe_lookup(self, asked: int, hit: int) -> None:
        self.lookup_blocks.labels(self.node_id, "hit").inc(hit)
        self.lookup_blocks.labels(self.node_id, "miss").inc(max(0, asked - hit))

    def _collect(self) -> list[Metric]:
        return self._families(self._stats() if self._stats is not None else None)

    def _families(self, n: NodeStats | None) -> list[Metric]:
        lab = ["node_id"]
        fams: list[tuple[type, str, str, list[str], Callable[[NodeStats], Iterable[tuple]]]] = [
            (GaugeMetricFamily, "pdserve_kv_capacity_blocks", "Blocks this node can hold.", lab,
             lambda n: [((), n.capacity_blocks)]),
            (GaugeMetricFamily, "pdserve_kv_capacity_bytes", "Bytes of block memory of this node.", lab,
             lambda n: [((), n.capacity_bytes)]),
            (GaugeMetricFamily, "pdserve_kv_used_bytes", "Bytes of stored blocks.", lab,
             lambda n: [((), n.bytes_used)]),
            (GaugeMetricFamily, "pdserve_kv_blocks",
             "Blocks by state: stored (committed), pinned (stored and not evictable now), pending (puts in flight).",
             [*lab, "state"],
             lambda n: [(("stored",), n.num_blocks), (("pinned",), n.num_pinned), (("pending",), n.num_pending)]),
            (GaugeMetricFamily, "pdserve_kv_leases", "Leases outstanding.", lab, lambda n: [((), n.num_leases)]),
            (CounterMetricFamily, "pdserve_kv_evictions", "Blocks evicted (LRU) to make room.", lab,
             lambda n: [((), n.evictions)]),
            (CounterMetricFamily, "pdserve_kv_expired_leases", "Leases that expired unreleased.", lab,
             lambda n: [((), n.expired_leases)]),
            (CounterMetricFamily, "pdserve_kv_puts", "Blocks put (new or already stored).", lab,
             lambda n: [((), n.puts)]),
            (CounterMetricFamily, "pdserve_kv_put_dedups", "Puts of blocks already stored.", lab,
             lambda n: [((), n.put_dedups)]),
            (CounterMetricFamily, "pdserve_kv_integrity_events",
             "KV integrity and access events by reason (issue #13): checksum_failure (a Put whose bytes did not match its writer's checksum: refused), put_conflict (a Put of a stored key with other bytes: ignored, write-once), lease_ttl_clamp (a lease granted the node's max ttl instead of a longer ask), lease_quota_refusal (an owner's leased-block quota was full), denied_call (the caller is not a cluster member).",
             [*lab, "reason"],
             lambda n: [(("checksum_failure",), n.checksum_failures), (("put_conflict",), n.put_conflicts),
                        (("lease_ttl_clamp",), n.lease_ttl_clamps), (("lease_quota_refusal",), n.lease_quota_refusals),
                        (("denied_call",), n.denied_calls)]),
            (CounterMetricFamily, "pdserve_kv_block_reads", "Block reads (get, lease, zero-rpc handoff reads reported on release) by result: hit or miss.",
             [*lab, "result"], lambda n: [(("hit",), n.hits), (("miss",), n.misses)]),
        ]  # fmt: skip
        out: list[Metric] = []
        for kind, name, doc, labels, values in fams:
            m = kind(name, doc, labels=labels)
            if n is not None:
                for extra, v in values(n):
                    m.add_metric([self.node_id, *extra], v)
            out.append(m)
        return out


# ---------------------------------------------------------------------------- plumbing
class _FnCollector(Collector):
    """A collector whose families come from a function; ``describe`` is fixed (empty families)."""

    def __init__(self, collect: Callable[[], list[Metric]], described: list[Metric]) -> None:
        self._collect_fn = collect
        self._described = described

    def describe(self) -> list[Metric]:
        return self._described

    def collect(self) -> list[Metric]:
        return self._collect_fn()


# ---------------------------------------------------------------------------- service discovery
class Component(enum.Enum):
    """The ``component`` label of a scrape target (alerts and dashboards group by it)."""

    ROUTER = "router"
    PREFILL = "prefill"
    DECODE = "decode"
    KV_STORE = "kv_store"


@dataclass(frozen=True)
class ScrapeTarget:
    """One process's /metrics endpoint: ``process`` is its unique name (router, prefill-0, ...)."""

    process: str
    component: Component
    address: str  # host:port


def file_sd_groups(targets: Iterable[ScrapeTarget]) -> list[dict[str, object]]:
    """Prometheus ``file_sd_configs`` content: one target group per process (sorted by name),
    labelled ``component`` and ``process``. Process names must be unique."""
    ts = sorted(targets, key=lambda t: t.process)
    names = [t.process for t in ts]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"duplicate process names in scrape targets: {names}")
    return [
        {"targets": [t.address], "labels": {"component": t.component.value, "process": t.process}} for t in ts
    ]


def write_file_sd(path: str | Path, targets: Iterable[ScrapeTarget]) -> Path:
    """Write (atomically replace, so Prometheus never reads half a file) a file_sd JSON file of
    ``targets`` (see :func:`file_sd_groups`); returns the path. Used by launchers of a cluster:
    point ``file_sd_configs`` of deploy/prometheus/prometheus.yml at it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(file_sd_groups(targets), indent=2))
    tmp.replace(path)
    return path


def serve_metrics(
    port: int = 0, registry: CollectorRegistry = prometheus_client.REGISTRY, token: str | None = None
) -> int:
    """Serve ``registry`` at ``http://127.0.0.1:PORT/metrics`` from a daemon thread; port 0 picks a
    free port. Returns the bound port.

    ``token``: a bearer token every scrape must send (``Authorization: Bearer <token>``; anything
    else is answered 401). None: the process's ``--metrics-token-file`` / ``PDSERVE_METRICS_TOKEN``
    (:func:`pdserve.security.current`); "": no token."""
    if token is None:
        from pdserve.security import current

        token = current().metrics_token
    if not token:
        server, _thread = prometheus_client.start_http_server(port, addr="127.0.0.1", registry=registry)
        return int(server.server_port)
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    from pdserve.security import bearer_ok

    app = prometheus_client.make_wsgi_app(registry)
    expected = token

    def guarded(environ, start_response):
        if bearer_ok(environ.get("HTTP_AUTHORIZATION", ""), expected):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="pdserve-metrics"')],
        )
        return [b"pdserve /metrics needs Authorization: Bearer <metrics token>\n"]

    httpd = make_server("127.0.0.1", port, guarded, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics-http").start()
    return int(httpd.server_port)
