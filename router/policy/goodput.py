"""Goodput-aware placement (Mooncake's Conductor with early rejection) and colocated placement.

:class:`GoodputAwarePolicy` decides per request, on a :class:`ClusterView`, in this order:

1. **Tenant quota**: a tenant already holding its maximum of in-flight requests is refused
   (``QUOTA_EXCEEDED``) with a retry-after = the earliest predicted finish of its requests.
2. **Output length**: ``req.predicted_output_tokens`` or the :class:`LengthPredictor`'s guess.
3. **Decode side**, per decode instance ``d`` (role DECODE, or MIXED when there is none):
   predicted TPOT after admission ``decode_time(batch + 1, context + prompt + out/2)`` where
   batch = running + queued requests and context = used blocks x block size; it has room when
   its free blocks hold the prompt (+1 token). Llumnix's freeness breaks ties.
4. **Prefill side**: per prefill instance, TTFT = queue + fetch(remote prefix) + prefill(tokens
   not reused); the longest prefix cached on any instance or in the KV store
   (``req.store_prefix_blocks``) is fetched only when that beats recomputing it.
   **Conditional disaggregation**: a decode instance may prefill the prompt itself
   (``local_prefill``) when at most ``local_prefill_max_tokens`` tokens are uncached there; its
   TTFT = its queue + one co-scheduled decode step + prefill(uncached), no KV handoff.
5. **SLO check with margin**: a (prefill, decode) pair is feasible when predicted TTFT and TPOT
   are within ``(1 - margin)`` of the request's SLO and the decode instance has room. The margin
   grows with the priority value (``priority_margin_step`` per level above 0), so as load grows
   the least important requests fail the check first (priority shedding). With
   ``shared_cores`` set (all instances on one host's cores), every prediction is first multiplied
   by the contention factor busy instances / cores (>= 1; :meth:`GoodputConfig.contention`).
   The check uses the upper quantile of each prediction (``OnlineCorrectedLatency.spread``: the
   measured log-error spread, 90th percentile by default), so the admitted requests meet the SLO
   with that probability, not just on average.
6. **Choice**: the decode instance first (length-aware, TetriInfer: a request predicted long goes
   where the fewest long requests are in flight; then lowest predicted TPOT; then most free
   blocks), then on it the mode (local or the best prefill instance) with the lower TTFT.
7. **Early rejection**: no feasible pair -> :class:`Rejection` (``SLO_UNATTAINABLE``) with a
   reason and ``retry_after_s`` (the predicted TTFT excess, or the time until the earliest
   predicted decode finish), before any compute is spent.

Accepted requests are recorded in an in-flight ledger (tenant, decode instance, predictions),
released by :meth:`on_finished` (which also feeds the online latency correction and the length
predictor) or :meth:`release`, and otherwise expired at their predicted finish + a grace period
(a caller that never reports back, e.g. the simulator, leaves no permanent load behind).

:class:`ColocatedPolicy` always prefills on the least-loaded decode instance (no handoff).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field

from router.policy.estimate import TtftEstimator, usable_prefix_blocks
from router.policy.latency import (
    DecodeLatencyEstimator,
    LinearLatency,
    OnlineCorrectedLatency,
    Phase,
    WithDecode,
)
from router.policy.length_predictor import LengthPredictor, LengthSample
from router.policy.placement import PlacementPolicy, PolicyKind, best_remote_prefix
from router.policy.protocols import Clock, LatencyEstimator
from router.policy.types import (
    SLO,
    InstanceRole,
    Observation,
    Placement,
    Rejection,
    RejectReason,
    RequestInfo,
)
from router.policy.view import ClusterView, InstanceView


@dataclass(frozen=True)
class GoodputConfig:
    """Knobs of :class:`GoodputAwarePolicy` (see its module docstring for their roles)."""

    slo_margin: float = 0.1
    priority_margin_step: float = 0.1
    max_margin: float = 0.8
    tenant_max_inflight: int | None = None  # None: no quota
    tenant_quotas: tuple[tuple[str, int], ...] = ()  # per-tenant overrides of tenant_max_inflight
    local_prefill: bool = True  # conditional disaggregation
    local_prefill_max_tokens: int = 256  # uncached prompt tokens a decode instance may prefill
    long_output_tokens: int = 256  # predicted outputs at least this long are spread (TetriInfer)
    min_retry_after_s: float = 0.1
    max_retry_after_s: float = 30.0
    default_slo: SLO | None = None  # applied to requests that carry none
    ledger_grace_s: float = 30.0
    # Instances sharing this many cores (one host running every worker, e.g. CPU serving): while
    # more instances than cores are busy, each step takes proportionally longer, so predictions
    # are multiplied by busy / shared_cores (the placed request's instance counted busy).
    # None: every instance has its own device (GPUs), no contention term.
    shared_cores: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.slo_margin < 1 and self.priority_margin_step >= 0 and 0 <= self.max_margin < 1):
            raise ValueError("margins must be in [0, 1)")
        if self.tenant_max_inflight is not None and self.tenant_max_inflight < 1:
            raise ValueError("tenant_max_inflight must be >= 1 (None: unlimited)")
        if not 0 < self.min_retry_after_s <= self.max_retry_after_s:
            raise ValueError("need 0 < min_retry_after_s <= max_retry_after_s")
        if self.shared_cores is not None and self.shared_cores < 1:
            raise ValueError("shared_cores must be >= 1 (None: no shared cores)")

    def contention(self, view: ClusterView) -> float:
        """Slow-down of every instance's steps when they share ``shared_cores`` cores: busy
        instances (queued or running work, plus one for the request being placed) / cores, >= 1."""
        if self.shared_cores is None:
            return 1.0
        busy = sum(1 for i in view.instances if i.running_requests or i.queued_requests or i.queued_tokens)
        return max(1.0, min(len(view.instances), busy + 1) / self.shared_cores)

    def margin(self, priority: int) -> float:
        """Required headroom below the SLO for a request of ``priority`` (lower = more important)."""
        return min(self.max_margin, self.slo_margin + self.priority_margin_step * max(0, priority))

    def quota(self, tenant: str) -> int | None:
        for t, n in self.tenant_quotas:
            if t == tenant:
                return n
        return self.tenant_max_inflight


@dataclass
class _Inflight:
    request_id: str
    tenant: str
    decode_id: str
    long: bool
    ttft_base_s: float  # uncorrected model predictions (online correction compares to these)
    tpot_base_s: float
    predicted_finish: float
    expires_at: float


@dataclass(frozen=True)
class _DecodeEstimate:
    inst: InstanceView
    tpot_s: float
    fits: bool
    freeness: int


@dataclass(frozen=True)
class _Option:
    """One feasible-or-not (prefill plan, decode instance) pair."""

    plan: Placement
    decode: _DecodeEstimate
    ttft_s: float


class _FreshTtft(TtftEstimator):
    """TTFT estimator without step-time memo: the corrected latency model changes over time."""

    def _step_time(self, tokens: int) -> float:
        return self.latency.prefill_time([tokens])


@dataclass
class GoodputStats:
    """Counters of decisions (read by tests and the router's logs)."""

    placed: int = 0
    local_prefill: int = 0
    rejected: dict[RejectReason, int] = field(default_factory=dict)


class GoodputAwarePolicy(PlacementPolicy):
    """SLO-predictive placement with early rejection; see the module docstring for the contract.

    ``latency``: the seed model (default :class:`LinearLatency`); one without ``decode_time``
    gets the seed's decode side. It is wrapped in :class:`OnlineCorrectedLatency` (``corrected``)
    unless it is one already. ``length_predictor`` defaults to a fresh :class:`LengthPredictor`.
    """

    kind = PolicyKind.GOODPUT

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        latency: DecodeLatencyEstimator | LatencyEstimator | None = None,
        config: GoodputConfig | None = None,
        length_predictor: LengthPredictor | None = None,
        **kw,
    ) -> None:
        base = latency if latency is not None else LinearLatency()
        if not isinstance(base, DecodeLatencyEstimator):
            base = WithDecode(base)  # a prefill-only estimator: decode side from the seed model
        corrected = base if isinstance(base, OnlineCorrectedLatency) else OnlineCorrectedLatency(base)
        super().__init__(clock=clock, latency=corrected, **kw)
        self.corrected: OnlineCorrectedLatency = corrected
        self.estimator = _FreshTtft(corrected)
        self.config = config or GoodputConfig()
        self.lengths = length_predictor or LengthPredictor()
        self.stats = GoodputStats()
        self._ledger: dict[str, _Inflight] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ feedback
    def on_finished(self, obs: Observation) -> None:
        """A request finished: release it, correct the latency model, teach the length predictor."""
        with self._lock:
            e = self._ledger.pop(obs.request_id, None)
        if obs.num_prompt_tokens > 0:
            self.lengths.observe(
                LengthSample(obs.num_prompt_tokens, obs.max_output_tokens, obs.output_tokens)
            )
        if e is None:
            return
        self.corrected.observe(Phase.TTFT, e.ttft_base_s, obs.ttft_s)
        if obs.output_tokens > 1:
            self.corrected.observe(Phase.TPOT, e.tpot_base_s, obs.tpot_s)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._ledger.pop(request_id, None)

    def inflight(self, tenant: str | None = None) -> int:
        """Requests in the ledger (of ``tenant`` when given)."""
        with self._lock:
            self._expire(self.clock.now())
            return sum(1 for e in self._ledger.values() if tenant is None or e.tenant == tenant)

    # ------------------------------------------------------------------ decision
    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        """Best TTFT among ``candidates`` (global cache-aware, KV store included as a source)."""
        return min(
            (self._prefill_plan(req, i, view) for i in candidates),
            key=lambda pl: pl.estimated_ttft_s or 0.0,
        )

    def place(self, req: RequestInfo, view: ClusterView) -> Placement | Rejection:
        with self._lock:
            now = self.clock.now()
            self._expire(now)
            self._ledger.pop(req.request_id, None)  # a retried id replaces its old entry
            d = self._decide(req, view, now)
            if isinstance(d, Rejection):
                self.stats.rejected[d.reason] = self.stats.rejected.get(d.reason, 0) + 1
            else:
                self.stats.placed += 1
                self.stats.local_prefill += int(d.local_prefill)
            return d

    def _decide(self, req: RequestInfo, view: ClusterView, now: float) -> Placement | Rejection:
        cfg = self.config
        q = self._quota(req, now)
        if q is not None:
            return q
        decode_pool = view.with_role(InstanceRole.DECODE) or view.with_role(InstanceRole.MIXED)
        prefill_pool = view.with_role(InstanceRole.PREFILL)
        if not decode_pool:
            return Rejection(RejectReason.NO_INSTANCE, "no decode or mixed instance is available")
        out = req.predicted_output_tokens or self.lengths.predict(
            req.num_prompt_tokens, req.max_output_tokens
        )
        is_long = out >= cfg.long_output_tokens
        decodes = [self._decode_estimate(req, d, out) for d in decode_pool]
        options: list[_Option] = []
        remote_plan = self.choose_prefill(req, prefill_pool, view) if prefill_pool else None
        for de in decodes:
            if remote_plan is not None:
                options.append(_Option(remote_plan, de, remote_plan.estimated_ttft_s or 0.0))
            local = self._local_plan(req, de, view)
            if local is not None:
                options.append(_Option(local, de, local.estimated_ttft_s or 0.0))
        if not options:
            return Rejection(RejectReason.NO_INSTANCE, "no prefill instance is available")
        contention = cfg.contention(view)
        if contention != 1.0:  # every step slower while the shared cores are oversubscribed
            options = [
                _Option(
                    o.plan,
                    dataclasses.replace(o.decode, tpot_s=o.decode.tpot_s * contention),
                    o.ttft_s * contention,
                )
                for o in options
            ]
        slo = req.slo or cfg.default_slo
        margin = cfg.margin(req.priority)
        lim_ttft = (1 - margin) * slo.ttft_s if slo else math.inf
        lim_tpot = (1 - margin) * slo.tpot_s if slo else math.inf
        # admit on the upper quantile of the corrected prediction (its measured error spread), so
        # that the admitted requests meet the SLO with that probability, not just on average
        q_ttft, q_tpot = self.corrected.spread(Phase.TTFT), self.corrected.spread(Phase.TPOT)
        lim_ttft, lim_tpot = lim_ttft / q_ttft, lim_tpot / q_tpot
        feasible = [
            o for o in options if o.decode.fits and o.ttft_s <= lim_ttft and o.decode.tpot_s <= lim_tpot
        ]
        if not feasible:
            if slo is not None:
                return self._reject(req, options, lim_ttft, lim_tpot, margin, now)
            # best effort: queue on the decode instance with the most room, fastest start
            feasible = options
        longs = self._long_counts()

        def decode_key(o: _Option) -> tuple[int, int, float, int]:
            return (
                -int(o.decode.fits),
                longs.get(o.decode.inst.instance_id, 0) if is_long else 0,
                o.decode.tpot_s,
                -o.decode.freeness,
            )

        best_d = min(feasible, key=decode_key).decode.inst.instance_id
        choice = min((o for o in feasible if o.decode.inst.instance_id == best_d), key=lambda o: o.ttft_s)
        plan = Placement(
            choice.plan.instance_id,
            decode_instance_id=best_d,
            fetch_from=choice.plan.fetch_from,
            fetch_blocks=choice.plan.fetch_blocks,
            reused_blocks=choice.plan.reused_blocks,
            estimated_ttft_s=choice.ttft_s,
            local_prefill=choice.plan.local_prefill,
            estimated_tpot_s=choice.decode.tpot_s,
            predicted_output_tokens=out,
        )
        rej = self.admit(req, plan, view)
        if rej is not None:
            return rej
        ft, fd = self.corrected.factor(Phase.TTFT), self.corrected.factor(Phase.TPOT)
        finish = now + choice.ttft_s + out * choice.decode.tpot_s
        self._ledger[req.request_id] = _Inflight(
            req.request_id,
            req.tenant,
            best_d,
            is_long,
            choice.ttft_s / ft / contention,  # the model's own prediction: what correction learns
            choice.decode.tpot_s / fd / contention,
            finish,
            finish + cfg.ledger_grace_s,
        )
        return plan

    # ------------------------------------------------------------------ parts
    def _prefill_plan(self, req: RequestInfo, inst: InstanceView, view: ClusterView) -> Placement:
        est = self.estimator
        assert est is not None
        p, bs = req.num_prompt_tokens, inst.block_size
        local = usable_prefix_blocks(inst.cached_prefix_blocks(req.block_hashes), p, bs)
        t = est.ttft(inst, p, local)
        plan = Placement(inst.instance_id, reused_blocks=local, estimated_ttft_s=t)
        src, remote = best_remote_prefix(req, inst, view)
        if remote > local:
            tf = est.ttft(inst, p, remote, fetched_blocks=remote - local)
            if tf < t:
                plan = Placement(
                    inst.instance_id,
                    fetch_from=src,
                    fetch_blocks=remote,
                    reused_blocks=remote,
                    estimated_ttft_s=tf,
                )
        return plan

    def _local_plan(self, req: RequestInfo, de: _DecodeEstimate, view: ClusterView) -> Placement | None:
        """The decode instance prefills the prompt itself (conditional disaggregation), or None."""
        inst = de.inst
        p, bs = req.num_prompt_tokens, inst.block_size
        local = usable_prefix_blocks(inst.cached_prefix_blocks(req.block_hashes), p, bs)
        if inst.role is InstanceRole.DECODE and (
            not self.config.local_prefill or p - local * bs > self.config.local_prefill_max_tokens
        ):
            return None
        est = self.estimator
        assert est is not None
        batch = inst.running_requests + inst.queued_requests
        cotenant = self.corrected.decode_time(batch, _context_tokens(inst)) if batch else 0.0
        t = est.ttft(inst, p, local) + cotenant
        return Placement(
            inst.instance_id,
            decode_instance_id=inst.instance_id,
            reused_blocks=local,
            estimated_ttft_s=t,
            local_prefill=True,
        )

    def _decode_estimate(self, req: RequestInfo, inst: InstanceView, out: int) -> _DecodeEstimate:
        bs = max(1, inst.block_size)
        need = -(-(req.num_prompt_tokens + 1) // bs)
        batch = inst.running_requests + inst.queued_requests
        ctx = _context_tokens(inst) + req.num_prompt_tokens + out // 2
        tpot = self.corrected.decode_time(batch + 1, ctx)
        freeness = inst.free_blocks - need
        return _DecodeEstimate(inst, tpot, freeness >= 0 and need <= inst.total_blocks, freeness)

    def _quota(self, req: RequestInfo, now: float) -> Rejection | None:
        limit = self.config.quota(req.tenant)
        if limit is None:
            return None
        mine = [e for e in self._ledger.values() if e.tenant == req.tenant]
        if len(mine) < limit:
            return None
        wait = min(e.predicted_finish for e in mine) - now
        return Rejection(
            RejectReason.QUOTA_EXCEEDED,
            f"tenant {req.tenant or '(anonymous)'!r} already has {len(mine)} requests in flight "
            f"(quota {limit}); retry when one finishes",
            self._retry(wait),
        )

    def _reject(
        self,
        req: RequestInfo,
        options: list[_Option],
        lim_ttft: float,
        lim_tpot: float,
        margin: float,
        now: float,
    ) -> Rejection:
        best_ttft = min(o.ttft_s for o in options)
        best_tpot = min(o.decode.tpot_s for o in options)
        roomy = any(o.decode.fits for o in options)
        if best_ttft > lim_ttft:
            why = f"predicted TTFT {best_ttft * 1e3:.1f} ms exceeds {lim_ttft * 1e3:.1f} ms"
            wait = best_ttft - lim_ttft
        elif best_tpot > lim_tpot:
            why = f"predicted TPOT {best_tpot * 1e3:.1f} ms exceeds {lim_tpot * 1e3:.1f} ms"
            wait = self._next_decode_finish(now)
        elif not roomy:
            why = "no decode instance has free KV blocks for the prompt"
            wait = self._next_decode_finish(now)
        else:
            why = "no single (prefill, decode) pair meets both TTFT and TPOT"
            wait = max(best_ttft - lim_ttft, self._next_decode_finish(now))
        return Rejection(
            RejectReason.SLO_UNATTAINABLE,
            f"{why} (SLO with {margin:.0%} margin at priority {req.priority}); retry later or relax the SLO",
            self._retry(wait),
        )

    def _next_decode_finish(self, now: float) -> float:
        if not self._ledger:
            return 0.0
        return min(e.predicted_finish for e in self._ledger.values()) - now

    def _retry(self, wait_s: float) -> float:
        c = self.config
        return min(c.max_retry_after_s, max(c.min_retry_after_s, wait_s))

    def _long_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self._ledger.values():
            if e.long:
                out[e.decode_id] = out.get(e.decode_id, 0) + 1
        return out

    def _expire(self, now: float) -> None:
        dead = [k for k, e in self._ledger.items() if e.expires_at <= now]
        for k in dead:
            del self._ledger[k]


def _context_tokens(inst: InstanceView) -> int:
    """KV tokens held on ``inst`` (used blocks x block size; an upper bound on real context)."""
    return max(0, inst.total_blocks - inst.free_blocks) * inst.block_size


class ColocatedPolicy(PlacementPolicy):
    """Every request runs whole on the least-loaded decode (or mixed) instance: no KV handoff."""

    kind = PolicyKind.COLOCATED

    def place(self, req: RequestInfo, view: ClusterView) -> Placement | Rejection:
        pool = view.with_role(InstanceRole.DECODE) or view.with_role(InstanceRole.MIXED)
        if not pool:
            return Rejection(RejectReason.NO_INSTANCE, "no decode or mixed instance is available")
        placement = self.choose_prefill(req, pool, view)
        return self.admit(req, placement, view) or placement

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        inst = min(
            candidates,
            key=lambda i: (i.running_requests + i.queued_requests, i.queued_tokens, -i.free_blocks),
        )
        return Placement(inst.instance_id, decode_instance_id=inst.instance_id, local_prefill=True)
