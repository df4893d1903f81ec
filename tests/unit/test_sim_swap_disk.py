"""The engine's disk tier for swapped-out KV in the simulator (issue #15): with a swap pool too
small for every preempted request, the engine's scheduler spills the coldest swapped-out KV to
the disk tier and promotes it back ahead of its turn; each step pays that traffic at the disk
bandwidth, and fewer tokens are recomputed than without the tier."""

from __future__ import annotations

import pytest

from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig
from router.policy import InstanceRole
from simulator.config import ClusterConfig
from simulator.events import EventLoop
from simulator.instance import SimInstance
from simulator.latency import LatencySpec
from tests.sim_fakes import LinearLatency

CFG = SchedulerConfig(max_num_batched_tokens=256, long_prefill_token_threshold=64, max_model_len=1024)
BLOCK = 16 * 1024  # block_size 16 x LinearLatency's 1 KiB per token


def _run(swap_blocks: int, disk_blocks: int) -> SimInstance:
    loop = EventLoop()
    done: set[str] = set()

    def on_step(rep) -> None:
        done.update(r.request_id for r in rep.done)

    inst = SimInstance(
        "mixed0",
        InstanceRole.MIXED,
        CFG,
        24,
        16,
        LinearLatency(1024),
        loop,
        on_step,
        swap_space_bytes=swap_blocks * BLOCK,
        swap_bytes_per_s=1e9,
        swap_disk_bytes=disk_blocks * BLOCK,
        disk_bytes_per_s=1e8,
    )
    for i in range(12):
        sp = SamplingParams(max_tokens=40, ignore_eos=True)
        inst.submit(Request(f"r{i}", range(20 + 4 * i), sp, arrival_time=0.0, priority=i % 4))
    loop.run()
    assert done == {f"r{i}" for i in range(12)}
    assert inst.kv.num_free_blocks == 24
    assert inst.kv.num_free_host_blocks == inst.kv.num_host_blocks
    assert inst.kv.num_free_disk_blocks == inst.kv.num_disk_blocks
    return inst


def test_the_disk_tier_takes_swapped_kv_the_swap_pool_cannot() -> None:
    host_only = _run(swap_blocks=6, disk_blocks=0)
    tiered = _run(swap_blocks=6, disk_blocks=256)
    assert tiered.sched.num_spills > 0 and tiered.sched.num_disk_promotions > 0
    assert tiered.stats.swap_disk_blocks == 2 * tiered.kv.swap_stats.blocks_spilled > 0
    assert tiered.stats.swap_disk_s == pytest.approx(tiered.stats.swap_disk_blocks * BLOCK / 1e8)
    assert host_only.stats.swap_disk_blocks == 0
    # swapped instead of recomputed: fewer prompt tokens computed again
    assert tiered.sched.num_swap_outs > host_only.sched.num_swap_outs
    assert tiered.stats.prefill_tokens < host_only.stats.prefill_tokens


def test_cluster_config_refuses_bad_swap_disk_settings() -> None:
    spec = LatencySpec("llama-2-7b", "a100")
    with pytest.raises(ValueError, match="swap_disk_gib must be >= 0"):
        ClusterConfig(spec, (), swap_space_gib=1, swap_disk_gib=-1)
    with pytest.raises(ValueError, match="swap_disk_gib needs swap_space_gib"):
        ClusterConfig(spec, (), swap_disk_gib=1)
