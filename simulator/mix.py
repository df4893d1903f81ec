"""Several base models on one cluster (issue #16 part 3): simulate a mix, and plan the GPU split.

pdserve serves each base model from its own worker pools (a router keeps each model's policy state
apart, and a worker serves one model), so a mix of models shares the GPU budget but no instance: a
model's requests meet their SLOs or not according to its own pools and its own arrivals only.
Simulating the mix is therefore exact as one simulation per model (:func:`simulate_mix`), and
its SLO attainment is the mix's: the share of *all* requests (of every model) meeting their own
model's SLOs.

Planning (:func:`plan_mix`) splits a GPU budget between the models:

1. per model, :func:`simulator.planner.plan` over the whole budget gives every candidate deployment
   (disaggregated and colocated, instance counts and TP degrees) with its estimated goodput from
   phase goodputs; ``best(g)``, the model's highest goodput on at most ``g`` GPUs, follows;
2. a dynamic programme over the models chooses ``g_m`` (sum at most the budget) maximising the
   smallest headroom ``best_m(g_m) / rate_m`` (every model served at its demanded rate with the
   most margin; ties: fewer GPUs);
3. the chosen deployments are simulated whole, each at its model's rate (:func:`simulate_mix`),
   and the report gives each model's attainment and the mix's.

A mix can also be one arrival timeline whose requests each name their model
(:class:`MixedWorkload`: the per-model sources merged by :func:`mixed_workload`, or a Mooncake-format
JSONL trace with a ``model`` field per line, :func:`load_mixed_jsonl`). :func:`simulate_mixed`
routes each request to its model's pools as the router does (:func:`router.multi_model.choose_model`:
a request naming a model the cluster does not serve is refused with NOT_FOUND naming the served
models, never sent to another model's pools) and reports, per model and for the whole mix, the
requests, SLO attainment and goodput (requests that met their model's SLO per second of the
mix's arrival window): :meth:`MixResult.table`.

This is the placement an operator would do by hand for a fleet of fine-tunes or base models; the
heterogeneous-hardware planner (AlpaServe's model parallelism across models) builds on it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from router.policy import SLO, PolicyKind
from simulator.config import ClusterConfig, SimConfig
from simulator.latency import LatencySpec
from simulator.metrics import SimResult
from simulator.planner import Candidate, PlanEntry, PlanReport, PlanSpec, plan
from simulator.sim import Simulation
from simulator.workload import RateSource, Workload, WorkloadRequest


@dataclass(frozen=True)
class ModelDemand:
    """One model of the mix: its latency model (model and GPU), the request rate it must serve
    (requests/s), the shape of its requests, and its SLO."""

    name: str
    latency: LatencySpec
    rate: float
    workload: RateSource
    slo: SLO

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a model of the mix needs a name")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"model {self.name!r}: rate must be > 0 requests/s, got {self.rate}")


@dataclass(frozen=True)
class ModelRun:
    """One model's part of a mix simulation. ``window_s``: the arrival window its goodput is
    counted over (the mix's, for a mixed timeline; 0: its own requests' first to last arrival)."""

    name: str
    cluster: ClusterConfig
    result: SimResult
    slo: SLO
    window_s: float = 0.0

    @property
    def attainment(self) -> float:
        return self.result.attainment(self.slo)

    @property
    def num_requests(self) -> int:
        return len(self.result.records)

    @property
    def num_met(self) -> int:
        """Requests that met this model's SLO."""
        return sum(1 for r in self.result.records if r.meets(self.slo))

    @property
    def window(self) -> float:
        """Seconds of arrivals goodput is counted over (see the class doc)."""
        if self.window_s > 0:
            return self.window_s
        arrivals = [r.arrival for r in self.result.records]
        return max(arrivals) - min(arrivals) if len(arrivals) > 1 else 0.0

    @property
    def goodput(self) -> float:
        """Requests/s that met this model's SLO, over :attr:`window` (NaN without a window)."""
        w = self.window
        return self.num_met / w if w > 0 else math.nan

    def percentile(self, metric: str, q: float) -> float:
        """The ``q``-th percentile of ``metric`` (ttft, tpot, e2e) over its finished requests."""
        a = self.result.array(metric)
        a = a[np.isfinite(a)]
        return float(np.percentile(a, q)) if a.size else math.nan


