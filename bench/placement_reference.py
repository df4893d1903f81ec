"""The placement policies as they were before issue #12 ("placement that scales"), kept verbatim.

The oracle of ``tests/unit/test_placement_equivalence.py`` (the indexed implementations must
decide exactly as these do, rejections and retry-afters included) and the "old" column of
``bench/placement.py``. Their remote-prefix search walks every instance's cache once per prefill
candidate: O(prefill candidates x instances) per decision. Do not use them for serving.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field

from router.policy import (
    STORE_SOURCE,
    ClusterView,
    GlobalCacheAwarePolicy,
    GoodputConfig,
    InstanceRole,
    InstanceView,
    LocalCacheAwarePolicy,
    Observation,
    Placement,
    PlacementPolicy,
    PolicyKind,
    Rejection,
    RejectReason,
    RequestInfo,
    TtftEstimator,
    usable_prefix_blocks,
)
from router.policy.latency import (
    DecodeLatencyEstimator,
    LinearLatency,
    OnlineCorrectedLatency,
    Phase,
    WithDecode,
)
from router.policy.length_predictor import LengthPredictor, LengthSample
from router.policy.protocols import Clock, LatencyEstimator


def best_remote_prefix(req: RequestInfo, inst: InstanceView, view: ClusterView) -> tuple[str, int]:
    """Pre-#12 ``router.policy.placement.best_remote_prefix``: a walk of every other instance."""
    p, bs = req.num_prompt_tokens, inst.block_size
    src, remote = STORE_SOURCE, usable_prefix_blocks(req.store_prefix_blocks, p, bs)
    for other in view.instances:
        if other.instance_id == inst.instance_id:
            continue
        h = usable_prefix_blocks(other.cached_prefix_blocks(req.block_hashes), p, bs)
        if h > remote:
            src, remote = other.instance_id, h
    return src, remote


def least_then_loaded(plans: list[Placement], candidates: list[InstanceView]) -> Placement:
    """The plan of least predicted TTFT; among equals (issue #16's tie-break of the cache-aware
    policies, base-model requests: these reference policies price no adapter) the least loaded
    candidate (fewest queued prompt tokens, fewest requests, most free blocks), then the first."""

    def key(k: int) -> tuple:
        c = candidates[k]
        load = (c.queued_tokens, c.running_requests + c.queued_requests, -c.free_blocks)
        return (plans[k].estimated_ttft_s, *load, k)

    return plans[min(range(len(plans)), key=key)]


class RefLocalCacheAwarePolicy(LocalCacheAwarePolicy):
    """Pre-#12 :class:`LocalCacheAwarePolicy` (a cached-prefix walk per candidate)."""

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        est = self._require_estimator()
        plans: list[Placement] = []
        for inst in candidates:
            hit = usable_prefix_blocks(
                inst.cached_prefix_blocks(req.block_hashes), req.num_prompt_tokens, inst.block_size
            )
            t = est.ttft(inst, req.num_prompt_tokens, hit)
            plans.append(Placement(inst.instance_id, reused_blocks=hit, estimated_ttft_s=t))
        return least_then_loaded(plans, candidates)


class RefGlobalCacheAwarePolicy(GlobalCacheAwarePolicy):
    """Pre-#12 :class:`GlobalCacheAwarePolicy`: O(candidates x instances) prefix walks."""

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        est = self._require_estimator()
        p = req.num_prompt_tokens
        plans: list[Placement] = []
        for inst in candidates:
            local = usable_prefix_blocks(inst.cached_prefix_blocks(req.block_hashes), p, inst.block_size)
            src, remote = best_remote_prefix(req, inst, view)
            t = est.ttft(inst, p, local)
            plan = Placement(inst.instance_id, reused_blocks=local, estimated_ttft_s=t)
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
            plans.append(plan)
        return least_then_loaded(plans, candidates)


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
    ttft_slo_s: float = math.inf  # the request's TTFT SLO (inf: none)
    stall_left_s: float = math.inf  # seconds of stall it still absorbs within its TPOT limit (#19)


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


class RefGoodputAwarePolicy(PlacementPolicy):
    """Pre-#12 ``GoodputAwarePolicy`` (decision, ledger, feedback), verbatim.

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
        # the same learning floor as router.policy.goodput (GoodputConfig.ttft_learn_min_share)
        share = self.config.ttft_learn_min_share
        if not math.isfinite(e.ttft_slo_s) or e.ttft_base_s >= share * e.ttft_slo_s:
            self.corrected.observe(Phase.TTFT, e.ttft_base_s, obs.ttft_s)
        if obs.output_tokens >= self.config.tpot_learn_min_tokens:
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
        # admit on the upper quantile of the corrected prediction (its measured error spread), so
        # that the admitted requests meet the SLO with that probability, not just on average;
        # the larger of that spread and the margin, not both (#19)
        q_ttft, q_tpot = self.corrected.spread(Phase.TTFT), self.corrected.spread(Phase.TPOT)
        lim_ttft = cfg.limit(slo.ttft_s, req.priority, q_ttft) if slo else math.inf
        lim_tpot = cfg.limit(slo.tpot_s, req.priority, q_tpot) if slo else math.inf

        def allowed(o: _Option) -> bool:
            """A local prefill stalls the requests decoding there: within what they absorb."""
            return not o.plan.local_prefill or o.ttft_s <= self._stall_room(o.decode.inst.instance_id)

        feasible = [
            o
            for o in options
            if o.decode.fits and o.ttft_s <= lim_ttft and o.decode.tpot_s <= lim_tpot and allowed(o)
        ]
        if not feasible:
            if slo is not None:
                return self._reject(req, [o for o in options if allowed(o)], lim_ttft, lim_tpot, margin, now)
            # best effort: queue on the decode instance with the most room, fastest start (a
            # local prefill that stalls others only when there is no prefill instance)
            feasible = [o for o in options if allowed(o) or remote_plan is None]
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
        if plan.local_prefill:
            for e in self._ledger.values():
                if e.decode_id == best_d:
                    e.stall_left_s -= choice.ttft_s
        tp = choice.decode.tpot_s
        budget = (lim_tpot - tp) * (out - 1) if out > 1 and math.isfinite(lim_tpot) else math.inf
        self._ledger[req.request_id] = _Inflight(
            req.request_id,
            req.tenant,
            best_d,
            is_long,
            choice.ttft_s / ft / contention,  # the model's own prediction: what correction learns
            choice.decode.tpot_s / fd / contention,
            finish,
            finish + cfg.ledger_grace_s,
            ttft_slo_s=slo.ttft_s if (slo := req.slo or cfg.default_slo) else math.inf,
            stall_left_s=max(0.0, budget),
        )
        return plan

    def _stall_room(self, decode_id: str) -> float:
        return min(
            (e.stall_left_s for e in self._ledger.values() if e.decode_id == decode_id), default=math.inf
        )

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
        if not options:
            return Rejection(
                RejectReason.SLO_UNATTAINABLE,
                "no prefill instance, and a prefill on any decode instance would stall the requests "
                f"decoding there past their TPOT SLO (priority {req.priority}); retry later",
                self._retry(self._next_decode_finish(now)),
            )
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
