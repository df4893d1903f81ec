"""bench/router_python.py drives the real router servicer against its in-process fake workers:
every direct request gets its first token, its redirect and a finish counting all its tokens
(the bench raises otherwise), and a CPU figure per round comes back."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_router_python_bench_serves_every_request_and_reports_each_round(tmp_path) -> None:
    from bench.router_python import measure

    per = measure(requests=48, concurrency=8, rounds=2, max_tokens=5, profile=str(tmp_path / "p.prof"))
    assert len(per) == 2 and all(x > 0 for x in per)
    assert (tmp_path / "p.prof").stat().st_size > 0
