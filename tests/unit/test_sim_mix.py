"""Several base models on one cluster in the simulator and planner (#16 part 3): the GPU split
(pure dynamic programme), the planner's per-model tables, and a mix simulated as one simulation
per model (exact: the models share no instance)."""

from __future__ import annotations

import pytest

from router.policy import SLO, InstanceRole
from simulator.cli import parse_mix_model
from simulator.config import ClusterConfig, InstanceGroup, SimConfig
from simulator.latency import LatencySource, LatencySpec
from simulator.mix import ModelDemand, best_by_gpus, plan_mix, simulate_mix, split_budget
from simulator.planner import Candidate, PlanEntry, PlanReport, PlanSpec
from simulator.sim import Simulation
from simulator.workload import RateSource

SLO_ = SLO(1.0, 0.2)


def _entry(groups: tuple[tuple[InstanceRole, int], ...], rate: float) -> PlanEntry:
    return PlanEntry(Candidate(tuple(InstanceGroup(r, n) for r, n in groups)), rate)


M, P, D = InstanceRole.MIXED, InstanceRole.PREFILL, InstanceRole.DECODE


def _report(per_replica: float, disagg: float, gpus: int) -> PlanReport:
    """A planner report: colocated replicas of ``per_replica`` req/s (listed at the whole
    budget, as the planner does) and a 1P+1D deployment of ``disagg`` req/s."""
    spec = PlanSpec(LatencySpec("fake"), gpus, RateSource(), SLO_)
    return PlanReport(
        spec,
        {("colocated", 1): per_replica},
        (_entry(((P, 1), (D, 1)), disagg),),
        (_entry(((M, gpus),), gpus * per_replica),),
    )


def test_best_by_gpus_fills_in_smaller_colocated_deployments():
    t = best_by_gpus(_report(per_replica=3.0, disagg=7.0, gpus=4), 4)
    assert t[0] is None
    assert (t[1].candidate.label, t[1].rate) == ("1xM(TP1)", 3.0)
    assert (t[2].candidate.label, t[2].rate) == ("1xP(TP1) + 1xD(TP1)", 7.0)  # beats 2 replicas (6)
    assert (t[4].candidate.label, t[4].rate) == ("4xM(TP1)", 12.0)


def test_split_budget_maximises_the_smallest_headroom():
    a = best_by_gpus(_report(per_replica=2.0, disagg=1.0, gpus=4), 4)  # 2 req/s per GPU
    b = best_by_gpus(_report(per_replica=1.0, disagg=1.0, gpus=4), 4)  # 1 req/s per GPU
    # a needs 4 req/s, b 2 req/s: 2 GPUs each gives both headroom 1.0; any other split less
    assert split_budget([a, b], [4.0, 2.0], 4) == [2, 2]
    # b's demand tripled: 1 GPU for a (headroom 0.5), 3 for b (0.5) beats 2/2 (1.0 and 0.33)
    assert split_budget([a, b], [4.0, 6.0], 4) == [1, 3]
    # plenty of GPUs: the smallest headroom does not grow past what the best deployments give
    assert sum(split_budget([a, b], [1.0, 1.0], 4)) <= 4
    with pytest.raises(ValueError, match="cannot hold a deployment of every one"):
        split_budget([a, b, a], [1.0, 1.0, 1.0], 2)


def test_plan_mix_splits_the_budget_from_each_models_plan():
    reports = {"a": _report(2.0, 1.0, 3), "b": _report(1.0, 1.0, 3)}
    seen: list[int] = []

    def fake_plan(spec: PlanSpec) -> PlanReport:
        seen.append(spec.num_gpus)
        return reports[spec.latency.model]

    ds = [
        ModelDemand("a", LatencySpec("a"), 2.0, RateSource(), SLO_),
        ModelDemand("b", LatencySpec("b"), 2.0, RateSource(), SLO_),
    ]
    p = plan_mix(ds, 4, verify=False, plan_fn=fake_plan)
    assert seen == [3, 3]  # each model may use the budget less one GPU per other model
    assert [c.num_gpus for c in p.choices] == [1, 3] or [c.num_gpus for c in p.choices] == [2, 2]
    assert p.headroom >= 1.0 and p.verified is None
    with pytest.raises(ValueError, match="distinct"):
        plan_mix([ds[0], ds[0]], 4, plan_fn=fake_plan)
    with pytest.raises(ValueError, match="each needs at least one"):
        plan_mix(ds, 1, plan_fn=fake_plan)
    with pytest.raises(ValueError, match="rate must be > 0"):
        ModelDemand("c", LatencySpec("c"), 0.0, RateSource(), SLO_)


def test_parse_mix_model():
    assert parse_mix_model("llama-2-7b:2.5") == ("llama-2-7b", 2.5)
    for bad in ("llama-2-7b", ":2", "m:x", "m:-1", "m:nan"):
        with pytest.raises(ValueError):
            parse_mix_model(bad)


def test_a_mix_simulates_as_each_model_alone_and_counts_every_request():
    """Two real latency models (Vidur Llama-2-7B, DistServe OPT-13B on A100), each on its own
    pools at its own rate: each model's part equals its simulation alone, and the mix's
    attainment is the request-weighted mean of the parts."""
    src = RateSource(duration_s=8.0, min_requests=20, max_requests=40)
    llama = ModelDemand("llama", LatencySpec("llama-2-7b", "a100"), 2.0, src, SLO_)
    opt = ModelDemand(
        "opt", LatencySpec("opt-13b", "a100", LatencySource.DISTSERVE), 1.0, src, SLO(0.3, 0.05)
    )
    c_llama = ClusterConfig(llama.latency, (InstanceGroup(M, 1),))
    c_opt = ClusterConfig(opt.latency, (InstanceGroup(P, 1), InstanceGroup(D, 1)))
    mix = simulate_mix([(llama, c_llama), (opt, c_opt)])
    alone = Simulation(c_opt, SimConfig(slo=opt.slo)).run(opt.workload.at_rate(opt.rate))
    (r_llama, r_opt) = mix.runs
    assert r_opt.attainment == alone.attainment(opt.slo)
    assert [r.arrival for r in r_opt.result.records] == [r.arrival for r in alone.records]
    assert mix.num_requests == r_llama.num_requests + r_opt.num_requests == 20 + 20  # min_requests each
    want = (
        r_llama.attainment * r_llama.num_requests + r_opt.attainment * r_opt.num_requests
    ) / mix.num_requests
    assert mix.attainment == pytest.approx(want) and mix.num_gpus == 3
    with pytest.raises(ValueError, match="distinct"):
        simulate_mix([(llama, c_llama), (llama, c_llama)])


def test_plan_mix_end_to_end_on_real_latency_models():
    """A 3-GPU budget for two models: every model gets a deployment, the budget holds, and the
    chosen deployments simulated whole meet the target at the demanded rates."""
    src = RateSource(duration_s=8.0, min_requests=20, max_requests=120)
    ds = [
        ModelDemand("llama", LatencySpec("llama-2-7b", "a100"), 1.0, src, SLO_),
        ModelDemand("opt", LatencySpec("opt-13b", "a100", LatencySource.DISTSERVE), 0.5, src, SLO_),
    ]
    p = plan_mix(ds, 3, tp_options=(1,), verify_top=1, rel_tol=0.2)
    assert sum(c.num_gpus for c in p.choices) <= 3 and all(c.num_gpus >= 1 for c in p.choices)
    assert p.headroom >= 1.0, p.table()
    assert p.verified is not None and p.verified.attainment >= 0.9, p.table()
    assert "mix SLO attainment" in p.table()