@dataclass(frozen=True)
class MixResult:
    runs: tuple[ModelRun, ...]

    @property
    def num_requests(self) -> int:
        return sum(r.num_requests for r in self.runs)

    @property
    def attainment(self) -> float:
        """Share of every model's requests that met their own model's SLOs."""
        n = self.num_requests
        if not n:
            return 1.0
        return sum(r.attainment * r.num_requests for r in self.runs) / n

    @property
    def num_gpus(self) -> int:
        return sum(r.cluster.num_gpus for r in self.runs)

    @property
    def goodput(self) -> float:
        """Requests/s, of every model, that met their own model's SLO: the sum of the parts'."""
        return sum(r.goodput for r in self.runs if r.num_requests)

    def table(self) -> str:
        """One row per model (its pools, requests, attainment, goodput, p90 TTFT and TPOT), then
        the mix's."""
        lines = [
            f"{'model':<16} {'pools':<28} {'GPUs':>4} {'requests':>8} {'attained':>8} {'goodput':>8} "
            f"{'TTFT p90':>9} {'TPOT p90':>9}"
        ]
        for r in self.runs:
            label = Candidate(r.cluster.groups).label
            lines.append(
                f"{r.name:<16} {label:<28} {r.cluster.num_gpus:>4} {r.num_requests:>8} "
                f"{100 * r.attainment:>7.1f}% {r.goodput:>8.2f} {r.percentile('ttft', 90):>8.3f}s "
                f"{r.percentile('tpot', 90):>8.4f}s"
            )
        lines.append(
            f"{'mix':<16} {'':<28} {self.num_gpus:>4} {self.num_requests:>8} {100 * self.attainment:>7.1f}% "
            f"{self.goodput:>8.2f}"
        )
        return "\n".join(lines)


def simulate_mix(
    parts: Sequence[tuple[ModelDemand, ClusterConfig]], target: float = 0.9, max_sim_time_s: float = math.inf
) -> MixResult:
    """Simulate each model's pools on its own requests at its rate (see the module docstring: the
    pools share no instance, so this is the mix). Names must be distinct."""
    names = [d.name for d, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"model names of a mix must be distinct, got {names}")
    runs = []
    for d, cluster in parts:
        sim = Simulation(
            cluster, SimConfig(slo=d.slo, attainment_target=target, max_sim_time_s=max_sim_time_s)
        )
        runs.append(ModelRun(d.name, cluster, sim.run(d.workload.at_rate(d.rate)), d.slo))
    return MixResult(tuple(runs))


@dataclass(frozen=True, slots=True)
class TaggedRequest:
    """One request of a mixed timeline: the base model it names and its shape and arrival."""

    model: str
    request: WorkloadRequest


@dataclass(frozen=True)
class MixedWorkload:
    """One arrival timeline of requests that each name a base model (sorted by arrival)."""

    name: str
    requests: tuple[TaggedRequest, ...]

    def __post_init__(self) -> None:
        times = [t.request.arrival_s for t in self.requests]
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"mixed workload {self.name!r}: requests must be sorted by arrival")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def models(self) -> tuple[str, ...]:
        """The models the requests name, in order of first appearance."""
        return tuple(dict.fromkeys(t.model for t in self.requests))

    @property
    def duration_s(self) -> float:
        """First to last arrival, over every model's requests."""
        if len(self.requests) < 2:
            return 0.0
        return self.requests[-1].request.arrival_s - self.requests[0].request.arrival_s

    def route(self, served: Sequence[str]) -> dict[str, Workload]:
        """Each served model's requests (arrival times kept: the models share the timeline), by
        :func:`router.multi_model.choose_model` (a single served model takes requests naming
        none; a request naming a model not in ``served`` raises ModelNotFoundError naming the
        served models; with several, one naming none raises InvalidRequestError)."""
        from router.multi_model import choose_model

        out: dict[str, list[WorkloadRequest]] = {m: [] for m in served}
        for t in self.requests:
            out[choose_model(t.model, served)].append(t.request)
        return {m: Workload(f"{self.name}:{m}", tuple(rs)) for m, rs in out.items()}


def mixed_workload(demands: Sequence[ModelDemand], name: str = "mix") -> MixedWorkload:
    """Every model's requests at its rate (``demand.workload.at_rate(demand.rate)``), merged into
    one timeline by arrival (ties: the models' order). Names must be distinct. Goodput is counted
    over the merged window: give the sources one duration and no request floor
    (``RateSource(duration_s=T, min_requests=1)``) so that each model's arrivals span it."""
    names = [d.name for d in demands]
    if len(set(names)) != len(names):
        raise ValueError(f"model names of a mix must be distinct, got {names}")
    tagged = [
        (r.arrival_s, i, k, TaggedRequest(d.name, r))
        for i, d in enumerate(demands)
        for k, r in enumerate(d.workload.at_rate(d.rate).requests)
    ]
    tagged.sort(key=lambda x: x[:3])
    return MixedWorkload(name, tuple(t for *_, t in tagged))


