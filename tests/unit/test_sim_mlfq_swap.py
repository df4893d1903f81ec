"""Swap-based preemption in the simulator (issue #15): an instance with a host swap pool lets the
engine's scheduler swap a preempted request's KV out instead of recomputing it, and each step
pays its copies at the configured bandwidth."""

from __future__ import annotations

import pytest

from engine.request import Request
from engine.sampling_params import SamplingParams
from router.policy import InstanceRole
from simulator.config import ClusterConfig
from simulator.events import EventLoop
from simulator.instance import SimInstance
from simulator.latency import LatencySpec
from tests.sim_fakes import LinearLatency
from tests.unit.test_mlfq_sim import CFG


def _run(swap_space_bytes: int) -> tuple[SimInstance, dict[str, float]]:
    loop = EventLoop()
    done: dict[str, float] = {}

    def on_step(rep) -> None:
        for r in rep.done:
            done[r.request_id] = rep.end

    inst = SimInstance(
        "mixed0",
        InstanceRole.MIXED,
        CFG,
        256,
        16,
        LinearLatency(1024),
        loop,
        on_step,
        swap_space_bytes=swap_space_bytes,
        swap_bytes_per_s=1e9,
    )
    inst.submit(Request("long", range(400), SamplingParams(max_tokens=30, ignore_eos=True), arrival_time=0.0))
    for i in range(3):
        t = 0.5 + 0.05 * i
        loop.at(t, inst.submit, Request(f"short{i}", range(10), SamplingParams(max_tokens=3), arrival_time=t))
    loop.run()
    return inst, done


def test_mlfq_preemption_swaps_in_the_simulator_when_a_host_pool_exists() -> None:
    recompute, done_r = _run(0)
    swap, done_s = _run(1 << 20)  # 1 MiB host pool: 64 blocks of 16 KiB
    assert set(done_r) == set(done_s) == {"long", "short0", "short1", "short2"}
    assert recompute.sched.num_preemptions >= 1 and recompute.sched.num_swap_outs == 0
    assert swap.sched.num_swap_outs >= 1 and swap.stats.swap_s > 0
    # the long job resumes from its swapped KV instead of prefilling 400+ tokens again
    assert done_s["long"] < done_r["long"]
    assert swap.stats.prefill_tokens < recompute.stats.prefill_tokens
    for inst in (recompute, swap):
        assert inst.kv.num_free_blocks == 256


def test_cluster_config_refuses_bad_swap_settings() -> None:
    spec = LatencySpec("llama-2-7b", "a100")
    with pytest.raises(ValueError, match="swap_space_gib"):
        ClusterConfig(spec, (), swap_space_gib=-1)
    with pytest.raises(ValueError, match="swap_gb_s"):
        ClusterConfig(spec, (), swap_gb_s=0)
