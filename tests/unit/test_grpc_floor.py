"""bench/grpc_floor.py drives the bare message pattern of direct requests end to end (every request
gets its redirect, its direct deltas and its finish) and reports every process's CPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_floor_runs_every_request_and_reports_each_process() -> None:
    from bench.grpc_floor import measure_floor

    r = measure_floor(streams=4, requests=24, deltas=3, tokens_per_delta=2, kv_bytes=1024)
    assert r.requests == 24 and r.deltas == 3
    assert set(r.cpu_ms_per_request) == {"store", "prefill", "decode", "router", "client", "all"}
    assert all(v >= 0 for v in r.cpu_ms_per_request.values())
    parts = sum(v for k, v in r.cpu_ms_per_request.items() if k != "all")
    assert abs(r.cpu_ms_per_request["all"] - parts) < 1e-9
    assert 0 < r.wall_s < 60
