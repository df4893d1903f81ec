"""LoRA adapters in the simulator (issue #16): slot and host tiers, load times, step cost,
affinity placement, and refused settings. Fake latency model and small configs (fast)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from router.policy import PolicyKind
from simulator.adapters import (
    AdapterConfig,
    AdapterPopularity,
    AdapterResidency,
    Pin,
    bytes_per_rank,
    resolve_bytes_per_rank,
    with_adapters,
)
from simulator.config import ClusterConfig, SimConfig, colocated, disaggregated
from simulator.latency import LatencyModel, LatencySpec
from simulator.migration import SimMigrationConfig
from simulator.models import model_spec
from simulator.sim import Simulation
from simulator.workload import LengthDistribution, LengthKind, Workload, WorkloadRequest, synthetic

SPEC = LatencySpec("fake-model")
KW = dict(kv_blocks=4096, max_model_len=4096)
MB = 10**6


class TokenLatency(LatencyModel):
    """Prefill: ``per_token`` s per new token; a decode step: ``decode`` s."""

    def __init__(self, per_token: float = 1e-3, decode: float = 0.01) -> None:
        super().__init__(kv_bytes_per_token=1000, transfer_bandwidth=1e9, transfer_latency_s=0.0)
        self.per_token, self.decode = per_token, decode

    def step_time(self, prefill_tokens, prefill_contexts, num_decodes, decode_context) -> float:
        t = self.per_token * sum(prefill_tokens) if prefill_tokens else 0.0
        return t + (self.decode if num_decodes else 0.0)


def cfg(**kw) -> AdapterConfig:
    """Adapters of 1 MB per rank, rank 10 (10 MB): a slot copy 10 ms at 1 GB/s, a disk read
    100 ms at 0.1 GB/s; no step cost unless asked."""
    base = dict(
        num_adapters=4,
        ranks=(10,),
        bytes_per_rank=MB,
        host_to_device_gb_s=1.0,
        disk_gb_s=0.1,
        step_cost_per_adapter=0.0,
        step_cost_lora_tokens=0.0,
    )
    base.update(kw)
    return AdapterConfig(**base)


def run(cluster: ClusterConfig, reqs: Sequence[WorkloadRequest], lat: LatencyModel | None = None):
    lat = lat or TokenLatency()
    return Simulation(cluster, SimConfig(), latency_factory=lambda tp: lat).run(Workload("t", tuple(reqs)))


def total(res, key: str) -> float:
    return sum(s[key] for s in res.instance_stats.values())


# ----------------------------------------------------------------------------- tiers (pure)
def test_slot_miss_costs_the_copy_and_a_hit_nothing() -> None:
    r = AdapterResidency(cfg(), "fake-model")
    assert r.load_s("lora-1", 0.0) == pytest.approx(0.01)  # in host memory: the copy
    assert r.acquire("lora-1", 0.0) == (Pin.PINNED, pytest.approx(0.01))
    assert r.load_s("lora-1", 0.0) == 0.0
    assert r.acquire("lora-1", 0.0) == (Pin.PINNED, 0.0)  # second request: resident
    assert r.stats.slot_loads == 1 and r.load_s("", 0.0) == 0.0


def test_host_miss_reads_from_disk_in_the_background_one_read_at_a_time() -> None:
    r = AdapterResidency(cfg(max_cpu_loras=2), "fake-model")
    assert list(r.host) == ["lora-2", "lora-3"]  # the engine keeps the last registered
    assert r.load_s("lora-0", 1.0) == pytest.approx(0.1 + 0.01)  # read + copy
    assert r.acquire("lora-0", 1.0) == (Pin.READING, pytest.approx(1.1))
    assert r.acquire("lora-0", 1.05) == (Pin.READING, pytest.approx(1.1))  # the same read
    assert r.load_s("lora-0", 1.05) == pytest.approx(0.05 + 0.01)  # the rest of it + the copy
    assert r.acquire("lora-1", 1.0) == (Pin.READING, pytest.approx(1.2))  # queued behind it
    assert r.stats.disk_loads == 2
    r.read_done("lora-0")
    assert list(r.host) == ["lora-3", "lora-0"] and r.stats.host_evictions == 1
    assert r.acquire("lora-0", 1.1) == (Pin.PINNED, pytest.approx(0.01))


def test_slots_evict_the_least_recently_used_unpinned_adapter() -> None:
    r = AdapterResidency(cfg(max_loras=2), "fake-model")
    for name in ("lora-0", "lora-1", "lora-0"):  # lora-0 used last
        assert r.acquire(name, 0.0)[0] is Pin.PINNED
        r.release(name)
    assert r.acquire("lora-2", 0.0)[0] is Pin.PINNED
    assert sorted(r.slots.resident()) == ["lora-0", "lora-2"] and r.stats.slot_evictions == 1
    # lora-2 is still pinned; pinning lora-0 too leaves no slot for a third adapter
    assert r.acquire("lora-0", 0.0) == (Pin.PINNED, 0.0)
    assert r.acquire("lora-3", 0.0) == (Pin.NO_SLOT, 0.0)
    assert r.stats.disk_loads == 0  # no read starts without a slot to go to


def test_full_slot_periods_are_measured_and_priced_as_the_router_does() -> None:
    """Every slot pinned from t=1 to t=1.4: the residency measures that full period (what a
    worker reports) and prices a request for another adapter with the router's own function:
    its copy plus one full period per request in line; an adapter in a pinned slot costs 0."""
    from router.policy.adapter_cost import adapter_ready_s

    r = AdapterResidency(cfg(max_loras=2), "fake-model")
    assert r.acquire("lora-0", 0.5)[0] is Pin.PINNED and r.slot_free_s == 0.0
    assert r.acquire("lora-1", 1.0)[0] is Pin.PINNED  # now full
    assert r.pinned_slots() == 2 and r.ready_s("lora-2", 1.0) == pytest.approx(0.01)  # not measured
    r.release("lora-0", 1.4)
    assert r.slot_free_s == pytest.approx(0.4)
    assert r.acquire("lora-0", 1.5)[0] is Pin.PINNED  # full again
    assert r.ready_s("lora-0", 1.5) == 0.0
    assert r.ready_s("lora-2", 1.5) == pytest.approx(0.4 + 0.01)
    assert r.ready_s("lora-2", 1.5, slot_waiters=1) == pytest.approx(2 * 0.4 + 0.01)
    t = r.tiers("lora-2", 1.5, 1)
    assert (t.slots, t.slots_pinned, t.slot_waiters) == (2, 2, 1)
    assert r.ready_s("lora-2", 1.5, 1) == adapter_ready_s("lora-2", t)
    r.release("lora-1")  # untimed: ends the period without a sample
    assert r.slot_free_s == pytest.approx(0.4) and r.ready_s("lora-2", 1.6) == pytest.approx(0.01)


def test_a_disk_miss_is_priced_behind_the_reads_queued() -> None:
    r = AdapterResidency(cfg(max_cpu_loras=1), "fake-model")  # host holds lora-3 only
    assert r.ready_s("lora-0", 0.0) == pytest.approx(0.1 + 0.01)
    assert r.acquire("lora-0", 0.0)[0] is Pin.READING
    assert r.ready_s("lora-1", 0.0) == pytest.approx(2 * 0.1 + 0.01)  # behind lora-0's read
    assert r.ready_s("lora-0", 0.04) == pytest.approx(0.06 + 0.01)  # the rest of its own read


def test_step_factor_is_calibrated_on_bench_lora_step() -> None:
    c = AdapterConfig()
    assert c.step_factor(0, 0, 32) == 1.0
    one = c.step_factor(1, 32, 32)
    eight = c.step_factor(8, 32, 32)
    assert one == pytest.approx(1.029, abs=0.005)  # 1 adapter / base
    assert eight / one == pytest.approx(1.182, abs=0.01)  # 8 adapters / 1 adapter
    assert c.step_factor(1, 16, 32) < one  # half the tokens on the base model


def test_adapter_bytes_from_the_model_shape() -> None:
    m = model_spec("llama-2-7b")
    # rank 16 on all 7 projections of Llama-2-7B: ~40 M parameters, fp16
    assert 16 * bytes_per_rank(m, AdapterConfig().targets) == pytest.approx(80e6, rel=0.01)
    assert bytes_per_rank(m, ("q", "v")) == 2 * (4096 + 4096) * 32 * 2


# ----------------------------------------------------------------------------- simulation
def test_a_miss_costs_the_load_time_in_ttft() -> None:
    lat = TokenLatency()
    reqs = [
        WorkloadRequest(0.0, 100, 2, adapter="lora-3"),  # in host memory: copy 10 ms
        WorkloadRequest(1.0, 100, 2, adapter="lora-3"),  # in a slot now: free
        WorkloadRequest(2.0, 100, 2, adapter="lora-0"),  # not in host memory: read 100 ms + copy
        WorkloadRequest(3.0, 100, 2),  # the base model
    ]
    res = run(colocated(SPEC, 1, adapters=cfg(max_cpu_loras=1), **KW), reqs, lat)
    a, b, c, d = (r.ttft for r in res.records)
    assert a == pytest.approx(0.1 + 0.01)
    assert b == pytest.approx(0.1)
    assert c == pytest.approx(0.1 + 0.1 + 0.01)
    assert d == pytest.approx(0.1)
    s = res.instance_stats["mixed0"]
    assert (s["adapter_slot_loads"], s["adapter_disk_loads"]) == (2, 1)
    assert s["adapter_copy_s"] == pytest.approx(0.02) and s["adapter_wait_s"] == pytest.approx(0.1)
    assert [r.adapter for r in res.records] == ["lora-3", "lora-3", "lora-0", ""]


def test_lora_step_cost_in_mixed_batches() -> None:
    """Four prompts in one step (queued behind a 1 s base-model prefill): the step costs
    (1 + per_adapter * distinct + lora_tokens * LoRA share) x the base model's, plus the copies
    of the adapters it loaded."""
    c = cfg(step_cost_per_adapter=0.1, step_cost_lora_tokens=0.05)

    def ttft(names: list[str]) -> float:
        reqs = [WorkloadRequest(0.0, 1000, 1)] + [WorkloadRequest(0.5, 100, 1, adapter=n) for n in names]
        res = run(colocated(SPEC, 1, adapters=c, **KW), reqs)
        assert res.records[0].ttft == pytest.approx(1.0)
        t = {r.ttft for r in res.records[1:]}
        assert len(t) == 1  # one step
        copies = len(set(n for n in names if n)) * 0.01
        return t.pop() - 0.5 - copies

    assert ttft(["", "", "", ""]) == pytest.approx(0.4)
    assert ttft(["lora-0"] * 4) == pytest.approx(0.4 * (1 + 0.1 + 0.05))
    assert ttft(["lora-0", "lora-1", "lora-2", "lora-3"]) == pytest.approx(0.4 * (1 + 0.4 + 0.05))
    assert ttft(["lora-0", "lora-0", "", ""]) == pytest.approx(0.4 * (1 + 0.1 + 0.025))


def test_requests_wait_for_a_slot_while_every_slot_is_pinned() -> None:
    """One slot: the second adapter's request waits until every request on the first adapter
    finished (pins are held through decoding), then evicts it; a request for the resident
    adapter joins the batch at once."""
    reqs = [
        WorkloadRequest(0.0, 100, 11, adapter="lora-0"),  # its step: copy 0.01 + prefill 0.1
        WorkloadRequest(0.0, 100, 2, adapter="lora-1"),
        WorkloadRequest(0.0, 100, 2, adapter="lora-0"),
    ]
    res = run(colocated(SPEC, 1, adapters=cfg(max_loras=1), **KW), reqs)
    a, b, c = res.records
    assert a.ttft == pytest.approx(0.11)
    assert c.ttft == pytest.approx(0.11 + 0.1 + 0.01)  # next step: its prefill + a's decode
    assert b.first_scheduled == pytest.approx(max(a.finish, c.finish))  # waited for the slot
    assert b.ttft == pytest.approx(a.finish + 0.01 + 0.1)  # then its copy and prefill
    s = res.instance_stats["mixed0"]
    assert s["adapter_slot_evictions"] == 1 and s["adapter_slot_loads"] == 2
    assert res.complete


def test_disaggregated_decode_side_pins_and_releases() -> None:
    wl = with_adapters(synthetic_wl(40), 4, AdapterPopularity.UNIFORM, seed=3)
    cl = disaggregated(SPEC, 1, 1, adapters=cfg(max_loras=2, max_cpu_loras=2), **KW)
    sim = Simulation(cl, SimConfig(), latency_factory=lambda tp: TokenLatency())
    res = sim.run(wl)
    assert res.complete and res.num_finished == 40
    assert res.instance_stats["decode0"]["adapter_slot_loads"] > 0
    assert res.instance_stats["decode0"]["adapter_disk_loads"] > 0


def test_prefix_reuse_never_crosses_adapters() -> None:
    ids = (11, 12, 13)
    reqs = [
        WorkloadRequest(0.0, 1536, 1, ids, adapter="lora-0"),
        WorkloadRequest(5.0, 1536, 1, ids, adapter="lora-1"),  # same prompt, another adapter
        WorkloadRequest(10.0, 1536, 1, ids, adapter="lora-0"),
        WorkloadRequest(15.0, 1536, 1, ids),  # the base model
    ]
    res = run(colocated(SPEC, 1, adapters=cfg(), **KW), reqs)
    assert [r.cached_tokens for r in res.records] == [0, 0, 1520, 0]


def synthetic_wl(n: int, rate: float = 20.0, seed: int = 0) -> Workload:
    ins = LengthDistribution(LengthKind.UNIFORM, 50, 300)
    outs = LengthDistribution(LengthKind.UNIFORM, 2, 20)
    return synthetic(n, rate, ins, outs, seed=seed)


def test_affinity_placement_loads_adapters_less_than_round_robin() -> None:
    """Four instances, two slots each, 16 Zipf adapters (host memory holds 2): the cache-aware
    policy prices each instance's adapter load, the reads queued and the wait for a pinned slot
    (the router's TTFT prediction) and so loads far fewer than round-robin, at a lower mean TTFT
    than least-loaded (bench/sim_adapter_affinity.py reports both at scale)."""
    wl = with_adapters(synthetic_wl(300, rate=10.0, seed=1), 16, AdapterPopularity.ZIPF, zipf_s=1.0, seed=1)
    ad = cfg(num_adapters=16, max_loras=2, max_cpu_loras=2)
    out = {}
    for pol in (PolicyKind.ROUND_ROBIN, PolicyKind.LEAST_LOADED, PolicyKind.LOCAL_CACHE_AWARE):
        res = run(colocated(SPEC, 4, policy=pol, adapters=ad, **KW), wl.requests)
        assert res.complete
        ttft = sum(r.ttft for r in res.records) / len(res.records)
        out[pol] = (total(res, "adapter_slot_loads"), total(res, "adapter_disk_loads"), ttft)
    rr, ll, aff = (
        out[k] for k in (PolicyKind.ROUND_ROBIN, PolicyKind.LEAST_LOADED, PolicyKind.LOCAL_CACHE_AWARE)
    )
    assert aff[0] < 0.8 * rr[0] and aff[1] < 0.8 * rr[1]
    assert aff[0] < ll[0] and aff[2] <= ll[2], (aff, ll)


def test_goodput_placement_gains_adapter_affinity() -> None:
    """The goodput policy on the same cluster: it picked the decode instance by predicted TPOT, so
    the adapter's load (in its TTFT) never steered a request and it loaded as often as
    least-loaded; an adapter's request now compares where it can start soonest before TPOT
    (``router.policy.decode_side.adapter_starts``): fewer loads, mean TTFT <= least-loaded's."""
    wl = with_adapters(synthetic_wl(300, rate=10.0, seed=1), 16, AdapterPopularity.ZIPF, zipf_s=1.0, seed=1)
    ad = cfg(num_adapters=16, max_loras=2, max_cpu_loras=2)
    out = {}
    for pol in (PolicyKind.LEAST_LOADED, PolicyKind.GOODPUT):
        res = run(colocated(SPEC, 4, policy=pol, adapters=ad, **KW), wl.requests)
        assert res.complete
        ttft = sum(r.ttft for r in res.records) / len(res.records)
        out[pol] = (total(res, "adapter_slot_loads"), ttft)
    ll, gp = out[PolicyKind.LEAST_LOADED], out[PolicyKind.GOODPUT]
    assert gp[0] < 0.8 * ll[0] and gp[1] <= ll[1], (gp, ll)


# ----------------------------------------------------------------------------- refused
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(num_adapters=0), "num_adapters"),
        (dict(ranks=(16, 0)), "rank"),
        (dict(ranks=()), "rank"),
        (dict(targets=("q", "lm_head")), "targets"),
        (dict(targets=("q", "q")), "targets"),
        (dict(max_loras=0), "max_loras"),
        (dict(max_cpu_loras=0), "max_cpu_loras"),
        (dict(host_to_device_gb_s=0.0), "host_to_device_gb_s"),
        (dict(disk_gb_s=float("inf")), "disk_gb_s"),
        (dict(bytes_per_rank=0), "bytes_per_rank"),
        (dict(step_cost_per_adapter=-0.1), "step_cost_per_adapter"),
        (dict(step_cost_lora_tokens=float("nan")), "step_cost_lora_tokens"),
    ],
)
def test_bad_adapter_config_is_refused_naming_the_field(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kw)


