"""Several base models on one cluster in the simulator and planner (#16 part 3): the GPU split
(pure dynamic programme), the planner's per-model tables, and a mix simulated as one simulation
per model (exact: the models share no instance)."""

from __future__ import annotations

import json
import math

import pytest

from pdserve.errors import InvalidRequestError, ModelNotFoundError
from router.policy import SLO, InstanceRole
from simulator.cli import parse_mix_model
from simulator.config import ClusterConfig, InstanceGroup, SimConfig
from simulator.latency import LatencySource, LatencySpec
from simulator.mix import (
    MixedWorkload,
    ModelDemand,
    TaggedRequest,
    best_by_gpus,
    load_mixed_jsonl,
    mixed_workload,
    plan_mix,
    simulate_mix,
    simulate_mixed,
    split_budget,
)
from simulator.planner import Candidate, PlanEntry, PlanReport, PlanSpec
from simulator.sim import Simulation
from simulator.workload import LengthDistribution, LengthKind, RateSource, WorkloadRequest

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


def _fixed_source(input_len: int, seed: int) -> RateSource:
    """A small synthetic source whose prompts all have ``input_len`` tokens (a model's requests
    are recognisable by their length in any run's records)."""
    return RateSource(
        input_len=LengthDistribution(LengthKind.FIXED, input_len),
        output_len=LengthDistribution(LengthKind.FIXED, 24),
        duration_s=8.0,
        min_requests=16,
        max_requests=40,
        seed=seed,
    )


LLAMA = ModelDemand("llama", LatencySpec("llama-2-7b", "a100"), 3.0, _fixed_source(128, 1), SLO_)
OPT = ModelDemand(
    "opt", LatencySpec("opt-13b", "a100", LatencySource.DISTSERVE), 1.5, _fixed_source(384, 2), SLO(0.3, 0.05)
)


def test_a_mixed_timeline_merges_the_models_and_routes_each_request_to_its_models_pools():
    mixed = mixed_workload([LLAMA, OPT])
    times = [t.request.arrival_s for t in mixed.requests]
    assert times == sorted(times) and mixed.models == ("llama", "opt")
    routed = mixed.route(["llama", "opt"])
    for d in (LLAMA, OPT):  # each model's part is exactly its own source at its rate
        assert routed[d.name].requests == d.workload.at_rate(d.rate).requests
    assert len(mixed) == sum(len(w) for w in routed.values())
    # routed as the router routes: an unserved model is NOT_FOUND naming the served ones
    with pytest.raises(ModelNotFoundError, match="unknown model 'opt'; this cluster serves 'llama'"):
        mixed.route(["llama"])
    one = MixedWorkload("x", (TaggedRequest("", WorkloadRequest(0.0, 8, 2)),))
    assert len(one.route(["only"])["only"]) == 1  # a single-model cluster takes a request naming none
    with pytest.raises(InvalidRequestError, match="serves several models"):
        one.route(["a", "b"])
    with pytest.raises(ValueError, match="sorted by arrival"):
        MixedWorkload(
            "x",
            (TaggedRequest("a", WorkloadRequest(1.0, 8, 2)), TaggedRequest("a", WorkloadRequest(0.0, 8, 2))),
        )
    with pytest.raises(ValueError, match="distinct"):
        mixed_workload([LLAMA, LLAMA])


def test_simulate_mixed_equals_each_models_pools_alone_with_per_model_goodput():
    """Two real latency models on their own pools fed from one mixed timeline: each model's part
    equals its pools simulated alone on its requests (no request crosses to the other model's
    pools: each run holds only its model's prompt length); goodput = SLO-met requests over the
    mix's arrival window, the mix's the sum."""
    c_llama = ClusterConfig(LLAMA.latency, (InstanceGroup(M, 1),))
    c_opt = ClusterConfig(OPT.latency, (InstanceGroup(P, 1), InstanceGroup(D, 1)))
    mixed = mixed_workload([LLAMA, OPT])
    res = simulate_mixed(mixed, {"llama": (c_llama, LLAMA.slo), "opt": (c_opt, OPT.slo)})
    r_llama, r_opt = res.runs
    assert {r.input_len for r in r_llama.result.records} == {128}
    assert {r.input_len for r in r_opt.result.records} == {384}
    alone = Simulation(c_opt, SimConfig(slo=OPT.slo)).run(mixed.route(["llama", "opt"])["opt"])
    assert r_opt.attainment == alone.attainment(OPT.slo)
    assert [r.ttft for r in r_opt.result.records] == [r.ttft for r in alone.records]
    met = sum(1 for r in alone.records if r.meets(OPT.slo))
    assert r_opt.num_met == met and r_opt.goodput == pytest.approx(met / mixed.duration_s)
    assert res.num_requests == len(mixed) and res.num_gpus == 3
    assert res.goodput == pytest.approx(r_llama.goodput + r_opt.goodput)
    assert 0 < res.goodput <= len(mixed) / mixed.duration_s
    table = res.table()
    assert table.splitlines()[1].startswith("llama") and "1xP(TP1) + 1xD(TP1)" in table
    assert table.splitlines()[-1].startswith("mix")
    # a served model no request names: nothing run, reported with 0 requests
    idle = simulate_mixed(
        MixedWorkload("x", tuple(t for t in mixed.requests if t.model == "llama")),
        {"llama": (c_llama, LLAMA.slo), "opt": (c_opt, OPT.slo)},
    )
    assert idle.runs[1].num_requests == 0 and math.isclose(idle.goodput, idle.runs[0].goodput)


