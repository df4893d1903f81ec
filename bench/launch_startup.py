"""Start-up benchmark of the process launcher: processes side by side vs one after another.

Brings up the embedded cluster (``pdserve.launcher.launch``: one KV store, the router, P prefill
and D decode workers; SmolLM2-135M on CPU by default) and streams one greedy request; the time is
from ``launch`` to that request's first token. Two ways, alternated within the run:

* baseline  ``ClusterSpec(parallel_start=False)``: every process starts after the one before has
            printed its ready line (the launcher before 2026-12-07);
* parallel  ``parallel_start=True`` (the default): the store beside the router, the prefill
            workers beside the decode workers (each kind's workers in order).

Prints each start-up, the medians, and ``ratio = parallel / baseline`` of the time to the first
token (lower is better). Both ways load the model the same way; on 2 cores the workers' start-ups
share the cores, so the gain is below the sum of the overlapped start-ups.

Usage: python bench/launch_startup.py [--model PATH] [--reps 3] [--prefill 1] [--decode 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve.client import Client  # noqa: E402
from pdserve.launcher import ClusterSpec, launch  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402

PROMPT = "The capital of France is"


def one_start(model: str, parallel: bool, prefill: int, decode: int) -> tuple[float, float]:
    """(seconds until ``launch`` returned, seconds until the first token) of one start-up."""
    spec = ClusterSpec(
        model_path=model,
        num_prefill=prefill,
        num_decode=decode,
        worker_kv_blocks=256,
        store_capacity_blocks=512,
        parallel_start=parallel,
    )
    t0 = time.monotonic()
    with launch(spec) as cl:
        up = time.monotonic() - t0
        with Client(cl.router_address, timeout=60) as c:
            for _ in c.generate(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True):
                return up, time.monotonic() - t0
    raise RuntimeError("the request streamed no token")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--reps", type=int, default=3, help="start-ups measured per way, alternated (default 3)")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    ap.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.reps < 1 or args.prefill < 1 or args.decode < 1:
        ap.error("--reps, --prefill and --decode must be >= 1")
    model = str(resolve_model_path(args.model))
    print(f"launcher start-up to first token: {args.prefill}P+{args.decode}D, {model}, {os.cpu_count()} CPUs")
    times: dict[str, list[tuple[float, float]]] = {"baseline": [], "parallel": []}
    for rep in range(args.reps):
        for way in ("baseline", "parallel") if rep % 2 == 0 else ("parallel", "baseline"):
            up, first = one_start(model, way == "parallel", args.prefill, args.decode)
            times[way].append((up, first))
            print(f"  rep {rep + 1} {way:8s} launch {up:6.2f} s  first token {first:6.2f} s", flush=True)
    med = {
        w: (statistics.median(u for u, _ in t), statistics.median(f for _, f in t)) for w, t in times.items()
    }
    for w, (u, f) in med.items():
        print(f"{w:8s} median: launch {u:6.2f} s, first token {f:6.2f} s")
    print(f"ratio parallel / baseline (first token): {med['parallel'][1] / med['baseline'][1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
