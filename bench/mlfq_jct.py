"""Skip-join MLFQ vs FCFS job completion time on a heavy-tailed workload (issue #15, FastServe),
in the simulator: Llama-2-7B on one A100 (Vidur profiles from ../shared/data/vidur), colocated
(one engine doing prefill and decode, as FastServe's), KV capacity derived from GPU memory.

The engine's own :class:`engine.scheduler.Scheduler` runs inside the simulator
(:mod:`simulator.instance`) on the simulated clock, with the latency model's prefill time for
skip-join; the two runs differ only in ``SchedulerConfig.policy`` (FCFS vs MLFQ, the engine's
default MLFQ settings unless flags say otherwise). Preemption recomputes, or with ``--swap-gib``
the scheduler swaps a victim's KV to a host pool when cheaper (copies at 25 GB/s, charged to the
step). Same requests, same arrival times (equal load).

Workload (seeded): Poisson arrivals; prompts lognormal (median ``--in-median`` tokens, sigma
1.0, 8..2048); outputs heavy-tailed lognormal (median ``--out-median``, sigma ``--out-sigma``,
1..2048). Load: first the burst throughput is measured (all requests at t=0, FCFS: requests /
makespan), then each rate is a fraction of it (``--loads``; the burst figure understates what a
steady stream sustains, so 1.0 is not yet overload: queues build from about 1.1).

JCT = finish - arrival. Prints mean and p90 JCT per policy and the MLFQ/FCFS ratios.
Target: lower mean JCT with MLFQ than FCFS at equal load (PASS/FAIL per load).

``--live``: the same comparison on the real engine (:class:`engine.llm_engine.LLMEngine`, CPU), a
random-weight Llama-like model (4 layers, hidden 256, as bench/swap_resume.py), a small KV pool with
a host swap pool, ``--live-requests`` requests of the same heavy-tailed shape scaled down (prompts
median 32, outputs median 8, sigma 1.6, at most 128), Poisson arrivals at ``--loads`` fractions of
the engine's measured burst throughput; each policy runs ``--live-repeats`` times, alternating, and
JCT (finish - arrival) is averaged over the repeats. ``--live-clock cpu`` (the default) runs
arrivals, JCTs, the burst throughput and MLFQ's starvation bound on this process's CPU time with one
torch thread (idle gaps skipped to the next arrival), so other jobs on a shared host do not stretch
them; ``--live-clock wall`` uses wall time.

Usage: python bench/mlfq_jct.py [--requests 1500] [--loads 0.9,1.1,1.3] [--max-num-seqs 16] [--levels N] [--swap-gib G]
       [--backoff N] [--kv-blocks N]   (a smaller pool than the A100's, so that memory binds and preemption swaps)
       python bench/mlfq_jct.py --live [--live-requests 60] [--loads 0.9,1.1,1.3]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.scheduler import SchedulerConfig, SchedulingPolicy  # noqa: E402
from pdserve import cli_help  # noqa: E402
from simulator.config import colocated  # noqa: E402
from simulator.latency import LatencySpec  # noqa: E402
from simulator.sim import Simulation  # noqa: E402
from simulator.workload import LengthDistribution, LengthKind, Workload, WorkloadRequest, synthetic  # noqa: E402

MAX_LEN = 4096


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1500, help="requests per run (default 1500)")
    p.add_argument(
        "--loads", default="0.9,1.1,1.3", help="arrival rates as fractions of the burst throughput"
    )
    p.add_argument("--max-num-seqs", type=int, default=16, help="batch size limit (default 16)")
    p.add_argument("--in-median", type=float, default=256, help="median prompt tokens (default 256)")
    p.add_argument("--out-median", type=float, default=48, help="median output tokens (default 48)")
    p.add_argument("--out-sigma", type=float, default=1.6, help="lognormal sigma of outputs (default 1.6)")
    p.add_argument("--levels", type=int, default=None, help="MLFQ levels (default: the engine's)")
    p.add_argument(
        "--quantum", type=int, default=None, help="MLFQ base quantum, iterations (default: engine's)"
    )
    p.add_argument(
        "--base-prefill-s", type=float, default=None, help="MLFQ skip-join base (default: engine's)"
    )
    p.add_argument(
        "--swap-gib", type=float, default=0.0, help="host swap pool per instance, GiB (default 0: recompute)"
    )
    p.add_argument(
        "--swap-watermark",
        type=float,
        default=None,
        help="MLFQ: preempt lower levels before the pool passes this fraction (default: engine's; 1.0: "
        "only when the queued request does not fit)",
    )
    p.add_argument(
        "--backoff",
        type=int,
        default=None,
        help="MLFQ: iterations a request swapped out and back in is safe from policy preemption, "
        "doubling with each of its swaps (default: engine's; 0: off)",
    )
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="KV blocks (16 tokens) of the instance (default: derived from the A100's memory)",
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--live", action="store_true", help="run the real engine (CPU, tiny model) instead")
    p.add_argument("--live-requests", type=int, default=60, help="--live: requests per run (default 60)")
    p.add_argument(
        "--live-repeats", type=int, default=2, help="--live: runs per policy, alternating (default 2)"
    )
    p.add_argument(
        "--live-kv-blocks", type=int, default=40, help="--live: device KV blocks of 16 tokens (default 40)"
    )
    p.add_argument("--live-max-num-seqs", type=int, default=8, help="--live: batch size limit (default 8)")
    p.add_argument(
        "--live-starvation-s",
        type=float,
        default=2.0,
        help="--live: MLFQ starvation bound, seconds on the live clock (default %(default)s)",
    )
    p.add_argument(
        "--live-base-prefill-s",
        type=float,
        default=None,
        help="--live: MLFQ skip-join base, seconds (default: the engine's)",
    )
    p.add_argument(
        "--live-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="--live: the clock of arrivals, JCTs and MLFQ's starvation bound: cpu (this process's CPU "
        "time, one torch thread: other jobs on a shared host do not move it) or wall (default: %(default)s)",
    )
    return cli_help.apply(p)


def workload(args: argparse.Namespace, rate: float) -> Workload:
    ins = LengthDistribution(LengthKind.LOGNORMAL, args.in_median, 1.0, lo=8, hi=2048)
    outs = LengthDistribution(LengthKind.LOGNORMAL, args.out_median, args.out_sigma, lo=1, hi=2048)
    return synthetic(args.requests, rate, ins, outs, seed=args.seed, name="heavy-tailed")


def scheduler(args: argparse.Namespace, policy: SchedulingPolicy) -> SchedulerConfig:
    base = SchedulerConfig(
        max_num_batched_tokens=2048,
        max_num_seqs=args.max_num_seqs,
        long_prefill_token_threshold=512,
        max_model_len=MAX_LEN,
        policy=policy,
    )
    kw = {}
    if args.levels is not None:
        kw["mlfq_num_levels"] = args.levels
    if args.quantum is not None:
        kw["mlfq_quantum_iters"] = args.quantum
    if args.base_prefill_s is not None:
        kw["mlfq_base_prefill_s"] = args.base_prefill_s
    if args.swap_watermark is not None:
        kw["mlfq_swap_watermark"] = args.swap_watermark
    if args.backoff is not None:
        kw["mlfq_swap_backoff_iters"] = args.backoff
    return dataclasses.replace(base, **kw)


def run(args: argparse.Namespace, w: Workload, policy: SchedulingPolicy) -> tuple[list[float], float, str]:
    cluster = colocated(
        LatencySpec("llama-2-7b", "a100"),
        1,
        scheduler=scheduler(args, policy),
        max_model_len=MAX_LEN,
        swap_space_gib=args.swap_gib,
        kv_blocks=args.kv_blocks,
    )
    res = Simulation(cluster).run(w)
    jct = [r.finish - r.arrival for r in res.records if r.finished]
    if len(jct) != len(w):
        raise SystemExit(f"{policy.value}: {len(w) - len(jct)} of {len(w)} requests did not finish")
    (st,) = res.instance_stats.values()
    pre = (
        f"{int(st['preemptions'])}/{int(st['swap_outs'])}/{st['swap_s']:.0f}s of {st['busy_s']:.0f}s busy/"
        f"{int(st['prefill_tokens'])}"
    )
    return jct, res.sim_time_s, pre


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1]


# ----------------------------------------------------------------------------- live engine
LIVE_VOCAB = 1024


def live_workload(args: argparse.Namespace, rate: float) -> Workload:
    ins = LengthDistribution(LengthKind.LOGNORMAL, 32, 1.0, lo=4, hi=128)
    outs = LengthDistribution(LengthKind.LOGNORMAL, 8, args.out_sigma, lo=1, hi=128)
    return synthetic(args.live_requests, rate, ins, outs, seed=args.seed, name="heavy-tailed-live")


def live_clock(args: argparse.Namespace):
    """The live runs' clock: the process's CPU time (arrivals and JCTs in seconds of this engine's
    own work, so a loaded host does not stretch them) or wall time."""
    return time.process_time if args.live_clock == "cpu" else time.perf_counter


def live_engine(path: Path, args: argparse.Namespace, policy: SchedulingPolicy):
    from bench.swap_resume import _block_nbytes
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    eng = LLMEngine.from_pretrained(
        path,
        EngineConfig(
            block_size=16,
            num_kv_blocks=args.live_kv_blocks,
            max_num_seqs=args.live_max_num_seqs,
            max_num_batched_tokens=512,
            long_prefill_token_threshold=256,
            max_model_len=320,
            scheduling_policy=policy,
            swap_space_bytes=4 * args.live_kv_blocks * _block_nbytes(path, 16),
            # the tiny model's JCTs are ~100x shorter than the 7B's: starvation in proportion.
            # Skip-join keeps the engine's base (50 ms): this model's prefill step hardly grows
            # with the prompt (2.7 ms for 1 token, 5.2 ms for 256 on one CPU thread); the 2 ms
            # base this bench used to set was below one iteration and put every prompt of more
            # than a few tokens at the bottom level (no demotion left: MLFQ became FCFS plus
            # preemptions of the bottom level by the few short prompts)
            mlfq_starvation_s=args.live_starvation_s,
            **({} if args.live_base_prefill_s is None else {"mlfq_base_prefill_s": args.live_base_prefill_s}),
        ),
    )
    # MLFQ's starvation bound and the requests' arrival times on the bench's clock
    eng.clock = eng.scheduler.clock = live_clock(args)
    return eng


def replay(eng, w: Workload, tag: str, on_arrival, step) -> None:
    """Replays ``w`` against ``eng`` on the engine's clock: a request (id ``{tag}-{i}``, a random
    prompt of its length, seed 1, greedy, ``max_tokens`` its output length) is added once the clock
    passes its arrival, after ``on_arrival(rid, request, arrival)`` (``arrival``: on the engine's
    clock); while idle on the CPU clock the clock is advanced to the next arrival (no work is done
    meanwhile), on the wall clock it sleeps. ``step()`` runs one engine step (it calls
    ``eng.step()`` and handles its outputs) while anything is unfinished."""
    import torch

    from engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, LIVE_VOCAB, (r.input_len,), generator=g).tolist() for r in w.requests]
    pending = list(range(len(w.requests)))
    clock = eng.clock
    cpu = clock is time.process_time
    skipped = 0.0  # CPU clock: idle time skipped (the clock does not run while nothing is to do)
    t0 = clock()
    while pending or eng.has_unfinished():
        now = clock() - t0 + skipped
        while pending and w.requests[pending[0]].arrival_s <= now:
            i = pending.pop(0)
            r = w.requests[i]
            rid = f"{tag}-{i}"
            on_arrival(rid, r, t0 + r.arrival_s - skipped)
            params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            eng.add_request(rid, prompts[i], params)
        if not eng.has_unfinished():
            if cpu:
                skipped += max(0.0, w.requests[pending[0]].arrival_s - now)
            else:
                time.sleep(max(0.0, min(0.01, w.requests[pending[0]].arrival_s - now)))
            continue
        step()


def live_run(eng, w: Workload, tag: str) -> tuple[list[float], dict[str, int]]:
    """Replays ``w`` against ``eng`` (:func:`replay`); returns the JCTs (finish - arrival,
    seconds, on the engine's clock) and the engine's preemption counts."""
    sched = eng.scheduler
    before = (sched.num_preemptions, sched.num_swap_outs, sched.num_promotions)
    arrival: dict[str, float] = {}
    jct: list[float] = []
    clock = eng.clock

    def on_arrival(rid: str, _r, at: float) -> None:
        arrival[rid] = at

    def step() -> None:
        for o in eng.step():
            if o.finished:
                jct.append(clock() - arrival[o.request_id])

    replay(eng, w, tag, on_arrival, step)
    if len(jct) != len(w.requests):
        raise SystemExit(f"live {tag}: {len(jct)} of {len(w.requests)} requests finished")
    counts = {
        "preemptions": sched.num_preemptions - before[0],
        "swap_outs": sched.num_swap_outs - before[1],
        "promotions": sched.num_promotions - before[2],
    }
    return jct, counts


def live_capacity(eng, burst: Workload, args: argparse.Namespace, runs: int = 3) -> float:
    """Burst throughput (requests/s, every request at t=0, FCFS): the median of ``runs`` runs
    (one run's figure moved by 1.5x between invocations on a shared host, and with it every
    load's arrival rate)."""
    clock = live_clock(args)
    caps = []
    for k in range(runs):
        tb = clock()
        live_run(eng, burst, f"burst{k}")
        caps.append(len(burst) / (clock() - tb))
    return statistics.median(caps)


def live_main(args: argparse.Namespace, loads: list[float]) -> int:
    import tempfile

    import torch

    from bench.swap_resume import make_model

    torch.set_num_threads(1 if args.live_clock == "cpu" else max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp), 1024)
        engines = {p: live_engine(path, args, p) for p in (SchedulingPolicy.FCFS, SchedulingPolicy.MLFQ)}
        # warm-up, then capacity: every request at t=0 under FCFS
        w0 = live_workload(args, 1.0)
        live_run(engines[SchedulingPolicy.FCFS], Workload("warm", w0.requests[:8]), "warm")
        live_run(engines[SchedulingPolicy.MLFQ], Workload("warm", w0.requests[:8]), "warm")
        burst = Workload("burst", tuple(WorkloadRequest(0.0, r.input_len, r.output_len) for r in w0.requests))
        capacity = live_capacity(engines[SchedulingPolicy.FCFS], burst, args)
        outs = sorted(r.output_len for r in w0.requests)
        print(
            f"live: tiny random Llama (4 layers, hidden 256, CPU), {args.live_requests} requests, batch "
            f"{args.live_max_num_seqs}, {args.live_kv_blocks} KV blocks + host swap pool; outputs mean "
            f"{statistics.mean(outs):.0f} / median {statistics.median(outs):.0f} / max {outs[-1]} tokens; "
            f"burst throughput (FCFS) {capacity:.2f} req/s; {args.live_repeats} runs per policy, alternating; "
            f"clock: {'process CPU time, 1 torch thread' if args.live_clock == 'cpu' else 'wall'}"
        )
        print(
            f"{'load':>5} {'rate':>6} | {'FCFS mean':>9} {'p90':>8} | {'MLFQ mean':>9} {'p90':>8} | {'mean x':>6} {'p90 x':>6} | verdict"
        )
        ok = True
        for load in loads:
            w = live_workload(args, load * capacity)
            res: dict[SchedulingPolicy, list[float]] = {SchedulingPolicy.FCFS: [], SchedulingPolicy.MLFQ: []}
            cnt: dict[SchedulingPolicy, dict[str, int]] = {}
            for k in range(args.live_repeats):
                for p in (SchedulingPolicy.FCFS, SchedulingPolicy.MLFQ):
                    j, c = live_run(engines[p], w, f"{p.value}-{load}-{k}")
                    res[p].extend(j)
                    cnt[p] = {n: cnt.get(p, {}).get(n, 0) + v for n, v in c.items()}
            f, m = res[SchedulingPolicy.FCFS], res[SchedulingPolicy.MLFQ]
            fm, mm = statistics.mean(f), statistics.mean(m)
            good = mm < fm
            ok &= good
            print(
                f"{load:5.2f} {rate_fmt(load * capacity)} | {fm:8.2f}s {p90(f):7.2f}s | {mm:8.2f}s {p90(m):7.2f}s | "
                f"{mm / fm:6.2f} {p90(m) / p90(f):6.2f} | {'PASS' if good else 'FAIL'}   "
                f"FCFS {cnt[SchedulingPolicy.FCFS]}, MLFQ {cnt[SchedulingPolicy.MLFQ]}"
            )
    print(
        f"target (live): MLFQ mean JCT < FCFS at equal load: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s)"
    )
    return 0


def rate_fmt(rate: float) -> str:
    return f"{rate:6.2f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loads = [float(x) for x in args.loads.split(",")]
    if args.requests < 10 or not all(0 < x < 1.5 for x in loads):
        raise SystemExit("--requests >= 10 and --loads in (0, 1.5)")
    if args.live:
        if args.live_requests < 10 or args.live_repeats < 1:
            raise SystemExit("--live-requests >= 10 and --live-repeats >= 1")
        return live_main(args, loads)
    t0 = time.perf_counter()
    # capacity: every request at t=0 under FCFS
    w0 = workload(args, 1.0)
    burst = Workload("burst", tuple(WorkloadRequest(0.0, r.input_len, r.output_len) for r in w0.requests))
    _, makespan, _ = run(args, burst, SchedulingPolicy.FCFS)
    capacity = len(burst) / makespan
    ins = [r.input_len for r in w0.requests]
    outs = sorted(r.output_len for r in w0.requests)
    cfg = scheduler(args, SchedulingPolicy.MLFQ)
    print(
        f"Llama-2-7B / A100 (Vidur), colocated, max_num_seqs {args.max_num_seqs}, {args.requests} requests; "
        f"prompts mean {statistics.mean(ins):.0f}, outputs mean {statistics.mean(outs):.0f} / median "
        f"{statistics.median(outs):.0f} / p99 {outs[math.ceil(0.99 * len(outs)) - 1]} tokens (heavy tail)"
    )
    print(
        f"MLFQ: {cfg.mlfq_num_levels} levels, quantum {cfg.mlfq_quantum_iters} x 2^level iterations, skip-join "
        f"base {cfg.mlfq_base_prefill_s * 1e3:.0f} ms, starvation {cfg.mlfq_starvation_s:g} s (+{cfg.mlfq_promote_levels} "
        f"level), watermark "
        f"{cfg.mlfq_swap_watermark:g}, swap backoff {cfg.mlfq_swap_backoff_iters} x 2^(k-1) "
        f"iterations (max {cfg.mlfq_swap_backoff_max_iters}); "
        f"swap pool {args.swap_gib:g} GiB; KV blocks {args.kv_blocks or 'derived'}; burst throughput (FCFS) {capacity:.2f} req/s"
    )
    print(
        f"{'load':>5} {'rate':>6} | {'FCFS mean':>9} {'p90':>8} | {'MLFQ mean':>9} {'p90':>8} | "
        f"{'mean x':>6} {'p90 x':>6} | verdict"
    )
    ok = True
    for load in loads:
        rate = load * capacity
        w = workload(args, rate)
        f, _, fp = run(args, w, SchedulingPolicy.FCFS)
        m, _, mp = run(args, w, SchedulingPolicy.MLFQ)
        fm, mm = statistics.mean(f), statistics.mean(m)
        good = mm < fm
        ok &= good
        print(
            f"{load:5.2f} {rate:6.2f} | {fm:8.2f}s {p90(f):7.2f}s | {mm:8.2f}s {p90(m):7.2f}s | "
            f"{mm / fm:6.2f} {p90(m) / p90(f):6.2f} | {'PASS' if good else 'FAIL'}   "
            f"preemptions/swap-outs/swap time of busy time/prefill tokens: FCFS {fp}, MLFQ {mp}"
        )
    print(
        f"target: MLFQ mean JCT < FCFS at equal load: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
