"""Worker metrics of the memory hierarchy (issue #15): swap bytes and copy time, MLFQ promotions,
weight bytes per tier and prefetch stalls; the host KV cache's cumulative copy counters that
feed them (CPU, no model)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from engine.swap_space import HostKVCache
from pdserve import metrics as M
from tests.unit.test_metrics import _snap, value

W = {"worker_id": "mixed-0", "role": "mixed"}


def test_worker_swap_bytes_time_promotions_and_offload_families():
    reg = CollectorRegistry()
    snap = _snap(
        swap_outs=2,
        swapped_out_blocks=10,
        swapped_in_blocks=4,
        swapped_out_bytes=10 * 4096,
        swapped_in_bytes=4 * 4096,
        swap_copy_seconds=0.25,
        mlfq_promotions=3,
        weight_bytes=(("device", 1000), ("host", 600), ("disk", 400)),
        weight_prefetch_bytes=5000,
        weight_prefetch_stall_seconds=0.5,
    )
    M.WorkerMetrics(reg, "mixed-0", "mixed", snapshot=lambda: snap)
    assert value(reg, "pdserve_worker_swapped_bytes_total", direction="out", **W) == 40960
    assert value(reg, "pdserve_worker_swapped_bytes_total", direction="in", **W) == 16384
    assert value(reg, "pdserve_worker_swap_seconds_total", **W) == 0.25
    assert value(reg, "pdserve_worker_mlfq_promotions_total", **W) == 3
    assert value(reg, "pdserve_worker_weight_bytes", tier="device", **W) == 1000
    assert value(reg, "pdserve_worker_weight_bytes", tier="host", **W) == 600
    assert value(reg, "pdserve_worker_weight_bytes", tier="disk", **W) == 400
    assert value(reg, "pdserve_worker_weight_prefetch_bytes_total", **W) == 5000
    assert value(reg, "pdserve_worker_weight_prefetch_stall_seconds_total", **W) == 0.5


def test_without_offloading_there_is_no_weight_tier_series():
    reg = CollectorRegistry()
    M.WorkerMetrics(reg, "mixed-0", "mixed", snapshot=_snap)
    assert value(reg, "pdserve_worker_weight_bytes", tier="device", **W) is None
    assert value(reg, "pdserve_worker_swapped_bytes_total", direction="out", **W) == 0
    assert value(reg, "pdserve_worker_swap_seconds_total", **W) == 0


def test_host_kv_cache_adds_up_its_copies():
    # [layers, 2, blocks, block_size, kv_heads, head_dim]
    dev = torch.randn(2, 2, 6, 4, 2, 8)
    hc = HostKVCache(4, dev)
    assert hc.copied_bytes == 0 and hc.copy_seconds == 0.0
    hc.swap(dev, [(0, 0), (1, 1)], [])
    hc.swap(dev, [], [(0, 5)])
    timings = hc.take_timings()
    assert sum(n for n, _ in timings) == 3 * hc.block_nbytes
    assert hc.copied_bytes == 3 * hc.block_nbytes
    assert hc.copy_seconds == sum(s for _, s in timings) and hc.copy_seconds >= 0.0
    assert torch.equal(dev[:, :, 5], dev[:, :, 0])  # the swap-in copied block 0's bytes back
    assert hc.take_timings() == [] and hc.copied_bytes == 3 * hc.block_nbytes  # counted once


def test_worker_snapshot_reads_swap_bytes_and_time_from_the_engine(tiny_models):
    """A real engine preempting by swap under memory pressure: the worker's snapshot reports the
    bytes (blocks x the KV block size) and the copy time the host cache measured."""
    from types import SimpleNamespace

    from pdserve.worker_base import WorkerState
    from tests.unit.test_engine_swap import BLOCK_NBYTES, GREEDY, _engine, _prompts

    eng = _engine(tiny_models["llama"], num_kv_blocks=14, swap_space_bytes=64 * BLOCK_NBYTES)
    eng.generate(_prompts(6), GREEDY)
    st = eng.stats()
    assert st.num_swap_outs >= 1  # the pool is too small for the batch: something swapped
    fake = SimpleNamespace(
        engine=eng, finished_total=6, loop=SimpleNamespace(call=lambda fn, timeout_s: fn(eng))
    )
    snap = WorkerState.metrics_snapshot(fake)  # type: ignore[arg-type]
    assert snap.swapped_out_bytes == st.swapped_out_blocks * BLOCK_NBYTES > 0
    assert snap.swapped_in_bytes == st.swapped_in_blocks * BLOCK_NBYTES
    assert snap.swap_copy_seconds == eng.runner.host_cache.copy_seconds > 0.0
    assert snap.mlfq_promotions == 0  # not an MLFQ engine
    assert snap.weight_bytes == () and snap.weight_prefetch_bytes == 0  # no weight offloading