def load_mixed_jsonl(path: str | Path, limit: int | None = None) -> MixedWorkload:
    """A Mooncake-format JSONL trace (``timestamp`` ms, ``input_length``, ``output_length``,
    optional ``hash_ids``) whose every line also names its ``model``; ValueError naming the line
    of one without a model (a request is never given a model the trace did not name)."""
    p = Path(path)
    rows: list[TaggedRequest] = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            d = json.loads(line)
            model = d.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError(
                    f"{p}:{lineno}: every request of a mixed trace names its model (field 'model')"
                )
            ids = d.get("hash_ids")
            req = WorkloadRequest(
                d["timestamp"] / 1000.0,
                int(d["input_length"]),
                max(1, int(d["output_length"])),
                tuple(ids) if ids is not None else None,
            )
            rows.append(TaggedRequest(model, req))
    rows.sort(key=lambda t: t.request.arrival_s)
    return MixedWorkload(p.stem, tuple(rows))


def simulate_mixed(
    workload: MixedWorkload,
    pools: Mapping[str, tuple[ClusterConfig, SLO]],
    target: float = 0.9,
    max_sim_time_s: float = math.inf,
) -> MixResult:
    """Route ``workload``'s requests to their models' pools (:meth:`MixedWorkload.route`; the
    refusals are its) and simulate each model's pools on its requests (``pools``: model -> its
    cluster and SLO, in report order). Goodput is counted over the mix's arrival window. A
    served model no request names runs nothing and reports 0 requests."""
    if not pools:
        raise ValueError("a mix needs at least one model's pools")
    routed = workload.route(list(pools))
    window = workload.duration_s
    runs = []
    for name, (cluster, slo) in pools.items():
        reqs = routed[name]
        if len(reqs):
            sim = Simulation(
                cluster, SimConfig(slo=slo, attainment_target=target, max_sim_time_s=max_sim_time_s)
            )
            result = sim.run(reqs)
        else:
            result = SimResult([], 0.0, 0.0, True, num_gpus=cluster.num_gpus)
        runs.append(ModelRun(name, cluster, result, slo, window))
    return MixResult(tuple(runs))


@dataclass(frozen=True)
class MixChoice:
    """One model's share of the budget: the deployment chosen, its goodput estimate, and the
    headroom ``goodput / rate`` (>= 1: it serves its demanded rate at the target)."""

    demand: ModelDemand
    entry: PlanEntry

    @property
    def num_gpus(self) -> int:
        return self.entry.candidate.num_gpus

    @property
    def headroom(self) -> float:
        return self.entry.rate / self.demand.rate


@dataclass(frozen=True)
class MixPlan:
    num_gpus: int
    choices: tuple[MixChoice, ...]
    verified: MixResult | None = None  # the choices simulated whole (None: not verified)

    @property
    def headroom(self) -> float:
        """The smallest model headroom (>= 1: every model meets its rate, by the estimates)."""
        return min((c.headroom for c in self.choices), default=0.0)

    def table(self) -> str:
        lines = [
            f"{'model':<16} {'configuration':<32} {'GPUs':>4} {'rate':>7} {'goodput':>8} {'headroom':>8} {'attained':>8}"
        ]
        runs = {r.name: r for r in self.verified.runs} if self.verified is not None else {}
        for c in self.choices:
            run = runs.get(c.demand.name)
            att = f"{100 * run.attainment:7.1f}%" if run is not None else "       -"
            lines.append(
                f"{c.demand.name:<16} {c.entry.candidate.label:<32} {c.num_gpus:>4} {c.demand.rate:>7.2f} "
                f"{c.entry.rate:>8.2f} {c.headroom:>8.2f} {att}"
            )
        used = sum(c.num_gpus for c in self.choices)
        tail = f"GPUs used {used} of {self.num_gpus}; smallest headroom {self.headroom:.2f}x"
        if self.verified is not None:
            tail += f"; mix SLO attainment {100 * self.verified.attainment:.1f}% (simulated)"
        lines.append(tail)
        return "\n".join(lines)


def best_by_gpus(report: PlanReport, num_gpus: int) -> list[PlanEntry | None]:
    """``out[g]``: the candidate of ``report`` with the highest goodput on at most ``g`` GPUs
    (fewer GPUs on ties), for ``g`` in ``0..num_gpus`` (None: none fits). Simulated goodputs
    where the planner verified a candidate, estimates from phase goodputs elsewhere."""
    entries = [*report.disaggregated, *report.colocated]
    # the planner lists colocated deployments only at the whole budget (budget // tp replicas):
    # fewer replicas, from the one-instance phase goodput, for smaller shares
    for e in report.colocated:
        (group,) = e.candidate.groups
        one = report.phase_goodput.get(("colocated", group.tp), 0.0)
        for k in range(1, group.count):
            entries.append(PlanEntry(Candidate((replace(group, count=k),)), k * one))
    out: list[PlanEntry | None] = [None] * (num_gpus + 1)
    for g in range(num_gpus + 1):
        fit = [e for e in entries if e.candidate.num_gpus <= g]
        if fit:
            out[g] = max(fit, key=lambda e: (e.rate, -e.candidate.num_gpus))
    return out


