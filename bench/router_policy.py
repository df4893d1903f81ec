"""Router placement benchmark (simulated): goodput-aware placement vs least-loaded, same run.

The router's policy code (``router.policy``) drives the discrete-event simulator unchanged. A
disaggregated Llama-2-7B cluster (Vidur A100 latency tables) serves the first requests of the
Mooncake conversation trace (prefix hashes included; prompts clipped to 3584 tokens) replayed at
a rate near saturation; every request carries the same SLO. Printed per policy: SLO attainment
over *all* requests (rejected ones count as misses), goodput = requests meeting the SLO per
second of the arrival window, rejections, p50/p99 TTFT and p50 TPOT of the served ones; then the
goodput ratio of each policy to least_loaded (colocated is left out: in a P/D cluster it would
use only the decode half).

Caveat, stated here once: in the simulator the goodput policy's latency model *is* the
simulator's (the router's live model is a seed corrected online), so this is its best case.

Usage: python bench/router_policy.py [--requests 600] [--rate 6] [--ttft 2.0] [--tpot 0.1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.policy import SLO, PolicyKind  # noqa: E402
from simulator.config import SimConfig, disaggregated  # noqa: E402
from simulator.latency import LatencySpec  # noqa: E402
from simulator.sim import Simulation  # noqa: E402
from simulator.workload import load_mooncake  # noqa: E402

POLICIES = (PolicyKind.LEAST_LOADED, PolicyKind.GLOBAL_CACHE_AWARE, PolicyKind.GOODPUT)


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="bench/router_policy.py")
    ap.add_argument("--requests", type=int, default=600, help="Mooncake trace requests simulated")
    ap.add_argument("--rate", type=float, default=6.0, help="arrivals per second (trace rescaled)")
    ap.add_argument("--prefill", type=int, default=2, help="prefill instances")
    ap.add_argument("--decode", type=int, default=2, help="decode instances")
    ap.add_argument("--ttft", type=float, default=2.0, help="TTFT SLO (s)")
    ap.add_argument("--tpot", type=float, default=0.1, help="TPOT SLO (s)")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    wl = load_mooncake(limit=a.requests).clipped(max_input=3584, max_total=4096).with_rate(a.rate)
    slo = SLO(a.ttft, a.tpot)
    spec = LatencySpec("llama-2-7b", gpu="a100")
    print(
        f"workload: {len(wl)} Mooncake requests at {wl.rate:.1f}/s; cluster {a.prefill}P+{a.decode}D "
        f"llama-2-7b a100; SLO ttft {a.ttft}s tpot {a.tpot}s"
    )
    span = max(1e-9, wl.duration_s)
    goodput: dict[PolicyKind, float] = {}
    for kind in POLICIES:
        cluster = disaggregated(spec, a.prefill, a.decode, policy=kind)
        res = Simulation(cluster, SimConfig(slo=slo)).run(wl)
        s = res.summary(slo)
        met = s["slo_attainment"] * len(res)
        goodput[kind] = met / span  # same denominator for every policy: the arrival window
        print(
            f"{kind.value:>20}: attainment {s['slo_attainment']:.3f}  goodput {goodput[kind]:.2f} req/s  "
            f"rejected {int(s['rejected'])}  ttft p50 {s['ttft_p50']:.3f}s p99 {s['ttft_p99']:.3f}s  "
            f"tpot p50 {s['tpot_p50']:.4f}s"
        )
    base = goodput[PolicyKind.LEAST_LOADED]
    for kind in POLICIES[1:]:
        ratio = goodput[kind] / base if base > 0 else float("inf")
        print(f"goodput ratio {kind.value} / least_loaded: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
