"""Configuration of the goodput-aware placement policy (:class:`GoodputConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.policy.types import SLO

if TYPE_CHECKING:
    from router.policy.view import ClusterView


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
    # A correction nobody confirms fades: once no request of a phase finished for
    # ``correction_stale_s``, its online factor and error quantile decay toward the model
    # (the workers' own profiles) with this half-life. Without it a cluster that was slow for a
    # while (a busy host) refused every request with an SLO from then on, and refused requests
    # bring no new measurement (#19). None: never fade.
    correction_stale_s: float | None = 30.0
    correction_half_life_s: float = 60.0
    # The online TTFT correction (a factor on the model's prediction) learns only from requests
    # whose uncorrected TTFT prediction is at least this share of their TTFT SLO (requests with
    # no finite TTFT SLO always teach it). Far below the SLO the error is mostly per-request
    # overhead no factor models (RPCs, the KV publish, the relay) and errors there do not decide
    # admission: cached prompts predicted 0.1 s and measured 0.17 s made the factor 1.74, and
    # the next uncached prompts, 0.81 s in truth, were refused at a predicted 1.37 s (#19).
    ttft_learn_min_share: float = 0.25
    # The online TPOT correction learns only from requests with at least this many output tokens:
    # a request's measured TPOT includes its first decode step, which waits for the KV handoff
    # (the decode worker's pull), a one-off cost the per-step model does not have; over 2-7 tokens
    # it made the TPOT factor and spread refuse requests predicted at 134-168 ms against a 180 ms
    # SLO while admitted ones measured p50 80 ms (#19).
    tpot_learn_min_tokens: int = 8
    # The prefill -> decode KV handoff is part of a disaggregated request's TTFT: a remote
    # prefill's prediction adds TtftEstimator.handoff_time (a local prefill has none). 0: the
    # whole KV moves after the prefill; > 0: chunk-wise KV streaming (the router's --kv-stream)
    # with this prefill chunk, only what the overlap leaves (the last chunk's transfer while the
    # link keeps up). ``price_handoff`` False: no handoff term (the policy before #14).
    price_handoff: bool = True
    handoff_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.slo_margin < 1 and self.priority_margin_step >= 0 and 0 <= self.max_margin < 1):
            raise ValueError("margins must be in [0, 1)")
        if self.tenant_max_inflight is not None and self.tenant_max_inflight < 1:
            raise ValueError("tenant_max_inflight must be >= 1 (None: unlimited)")
        if not 0 < self.min_retry_after_s <= self.max_retry_after_s:
            raise ValueError("need 0 < min_retry_after_s <= max_retry_after_s")
        if self.shared_cores is not None and self.shared_cores < 1:
            raise ValueError("shared_cores must be >= 1 (None: no shared cores)")
        if (self.correction_stale_s is not None and self.correction_stale_s < 0) or not (
            self.correction_half_life_s > 0
        ):
            raise ValueError("need correction_stale_s >= 0 (None: never fade) and correction_half_life_s > 0")
        if self.handoff_chunk_tokens < 0:
            raise ValueError(f"handoff_chunk_tokens must be >= 0, got {self.handoff_chunk_tokens}")
        if self.tpot_learn_min_tokens < 2:
            raise ValueError(f"tpot_learn_min_tokens must be >= 2, got {self.tpot_learn_min_tokens}")
        if not 0 <= self.ttft_learn_min_share < 1:
            raise ValueError(f"ttft_learn_min_share must be in [0, 1), got {self.ttft_learn_min_share}")

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

    def limit(self, slo_s: float, priority: int, spread: float) -> float:
        """The admission limit for a prediction against an SLO of ``slo_s`` seconds:
        ``slo_s x (1 - priority share) x min(1 / spread, 1 - slo_margin)``.

        ``spread`` is the measured upper quantile of the prediction's error
        (``OnlineCorrectedLatency.spread``, 90th percentile by default): the headroom the model's
        error asks for. ``slo_margin`` is the least headroom, used until that spread is learned
        and whenever it is narrower; the two are not stacked (a 10% margin on top of a 1.35
        90th-percentile spread refused requests predicted at 146 ms against a 200 ms TPOT SLO
        whose admitted peers measured p90 152 ms, #19). The priority share (``margin(priority) -
        slo_margin``, >= 0) comes on top: less important requests are refused first."""
        share = max(0.0, self.margin(priority) - self.slo_margin)
        return slo_s * (1 - share) * min(1 / spread, 1 - self.slo_margin)

    def quota(self, tenant: str) -> int | None:
        for t, n in self.tenant_quotas:
            if t == tenant:
                return n
        return self.tenant_max_inflight
