"""Weight and KV offloading in the simulator (issue #15 part 4, simulator/offload.py): placements
from the engine's cost model, the KV pool growing with what offloading frees, each step priced by
engine.offload_policy.predict_step_s, refusals of inconsistent budgets, and the CLI flags. All on
the simulated clock (deterministic)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from engine.offload_policy import (
    OffloadCostModel,
    OffloadPolicyError,
    WeightTier,
    kv_step_cost,
    pick_offline_batch_size,
    place_kv,
    predict_step_s,
    split_device_budget,
    staging_bound,
)
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig, SchedulingPolicy
from pdserve.cli import main
from router.policy import SLO, InstanceRole
from simulator.adapters import AdapterConfig
from simulator.config import ClusterConfig, InstanceGroup, SimConfig, colocated, vllm_scheduler
from simulator.events import EventLoop
from simulator.instance import SimInstance
from simulator.latency import LatencySpec
from simulator.models import ModelSpec, model_spec
from simulator.offload import GIB, SimOffloadConfig, other_share, plan_offload
from simulator.sim import Simulation
from simulator.workload import Workload, WorkloadRequest
from tests.sim_fakes import LinearLatency

# 4 layers of 100,000 parameters (200,000 bytes), embedding + LM head 12,800 parameters (25,600
# bytes); K and V of one token over all layers: 2 * 4 * 4 * 16 * 2 = 1024 bytes
TINY = ModelSpec("tiny", 4, 64, 4, 4, 128, 100, 412_800.0, 2048)
SPEC = LatencySpec("llama-2-7b", "a100")


def _gib(nbytes: int) -> float:
    return (nbytes + 0.5) / GIB  # rounds back to nbytes under int(gib * GIB)


def StepLatency() -> LinearLatency:
    """10 ms per step + 1 ms per prefill token + 0.1 ms per decode (a fake, monotone model)."""
    return LinearLatency(TINY.kv_bytes_per_token)


def _tiny_plan(cfg: SimOffloadConfig, usable: int = 2_000_000):
    return plan_offload(cfg, TINY, usable, 16, None, 8, 0.0)


def _instance(plan, sched: SchedulerConfig, loop: EventLoop, steps: list[tuple[float, float]]) -> SimInstance:
    """A mixed instance of ``plan``'s pool (block size 16) that appends each step's (start, end)
    to ``steps``."""
    return SimInstance(
        "mixed0",
        InstanceRole.MIXED,
        sched,
        plan.num_blocks,
        16,
        StepLatency(),
        loop,
        lambda rep: steps.append((rep.start, rep.end)),
        offload=plan,
    )


# ----------------------------------------------------------------------------- placement
def test_tiny_plan_places_weights_and_kv_as_the_engine_policy_does() -> None:
    plan = _tiny_plan(
        SimOffloadConfig(
            weight_budget_gib=_gib(650_000),
            weight_host_gib=_gib(200_000),
            kv_budget_gib=_gib(100_000),
            kv_host_gib=_gib(1_000_000),
        )
    )
    # 650,000 - (25,600 + 2 slots of 200,000) leaves one resident layer; one on host, two on disk
    tiers = plan.weights.tiers
    assert tiers.count(WeightTier.DEVICE) == 1
    assert tiers.count(WeightTier.HOST) == 1 and tiers.count(WeightTier.DISK) == 2
    # one block of one layer: 16 * 1024 / 4 = 4096 bytes. 4 layers' KV off (two staging buffers of
    # 12 blocks = 98,304 <= 100,000) beats 3 off (8 blocks) and none (6 blocks)
    assert plan.kv.block_bytes == 4096
    assert plan.num_blocks == 12 and plan.kv.offloaded == (0, 1, 2, 3)
    assert plan.kv.device_bytes <= 100_000 and plan.kv.host_bytes <= 1_000_000


def test_simulated_step_time_is_the_engine_cost_models_prediction() -> None:
    """A simulated instance with offloaded weights and KV: each step lasts what
    engine.offload_policy.predict_step_s predicts for the same placement, compute and KV copies."""
    cfg = SimOffloadConfig(
        weight_budget_gib=_gib(650_000),
        weight_host_gib=_gib(200_000),
        kv_budget_gib=_gib(100_000),
        kv_host_gib=_gib(1_000_000),
        host_gb_s=0.005,
        disk_gb_s=0.001,
    )
    plan = _tiny_plan(cfg)
    loop = EventLoop()
    steps: list[tuple[float, float]] = []
    sched = SchedulerConfig(
        max_num_batched_tokens=512, max_num_seqs=8, long_prefill_token_threshold=0, max_model_len=192
    )
    inst = _instance(plan, sched, loop, steps)
    inst.submit(Request("r", range(40), SamplingParams(max_tokens=3, ignore_eos=True), arrival_time=0.0))
    loop.run()
    assert len(steps) == 3
    share = TINY.vocab_size * TINY.hidden / TINY.num_params
    layer_bytes = [200_000] * 4
    # (prefill 40 tokens: 3 blocks held), then two decodes (41 and 42 tokens: 3 blocks)
    for (start, end), (base, held, new) in zip(
        steps, [(0.01 + 0.040, 3, 40), (0.01 + 1e-4, 3, 1), (0.01 + 1e-4, 3, 1)], strict=True
    ):
        kv = kv_step_cost(plan.kv, held, new, 16, 0.005e9)
        want = predict_step_s(
            plan.weights.tiers,
            layer_bytes,
            [base * (1 - share) / 4] * 4,
            0.005e9,
            0.001e9,
            base * share,
            kv=kv,
        )
        assert want > base * 2  # the copies dominate at these bandwidths
        assert end - start == pytest.approx(want, rel=1e-12)
    assert inst.stats.offload_s == pytest.approx(sum(e - s for s, e in steps) - (0.05 + 0.0202), rel=1e-9)
    assert inst.kv.num_free_blocks == plan.num_blocks


def test_step_time_with_disk_kv_layers_and_bounded_staging_is_the_engine_prediction() -> None:
    """Disk-backed KV layers (host budget of one layer's pool) and staging buffers bounded by
    max_num_seqs x max_model_len (13 of 100 blocks): each simulated step lasts predict_step_s with
    kv_step_cost of the blocks the step's requests use (what the engine stages: here block 0 too,
    a decode table's padding, although its owner finished), disk layers at the disk bandwidth."""
    cfg = SimOffloadConfig(
        weight_budget_gib=_gib(650_000),
        weight_host_gib=_gib(200_000),
        kv_budget_gib=_gib(2 * 13 * 4096),  # two staging buffers of 13 blocks
        kv_host_gib=_gib(100 * 4096),  # one layer's pool of 100 blocks
        kv_disk_gib=_gib(3 * 100 * 4096),  # the other three
        host_gb_s=0.005,
        disk_gb_s=0.001,
    )
    plan = plan_offload(cfg, TINY, 2_000_000, 16, None, 3, 0.0, 64)
    assert plan.kv.staging == staging_bound(100, 16, 3, 64) == 13 and plan.num_blocks == 100
    assert plan.kv.offloaded == (0, 1, 2, 3) and plan.kv.disk == (1, 2, 3)  # layer 0 kept on the host
    assert plan.kv.host_bytes == 100 * 4096 and plan.kv.disk_bytes == 300 * 4096
    assert plan.kv == place_kv(4, 100, 4096, 2 * 13 * 4096, 13, 100 * 4096)
    # whole-pool staging (max_model_len 2048: 3 x 128 + 1 blocks > the pool) fits only 13 blocks
    assert plan_offload(cfg, TINY, 2_000_000, 16, None, 3, 0.0, 2048).num_blocks == 13
    # a max_model_len over the model's is capped by it, as LLMEngine.max_model_len
    assert plan_offload(cfg, TINY, 2_000_000, 16, None, 3, 0.0, 10**6).num_blocks == 13
    loop = EventLoop()
    steps: list[tuple[float, float]] = []
    sched = SchedulerConfig(
        max_num_batched_tokens=512, max_num_seqs=3, long_prefill_token_threshold=0, max_model_len=64
    )
    inst = _instance(plan, sched, loop, steps)
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    inst.submit(
        Request("x", range(200, 210), SamplingParams(max_tokens=1, ignore_eos=True), arrival_time=0.0)
    )
    inst.submit(Request("a", range(40), sp, arrival_time=0.0))
    inst.submit(Request("b", range(100, 120), sp, arrival_time=0.0))
    loop.run()
    assert len(steps) == 4
    share = TINY.vocab_size * TINY.hidden / TINY.num_params
    # step 1: x alone (submitted first: 10 tokens, block 0), which finishes; step 2: prefills of
    # a (40 tokens: 3 blocks) and b (20: 2 blocks); steps 3-4: decodes of a (3 blocks) and b (2):
    # the shorter table is padded with block 0, so the engine stages 6 blocks, the KV manager
    # holding 5
    for (start, end), (base, held, new) in zip(
        steps,
        [(0.01 + 0.010, 1, 10), (0.01 + 0.060, 5, 60), (0.01 + 2e-4, 6, 2), (0.01 + 2e-4, 6, 2)],
        strict=True,
    ):
        kv = kv_step_cost(plan.kv, held, new, 16, 0.005e9, 0.001e9)
        assert kv.disk_layers == (1, 2, 3) and kv.disk_read_s == pytest.approx(5 * kv.read_s)

        def want(c=kv, b=base):
            return predict_step_s(
                plan.weights.tiers,
                [200_000] * 4,
                [b * (1 - share) / 4] * 4,
                0.005e9,
                0.001e9,
                b * share,
                kv=c,
            )

        assert end - start == pytest.approx(want(), rel=1e-12)
        # the old pricing (every block held, all at the host bandwidth) gives another time
        old = kv_step_cost(plan.kv, min(held, 5), new, 16, 0.005e9, 0.005e9)
        assert abs(want(old) - (end - start)) > 1e-3
    assert inst.kv.num_free_blocks == plan.num_blocks


def test_device_budget_split_gets_the_staging_bound_and_the_host_budget() -> None:
    """device_budget_gib: the split is engine.offload_policy.split_device_budget with the inputs
    engine.offload.apply_device_budget gives it (staging buffers of staging_bound blocks, a step
    using every staged block, the host budget; the KV beyond it on disk)."""
    sched = vllm_scheduler(640, 64)
    cfg = SimOffloadConfig(device_budget_gib=20.0, kv_host_gib=2.0)
    c = colocated(SPEC, 1, scheduler=sched, max_model_len=640, offload=cfg, kv_blocks=3000)
    plan = c.offload_plan(c.groups[0])
    assert plan is not None
    m = model_spec("llama-2-7b")
    fixed = int(m.non_layer_params * m.dtype_bytes)
    lb = int(m.weight_bytes - fixed) // 32
    decode = c.latency_model(1).decode_time(64, 64)
    share = other_share(m)
    cost = OffloadCostModel(
        (lb,) * 32,
        tuple(decode * (1 - share) / 32 for _ in range(32)),
        fixed,
        20 * GIB,
        25e9,
        3e9,
        decode * share,
    )
    stb = staging_bound(3000, 16, 64, 640)
    assert stb == 64 * 40 + 1 < 3000
    bpl = 16 * m.kv_bytes_per_token // 32
    split = split_device_budget(
        cost, 3000, bpl, stb, 64, 16, staging_blocks=stb, kv_host_budget_bytes=2 * GIB
    )
    assert plan.kv == split.kv and plan.weights == split.weights
    assert plan.kv.staging == stb and plan.kv.disk and plan.kv.host_bytes <= 2 * GIB


def test_kv_disk_tier_grows_the_pool_beyond_the_host_budget() -> None:
    host = colocated(SPEC, 1, offload=SimOffloadConfig(kv_host_gib=16.0))
    both = colocated(SPEC, 1, offload=SimOffloadConfig(kv_host_gib=16.0, kv_disk_gib=48.0))
    ph, pb = host.offload_plan(host.groups[0]), both.offload_plan(both.groups[0])
    assert ph is not None and pb is not None
    assert not ph.kv.disk and pb.kv.disk and pb.num_blocks > ph.num_blocks
    assert pb.kv.host_bytes <= 16 * GIB and pb.kv.disk_bytes <= 48 * GIB
    assert set(pb.kv.disk) < set(pb.kv.offloaded) and pb.kv.offloaded[0] not in pb.kv.disk
    # the staging buffers are bounded by the instance scheduler's max_num_seqs x max_model_len
    c = colocated(SPEC, 1, scheduler=vllm_scheduler(640, 64), offload=SimOffloadConfig(kv_host_gib=64.0))
    p = c.offload_plan(c.groups[0])
    assert p is not None and p.kv.staging == 64 * 40 + 1 < p.num_blocks


def test_nothing_offloaded_keeps_the_latency_models_step() -> None:
    plan = _tiny_plan(SimOffloadConfig(weight_budget_gib=_gib(900_000)))
    assert not plan.offloads and plan.step_s(0.123, 5, 7) == 0.123


# ----------------------------------------------------------------------------- capacity
def _blocks(**kw) -> int:
    c = colocated(SPEC, 1, offload=SimOffloadConfig(**kw))
    return c.kv_blocks_for(c.groups[0])


def test_offloading_weights_grows_the_kv_pool_by_the_freed_memory() -> None:
    base = colocated(SPEC, 1)
    resident = base.kv_blocks_for(base.groups[0])
    m = model_spec("llama-2-7b")
    assert _blocks(weight_budget_gib=m.weight_bytes / GIB + 1) == resident  # budget holds everything
    half = colocated(SPEC, 1, offload=SimOffloadConfig(weight_budget_gib=6.0))
    plan = half.offload_plan(half.groups[0])
    assert plan is not None and len(plan.weights.offloaded) > 0
    freed = m.weight_bytes - plan.weights.device_bytes
    block = 16 * m.kv_bytes_per_token
    assert plan.num_blocks - resident == pytest.approx(freed / block, abs=1)
    assert _blocks(weight_budget_gib=3.0) > plan.num_blocks


def test_kv_host_memory_grows_the_pool_monotonically() -> None:
    base = colocated(SPEC, 1)
    resident = base.kv_blocks_for(base.groups[0])
    got = [_blocks(kv_host_gib=h) for h in (0.0, 20.0, 60.0, 200.0)]
    assert got[0] == resident
    assert got == sorted(got) and got[-1] > 2 * resident
    c = colocated(SPEC, 1, offload=SimOffloadConfig(kv_host_gib=60.0))
    plan = c.offload_plan(c.groups[0])
    assert plan is not None and plan.kv.host_bytes <= 60 * GIB and len(plan.kv.offloaded) >= 3


def test_device_budget_is_split_by_the_engine_policy() -> None:
    c = colocated(SPEC, 1, offload=SimOffloadConfig(device_budget_gib=20.0), kv_blocks=3000)
    plan = c.offload_plan(c.groups[0])
    assert plan is not None and plan.num_blocks == 3000
    assert plan.device_bytes <= 20 * GIB and plan.offloads


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"weight_budget_gib": -1.0}, "weight_budget_gib"),
        ({"kv_host_gib": math.inf}, "kv_host_gib"),
        ({"weight_budget_gib": 5.0, "host_gb_s": 0.0}, "host_gb_s"),
        ({"device_budget_gib": 20.0, "weight_budget_gib": 5.0}, "contradicts weight_budget_gib"),
        (
            {"device_budget_gib": 20.0, "kv_host_gib": 5.0, "kv_disk_gib": 5.0},
            "kv_disk_gib with device_budget_gib",
        ),
        ({"kv_budget_gib": 1.0, "kv_disk_gib": 5.0}, "kv_disk_gib needs kv_host_gib"),
        ({"kv_host_gib": 1.0, "kv_disk_gib": -1.0}, "kv_disk_gib must be"),
        ({"weight_host_gib": 5.0}, "weight_host_gib needs weight offloading"),
        ({}, "sets no budget"),
    ],
)
def test_offload_config_refuses(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimOffloadConfig(**kw)


@pytest.mark.parametrize(
    ("cfg", "kw", "match"),
    [
        (SimOffloadConfig(weight_budget_gib=100.0), {}, "exceeds the 70.00 GiB"),
        (SimOffloadConfig(weight_budget_gib=0.5), {}, "below the minimum"),
        (SimOffloadConfig(weight_budget_gib=6.0, kv_budget_gib=65.0), {}, "kv_budget_gib 65.0 exceeds"),
        (SimOffloadConfig(kv_budget_gib=1e-4, kv_host_gib=10.0), {}, "no room for one KV block"),
        (SimOffloadConfig(kv_budget_gib=0.1), {"kv_blocks": 1000}, "KV memory budget .* below the minimum"),
        (SimOffloadConfig(device_budget_gib=20.0), {}, "needs ClusterConfig.kv_blocks"),
        (SimOffloadConfig(kv_host_gib=10.0), {"kv_blocks": 100}, "needs kv_budget_gib"),
        (
            SimOffloadConfig(kv_budget_gib=1.0, kv_host_gib=1.0, kv_disk_gib=10.0),
            {"kv_blocks": 100},
            "kv_disk_gib sizes the KV pool, ClusterConfig.kv_blocks sets it",
        ),
    ],
)
def test_cluster_config_refuses_budgets_that_do_not_fit(cfg: SimOffloadConfig, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        colocated(SPEC, 1, offload=cfg, **kw)


def test_cluster_config_refuses_what_the_engine_refuses() -> None:
    off = SimOffloadConfig(weight_budget_gib=6.0)
    with pytest.raises(ValueError, match="tensor parallelism"):
        colocated(SPEC, 1, tp=2, offload=off)
    with pytest.raises(ValueError, match="LoRA with offloaded weights"):
        colocated(SPEC, 1, offload=off, adapters=AdapterConfig(num_adapters=4))
    with pytest.raises(ValueError, match="model's shape"):
        ClusterConfig(LatencySpec("my-profiled-model"), (InstanceGroup(InstanceRole.MIXED, 1),), offload=off)
    assert issubclass(OffloadPolicyError, ValueError)


# ----------------------------------------------------------------------------- whole runs
def _workload(n: int = 40, rate: float = 4.0, output: int = 64) -> Workload:
    return Workload("offload", tuple(WorkloadRequest(i / rate, 200 + 10 * (i % 7), output) for i in range(n)))


def _run(offload: SimOffloadConfig | None, wl: Workload | None = None):
    c = colocated(SPEC, 1, offload=offload)
    return Simulation(c, SimConfig(slo=SLO(5.0, 1.0))).run(wl or _workload())


def test_offloaded_instance_decodes_slower_and_runs_are_deterministic() -> None:
    resident = _run(None)
    off = SimOffloadConfig(weight_budget_gib=6.0)
    a, b = _run(off), _run(off)
    assert [(r.first_token, r.finish) for r in a.records] == [(r.first_token, r.finish) for r in b.records]
    assert a.num_finished == resident.num_finished == 40
    st = a.instance_stats["mixed0"]
    assert st["offload_s"] > 0 and st["weight_layers_offloaded"] > 0 and st["kv_layers_offloaded"] == 0
    assert "offload_s" not in resident.instance_stats["mixed0"]
    tpot = a.summary()["tpot_mean"]
    assert tpot > 3 * resident.summary()["tpot_mean"]


def test_kv_offload_trades_step_time_for_capacity_under_memory_pressure() -> None:
    """A KV budget of 300 blocks' worth: without host memory the pool is 300 blocks and the batch
    preempts; with 16 GiB of host KV the pool is several times larger and nothing is preempted,
    each step paying the KV copies."""
    block = 16 * model_spec("llama-2-7b").kv_bytes_per_token
    budget = 300 * block / GIB
    burst = _workload(rate=400.0, output=256)  # 40 requests at once: ~30 blocks each at the end
    small = _run(SimOffloadConfig(kv_budget_gib=budget), burst)
    big = _run(SimOffloadConfig(kv_budget_gib=budget, kv_host_gib=16.0), burst)
    s, b = small.instance_stats["mixed0"], big.instance_stats["mixed0"]
    assert s["kv_blocks"] == 300 and b["kv_blocks"] > 3 * 300
    assert s["preemptions"] > 0 and b["preemptions"] == 0
    assert b["kv_layers_offloaded"] >= 3 and b["offload_s"] > 0
    assert small.num_finished == big.num_finished == 40


def test_other_share_is_the_lm_heads_share() -> None:
    m = model_spec("llama-2-7b")
    assert other_share(m) == pytest.approx(32000 * 4096 / 6.74e9)
    assert model_spec("opt-13b").non_layer_params == 50272 * 5120  # tied embeddings


# ----------------------------------------------------------------------------- CLI
def test_simulate_cli_offload_flags(capsys) -> None:
    base = ["simulate", "--model", "llama-2-7b", "--num-requests", "20", "--rate", "4", "--quiet"]
    assert main([*base, "--weight-budget-gib", "6"]) == 0
    out = capsys.readouterr().out
    assert "mixed: offload: weights 20/32 layers off the device" in out
    assert main([*base, "--weight-budget-gib", "100"]) == 2
    assert "--weight-budget-gib 100.0 exceeds" in capsys.readouterr().err
    assert main([*base, "--weight-host-gib", "2"]) == 2
    assert "--weight-host-gib needs weight offloading" in capsys.readouterr().err
    assert main([*base, "--device-budget-gib", "20"]) == 2
    assert "--device-budget-gib needs --kv-blocks" in capsys.readouterr().err
    assert main([*base, "--offload-disk-gbs", "1"]) == 2
    assert "need an offloading budget" in capsys.readouterr().err
    assert main([*base, "--kv-host-gib", "4", "--kv-disk-gib", "12"]) == 0
    assert "KV 6/32 layers off the device (host 2.05 GiB, disk 5 layers 10.26 GiB)" in capsys.readouterr().out
    assert main([*base, "--kv-disk-gib", "12"]) == 2
    assert "--kv-disk-gib needs --kv-host-gib" in capsys.readouterr().err


# ----------------------------------------------------------------------------- offline batch
def test_offline_batch_is_the_engine_policys_choice() -> None:
    """EngineConfig.offline_batch in the simulator: max_num_seqs becomes
    pick_offline_batch_size's choice for the placement, bounded by max_num_seqs and the pool."""
    sched = vllm_scheduler(1024, 512)
    c = colocated(
        SPEC, 1, scheduler=sched, offload=SimOffloadConfig(weight_budget_gib=6.0, offline_batch=True)
    )
    g = c.groups[0]
    plan = c.offload_plan(g)
    assert plan is not None
    lat = c.latency_model(1)
    per = lat.decode_time(512, 512) / 512 * (1 - other_share(model_spec("llama-2-7b"))) / 32
    off = set(plan.weights.offloaded)
    lb = [b if i in off else 0 for i, b in enumerate(plan.layer_bytes)]
    want = pick_offline_batch_size(plan.weights.tiers, lb, [0.0] * 32, [per] * 32, 25e9, 3e9, 512)
    assert c.offline_batch_for(g) == want
    assert c.scheduler_for(g).max_num_seqs == want.batch_size < 512
    # the instance runs with it
    res = Simulation(c, SimConfig(slo=SLO(1e9, 1e9))).run(_workload(n=600, rate=1e6, output=8))
    assert res.num_finished == 600
    # without offline_batch the scheduler is the one given
    plain = colocated(SPEC, 1, scheduler=sched, offload=SimOffloadConfig(weight_budget_gib=6.0))
    assert plain.scheduler_for(plain.groups[0]).max_num_seqs == 512 and plain.offline_batch_for(g) is None


def test_offline_batch_refusals() -> None:
    with pytest.raises(ValueError, match="offline_batch sizes the batch for offloaded weights"):
        SimOffloadConfig(kv_host_gib=10.0, offline_batch=True)
    mlfq = replace(vllm_scheduler(1024), policy=SchedulingPolicy.MLFQ)
    with pytest.raises(ValueError, match="offline_batch with the MLFQ"):
        colocated(
            SPEC, 1, scheduler=mlfq, offload=SimOffloadConfig(weight_budget_gib=6.0, offline_batch=True)
        )


def test_simulate_cli_offline_batch(capsys) -> None:
    base = ["simulate", "--model", "llama-2-7b", "--num-requests", "20", "--quiet"]
    assert main([*base, "--weight-budget-gib", "6", "--offline-batch"]) == 0
    assert "mixed: offline batch 231 sequences" in capsys.readouterr().out
    assert main([*base, "--offline-batch"]) == 2
    assert "--offline-batch needs --weight-budget-gib" in capsys.readouterr().err
