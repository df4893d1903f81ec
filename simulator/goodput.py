"""Goodput (DistServe): the highest request rate at which at least ``target`` of requests meet
both SLOs, found by bracketing then bisecting on rate. Assumes attainment does not increase
with rate (monotone), which holds for a fixed workload rescaled in time up to simulation noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from router.policy import SLO
from simulator.config import ClusterConfig, SimConfig
from simulator.sim import PolicyFactory, Simulation
from simulator.workload import RateSource, Workload


@dataclass(frozen=True)
class GoodputResult:
    rate: float  # requests/s meeting the target (0: not even the lowest rate tried)
    evaluations: tuple[tuple[float, float], ...] = field(default=())  # (rate, attainment) in order tried

    def per_gpu(self, num_gpus: int) -> float:
        return self.rate / num_gpus if num_gpus else 0.0


def search_goodput(
    attainment: Callable[[float], float],
    target: float = 0.9,
    *,
    start: float = 1.0,
    rel_tol: float = 0.03,
    min_rate: float = 1e-3,
    max_rate: float = 1e6,
    max_evals: int = 40,
) -> GoodputResult:
    """Largest rate ``r`` with ``attainment(r) >= target`` to within ``rel_tol`` (relative).

    Doubles (or halves) from ``start`` to bracket the answer, then bisects; returns the highest
    rate found feasible and every evaluation made.
    """
    if not 0 < target <= 1:
        raise ValueError("target must be in (0, 1]")
    evals: list[tuple[float, float]] = []

    def ok(r: float) -> bool:
        a = attainment(r)
        evals.append((r, a))
        return a >= target

    lo, hi = 0.0, None
    r = start
    if ok(r):
        lo = r
        while len(evals) < max_evals and r < max_rate:
            r *= 2
            if not ok(r):
                hi = r
                break
            lo = r
        if hi is None:
            return GoodputResult(lo, tuple(evals))
    else:
        hi = r
        while len(evals) < max_evals:
            r /= 2
            if r < min_rate:
                return GoodputResult(0.0, tuple(evals))
            if ok(r):
                lo = r
                break
            hi = r
    while hi - lo > rel_tol * lo and len(evals) < max_evals:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, tuple(evals))


def cluster_goodput(
    cluster: ClusterConfig,
    workload: Workload | RateSource,
    slo: SLO,
    target: float = 0.9,
    *,
    start: float | None = None,
    rel_tol: float = 0.03,
    policy_factory: PolicyFactory | None = None,
) -> GoodputResult:
    """Goodput of ``cluster`` on ``workload`` at each tried rate (simulations stop early once the
    target is out of reach). A fixed :class:`Workload` is rescaled in time (its request count is
    fixed: short at high rates); a :class:`RateSource` sizes the workload to the rate."""
    sim = Simulation(cluster, SimConfig(slo=slo, attainment_target=target, early_stop=True), policy_factory)
    at_rate = workload.at_rate if isinstance(workload, RateSource) else workload.with_rate

    def att(rate: float) -> float:
        return sim.run(at_rate(rate)).attainment(slo)

    return search_goodput(att, target, start=start or max(0.25, cluster.num_gpus * 0.5), rel_tol=rel_tol)