def test_load_mixed_jsonl_reads_each_requests_model_and_refuses_a_line_without_one(tmp_path):
    path = tmp_path / "mix.jsonl"
    rows = [
        {"timestamp": 500, "input_length": 64, "output_length": 8, "model": "b"},
        {"timestamp": 0, "input_length": 32, "output_length": 0, "model": "a", "hash_ids": [1]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = load_mixed_jsonl(path)
    assert [(t.model, t.request.arrival_s, t.request.output_len) for t in w.requests] == [
        ("a", 0.0, 1),
        ("b", 0.5, 8),
    ]
    assert w.requests[0].request.hash_ids == (1,) and w.duration_s == 0.5
    path.write_text(json.dumps({"timestamp": 0, "input_length": 4, "output_length": 2}) + "\n")
    with pytest.raises(ValueError, match=r"mix.jsonl:1: every request of a mixed trace names its model"):
        load_mixed_jsonl(path)


def test_parse_pools_and_mix_pools():
    from simulator.cli import parse_mix_pools, parse_pools

    assert [(g.role, g.count, g.tp) for g in parse_pools("1P2D")] == [(P, 1, 1), (D, 2, 1)]
    assert [(g.role, g.count) for g in parse_pools("3M")] == [(M, 3)]
    assert [g.role for g in parse_pools("1P1D1M")] == [P, D, M]
    for bad in ("", "P1", "1P", "2D", "1P1P1D", "0M", "1X", "1P2Dx"):
        with pytest.raises(ValueError, match="pools"):
            parse_pools(bad)
    name, groups, rate = parse_mix_pools("llama-2-7b:1P1D:2.5", with_rate=True)
    assert (name, len(groups), rate) == ("llama-2-7b", 2, 2.5)
    assert parse_mix_pools("opt-13b:2M", with_rate=False)[2] is None
    for bad, with_rate in (("m:1P1D", True), ("m:1P1D:2", False), (":2M:1", True), ("m:2M:0", True)):
        with pytest.raises(ValueError):
            parse_mix_pools(bad, with_rate)


def test_simulate_mix_command_on_a_trace(tmp_path, capsys):
    """``simulate-mix --trace``: the trace's requests routed by their model field, a table row per
    model and the mix's; a request naming a model without pools is refused, naming the served."""
    from simulator.cli import main

    rows = [
        {"timestamp": 250 * i, "input_length": 64, "output_length": 8, "model": m}
        for i, m in enumerate(["llama-2-7b", "opt-13b"] * 6)
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["simulate-mix", "--trace", str(trace), "--model", "llama-2-7b:1P1D", "--model", "opt-13b:1M"]
    assert main([*args, "--ttft", "5", "--tpot", "1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("2 models on their own pools (a100), 12 requests")
    assert lines[2].split()[:1] == ["llama-2-7b"] and lines[3].split()[:1] == ["opt-13b"]
    assert lines[4].split()[:3] == ["mix", "3", "12"]
    data = json.loads((tmp_path / "o" / "simulate_mix.json").read_text())
    assert [m["requests"] for m in data["models"]] == [6, 6] and data["attainment"] == 1.0
    assert data["goodput"] == pytest.approx(12 / 2.75)  # every request met, over the 2.75 s window
    with pytest.raises(ModelNotFoundError, match="unknown model 'opt-13b'; this cluster serves 'llama-2-7b'"):
        main(["simulate-mix", "--trace", str(trace), "--model", "llama-2-7b:1P1D"])
