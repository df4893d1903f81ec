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
   TTFT = its queue + one co-scheduled decode step + prefill(uncached), no KV handoff (a
   remote prefill's TTFT adds the handoff: the whole KV's transfer, or with chunk-wise KV
   streaming only what the overlap with the prefill leaves; ``GoodputConfig.price_handoff``,
   ``handoff_chunk_tokens``). A local
   prefill holds up every decode step there for its duration, so it is allowed only while the
   requests decoding there absorb that stall within their TPOT limits (the ledger's stall room,
   :mod:`router.policy.ledger`), unless a best-effort request has no other way.
5. **SLO check**: a (prefill, decode) pair is feasible when predicted TTFT and TPOT are within
   the request's limits (:meth:`GoodputConfig.limit`) and the decode instance has room. A limit
   is the SLO divided by the upper quantile of the prediction's measured error
   (``OnlineCorrectedLatency.spread``: 90th percentile by default, so the admitted requests
   meet the SLO with that probability, not just on average), or by ``1 / (1 - slo_margin)``
   when that is larger (the least headroom); then less a share growing with the priority value
   (``priority_margin_step`` per level above 0), so as load grows the least important requests
   fail the check first (priority shedding). With ``shared_cores`` set (all instances on one
   host's cores), every prediction is first multiplied by the contention factor busy instances
   / cores (>= 1; :meth:`GoodputConfig.contention`).
6. **Choice**: the decode instance first (length-aware, TetriInfer: a request predicted long goes
   where the fewest long requests are in flight; then lowest predicted TPOT; then most free
   blocks), then on it the mode (local or the best prefill instance) with the lower TTFT.
   A LoRA adapter's request (issue #16) compares, between the long-request count and TPOT, how
   soon it can start on each decode instance (:func:`~router.policy.decode_side.adapter_starts`:
   its local prefill's TTFT, which prices when the adapter is ready there, or the remote
   prefill then the adapter's load on the decode instance): instances differ there by a slot
   copy, a disk read or a wait for a pinned slot (tens of ms), against fractions of a ms of
   predicted TPOT, so by TPOT alone the affinity was lost (every request loaded its adapter
   wherever the batch was a request smaller). The start, not the adapter's readiness alone:
   readiness first piled a hot adapter's requests on its holders (no SLO bound in the way;
   ``bench/sim_adapter_affinity.py --zipf-s 2``: TPOT 2x), the start's queue and co-scheduled
   decode step spread them.
7. **Early rejection**: no feasible pair -> :class:`Rejection` (``SLO_UNATTAINABLE``) with a
   reason and ``retry_after_s`` (the predicted TTFT excess, or the time until the earliest
   predicted decode finish), before any compute is spent.

**Each worker's own speed** (issue #19): an instance whose view carries a step-time model
(``InstanceSnapshot.latency``: the worker measured it at start-up and reported it when it
registered) has its predictions scaled by its speed relative to the policy's model: TTFT terms by
``own.prefill_time([256]) / model.prefill_time([256])``, TPOT terms by the same ratio of decode
steps (batch 8, 512 tokens of context each), so a slow worker predicts slower and gets fewer
requests, from the first request on. A policy built without an explicit ``latency`` adopts the
first reported profile as its model (a homogeneous cluster is then predicted by its own measured
model, not by the seed's defaults); the online correction then refines it (it learns the
residual: the ledger keeps predictions with the instance factors divided out).

**Why a decision went as it did**: a TTFT refusal's message states the fastest option's terms
(queue, fetch, prefill of the uncached tokens, co-scheduled decode step, instance speed,
contention) and how the limit was made (:meth:`GoodputConfig.limit`); with
``on_decision`` set, every decision's :class:`DecisionTrace` goes to that callback (the router's
``--log-placement-terms`` logs it).

Accepted requests are recorded in an in-flight ledger (tenant, decode instance, predictions),
released by :meth:`on_finished` (which also feeds the online latency correction and the length
predictor) or :meth:`release`, and otherwise expired at their predicted finish + a grace period
(a caller that never reports back, e.g. the simulator, leaves no permanent load behind).

:class:`ColocatedPolicy` always prefills on the least-loaded decode instance (no handoff).

