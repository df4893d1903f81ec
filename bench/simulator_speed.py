"""Simulator speed: 10,000 requests against the issue's 10-second target, on this machine.

Scenarios (ShareGPT-like chatbot lengths, Poisson arrivals at a rate that keeps the cluster busy
without overloading it; Llama-2-7B on A100, Vidur latency model):

* disaggregated: 4 prefill + 4 decode instances (router policy, KV transfers, decode admission);
* colocated: 8 vLLM-style instances;
* mooncake: the first 10,000 requests of the Mooncake conversation trace (prefix hashes, global
  cache-aware placement) on 16 Llama-3-8B prefill + 8 decode instances at the trace's rate.

Printed per scenario: wall and process-CPU seconds (CPU time is what the simulator itself used
when the machine's cores are shared with other work), each as a ratio to the 10 s target (<= 1
meets it; the target is for the first two scenarios, mooncake is a heavier extra), events run, and
simulator events/s against a bare ``heapq`` event loop (no-op callbacks) measured in the same run
with the same event count (the baseline: the cost of the event queue alone).

Usage: python bench/simulator_speed.py [--requests 10000] [--only disaggregated,colocated]
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.policy import SLO, InstanceRole, PolicyKind  # noqa: E402
from simulator.config import ClusterConfig, InstanceGroup, SimConfig, colocated, disaggregated  # noqa: E402
from simulator.latency import LatencySpec  # noqa: E402
from simulator.sim import Simulation  # noqa: E402
from simulator.workload import load_mooncake, sharegpt  # noqa: E402

TARGET_S = 10.0


def bare_heap_rate(n: int) -> float:
    """Events/s of a bare heap loop: push ``n`` timed no-op events, pop and call them in order."""
    heap: list[tuple[float, int, object, tuple]] = []

    def noop() -> None:
        return None

    t0 = time.perf_counter()
    for i in range(n):
        heapq.heappush(heap, ((i * 7919) % n * 1e-3, i, noop, ()))
    while heap:
        _, _, fn, args = heapq.heappop(heap)
        fn(*args)  # type: ignore[operator]
    return n / (time.perf_counter() - t0)


def run(name: str, cluster: ClusterConfig, wl, slo: SLO) -> None:
    sim = Simulation(cluster, SimConfig(slo=slo))
    t0, c0 = time.perf_counter(), time.process_time()
    res = sim.run(wl)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    events = res.num_events
    base = bare_heap_rate(max(events, 1))
    sim_rate = events / wall
    s = res.summary(slo)
    print(
        f"{name:<14} {len(wl):>6} req  wall {wall:6.2f} s (ratio to 10 s target {wall / TARGET_S:.3f})  "
        f"cpu {cpu:6.2f} s (ratio {cpu / TARGET_S:.3f})  "
        f"events {events:>7}  {sim_rate:>8.0f} ev/s vs bare heap {base:>9.0f} ev/s "
        f"(x{base / sim_rate:.0f})  finished {int(s['finished'])}  attainment {s['slo_attainment']:.3f}"
    )


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000, help="requests simulated per scenario")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios (disaggregated, colocated, mooncake); default all",
    )
    return cli_help.apply(ap)


def main() -> int:
    ap = build_parser()
    a = ap.parse_args()
    n = a.requests
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    unknown = only - {"disaggregated", "colocated", "mooncake"}
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    slo = SLO(0.25, 0.1)
    l7 = LatencySpec("llama-2-7b", "a100")
    if not only or "disaggregated" in only:
        run("disaggregated", disaggregated(l7, 4, 4), sharegpt(n, rate=40.0), slo)
    if not only or "colocated" in only:
        run("colocated", colocated(l7, 8), sharegpt(n, rate=60.0), slo)
    if not only or "mooncake" in only:
        groups = (InstanceGroup(InstanceRole.PREFILL, 16, 1), InstanceGroup(InstanceRole.DECODE, 8, 1))
        moon = ClusterConfig(LatencySpec("llama-3-8b", "a100"), groups, policy=PolicyKind.GLOBAL_CACHE_AWARE)
        run("mooncake", moon, load_mooncake(limit=n), SLO(30.0, 0.1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
