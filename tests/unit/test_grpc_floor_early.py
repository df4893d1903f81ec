"""bench/grpc_floor.py's ``--early-redirect`` variant (the redirect sent with the first token, no
admission message from the decode worker) still completes every request: each gets its redirect,
its direct deltas and its finish (a request that lost one would hang the closed loop); and every
process's context switches per request are reported."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_early_redirect_variant_completes_every_request() -> None:
    from bench.grpc_floor import build_parser, measure_floor

    assert build_parser().parse_args(["--early-redirect", "on"]).early_redirect == "on"
    r = measure_floor(
        streams=4, requests=24, deltas=3, tokens_per_delta=2, kv_bytes=1024, early_redirect=True
    )
    assert r.requests == 24
    assert all(v >= 0 for v in r.cpu_ms_per_request.values())
    assert 0 < r.wall_s < 60
    # context switches per request of each process (voluntary, involuntary)
    assert set(r.switches_per_request) == {"store", "prefill", "decode", "router", "client"}
    assert all(v >= 0 and i >= 0 for v, i in r.switches_per_request.values())