def test_unsupported_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="migration"):
        colocated(SPEC, 2, adapters=cfg(), migration=SimMigrationConfig(), **KW)
    with pytest.raises(ValueError, match="no shape for model 'fake-model'.*bytes_per_rank"):
        resolve_bytes_per_rank(AdapterConfig(), "fake-model")
    with pytest.raises(ValueError, match="opt-13b has no gate"):
        resolve_bytes_per_rank(AdapterConfig(), "opt-13b")
    assert resolve_bytes_per_rank(AdapterConfig(targets=("q", "v")), "opt-13b") > 0
    # a workload naming adapters: the cluster must serve them
    with pytest.raises(ValueError, match="lora-0.*serves none"):
        run(colocated(SPEC, 1, **KW), [WorkloadRequest(0.0, 10, 2, adapter="lora-0")])
    with pytest.raises(ValueError, match="'lora-4' is not served"):
        run(colocated(SPEC, 1, adapters=cfg(), **KW), [WorkloadRequest(0.0, 10, 2, adapter="lora-4")])
    with pytest.raises(ValueError, match="'sql' is not served"):
        run(colocated(SPEC, 1, adapters=cfg(), **KW), [WorkloadRequest(0.0, 10, 2, adapter="sql")])
    with pytest.raises(ValueError, match="base_share"):
        with_adapters(synthetic_wl(3), 2, base_share=1.0)
    with pytest.raises(ValueError, match="zipf_s"):
        with_adapters(synthetic_wl(3), 2, AdapterPopularity.ZIPF, zipf_s=0.0)


