"""Placement planner (DistServe's Algorithm 1, simulation-driven): find the instance counts and
TP degree per phase that maximise goodput per GPU within a GPU budget, beside the best colocated
deployment.

1. Phase goodputs: for every usable TP degree, binary-search the goodput of one instance alone:
   colocated (both SLOs), prefill-only (TTFT SLO; requests end at their first token) and
   decode-only (TPOT SLO; requests arrive with their KV in place).
2. Estimates: ``m`` prefill x ``n`` decode instances serve ``min(m*g_p, n*g_d)``; ``k`` colocated
   replicas serve ``k*g_c``. Every combination within the budget is ranked by estimate per GPU.
3. Verification: the ``verify_top`` best of each kind are simulated whole (router policy,
   KV transfers, both SLOs) and their goodput searched again; that verified figure ranks them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from router.policy import SLO, InstanceRole, PolicyKind
from simulator.config import (
    ClusterConfig,
    InstanceGroup,
    Mode,
    SchedulerPreset,
    sarathi_scheduler,
    vllm_scheduler,
)
from simulator.goodput import GoodputResult, cluster_goodput
from simulator.latency import LatencySpec, make_latency_model
from simulator.models import MODELS, model_spec
from simulator.workload import RateSource, Workload


@dataclass(frozen=True)
class Candidate:
    groups: tuple[InstanceGroup, ...]

    @property
    def num_gpus(self) -> int:
        return sum(g.count * g.tp for g in self.groups)

    @property
    def mode(self) -> Mode:
        roles = {g.role for g in self.groups if g.count}
        return Mode.COLOCATED if roles == {InstanceRole.MIXED} else Mode.DISAGGREGATED

    @property
    def label(self) -> str:
        short = {InstanceRole.PREFILL: "P", InstanceRole.DECODE: "D", InstanceRole.MIXED: "M"}
        return " + ".join(f"{g.count}x{short[g.role]}(TP{g.tp})" for g in self.groups if g.count)


@dataclass(frozen=True)
class PlanEntry:
    candidate: Candidate
    estimate: float  # requests/s from phase goodputs
    goodput: float | None = None  # requests/s from the whole-cluster simulation (None: not verified)

    @property
    def rate(self) -> float:
        return self.goodput if self.goodput is not None else self.estimate

    @property
    def per_gpu(self) -> float:
        return self.rate / self.candidate.num_gpus

    @property
    def verified(self) -> bool:
        return self.goodput is not None


@dataclass(frozen=True)
class PlanSpec:
    """What to plan. ``colocated_latency`` lets the colocated baseline use another engine's
    profile (e.g. DistServe's vLLM fits, as in the DistServe paper); None = the same engine."""

    latency: LatencySpec
    num_gpus: int
    workload: RateSource | Workload  # a RateSource sizes each simulation to its rate (recommended)
    slo: SLO
    target: float = 0.9
    tp_options: tuple[int, ...] = (1, 2, 4, 8)
    colocated_scheduler: SchedulerPreset = SchedulerPreset.VLLM
    colocated_latency: LatencySpec | None = None
    policy: PolicyKind = PolicyKind.LEAST_LOADED
    verify_top: int = 2
    rel_tol: float = 0.04
    block_size: int = 16


@dataclass(frozen=True)
class PlanReport:
    spec: PlanSpec
    phase_goodput: dict[tuple[str, int], float]  # (colocated|prefill|decode, tp) -> requests/s, one instance
    disaggregated: tuple[PlanEntry, ...]
    colocated: tuple[PlanEntry, ...]
    searches: int = 0

    @property
    def best_disaggregated(self) -> PlanEntry | None:
        return self.disaggregated[0] if self.disaggregated else None

    @property
    def best_colocated(self) -> PlanEntry | None:
        return self.colocated[0] if self.colocated else None

    @property
    def advantage(self) -> float:
        """Best disaggregated goodput/GPU over best colocated goodput/GPU (NaN if either is missing)."""
        d, c = self.best_disaggregated, self.best_colocated
        if d is None or c is None or c.per_gpu == 0:
            return math.nan
        return d.per_gpu / c.per_gpu

    def table(self, top: int = 5) -> str:
        lines = [f"{'rank':>4}  {'configuration':<32} {'GPUs':>4} {'goodput':>9} {'per GPU':>8}  source"]
        for title, entries in (("disaggregated", self.disaggregated), ("colocated", self.colocated)):
            lines.append(f"-- {title}")
            for i, e in enumerate(entries[:top], 1):
                src = "simulated" if e.verified else "estimated"
                lines.append(
                    f"{i:>4}  {e.candidate.label:<32} {e.candidate.num_gpus:>4} {e.rate:>9.3f} {e.per_gpu:>8.3f}  {src}"
                )
        lines.append(f"best disaggregated / best colocated goodput per GPU: {self.advantage:.2f}x")
        return "\n".join(lines)


@dataclass
class _Ctx:
    spec: PlanSpec
    progress: Callable[[str], None]
    searches: int = 0
    cache: dict[tuple, GoodputResult] = field(default_factory=dict)


def _cluster(spec: PlanSpec, groups: Iterable[InstanceGroup], latency: LatencySpec) -> ClusterConfig:
    return ClusterConfig(latency, tuple(groups), block_size=spec.block_size, policy=spec.policy)


def _usable_tps(spec: PlanSpec, latency: LatencySpec) -> list[int]:
    out = []
    for tp in spec.tp_options:
        if tp > spec.num_gpus:
            continue
        if latency.model in MODELS and not model_spec(latency.model).valid_tp(tp):
            continue
        try:
            make_latency_model(latency, tp)
        except (ValueError, FileNotFoundError):
            continue
        c = _cluster(spec, (InstanceGroup(InstanceRole.MIXED, 1, tp),), latency)
        if latency.model in MODELS and not c.fits(c.groups[0]):
            continue
        out.append(tp)
    return out


def _goodput(ctx: _Ctx, cluster: ClusterConfig, start: float, what: str) -> float:
    key = (cluster,)
    r = ctx.cache.get(key)
    if r is None:
        ctx.progress(what)
        r = cluster_goodput(
            cluster, ctx.spec.workload, ctx.spec.slo, ctx.spec.target, start=start, rel_tol=ctx.spec.rel_tol
        )
        ctx.cache[key] = r
        ctx.searches += 1
    return r.rate


def plan(spec: PlanSpec, progress: bool = True) -> PlanReport:
    """Search placements for ``spec``; see the module docstring. ``progress`` shows a tqdm bar."""
    col_lat = spec.colocated_latency or spec.latency
    tps = _usable_tps(spec, spec.latency)
    col_tps = _usable_tps(spec, col_lat)
    if not tps and not col_tps:
        raise ValueError(
            f"{spec.latency.model} fits no TP degree of {spec.tp_options} within {spec.num_gpus} GPUs"
        )
    n_search = 2 * len(tps) + len(col_tps) + 2 * spec.verify_top
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_search, desc="plan", unit="search")

    def note(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    ctx = _Ctx(spec, note)
    model_len = _cluster(spec, (), spec.latency).model_len
    col_sched = (
        vllm_scheduler(model_len)
        if spec.colocated_scheduler is SchedulerPreset.VLLM
        else sarathi_scheduler(model_len)
    )
    phase: dict[tuple[str, int], float] = {}
    prev = {"colocated": 1.0, "prefill": 1.0, "decode": 1.0}
    for tp in col_tps:
        c = _cluster(spec, (InstanceGroup(InstanceRole.MIXED, 1, tp, col_sched),), col_lat)
        phase["colocated", tp] = prev["colocated"] = _goodput(
            ctx, c, max(prev["colocated"], 0.25), f"colocated TP{tp}"
        )
    for tp in tps:
        c = _cluster(
            spec,
            (InstanceGroup(InstanceRole.PREFILL, 1, tp), InstanceGroup(InstanceRole.DECODE, 0, tp)),
            spec.latency,
        )
        phase["prefill", tp] = prev["prefill"] = _goodput(
            ctx, c, max(prev["prefill"], 0.25), f"prefill TP{tp}"
        )
        c = _cluster(
            spec,
            (InstanceGroup(InstanceRole.PREFILL, 0, tp), InstanceGroup(InstanceRole.DECODE, 1, tp)),
            spec.latency,
        )
        phase["decode", tp] = prev["decode"] = _goodput(ctx, c, max(prev["decode"], 0.25), f"decode TP{tp}")

    g = spec.num_gpus
    col = [
        PlanEntry(
            Candidate((InstanceGroup(InstanceRole.MIXED, g // tp, tp, col_sched),)),
            (g // tp) * phase["colocated", tp],
        )
        for tp in col_tps
    ]
    dis = []
    for tp_p in tps:
        for tp_d in tps:
            for m in range(1, g // tp_p + 1):
                for n in range(1, (g - m * tp_p) // tp_d + 1):
                    est = min(m * phase["prefill", tp_p], n * phase["decode", tp_d])
                    groups = (
                        InstanceGroup(InstanceRole.PREFILL, m, tp_p),
                        InstanceGroup(InstanceRole.DECODE, n, tp_d),
                    )
                    dis.append(PlanEntry(Candidate(groups), est))

    def rank(entries: list[PlanEntry]) -> list[PlanEntry]:
        # per GPU first; fewer GPUs break ties (same efficiency, smaller purchase)
        return sorted(entries, key=lambda e: (-e.per_gpu, e.candidate.num_gpus))

    col, dis = rank(col), rank(dis)
    for entries, lat in ((col, col_lat), (dis, spec.latency)):
        for i in range(min(spec.verify_top, len(entries))):
            e = entries[i]
            c = _cluster(spec, e.candidate.groups, lat)
            entries[i] = replace(
                e, goodput=_goodput(ctx, c, max(e.estimate, 0.25), f"verify {e.candidate.label}")
            )
    verified_first = lambda es: sorted(es, key=lambda e: (not e.verified, -e.per_gpu, e.candidate.num_gpus))  # noqa: E731
    if bar is not None:
        bar.close()
    return PlanReport(spec, phase, tuple(verified_first(dis)), tuple(verified_first(col)), ctx.searches)
