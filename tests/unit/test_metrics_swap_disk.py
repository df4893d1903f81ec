"""Worker metrics of the engine's disk tier behind the swap pool (issue #15), from a snapshot and
from a real engine's stats (tiny model, CPU)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pdserve import metrics as M
from tests.unit.test_metrics import _snap, value

W = {"worker_id": "mixed-0", "role": "mixed"}


def test_swap_disk_families():
    reg = CollectorRegistry()
    snap = _snap(
        swap_disk_blocks_total=100,
        swap_disk_blocks_used=30,
        swap_disk_spilled_blocks=50,
        swap_disk_promoted_blocks=20,
        swap_disk_full=2,
        swap_disk_fallbacks=1,
        swap_disk_write_errors=3,
        swap_disk_corrupt_blocks=4,
        swap_disk_seconds=0.75,
        swap_disk_enabled=True,
        swap_prefetches=7,
        swap_prefetch_evictions=1,
    )
    M.WorkerMetrics(reg, "mixed-0", "mixed", snapshot=lambda: snap)
    assert value(reg, "pdserve_worker_swap_disk_blocks", state="used", **W) == 30
    assert value(reg, "pdserve_worker_swap_disk_blocks", state="free", **W) == 70
    assert value(reg, "pdserve_worker_swap_disk_transfer_blocks_total", direction="out", **W) == 50
    assert value(reg, "pdserve_worker_swap_disk_transfer_blocks_total", direction="in", **W) == 20
    assert value(reg, "pdserve_worker_swap_disk_recomputes_total", reason="full", **W) == 2
    assert value(reg, "pdserve_worker_swap_disk_recomputes_total", reason="fault", **W) == 1
    assert value(reg, "pdserve_worker_swap_disk_errors_total", reason="write", **W) == 3
    assert value(reg, "pdserve_worker_swap_disk_errors_total", reason="corrupt", **W) == 4
    assert value(reg, "pdserve_worker_swap_disk_seconds_total", **W) == 0.75
    assert value(reg, "pdserve_worker_swap_disk_enabled", **W) == 1
    assert value(reg, "pdserve_worker_swap_prefetches_total", outcome="prefetched", **W) == 7
    assert value(reg, "pdserve_worker_swap_prefetches_total", outcome="evicted", **W) == 1


def test_without_a_disk_tier_the_series_are_zero():
    reg = CollectorRegistry()
    M.WorkerMetrics(reg, "mixed-0", "mixed", snapshot=_snap)
    assert value(reg, "pdserve_worker_swap_disk_blocks", state="free", **W) == 0
    assert value(reg, "pdserve_worker_swap_disk_enabled", **W) == 0
    assert value(reg, "pdserve_worker_swap_disk_errors_total", reason="corrupt", **W) == 0


def test_worker_metrics_of_a_real_engine_spilling_to_its_disk_tier(tiny_models, tmp_path):
    """A real engine under memory pressure spills swapped-out KV to its disk tier and promotes it
    back: the worker's snapshot and the Prometheus families report what its stats counted."""
    from types import SimpleNamespace

    from pdserve.worker_base import WorkerState
    from tests.unit.test_engine_disk_tier import GREEDY, _engine, _prompts

    eng = _engine(tiny_models["llama"], tmp_path)
    try:
        eng.generate(_prompts(), GREEDY)
        st = eng.stats()
        assert st.disk_spilled_blocks > 0 and st.disk_promoted_blocks > 0  # the tier was used
        fake = SimpleNamespace(
            engine=eng, finished_total=16, loop=SimpleNamespace(call=lambda fn, timeout_s: fn(eng))
        )
        snap = WorkerState.metrics_snapshot(fake)  # type: ignore[arg-type]
        reg = CollectorRegistry()
        M.WorkerMetrics(reg, "mixed-0", "mixed", snapshot=lambda: snap)
        assert value(reg, "pdserve_worker_swap_disk_blocks", state="free", **W) == st.disk_blocks_total == 256
        assert value(reg, "pdserve_worker_swap_disk_blocks", state="used", **W) == 0  # all came back
        out = value(reg, "pdserve_worker_swap_disk_transfer_blocks_total", direction="out", **W)
        assert out == st.disk_spilled_blocks
        back = value(reg, "pdserve_worker_swap_disk_transfer_blocks_total", direction="in", **W)
        assert back == st.disk_promoted_blocks
        assert value(reg, "pdserve_worker_swap_disk_seconds_total", **W) == st.disk_seconds > 0
        assert value(reg, "pdserve_worker_swap_disk_enabled", **W) == 1
        assert value(reg, "pdserve_worker_swap_disk_errors_total", reason="corrupt", **W) == 0
    finally:
        eng.close()
