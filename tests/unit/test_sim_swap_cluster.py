"""Swap and the engine's swap disk tier through the whole simulator (#15: 'the simulator modelling
swap'): ``ClusterConfig.swap_space_gib`` / ``swap_gb_s`` / ``swap_disk_gib`` reach each instance, the
engine's scheduler swaps preempted requests instead of recomputing them, the colder swapped KV
spills to disk when the host pool is short, and each step pays its copies at the configured
bandwidths (``instance_stats``). test_sim_mlfq_swap / test_sim_swap_disk build a SimInstance by
hand; this goes through ``Simulation.run``. Deterministic (simulated clock)."""

from __future__ import annotations

import pytest

from router.policy import InstanceRole
from simulator.config import CacheConfig, ClusterConfig, InstanceGroup, vllm_scheduler
from simulator.latency import LatencySpec
from simulator.sim import Simulation
from simulator.workload import from_lengths

BLOCK_BYTES = 16 * 2 * 32 * 4096 * 2  # Llama-2-7B, fp16, 16-token blocks: tokens * (K, V) * layers * hidden


def _run(requests: list[tuple[int, int]], **kw) -> dict:
    c = ClusterConfig(
        LatencySpec("llama-2-7b", "a100"),
        (InstanceGroup(InstanceRole.MIXED, 1, 1, vllm_scheduler(2048, 16)),),
        kv_blocks=120,  # too few for the batch: preemptions
        cache=CacheConfig(disk_gb_s=20.0),
        **kw,
    )
    r = Simulation(c).run(from_lengths(requests, rate=100.0))
    assert r.complete
    (st,) = r.instance_stats.values()
    assert st["free_blocks_end"] == 120
    return st


def test_preempted_requests_swap_instead_of_recomputing() -> None:
    reqs = [(512, 256)] * 12
    plain = _run(reqs)
    swap = _run(reqs, swap_space_gib=2.0, swap_gb_s=25.0)
    assert plain["preemptions"] > 0 and plain["swap_outs"] == 0 and plain["swap_s"] == 0
    assert swap["preemptions"] > 0 and swap["swap_outs"] == swap["preemptions"]  # every one swapped
    assert swap["swap_s"] > 0
    assert swap["prefill_tokens"] < plain["prefill_tokens"]  # resumed, not recomputed
    assert _run(reqs, swap_space_gib=2.0, swap_gb_s=25.0) == swap  # deterministic
    # the copies' time follows the configured bandwidth (same swaps at 20 GB/s: 25/20 the time)
    slower = _run(reqs, swap_space_gib=2.0, swap_gb_s=20.0)
    assert slower["swap_outs"] == swap["swap_outs"]
    assert slower["swap_s"] == pytest.approx(swap["swap_s"] * 25 / 20, rel=1e-9)
    # chosen per request by cost, from the rates the instance measured so far (the engine's
    # estimator): at 15 GB/s some preemptions swap and some recompute; at 10 GB/s copying out
    # and back costs more than recomputing every time
    mid = _run(reqs, swap_space_gib=2.0, swap_gb_s=15.0)
    assert 0 < mid["swap_outs"] < mid["preemptions"]
    slow = _run(reqs, swap_space_gib=2.0, swap_gb_s=10.0)
    assert slow["swap_outs"] == 0 and slow["prefill_tokens"] == plain["prefill_tokens"]


def test_a_disaggregated_decode_instance_prices_recompute_as_a_decode_worker_does() -> None:
    """A decode instance adopts its prompts' KV and never prefills until it recomputes: as on a
    real decode worker (``RateEstimator.observe_decode``), its decode-only steps' token rate stands
    in for the prefill rate it has not measured, which leans its first preemptions towards the
    swap its host pool was configured for. At 10 GB/s a mixed instance recomputes every preempted
    request (above); the decode instance swaps every one (before the simulator priced recompute
    at the latency model's prefill rate from the start, and it recomputed them all)."""
    groups = (
        InstanceGroup(InstanceRole.PREFILL, 1, 1, vllm_scheduler(2048, 16)),
        InstanceGroup(InstanceRole.DECODE, 1, 1, vllm_scheduler(2048, 16)),
    )
    c = ClusterConfig(
        LatencySpec("llama-2-7b", "a100"), groups, kv_blocks=120, swap_space_gib=2.0, swap_gb_s=10.0
    )
    r = Simulation(c).run(from_lengths([(512, 256)] * 12, rate=100.0))
    assert r.complete
    st = r.instance_stats["decode0"]
    assert st["preemptions"] > 0 and st["swap_outs"] == st["preemptions"]
    assert st["prefill_tokens"] == 0  # resumed from the host pool, nothing recomputed


def test_a_short_host_pool_spills_colder_swapped_kv_to_the_disk_tier() -> None:
    reqs = [(256, 512)] * 24
    host_only = _run(reqs, swap_space_gib=0.4)
    tiered = _run(reqs, swap_space_gib=0.4, swap_disk_gib=8.0)
    assert host_only["swap_disk_blocks"] == 0 and host_only["swap_disk_s"] == 0
    assert tiered["swap_disk_blocks"] > 0
    # spills and promotions are charged at the cache's disk bandwidth (20 GB/s here)
    assert tiered["swap_disk_s"] == pytest.approx(tiered["swap_disk_blocks"] * BLOCK_BYTES / 20e9, rel=1e-9)
    assert tiered["prefill_tokens"] < host_only["prefill_tokens"]  # fewer recomputes
