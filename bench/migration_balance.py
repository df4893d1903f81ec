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

Live (``--live``): the same study on real processes (``pdserve.launcher``: a router, a store, one
prefill and two decode workers running SmolLM2-135M on this host's CPUs), once with rebalancing
off and once with ``--rebalance-interval-s`` on, the same requests at the same arrival times.
Skew: the router places by round robin (it cannot know output lengths) and the requests alternate
long (``--live-long`` tokens) and short (``--live-short``) outputs, so every long request lands on
one decode worker, whose small KV pool (``--live-kv-blocks`` blocks of 16 tokens) cannot hold them
all: it preempts (recompute) while the other worker has room. Measured: each request's TPOT as
the client sees it ((last token - first token) / (tokens - 1)), p99 and mean over the requests;
the decode workers' preemptions (their Stats counters, before/after); migrations started (the
router's log). Prints both runs and the on/off ratios. A loaded host's noise is large: the load
is kept small (``--live-requests``, ``--live-rate``) so that the two CPU cores carry it.

Usage: python bench/migration_balance.py [--requests 800] [--rates 6,7,9] [--decode 4]
       python bench/migration_balance.py --live [--live-requests 8] [--live-rate 0.5]
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
DEFAULT_MODEL = Path.home() / ".cache" / "pdserve" / "models" / "SmolLM2-135M-Instruct"


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
    p.add_argument("--live", action="store_true", help="run the live study on real processes instead")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="live: the model folder (SmolLM2-135M)")
    p.add_argument("--live-requests", type=int, default=8, help="live: requests per run (half of them long)")
    p.add_argument("--live-rate", type=float, default=0.5, help="live: arrival rate, requests/s")
    p.add_argument("--live-long", type=int, default=256, help="live: output tokens of a long request")
    p.add_argument("--live-short", type=int, default=16, help="live: output tokens of a short request")
    p.add_argument("--live-prompt", type=int, default=48, help="live: prompt tokens")
    p.add_argument(
        "--live-kv-blocks", type=int, default=48, help="live: KV blocks (16 tokens) per decode worker"
    )
    p.add_argument("--live-interval-s", type=float, default=0.5, help="live: rebalancing interval when on")
    p.add_argument("--live-gap", type=float, default=2.0, help="live: rebalancing freeness gap (blocks/slot)")
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


def _live_run(args: argparse.Namespace, rebalance: bool) -> dict:
    """One live run (see the module docstring): per-request TPOT, preemptions, migrations."""
    import contextlib
    import json
    import threading

    from engine.sampling_params import SamplingParams
    from pdserve.client import Client
    from pdserve.launcher import ClusterSpec, launch
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    router_args: tuple[str, ...] = ("--policy", "round_robin", "--migration", "on")
    if rebalance:
        router_args += (
            "--rebalance-interval-s",
            str(args.live_interval_s),
            "--rebalance-gap",
            str(args.live_gap),
        )
    cl = launch(
        ClusterSpec(
            model_path=args.model,
            num_prefill=1,
            num_decode=2,
            worker_kv_blocks=args.live_kv_blocks,
            store_capacity_blocks=2048,
            direct_streams=False,
            router_args=router_args,
            startup_timeout_s=900.0,  # a loaded host loads the model slowly
        )
    )

    def stats() -> dict[str, worker_pb2.WorkerStats]:
        import grpc

        out = {}
        for w, a in cl.workers.items():
            if w.startswith("decode"):
                with grpc.insecure_channel(a) as ch:
                    out[w] = worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=30)
        return out

    try:
        before = stats()
        n = args.live_requests
        tpots: list[float] = [float("nan")] * n
        errors: list[str] = []

        def one(i: int, client: Client) -> None:
            out = args.live_long if i % 2 == 0 else args.live_short
            prompt = [(7 * i + 13 * k) % 5000 + 100 for k in range(args.live_prompt)]
            params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
            times: list[float] = []
            try:
                for c in client.generate(prompt, params, direct=False):
                    times.extend([time.perf_counter()] * len(c.token_ids))
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                errors.append(f"request {i}: {type(e).__name__}: {e}")
                return
            if len(times) >= 2:
                tpots[i] = (times[-1] - times[0]) / (len(times) - 1)

        t0 = time.perf_counter()
        with Client(cl.router_address, timeout=900) as client:
            threads = []
            for i in range(n):
                delay = t0 + i / args.live_rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                th = threading.Thread(target=one, args=(i, client))
                th.start()
                threads.append(th)
            for th in threads:
                th.join()
        wall = time.perf_counter() - t0
        after = stats()
        moves = 0
        for line in list(cl.logs.get("router", [])):
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    moves += json.loads(line).get("msg") == "migration started"
        return {
            "tpot": np.array([t for t in tpots if t == t]),
            "preemptions": sum(after[w].num_preempted - before[w].num_preempted for w in after),
            "decode_tokens": {w: after[w].decode_tokens_total - before[w].decode_tokens_total for w in after},
            "moves": moves,
            "errors": errors,
            "wall_s": wall,
        }
    finally:
        cl.stop()


def live(args: argparse.Namespace) -> int:
    print(
        f"live: SmolLM2-135M on this host's CPUs, 1 prefill + 2 decode workers x {args.live_kv_blocks} KV "
        f"blocks, round-robin placement, {args.live_requests} requests at {args.live_rate:g}/s alternating "
        f"{args.live_long} / {args.live_short} output tokens, prompts of {args.live_prompt}; rebalancing: "
        f"every {args.live_interval_s:g} s past a gap of {args.live_gap:g} blocks/slot"
    )
    runs = {}
    for on in (False, True):
        r = runs[on] = _live_run(args, on)
        t = r["tpot"]
        print(
            f"  rebalancing {'on ' if on else 'off'}: p99 TPOT {np.percentile(t, 99) * 1e3:7.1f} ms, mean "
            f"{t.mean() * 1e3:6.1f} ms, preemptions {r['preemptions']:3d}, migrations started {r['moves']:2d}, "
            f"decode tokens per worker {r['decode_tokens']}, {len(t)}/{args.live_requests} requests, "
            f"{r['wall_s']:.0f} s" + (f"; errors: {r['errors']}" if r["errors"] else "")
        )
    off, on = runs[False], runs[True]
    p_off, p_on = float(np.percentile(off["tpot"], 99)), float(np.percentile(on["tpot"], 99))
    print(
        f"  ratio on/off: p99 TPOT {p_on / p_off:.2f}x, mean TPOT {on['tpot'].mean() / off['tpot'].mean():.2f}x, "
        f"preemptions {on['preemptions']} vs {off['preemptions']} "
        f"({on['preemptions'] / max(1, off['preemptions']):.2f}x)"
    )
    good = p_on < p_off and on["preemptions"] < off["preemptions"]
    print(f"  target (lower p99 TPOT and fewer preemptions with rebalancing): {'PASS' if good else 'FAIL'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.live:
        return live(args)
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