def split_budget(
    tables: Sequence[Sequence[PlanEntry | None]], rates: Sequence[float], num_gpus: int
) -> list[int]:
    """Pure: GPUs per model (sum <= ``num_gpus``) maximising ``min_m best_m(g_m).rate / rate_m``
    (``tables[m][g]`` from :func:`best_by_gpus`); among equal minima the fewest GPUs. Raises
    ValueError when the budget cannot give every model a deployment."""
    neg = -math.inf
    # dp[g] = (min headroom so far, -GPUs used, choice list) over the models seen, using <= g GPUs
    dp: list[tuple[float, int, tuple[int, ...]]] = [(math.inf, 0, ())] * (num_gpus + 1)
    for table, rate in zip(tables, rates, strict=True):
        new: list[tuple[float, int, tuple[int, ...]]] = [(neg, 0, ())] * (num_gpus + 1)
        for g in range(num_gpus + 1):
            best = (neg, 0, ())
            for k in range(1, g + 1):
                e = table[k]
                prev = dp[g - k]
                if e is None or prev[0] == neg:
                    continue
                used = e.candidate.num_gpus
                h = min(prev[0], e.rate / rate)
                cand = (h, prev[1] - used, (*prev[2], used))
                if (cand[0], cand[1]) > (best[0], best[1]):
                    best = cand
            new[g] = best
        dp = new
    h, _, split = dp[num_gpus]
    if h == neg or len(split) != len(tables):
        raise ValueError(f"{num_gpus} GPUs cannot hold a deployment of every one of the {len(tables)} models")
    return list(split)


def plan_mix(
    demands: Sequence[ModelDemand],
    num_gpus: int,
    *,
    target: float = 0.9,
    tp_options: tuple[int, ...] = (1, 2, 4, 8),
    policy: PolicyKind = PolicyKind.LEAST_LOADED,
    verify: bool = True,
    block_size: int = 16,
    rel_tol: float = 0.04,
    verify_top: int = 2,
    progress: bool = False,
    plan_fn: Callable[[PlanSpec], PlanReport] | None = None,
) -> MixPlan:
    """Split ``num_gpus`` between the models of ``demands`` (see the module docstring). ``plan_fn``
    replaces :func:`simulator.planner.plan` (tests)."""
    if not demands:
        raise ValueError("a mix needs at least one model")
    if num_gpus < len(demands):
        raise ValueError(f"{num_gpus} GPUs for {len(demands)} models: each needs at least one")
    names = [d.name for d in demands]
    if len(set(names)) != len(names):
        raise ValueError(f"model names of a mix must be distinct, got {names}")
    run = plan_fn or (lambda s: plan(s, progress=progress))
    tables = []
    for d in demands:
        spec = PlanSpec(
            latency=d.latency,
            num_gpus=num_gpus - (len(demands) - 1),  # the others need at least one GPU each
            workload=d.workload,
            slo=d.slo,
            target=target,
            tp_options=tp_options,
            policy=policy,
            block_size=block_size,
            rel_tol=rel_tol,
            verify_top=verify_top,
        )
        tables.append(best_by_gpus(run(spec), num_gpus))
    split = split_budget(tables, [d.rate for d in demands], num_gpus)
    choices = []
    for d, table, g in zip(demands, tables, split, strict=True):
        e = table[g]
        assert e is not None
        choices.append(MixChoice(d, e))
    out = MixPlan(num_gpus, tuple(choices))
    if not verify:
        return out
    parts = [
        (
            c.demand,
            ClusterConfig(c.demand.latency, c.entry.candidate.groups, block_size=block_size, policy=policy),
        )
        for c in choices
    ]
    return replace(out, verified=simulate_mix(parts, target))


__all__ = [
    "MixChoice",
    "MixPlan",
    "MixResult",
    "MixedWorkload",
    "ModelDemand",
    "ModelRun",
    "TaggedRequest",
    "best_by_gpus",
    "load_mixed_jsonl",
    "mixed_workload",
    "plan_mix",
    "simulate_mix",
    "simulate_mixed",
    "split_budget",
]