**Cost per decision** (issue #12: placement under the router's lock must scale): the prompt's
cached prefix is looked up once per request on every instance (:meth:`ClusterView.prefix_hits`),
never once per (candidate, instance) pair; the best remote prefix of a candidate is the best
holder's, or the second best's for the best holder itself (O(1)); queue, prefill and decode
step times of all instances are priced in one latency-model call per term; the (prefill,
decode) pair search is O(decode instances), because every pair shares the one best prefill
plan; ledger upkeep is O(log in-flight requests). So a decision is O(instances) with a small
constant. The decode pool is priced with numpy over its load columns
(:class:`~router.policy.view.RoleColumns`, bit for bit the per-instance arithmetic), and the
columns and the pools' queue prices are kept from one view to the next for the snapshot
objects that did not change (:class:`~router.policy.view.ColumnCache`; a router reuses a
worker's snapshot while its state is unchanged), so an unchanged instance is not re-read. ``bench/placement.py`` times it; ``tests/unit/test_placement_equivalence.py`` checks
it decides exactly as the quadratic search it replaced (``bench/placement_reference.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from router.policy.decode_side import (
    NUMPY_MIN_POOL,
    UNDECIDED,
    DecodeSide,
    adapter_starts,
    first_least,
    first_least_arr,
)
from router.policy.estimate import TtftEstimator, TtftTable
from router.policy.goodput_config import GoodputConfig
from router.policy.latency import (
    DecodeLatencyEstimator,
    LinearLatency,
    OnlineCorrectedLatency,
    Phase,
    WithDecode,
    decode_time_each,
)
from router.policy.ledger import Inflight, Ledger
from router.policy.length_predictor import LengthPredictor, LengthSample
from router.policy.placement import STORE_SOURCE, PlacementPolicy, PolicyKind, best_prefill_plan
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
from router.policy.view import ClusterView, ColumnCache, InstanceView

_REF_TOKENS = 256  # operating point at which a worker's profile is compared to the policy's model
_REF_BATCH = 8
_REF_CTX = 512


class _FreshTtft(TtftEstimator):
    """TTFT estimator over the online-corrected model, which changes over time: no memo of its
    step times, but of its base model's (fixed), scaled by the current TTFT factor (exactly what
    ``OnlineCorrectedLatency.prefill_time`` computes)."""

    def _step_time(self, tokens: int) -> float:
        return self.latency.prefill_time([tokens])

    def step_basis(self) -> tuple[float, dict[int, float], object]:
        lat = self.latency
        if isinstance(lat, OnlineCorrectedLatency):
            return lat.factor(Phase.TTFT), self._step, lat.base  # self._step: the base model's
        return 1.0, {}, lat


@dataclass
class GoodputStats:
    """Counters of decisions (read by tests and the router's logs)."""

    placed: int = 0
    local_prefill: int = 0
    rejected: dict[RejectReason, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TtftTerms:
    """One option's predicted TTFT, term by term, as the decision priced it (seconds; the online
    TTFT correction ``ttft_factor`` is already inside every term):
    ``predicted_s = ((queue_s + adapter_s + fetch_s + prefill_s + cotenant_s) * speed + handoff_s)
    * contention``.

    ``queue_s``: prompt tokens queued ahead on the instance; ``adapter_s``: loading the request's
    LoRA adapter there (0: resident in a slot, or the base model); ``fetch_s``: pulling
    ``fetched_blocks`` of a remote prefix; ``prefill_s``: computing the ``prompt_tokens -
    reused_tokens`` tokens not reused; ``cotenant_s``: the decode step of the instance's own batch
    co-scheduled with a local prefill; ``speed``: the instance's own profile relative to the
    policy's model; ``contention``: the shared-cores slow-down (1 without ``shared_cores``);
    ``handoff_s``: the prefill -> decode KV handoff left after a remote prefill
    (``GoodputConfig.price_handoff``; 0 for a local prefill)."""

    instance_id: str
    local_prefill: bool
    prompt_tokens: int
    reused_tokens: int
    fetched_blocks: int
    queue_s: float
    fetch_s: float
    prefill_s: float
    cotenant_s: float
    speed: float
    contention: float
    ttft_factor: float
    adapter_s: float = 0.0
    handoff_s: float = 0.0

    @property
    def predicted_s(self) -> float:
        return (
            (self.queue_s + self.adapter_s + self.fetch_s + self.prefill_s + self.cotenant_s) * self.speed
            + self.handoff_s
        ) * self.contention

    def describe(self) -> str:
        """One line: every term in ms, what it is of, and the factors."""
        parts = [f"queue {self.queue_s * 1e3:.0f}"]
        if self.adapter_s:
            parts.append(f"adapter load {self.adapter_s * 1e3:.0f}")
        if self.fetched_blocks:
            parts.append(f"fetch {self.fetch_s * 1e3:.0f} ({self.fetched_blocks} blocks)")
        parts.append(
            f"prefill {self.prefill_s * 1e3:.0f} ({self.prompt_tokens - self.reused_tokens} of "
            f"{self.prompt_tokens} tokens uncached)"
        )
        if self.cotenant_s:
            parts.append(f"co-scheduled decode {self.cotenant_s * 1e3:.0f}")
        handoff = f" + KV handoff {self.handoff_s * 1e3:.0f} ms" if self.handoff_s else ""
        where = f"{'local prefill on' if self.local_prefill else 'prefill on'} {self.instance_id}"
        return (
            f"{where}: ({' + '.join(parts)} ms) x speed {self.speed:.2f}{handoff}, x contention "
            f"{self.contention:.2f} (online TTFT factor {self.ttft_factor:.2f} included)"
        )


@dataclass(frozen=True)
class DecisionTrace:
    """Why one goodput decision went the way it did (``GoodputAwarePolicy(on_decision=...)``).

    ``ttft``: the terms of the chosen option (placed) or of the fastest one (rejected; None when
    the decision never priced an option, e.g. a quota refusal). The admission limit is
    ``limit_ttft_s = GoodputConfig.limit(slo_ttft_s, priority, quantile_ttft)``: a placement needs
    ``ttft.predicted_s <= limit_ttft_s`` (likewise TPOT) unless the request has no SLO."""

    request_id: str
    placed: bool
    ttft: TtftTerms | None
    quantile_ttft: float
    limit_ttft_s: float
    slo_ttft_s: float | None
    margin: float
    predicted_tpot_s: float | None
    quantile_tpot: float
    limit_tpot_s: float
    predicted_output_tokens: int
    rejection: str = ""  # the rejection's message ("" when placed)

    def to_dict(self) -> dict:
        """Plain values (a log line's fields), the TTFT terms flattened with a ``ttft_`` prefix."""
        d = {k: v for k, v in asdict(self).items() if k != "ttft"}
        if self.ttft is not None:
            d.update({f"ttft_{k}": v for k, v in asdict(self.ttft).items()})
            d["predicted_ttft_s"] = self.ttft.predicted_s
        return d


class GoodputAwarePolicy(PlacementPolicy):
    """SLO-predictive placement with early rejection; see the module docstring for the contract.

    ``latency``: the seed model (default :class:`LinearLatency`); one without ``decode_time``
    gets the seed's decode side. It is wrapped in :class:`OnlineCorrectedLatency` (``corrected``)
    unless it is one already. ``length_predictor`` defaults to a fresh :class:`LengthPredictor`.

    Cost per decision: one cached-prefix walk per instance (:meth:`ClusterView.prefix_hits`),
    then O(1) latency-model work per prefill candidate (the remote prefix is not searched per
    candidate) and per decode instance; the pair search is O(decode instances), because every
    (prefill, decode) pair shares the one best prefill plan; ledger upkeep is O(log in-flight).
    """

    kind = PolicyKind.GOODPUT

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        latency: DecodeLatencyEstimator | LatencyEstimator | None = None,
        config: GoodputConfig | None = None,
        length_predictor: LengthPredictor | None = None,
        on_decision: Callable[[DecisionTrace], None] | None = None,
        **kw,
    ) -> None:
        # called with every decision's :class:`DecisionTrace` (outside the policy's lock) when
        # set: pricing the terms costs a little, so only then (rejections always carry them)
        self.on_decision = on_decision
        self._trace: DecisionTrace | None = None
        self._adopt_profile = latency is None  # the first worker-reported profile becomes the model
        self._speeds: dict[int, tuple[object, float, float]] = {}  # id(profile) -> (it, ttft x, tpot x)
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
        self._ledger = Ledger()
        self._lock = threading.Lock()
        self._cols = ColumnCache()  # the pools' load columns, rows reused while unchanged
        self._learned_at: dict[Phase, float] = {}  # when a sample last corrected each phase

    # ------------------------------------------------------------------ feedback
    def on_finished(self, obs: Observation) -> None:
        """A request finished: release it, correct the latency model, teach the length predictor."""
        with self._lock:
            e = self._ledger.pop(obs.request_id)
        if obs.num_prompt_tokens > 0:
            self.lengths.observe(
                LengthSample(obs.num_prompt_tokens, obs.max_output_tokens, obs.output_tokens)
            )
        if e is None:
            return
        now = self.clock.now()
        teaches = e.ttft_base_s >= self.config.ttft_learn_min_share * e.ttft_slo_s or not math.isfinite(
            e.ttft_slo_s
        )
        if teaches and self.corrected.observe(Phase.TTFT, e.ttft_base_s, obs.ttft_s):
            self._learned_at[Phase.TTFT] = now
        many = obs.output_tokens >= self.config.tpot_learn_min_tokens
        if many and self.corrected.observe(Phase.TPOT, e.tpot_base_s, obs.tpot_s):
            self._learned_at[Phase.TPOT] = now

    def _fade(self, now: float) -> None:
        """Decay each phase's correction toward the model when no sample confirmed it for
        ``correction_stale_s`` (:class:`GoodputConfig`). Call under ``self._lock``."""
        cfg = self.config
        if cfg.correction_stale_s is None:
            return
        for phase, t in self._learned_at.items():
            idle = now - t - cfg.correction_stale_s
            if idle > 0:
                self.corrected.relax(phase, 0.5 ** (idle / cfg.correction_half_life_s))

    def release(self, request_id: str) -> None:
        with self._lock:
            self._ledger.pop(request_id)

    def inflight(self, tenant: str | None = None) -> int:
        """Requests in the ledger (of ``tenant`` when given)."""
        with self._lock:
            self._ledger.expire(self.clock.now())
            return self._ledger.count(tenant)

    # ------------------------------------------------------------------ decision
    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        """Best TTFT among ``candidates`` (global cache-aware, KV store included as a source)."""
        table = TtftTable.of(self.estimator, req)
        with self._lock:
            scales = self._scales(candidates, view)
        f = scales[0] if scales is not None else None
        return best_prefill_plan(
            req, candidates, view.prefix_hits(req.block_hashes), table, remote=True, scales=f
        )

    def _speed(self, inst: InstanceView) -> tuple[float, float]:
        """(TTFT, TPOT) factors of ``inst``'s own step-time model relative to the policy's model
        (1, 1 when it reported none). Memoised per profile object. Call under ``self._lock``."""
        prof = getattr(inst, "latency", None)
        if prof is None:
            return 1.0, 1.0
        hit = self._speeds.get(id(prof))
        if hit is not None and hit[0] is prof:
            return hit[1], hit[2]
        base = self.corrected.base
        bp, bd = base.prefill_time([_REF_TOKENS]), base.decode_time(_REF_BATCH, _REF_BATCH * _REF_CTX)
        op = prof.prefill_time([_REF_TOKENS])  # type: ignore[attr-defined]
        od = prof.decode_time(_REF_BATCH, _REF_BATCH * _REF_CTX)  # type: ignore[attr-defined]
        ft = op / bp if bp > 0 and op > 0 else 1.0
        fd = od / bd if bd > 0 and od > 0 else 1.0
        self._speeds[id(prof)] = (prof, ft, fd)
        return ft, fd

    def _scales(
        self, insts: Sequence[InstanceView], view: ClusterView
    ) -> tuple[list[float], list[float]] | None:
        """Per-instance (TTFT, TPOT) factors of ``insts`` (None: no instance of the view reported a
        profile, all 1). Adopts the first reported profile as the model when the policy was built
        without one. Call under ``self._lock``."""
        first = view.first_profile()
        if first is None:
            return None
        if self._adopt_profile:
            self._adopt_profile = False
            self.corrected.base = first  # type: ignore[assignment]
            self.estimator._step.clear()  # the memo of the old model's step times
            self._speeds.clear()
        sp = [self._speed(i) for i in insts]
        return [a for a, _ in sp], [b for _, b in sp]

    def place(self, req: RequestInfo, view: ClusterView) -> Placement | Rejection:
        with self._lock:
            now = self.clock.now()
            self._ledger.expire(now)
            self._ledger.pop(req.request_id)  # a retried id replaces its old entry
            self._fade(now)
            self._trace = None
            d = self._decide(req, view, now)
            if isinstance(d, Rejection):
                self.stats.rejected[d.reason] = self.stats.rejected.get(d.reason, 0) + 1
            else:
                self.stats.placed += 1
                self.stats.local_prefill += int(d.local_prefill)
            trace, self._trace = self._trace, None
        hook = self.on_decision
        if hook is not None and trace is not None:
            hook(trace)
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
        p = req.num_prompt_tokens
        out = req.predicted_output_tokens or self.lengths.predict(p, req.max_output_tokens)
        is_long = out >= cfg.long_output_tokens
        hits = view.prefix_hits(req.block_hashes)
        table = TtftTable.of(self.estimator, req)  # an adapter's load is priced per instance
        pre_scales = self._scales(prefill_pool, view) if prefill_pool else None
        dec_scales = self._scales(decode_pool, view)
        if len(prefill_pool) >= NUMPY_MIN_POOL and not req.adapter:  # queues priced over columns
            pc = self._cols.columns(view, InstanceRole.PREFILL)
            table.know_queues(prefill_pool, table.pool_queues(pc)[1])
        remote_plan = (
            best_prefill_plan(
                req,
                prefill_pool,
                hits,
                table,
                remote=True,
                from_view=True,
                scales=pre_scales[0] if pre_scales is not None else None,
            )
            if prefill_pool
            else None
        )
        # Options, in decode-pool order: (remote plan, d), then (d prefills locally, d). Every
        # remote option shares the one best prefill plan, so the pair search is linear in d.
        dec_roles = (
            (InstanceRole.DECODE,) if decode_pool[0].role is InstanceRole.DECODE else (InstanceRole.MIXED,)
        )
        big = len(decode_pool) >= NUMPY_MIN_POOL and not req.adapter  # (adapter loads: the list path)
        d = DecodeSide(
            cfg,
            self.corrected,
            req,
            decode_pool,
            out,
            hits,
            table,
            self._cols.columns(view, *dec_roles) if big else None,
        )
        n = len(decode_pool)
        local_ttft = d.local_ttft
        if dec_scales is not None:  # each decode instance's own speed
            d.tpots = [t * f for t, f in zip(d.tpots, dec_scales[1], strict=True)]
            local_ttft = [
                None if t is None else t * f for t, f in zip(local_ttft, dec_scales[0], strict=True)
            ]
        if remote_plan is None and local_ttft.count(None) == n:
            return Rejection(RejectReason.NO_INSTANCE, "no prefill instance is available")
        contention = cfg.contention(view)
        tpots = d.tpots
        remote_ttft: float | None = None
        if remote_plan is not None:  # the KV handoff after the prefill is part of its TTFT
            remote_ttft = (remote_plan.estimated_ttft_s or 0.0) + self._handoff_s(
                table, req, remote_plan, view
            )
        if contention != 1.0:  # every step slower while the shared cores are oversubscribed
            if remote_ttft is not None:
                remote_ttft = remote_ttft * contention
            tpots = [t * contention for t in tpots]
            local_ttft = [None if t is None else t * contention for t in local_ttft]
        slo = req.slo or cfg.default_slo
        margin = cfg.margin(req.priority)
        # admit on the upper quantile of the corrected prediction (its measured error spread), so
        # that the admitted requests meet the SLO with that probability, not just on average
        q_ttft, q_tpot = self.corrected.spread(Phase.TTFT), self.corrected.spread(Phase.TPOT)
        lim_ttft = cfg.limit(slo.ttft_s, req.priority, q_ttft) if slo else math.inf
        lim_tpot = cfg.limit(slo.tpot_s, req.priority, q_tpot) if slo else math.inf
        room = self._ledger.stall_room  # seconds of stall a decode instance's requests absorb
        fits = d.fits
        remote_ok = remote_ttft is not None and remote_ttft <= lim_ttft
        # decode instances with a feasible option: room, TPOT within the SLO, and the remote plan
        # or their own prefill within the TTFT bound
        best = -1
        fast = (  # the tpots are d's own and no long request counts: decide over the arrays
            remote_ok
            and d.arrays is not None
            and dec_scales is None
            and contention == 1.0
            and not (is_long and self._ledger.longs)
        )
        if fast:
            fa, ta = d.arrays  # type: ignore[misc]
            best = first_least_arr(np.flatnonzero(fa & (ta <= lim_tpot)), ta, d.freeness)
            if best == UNDECIDED:
                best, fast = -1, False
            cand = [best] if best >= 0 else []
        if fast:
            pass
        elif remote_ok:
            cand = [k for k in range(n) if fits[k] and tpots[k] <= lim_tpot]
        else:
            cand = [
                k
                for k in range(n)
                if fits[k]
                and tpots[k] <= lim_tpot
                and (lt := local_ttft[k]) is not None
                and lt <= lim_ttft
                and lt <= room(decode_pool[k].instance_id)
            ]
        if cand:
            ok_remote, best_effort = remote_ok, False
        else:
            if slo is not None:
                allowed = [  # the local options that would not stall others past their TPOT
                    None if t is None or t > room(decode_pool[k].instance_id) else t
                    for k, t in enumerate(local_ttft)
                ]

                def terms_of() -> TtftTerms | None:
                    return self._fastest_terms(
                        req, view, table, decode_pool, d, remote_plan, remote_ttft, allowed,
                        pre_scales, dec_scales, contention,
                    )  # fmt: skip

                rej = self._reject(
                    req, remote_ttft, allowed, tpots, fits, lim_ttft, lim_tpot, margin, now,
                    terms_of, slo, q_ttft,
                )  # fmt: skip
                if self.on_decision is not None:
                    terms = terms_of()
                    self._trace = DecisionTrace(
                        req.request_id, False, terms, q_ttft, lim_ttft, slo.ttft_s, margin,
                        min(tpots) if tpots else None, q_tpot, lim_tpot, out, rej.message,
                    )  # fmt: skip
                return rej
            # best effort: queue on the decode instance with the most room, fastest start
            ok_remote, best_effort = remote_ttft is not None, True
            cand = list(range(n)) if ok_remote else [k for k in range(n) if local_ttft[k] is not None]
        longs = self._ledger.longs if is_long else {}
        if best < 0 or best_effort:
            best = first_least(
                cand,
                fits,
                [longs.get(decode_pool[k].instance_id, 0) for k in cand] if longs else None,
                tpots,
                d.freeness,
                # an adapter's request: where it can start soonest (its adapter ready) before TPOT
                adapter_starts(decode_pool, req.adapter, local_ttft, remote_ttft) if req.adapter else None,
            )
        best_d = decode_pool[best].instance_id
        tpot = tpots[best]
        # on it, the remote option unless the local one is strictly faster
        lt = local_ttft[best]
        # a local prefill holds up every decode step on best_d for its duration: allowed while
        # the requests decoding there absorb that stall within their TPOT limits (see
        # router.policy.ledger), or when there is no other way to serve a best-effort request
        ok_local = lt is not None and (
            (best_effort and not ok_remote) or (lt <= room(best_d) and (best_effort or lt <= lim_ttft))
        )
        inst_tpot = dec_scales[1][best] if dec_scales is not None else 1.0
        if ok_local and (not ok_remote or lt < remote_ttft):  # type: ignore[operator]
            ttft = lt
            inst_ttft = dec_scales[0][best] if dec_scales is not None else 1.0
            plan = Placement(
                best_d,
                decode_instance_id=best_d,
                reused_blocks=d.local_reused[best],
                estimated_ttft_s=ttft,
                local_prefill=True,
                estimated_tpot_s=tpot,
                predicted_output_tokens=out,
            )
        else:
            assert remote_plan is not None and remote_ttft is not None
            ttft = remote_ttft
            inst_ttft = 1.0
            if pre_scales is not None:
                ids = [i.instance_id for i in prefill_pool]
                inst_ttft = pre_scales[0][ids.index(remote_plan.instance_id)]
            plan = Placement(
                remote_plan.instance_id,
                decode_instance_id=best_d,
                fetch_from=remote_plan.fetch_from,
                fetch_blocks=remote_plan.fetch_blocks,
                reused_blocks=remote_plan.reused_blocks,
                estimated_ttft_s=ttft,
                estimated_tpot_s=tpot,
                predicted_output_tokens=out,
            )
        rej = self.admit(req, plan, view)
        if rej is not None:
            return rej
        ft, fd = self.corrected.factor(Phase.TTFT), self.corrected.factor(Phase.TPOT)
        finish = now + ttft + out * tpot
        if plan.local_prefill:  # charged to the requests already decoding there, not to this one
            self._ledger.stall(best_d, ttft)
        # the stall this request absorbs within its TPOT limit (inf: no TPOT to protect)
        budget = (lim_tpot - tpot) * (out - 1) if out > 1 and math.isfinite(lim_tpot) else math.inf
        self._ledger.add(
            Inflight(
                req.request_id,
                req.tenant,
                best_d,
                is_long,
                # the model's own prediction (instance speed and contention divided out): what
                # the online correction learns from
                ttft / ft / contention / inst_ttft,
                tpot / fd / contention / inst_tpot,
                finish,
                finish + cfg.ledger_grace_s,
                ttft_slo_s=slo.ttft_s if slo else math.inf,
                stall_budget_s=max(0.0, budget),
            )
        )
        if self.on_decision is not None:
            if plan.local_prefill:
                terms = self._terms(
                    table, decode_pool[best], p, True, plan.reused_blocks, 0, inst_ttft, contention
                )
            else:
                terms = self._terms(
                    table, view.get(plan.instance_id), p, False, plan.reused_blocks,
                    plan.fetch_blocks, inst_ttft, contention, plan.fetch_from == STORE_SOURCE,
                    self._handoff_s(table, req, plan, view),
                )  # fmt: skip
            self._trace = DecisionTrace(
                req.request_id, True, terms, q_ttft, lim_ttft, slo.ttft_s if slo else None, margin,
                tpot, q_tpot, lim_tpot, out,
            )  # fmt: skip
        return plan

    def _handoff_s(self, table: TtftTable, req: RequestInfo, plan: Placement, view: ClusterView) -> float:
        """The KV handoff after a remote prefill (``GoodputConfig.price_handoff``): the whole
        KV's transfer, or with chunk-wise streaming what the overlap leaves."""
        cfg = self.config
        if not cfg.price_handoff:
            return 0.0
        reused = plan.reused_blocks * view.get(plan.instance_id).block_size
        return table.est.handoff_time(req.num_prompt_tokens, reused, cfg.handoff_chunk_tokens)

    def _terms(
        self,
        table: TtftTable,
        inst: InstanceView,
        p: int,
        local: bool,
        reused_blocks: int,
        fetched_blocks: int,
        speed: float,
        contention: float,
        from_store: bool = False,
        handoff_s: float = 0.0,
    ) -> TtftTerms:
        """The TTFT terms of prefilling ``p`` prompt tokens on ``inst`` (``local``: a decode
        instance prefilling the prompt itself, its own batch's decode step co-scheduled), reusing
        ``reused_blocks`` blocks of which ``fetched_blocks`` are pulled (``from_store``: from the
        KV store, its disk-tier reads included), as the decision priced them."""
        bs = inst.block_size
        cot = 0.0
        if local:
            b = inst.running_requests + inst.queued_requests
            if b:
                held = (
                    (inst.total_blocks - inst.free_blocks) * bs if inst.total_blocks > inst.free_blocks else 0
                )
                cot = decode_time_each(self.corrected, [b], [held])[0]
        return TtftTerms(
            inst.instance_id,
            local,
            p,
            reused_blocks * bs,
            fetched_blocks,
            table.base_queues([inst])[0],
            (table.store_fetch if from_store else table.fetch)(fetched_blocks, bs),
            table.prefill(reused_blocks * bs),
            cot,
            speed,
            contention,
            self.corrected.factor(Phase.TTFT),
            table.adapter_s(inst),
            handoff_s,
        )

    def _fastest_terms(
        self,
        req: RequestInfo,
        view: ClusterView,
        table: TtftTable,
        decode_pool: list[InstanceView],
        d: DecodeSide,
        remote_plan: Placement | None,
        remote_ttft: float | None,
        local_ttft: list[float | None],
        pre_scales: tuple[list[float], list[float]] | None,
        dec_scales: tuple[list[float], list[float]] | None,
        contention: float,
    ) -> TtftTerms | None:
        """The terms of the option with the lowest predicted TTFT (the remote plan on a tie)."""
        p = req.num_prompt_tokens
        locs = [(t, k) for k, t in enumerate(local_ttft) if t is not None]
        k_best = min(locs)[1] if locs else None
        if (
            remote_plan is not None
            and remote_ttft is not None
            and (
                k_best is None or remote_ttft <= local_ttft[k_best]  # type: ignore[operator]
            )
        ):
            inst = view.get(remote_plan.instance_id)
            speed = 1.0
            if pre_scales is not None:
                ids = [i.instance_id for i in view.with_role(InstanceRole.PREFILL)]
                speed = pre_scales[0][ids.index(inst.instance_id)]
            return self._terms(
                table, inst, p, False, remote_plan.reused_blocks, remote_plan.fetch_blocks, speed, contention,
                remote_plan.fetch_from == STORE_SOURCE, self._handoff_s(table, req, remote_plan, view),
            )  # fmt: skip
        if k_best is None:
            return None
        speed = dec_scales[0][k_best] if dec_scales is not None else 1.0
        return self._terms(table, decode_pool[k_best], p, True, d.local_reused[k_best], 0, speed, contention)

    # ------------------------------------------------------------------ parts
    def _quota(self, req: RequestInfo, now: float) -> Rejection | None:
        limit = self.config.quota(req.tenant)
        if limit is None:
            return None
        n = self._ledger.count(req.tenant)
        if n < limit:
            return None
        wait = min(e.predicted_finish for e in self._ledger.of_tenant(req.tenant)) - now
        return Rejection(
            RejectReason.QUOTA_EXCEEDED,
            f"tenant {req.tenant or '(anonymous)'!r} already has {n} requests in flight "
            f"(quota {limit}); retry when one finishes",
            self._retry(wait),
        )

    def _reject(
        self,
        req: RequestInfo,
        remote_ttft: float | None,
        local_ttft: list[float | None],
        tpots: list[float],
        fits: list[bool],
        lim_ttft: float,
        lim_tpot: float,
        margin: float,
        now: float,
        terms: Callable[[], TtftTerms | None] | None = None,
        slo: SLO | None = None,
        quantile: float = 1.0,
    ) -> Rejection:
        """Why no option is feasible, over every option: (remote plan, d) for each decode instance
        ``d`` when there is a remote plan, and (d prefills locally, d) where allowed. A TTFT
        refusal states the fastest option's terms (``terms()``, priced only then) and how the
        limit was made."""
        ttfts: list[float] = []
        tpot_opts: list[float] = []
        roomy = False
        for k, lt in enumerate(local_ttft):
            if remote_ttft is not None:
                ttfts.append(remote_ttft)
            elif lt is None:
                continue  # no option on this decode instance
            if lt is not None:
                ttfts.append(lt)
            tpot_opts.append(tpots[k])
            roomy = roomy or fits[k]
        if not ttfts:  # no prefill instance, and every local prefill would stall others
            return Rejection(
                RejectReason.SLO_UNATTAINABLE,
                "no prefill instance, and a prefill on any decode instance would stall the requests "
                f"decoding there past their TPOT SLO (priority {req.priority}); retry later",
                self._retry(self._next_decode_finish(now)),
            )
        best_ttft, best_tpot = min(ttfts), min(tpot_opts)
        if best_ttft > lim_ttft:
            why = f"predicted TTFT {best_ttft * 1e3:.1f} ms exceeds {lim_ttft * 1e3:.1f} ms"
            tt = terms() if terms is not None else None
            if tt is not None and slo is not None:
                why += (
                    f" [{tt.describe()}; limit = SLO {slo.ttft_s * 1e3:.0f} ms x (1 - priority share "
                    f"{max(0.0, margin - self.config.slo_margin):.2f}) x min(1 / upper-quantile factor "
                    f"{quantile:.2f}, 1 - {self.config.slo_margin:.2f})]"
                )
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
        first = self._ledger.earliest_finish()
        return 0.0 if first is None else first - now

    def _retry(self, wait_s: float) -> float:
        c = self.config
        return min(c.max_retry_after_s, max(c.min_retry_after_s, wait_s))


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
