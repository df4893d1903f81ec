"""Adapter affinity in the simulator (issue #16): TTFT and adapter loads of placement policies
that price when an instance has the adapter ready (the router's cache-aware and goodput policies,
``router.policy.adapter_cost``: nothing for an adapter in a slot, the host -> device copy for
one in host memory, the disk read behind the reads queued + copy otherwise, and the wait for a
slot when every slot is pinned; the cache-aware policies take the least loaded of equally fast
candidates, the goodput policy compares where a request can start soonest before TPOT) against
policies that do not (round robin, least loaded), on the same requests.

Cluster: ``--instances`` colocated Llama-2-7B instances on A100 (Vidur profiles from
../shared/data/vidur), each serving ``--adapters`` rank-``--rank`` adapters on all 7 projections
(80 MB each at rank 16, fp16) with ``--max-loras`` engine slots and ``--max-cpu-loras`` adapters
in host memory (copy at ``--h2d-gbs``, disk reads at ``--disk-gbs``). Workload: ShareGPT-like
lengths, Poisson arrivals at each of ``--rates``, adapters drawn Zipf(``--zipf-s``). LoRA's step
cost is the simulator's default (calibrated on bench/lora_step.py, a CPU measurement). The same
requests on the base model alone (no adapters) are the reference row.

Prints per rate and policy: mean / p90 TTFT, slot loads, disk reads, the request-seconds spent
waiting for a slot or a read, and per rate each affinity policy's loads and mean TTFT over the
best policy without affinity, and cache-aware's mean TTFT over least-loaded's on the base model
alone (lower is better).

Usage: python bench/sim_adapter_affinity.py [--requests 1000] [--rates 6,10] [--instances 4]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve import cli_help  # noqa: E402
from router.policy import PolicyKind  # noqa: E402
from simulator.adapters import AdapterConfig, AdapterPopularity, with_adapters  # noqa: E402
from simulator.config import colocated  # noqa: E402
from simulator.latency import LatencySpec  # noqa: E402
from simulator.metrics import SimResult  # noqa: E402
from simulator.sim import Simulation  # noqa: E402
from simulator.workload import sharegpt  # noqa: E402

NO_AFFINITY = (PolicyKind.ROUND_ROBIN, PolicyKind.LEAST_LOADED)
AFFINITY = (PolicyKind.LOCAL_CACHE_AWARE, PolicyKind.GOODPUT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--requests", type=int, default=1000, help="requests per run")
    p.add_argument("--rates", default="6,10", help="arrival rates, requests/s (comma-separated)")
    p.add_argument("--instances", type=int, default=4, help="colocated instances")
    p.add_argument("--adapters", type=int, default=64, help="adapters every instance serves")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    p.add_argument("--rank", type=int, default=16, help="rank of every adapter")
    p.add_argument("--max-loras", type=int, default=8, help="engine slots per instance")
    p.add_argument("--max-cpu-loras", type=int, default=16, help="adapters in host memory per instance")
    p.add_argument("--h2d-gbs", type=float, default=25.0, help="host -> device copy bandwidth, GB/s")
    p.add_argument("--disk-gbs", type=float, default=3.0, help="disk read bandwidth, GB/s")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    return cli_help.apply(p)


def totals(res: SimResult, key: str) -> float:
    return sum(s.get(key, 0) for s in res.instance_stats.values())


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    lat = LatencySpec("llama-2-7b", "a100")
    ad = AdapterConfig(
        num_adapters=a.adapters,
        ranks=(a.rank,),
        max_loras=a.max_loras,
        max_cpu_loras=a.max_cpu_loras or None,
        host_to_device_gb_s=a.h2d_gbs,
        disk_gb_s=a.disk_gbs,
    )
    print(
        f"llama-2-7b / A100 x {a.instances} colocated, {a.adapters} adapters rank {a.rank} (Zipf {a.zipf_s}), "
        f"{a.max_loras} slots, {a.max_cpu_loras} in host memory, {a.requests} requests; load {os.getloadavg()[0]:.1f}"
    )
    head = f"{'rate':>5} {'policy':<24} {'ttft mean':>9} {'ttft p90':>9} {'slot loads':>10} {'disk reads':>10} {'wait s':>8}"
    for rate in (float(x) for x in a.rates.split(",")):
        base = sharegpt(a.requests, rate=rate, seed=a.seed)
        wl = with_adapters(base, a.adapters, AdapterPopularity.ZIPF, zipf_s=a.zipf_s, seed=a.seed)
        print(head)
        ref_ttft: dict[PolicyKind, float] = {}
        for pol in (PolicyKind.LEAST_LOADED, PolicyKind.LOCAL_CACHE_AWARE):
            ref = Simulation(colocated(lat, a.instances, policy=pol)).run(base).summary()
            ref_ttft[pol] = ref["ttft_mean"]
            name = f"base: {pol.value}"
            print(f"{rate:>5g} {name:<24} {ref['ttft_mean']:>9.3f} {ref['ttft_p90']:>9.3f}")
        got: dict[PolicyKind, tuple[float, float]] = {}
        for pol in NO_AFFINITY + AFFINITY:
            res = Simulation(colocated(lat, a.instances, policy=pol, adapters=ad)).run(wl)
            s = res.summary()
            loads = totals(res, "adapter_slot_loads")
            got[pol] = (s["ttft_mean"], loads)
            print(
                f"{rate:>5g} {pol.value:<24} {s['ttft_mean']:>9.3f} {s['ttft_p90']:>9.3f} {loads:>10.0f} "
                f"{totals(res, 'adapter_disk_loads'):>10.0f} {totals(res, 'adapter_wait_s'):>8.1f}"
            )
        best_no = min(NO_AFFINITY, key=lambda k: got[k][0])
        for aff in AFFINITY:
            print(
                f"  rate {rate:g}: {aff.value} / {best_no.value}: mean TTFT "
                f"{got[aff][0] / got[best_no][0]:.2f}x, slot loads {got[aff][1] / max(got[best_no][1], 1):.2f}x"
            )
        print(
            f"  rate {rate:g}: base model, {PolicyKind.LOCAL_CACHE_AWARE.value} / {PolicyKind.LEAST_LOADED.value}: "
            f"mean TTFT {ref_ttft[PolicyKind.LOCAL_CACHE_AWARE] / ref_ttft[PolicyKind.LEAST_LOADED]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