def test_with_adapters_draws_by_popularity() -> None:
    wl = with_adapters(synthetic_wl(2000), 8, AdapterPopularity.ZIPF, zipf_s=1.2, base_share=0.25, seed=0)
    names = [r.adapter for r in wl.requests]
    base = names.count("")
    assert 400 < base < 600
    assert names.count("lora-0") > 2 * names.count("lora-3") > 0
    same = with_adapters(synthetic_wl(2000), 8, AdapterPopularity.ZIPF, zipf_s=1.2, base_share=0.25, seed=0)
    assert [r.adapter for r in same.requests] == names  # seeded
    assert [r.input_len for r in wl.requests] == [r.input_len for r in synthetic_wl(2000).requests]


# ----------------------------------------------------------------------------- pdserve simulate
def test_pdserve_simulate_with_adapters(tmp_path, capsys) -> None:
    import csv
    import json

    from pdserve.cli import main

    out = tmp_path / "run"
    argv = ["simulate", "--model", "llama-2-7b", "--num-requests", "60", "--rate", "4", "--quiet"]
    extra = ["--instances", "2", "--adapters", "6", "--max-loras", "2", "--max-cpu-loras", "3"]
    assert main([*argv, *extra, "--adapter-base-share", "0.2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "adapters: slot loads" in text
    with (out / "requests.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    names = {r["adapter"] for r in rows}
    assert "" in names and names - {""} <= {f"lora-{i}" for i in range(6)} and len(names) > 3
    inst = json.loads((out / "summary.json").read_text())["instances"]
    assert sum(s["adapter_slot_loads"] for s in inst.values()) > 0
    # refused settings: a clear error, exit status 2
    assert main([*argv, "--adapters", "4", "--max-loras", "0"]) == 2
    assert "max_loras must be >= 1" in capsys.readouterr().err
    assert main([*argv, "--adapters", "4", "--goodput"]) == 2
    assert "--goodput with --adapters" in capsys.readouterr().err
    assert main([*argv, "--adapters", "4", "--adapter-rank", "16,x"]) == 2
    assert "--adapter-rank" in capsys.readouterr().err
