"""Disaggregated (1 prefill + 1 decode worker) vs colocated (2 engines, each running requests whole)
on the scaled Mooncake conversation trace, replayed open-loop at the same rates, same SLOs.

Both clusters are the embedded one on 127.0.0.1 (store + router + two worker processes with the same
torch thread count), so the comparison is the serving architecture only: the disaggregated run uses
the router's least-loaded (or ``--pd-policy``) placement, the colocated run its ``colocated`` policy
(every request prefilled on a decode worker). Prints SLO attainment and goodput side by side and
their ratio (disaggregated / colocated), measured in this run.

Usage: python bench/pd_vs_colocated.py [-n 24] [--rates 0.5,1,2] [--ttft 2] [--tpot 0.15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.models.config import ModelConfig  # noqa: E402
from pdserve import loadgen  # noqa: E402
from pdserve.bench_cli import at_rate  # noqa: E402
from pdserve.launcher import ClusterSpec, launch  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402
from simulator.workload import named_workload  # noqa: E402


def sweep(spec: ClusterSpec, rates, a, vocab, slo) -> list[loadgen.Report]:
    cl = launch(spec)
    try:
        out = []
        for i, rate in enumerate(rates):
            # a fresh slice of the trace per rate so the prefix cache is warmed by the trace, not by a rerun
            w = named_workload("mooncake", n=a.num_requests * (i + 1), seed=0)
            w = w.__class__(w.name, w.requests[a.num_requests * i :])
            w = at_rate(w, rate, seed=i)
            reqs = loadgen.materialize(w, a.length_scale, vocab, a.max_input, a.max_output, seed=i)
            res = loadgen.replay(cl.router_address, reqs, slo, progress=True)
            out.append(loadgen.summarize(res, slo, rate))
        return out
    finally:
        cl.stop()


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("-n", "--num-requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--rates", default="0.5,1,2", help="comma-separated request rates (req/s)")
    ap.add_argument("--length-scale", type=int, default=16, help="divide trace lengths by this")
    ap.add_argument("--max-input", type=int, default=512, help="clip prompts to this many tokens")
    ap.add_argument("--max-output", type=int, default=24, help="clip outputs to this many tokens")
    ap.add_argument("--ttft", type=float, default=2.0, help="TTFT SLO (s)")
    ap.add_argument("--tpot", type=float, default=0.15, help="TPOT SLO (s)")
    ap.add_argument("--target", type=float, default=0.9, help="SLO attainment target for goodput")
    ap.add_argument("--pd-policy", default="least_loaded", help="router policy of the disaggregated cluster")
    return cli_help.apply(ap)


def main() -> int:
    ap = build_parser()
    a = ap.parse_args()
    path = resolve_model_path(a.model)
    vocab = ModelConfig.from_path(path).vocab_size
    rates = [float(x) for x in a.rates.split(",")]
    slo = loadgen.SLO(a.ttft, a.tpot)
    pd = sweep(
        ClusterSpec(model_path=str(path), num_prefill=1, num_decode=1, router_args=("--policy", a.pd_policy)),
        rates, a, vocab, slo,
    )  # fmt: skip
    co = sweep(
        ClusterSpec(model_path=str(path), num_prefill=0, num_decode=2, router_args=("--policy", "colocated")),
        rates, a, vocab, slo,
    )  # fmt: skip
    print(f"\nMooncake conversation trace /{a.length_scale}, SLO TTFT {a.ttft}s TPOT {a.tpot}s")
    print(f"{'rate':>6} | {'1P+1D attain':>12} {'goodput':>8} | {'2 coloc attain':>14} {'goodput':>8}")
    for p, c in zip(pd, co, strict=True):
        print(
            f"{p.rate:>6.2f} | {p.attainment:>12.1%} {p.goodput_rps:>8.2f} | "
            f"{c.attainment:>14.1%} {c.goodput_rps:>8.2f}"
        )
    for name, reps in (("1P+1D", pd), ("2 colocated", co)):
        for r in reps:
            print(f"[{name}] " + loadgen.format_report(r))
    gp, gc = loadgen.goodput_from_sweep(pd, a.target), loadgen.goodput_from_sweep(co, a.target)
    ratio = gp / gc if gc > 0 else float("inf")
    print(
        f"\ngoodput at {a.target:.0%} attainment: 1P+1D {gp:.2f} req/s, 2 colocated {gc:.2f} req/s, ratio {ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
