"""Worker metrics of KV offloading (issue #15 part 4): KV pool bytes per tier, bytes copied in and
out, and stall time; read from a real engine whose KV of one layer lives in the host pool."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.kv_offload import install
from engine.llm_engine import LLMEngine
from engine.offload_policy import kv_placement
from engine.sampling_params import SamplingParams
from pdserve import metrics as M
from pdserve.worker_base import WorkerState
from tests.unit.test_metrics import _snap, value

W = {"worker_id": "mixed-0", "role": "mixed"}


def test_kv_offload_families():
    reg = CollectorRegistry()
    snap = _snap(
        kv_offload_bytes=(("device", 3000), ("host", 5000)),
        kv_offload_read_bytes=700,
        kv_offload_write_bytes=90,
        kv_offload_stall_seconds=0.25,
    )
    M.WorkerMetrics(reg, "mixed-0", "mixed", snapshot=lambda: snap)
    assert value(reg, "pdserve_worker_kv_offload_bytes", tier="device", **W) == 3000
    assert value(reg, "pdserve_worker_kv_offload_bytes", tier="host", **W) == 5000
    assert value(reg, "pdserve_worker_kv_offload_copied_bytes_total", direction="in", **W) == 700
    assert value(reg, "pdserve_worker_kv_offload_copied_bytes_total", direction="out", **W) == 90
    assert value(reg, "pdserve_worker_kv_offload_stall_seconds_total", **W) == 0.25


def test_without_kv_offloading_there_is_no_tier_series():
    reg = CollectorRegistry()
    M.WorkerMetrics(reg, "mixed-0", "mixed", snapshot=_snap)
    assert value(reg, "pdserve_worker_kv_offload_bytes", tier="device", **W) is None
    assert value(reg, "pdserve_worker_kv_offload_copied_bytes_total", direction="in", **W) == 0


def test_worker_snapshot_reads_the_engines_kv_offload(tiny_models):
    eng = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=32, linear="torch"))
    cache = eng.runner.kv_cache
    bb = cache[0, :, 0].numel() * cache.element_size()
    eng.kv_offload = install(eng.runner, eng.kv, kv_placement(2, 32, bb, (1,)))
    try:
        outs = eng.generate(
            [[5, 6, 7, 8, 9] * 4], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        )
        assert len(outs[0].token_ids) == 6
        eng.kv_offload.synchronize()  # the last write-backs run on the I/O thread: done before reading
        fake = SimpleNamespace(
            engine=eng, finished_total=1, loop=SimpleNamespace(call=lambda fn, timeout_s: fn(eng))
        )
        snap = WorkerState.metrics_snapshot(fake)  # type: ignore[arg-type]
        st = eng.kv_offload.snapshot()
        assert dict(snap.kv_offload_bytes) == {"device": 2 * 32 * bb, "host": 32 * bb}
        assert snap.kv_offload_read_bytes == st.read_bytes > 0
        # 20 prompt tokens + 5 decodes wrote K/V rows of the offloaded layer (the 6th token is not fed back)
        assert snap.kv_offload_write_bytes == st.write_bytes == 25 * bb // 16
        assert snap.kv_offload_stall_seconds == st.stall_s
    finally:
        eng.close()
