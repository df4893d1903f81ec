"""Load balancing by live migration (issue #14, Llumnix): p99 TPOT and preemptions with and
without rebalancing on a skewed long-output workload, in the simulator: Llama-2-7B on A100
(Vidur profiles from ../shared/data/vidur), decode instances only (the decode-phase study: each
request arrives with its prompt's KV in place, as after a handoff).

The router's own migration policies (``router/policy/migration.py``: Llumnix's virtual usage and
freeness, a move from the least to the most free instance past ``--gap`` blocks per batch slot)
run every ``--interval-s`` over the simulated instances (``simulator/migration.py``): the KV is
copied in stages while the request keeps decoding, then a stop-and-copy of the last blocks plus
a constant ``--stop-copy-ms`` pauses it (copies at ``--bandwidth-gb-s``).

Skew: the decode instance is chosen at random at dispatch (``PolicyKind.RANDOM``: a router that
cannot know output lengths), outputs are heavy-tailed lognormal (median ``--out-median``, sigma
``--out-sigma``, up to 3000 tokens), so some instances collect several long requests, run out of
blocks and preempt (recompute) while others have room. KV per instance: ``--kv-blocks`` blocks of
16 tokens (a smaller pool than an 80 GB A100's, so that memory binds at a rate a short run
reaches; the step times are the A100 profile's). Same requests, same arrival times, same
placements with and without migration (equal load).

Prints per arrival rate p99 / mean TPOT, preemptions and migrations, the with/without ratios,
and PASS when rebalancing lowers both p99 TPOT and preemptions. The last rate is past the
cluster's capacity on purpose: there every instance is short of blocks and moving requests
between them cannot help (reported as it comes out).

Usage: python bench/migration_balance.py [--requests 800] [--rates 6,7,9] [--decode 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve import cli_help  # noqa: E402
from router.policy import InstanceRole, PolicyKind  # noqa: E402
from router.policy.migration import MigrationConfig  # noqa: E402
from simulator.config import ClusterConfig, InstanceGroup  # noqa: E402
from simulator.latency import LatencySpec  # noqa: E402
from simulator.metrics import SimResult  # noqa: E402
from simulator.migration import MigrationResult, SimMigrationConfig  # noqa: E402
from simulator.sim import Simulation  # noqa: E402
from simulator.workload import LengthDistribution, LengthKind, Workload, synthetic  # noqa: E402

MAX_LEN = 4096


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=800, help="requests per run")
    p.add_argument("--rates", default="6,7,9", help="arrival rates, requests/s (comma-separated)")
    p.add_argument("--decode", type=int, default=4, help="decode instances")
    p.add_argument("--kv-blocks", type=int, default=2000, help="KV blocks (16 tokens) per instance")
    p.add_argument("--in-median", type=float, default=256, help="median prompt tokens")
    p.add_argument("--out-median", type=float, default=400, help="median output tokens")
    p.add_argument("--out-sigma", type=float, default=1.2, help="lognormal sigma of outputs")
    p.add_argument("--interval-s", type=float, default=0.5, help="how often the migration policies run")
    p.add_argument("--gap", type=float, default=8.0, help="freeness gap that triggers a move (blocks/slot)")
    p.add_argument("--bandwidth-gb-s", type=float, default=12.5, help="KV copy bandwidth between instances")
    p.add_argument("--stop-copy-ms", type=float, default=20.0, help="constant part of the stop-and-copy")
    p.add_argument("--seed", type=int, default=0, help="workload and placement seed")
    return cli_help.apply(p)


def workload(args: argparse.Namespace, rate: float) -> Workload:
    ins = LengthDistribution(LengthKind.LOGNORMAL, args.in_median, 0.5, lo=8, hi=1024)
    outs = LengthDistribution(LengthKind.LOGNORMAL, args.out_median, args.out_sigma, lo=16, hi=3000)
    return synthetic(args.requests, rate, ins, outs, seed=args.seed, name="skewed-long-output")


def run(args: argparse.Namespace, w: Workload, migrate: bool) -> SimResult:
    mig = None
    if migrate:
        mig = SimMigrationConfig(
            policy=MigrationConfig(balance_threshold=args.gap),
            interval_s=args.interval_s,
            bandwidth_gb_s=args.bandwidth_gb_s,
            stop_copy_s=args.stop_copy_ms / 1e3,
        )
    cluster = ClusterConfig(
        LatencySpec("llama-2-7b", "a100"),
        (InstanceGroup(InstanceRole.DECODE, args.decode),),
        kv_blocks=args.kv_blocks,
        max_model_len=MAX_LEN,
        policy=PolicyKind.RANDOM,
        seed=args.seed,
        migration=mig,
    )
    res = Simulation(cluster).run(w)
    if res.num_finished != len(w):
        raise SystemExit(
            f"migration={migrate}: {len(w) - res.num_finished} of {len(w)} requests did not finish"
        )
    return res


def preemptions(res: SimResult) -> int:
    return int(sum(s["preemptions"] for s in res.instance_stats.values()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    if args.requests < 10 or args.decode < 2 or not all(r > 0 for r in rates):
        raise SystemExit("--requests >= 10, --decode >= 2 and --rates > 0")
    t0 = time.perf_counter()
    w0 = workload(args, rates[0])
    outs = sorted(r.output_len for r in w0.requests)
    print(
        f"Llama-2-7B / A100 (Vidur), {args.decode} decode instances x {args.kv_blocks} KV blocks, random "
        f"dispatch, {args.requests} requests; outputs mean {statistics.mean(outs):.0f} / median "
        f"{statistics.median(outs):.0f} / p99 {outs[int(0.99 * len(outs)) - 1]} tokens"
    )
    print(
        f"migration: gap {args.gap:g} blocks/slot, every {args.interval_s:g} s, {args.bandwidth_gb_s:g} GB/s, "
        f"stop-and-copy {args.stop_copy_ms:g} ms + last blocks"
    )
    print(
        f"{'rate':>5} | {'p99 TPOT off':>12} {'on':>8} {'x':>5} | {'mean off':>8} {'on':>7} | "
        f"{'preempt off':>11} {'on':>5} {'x':>5} | {'moves':>5} {'aborted':>7} {'downtime p50':>12} | verdict"
    )
    passed = 0
    for rate in rates:
        w = workload(args, rate)
        off, on = run(args, w, False), run(args, w, True)
        t_off, t_on = off.array("tpot"), on.array("tpot")
        p_off, p_on = float(np.percentile(t_off, 99)), float(np.percentile(t_on, 99))
        n_off, n_on = preemptions(off), preemptions(on)
        done = [m for m in on.migrations if m.result is MigrationResult.DONE]
        down = statistics.median(m.downtime_s for m in done) if done else float("nan")
        good = p_on < p_off and n_on < n_off
        passed += good
        print(
            f"{rate:5.1f} | {p_off * 1e3:10.1f}ms {p_on * 1e3:6.1f}ms {p_on / p_off:5.2f} | "
            f"{t_off.mean() * 1e3:6.1f}ms {t_on.mean() * 1e3:5.1f}ms | {n_off:11d} {n_on:5d} "
            f"{n_on / max(1, n_off):5.2f} | {len(done):5d} {len(on.migrations) - len(done):7d} "
            f"{down * 1e3:10.1f}ms | {'PASS' if good else 'FAIL'}"
        )
    print(
        f"target: rebalancing lowers p99 TPOT and preemptions at every rate: "
        f"{'PASS' if passed == len(rates) else 'FAIL'} ({passed}/{len(rates)} rates; {time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
