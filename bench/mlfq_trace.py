"""Per-request timeline of a live MLFQ vs FCFS run (issue #15: where does MLFQ lose live?).

Runs :func:`bench.mlfq_jct.live_run`'s replay with the engine's scheduler instrumented: after each
engine step its duration (on the run's clock) is charged to every request in the engine by state
(``run``: scheduled in the step; ``stall``: running but not scheduled; ``queued``: waiting or
recompute-preempted; ``swapped``: KV on the host), and to its MLFQ level. Also per request: time to
first service, preemptions, swaps; per run: steps, steps with swap traffic and their mean time vs
the others', swapped blocks, prefill/decode tokens. Prints per output-length bucket the mean JCT
and its parts for each policy, so the two runs can be compared where they differ.

Usage: python bench/mlfq_trace.py [--live-requests 200] [--loads 0.9,1.1,1.3] (and mlfq_jct.py's live flags)
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import mlfq_jct  # noqa: E402
from engine.request import RequestStatus  # noqa: E402
from engine.scheduler import SchedulingPolicy  # noqa: E402
from simulator.workload import Workload, WorkloadRequest  # noqa: E402

BUCKETS = ((1, 8), (9, 32), (33, 10**9))


def build_parser():
    p = mlfq_jct.build_parser()
    p.description = __doc__.split("\n\n")[0]
    return p


def traced_run(eng, w: Workload, tag: str) -> dict:
    """Replays ``w`` as :func:`mlfq_jct.live_run` does (:func:`mlfq_jct.replay`), recording the
    timeline."""
    sched = eng.scheduler
    captured: list = []
    orig = sched.schedule
    clock = eng.clock
    sched_s = [0.0]

    def schedule():
        t = clock()
        out = orig()
        sched_s[0] += clock() - t
        captured.append(out)
        return out

    per: dict[str, dict] = {}
    steps: list[tuple[float, bool, int, int]] = []  # (seconds, swapped, batch, prefill tokens)
    blocks = [0, 0]

    def on_arrival(rid: str, r, at: float) -> None:
        per[rid] = {
            "arr": at,
            "out": r.output_len,
            "in": r.input_len,
            "run": 0.0,
            "stall": 0.0,
            "queued": 0.0,
            "swapped": 0.0,
            "lvl": defaultdict(float),
            "first": None,
        }

    def step() -> None:
        live = list(sched.requests.values())
        levels = {r.request_id: r.mlfq_level for r in live}
        ts = clock()
        outs = eng.step()
        te = clock()
        dt = te - ts
        out = captured[-1]
        ids = {s.request.request_id for s in out.scheduled}
        blocks[0] += len(out.swap_out)
        blocks[1] += len(out.swap_in) + len(getattr(out, "prefetch_in", ()) or ())
        swapped = bool(out.swap_out or out.swap_in or getattr(out, "prefetch_in", None))
        steps.append((dt, swapped, len(ids), out.num_prefill_tokens))
        for r in live:
            d = per.get(r.request_id)
            if d is None:
                continue
            if r.request_id in ids:
                d["run"] += dt
                if d["first"] is None:
                    d["first"] = ts - d["arr"]
            elif r.status is RequestStatus.RUNNING:
                d["stall"] += dt
            elif r.status is RequestStatus.SWAPPED:
                d["swapped"] += dt
            else:
                d["queued"] += dt
            d["lvl"][levels[r.request_id]] += dt
            d["pre"] = r.num_preemptions
            d["swaps"] = r.num_swaps
        for o in outs:
            if o.finished:
                per[o.request_id]["jct"] = te - per[o.request_id]["arr"]

    sched.schedule = schedule
    try:
        mlfq_jct.replay(eng, w, tag, on_arrival, step)
    finally:
        sched.schedule = orig
    return {"per": per, "steps": steps, "blocks": blocks, "sched_s": sched_s[0]}


def summarize(name: str, runs: list[dict]) -> dict:
    per = [d for r in runs for d in r["per"].values()]
    steps = [s for r in runs for s in r["steps"]]
    res = {"name": name, "jct": statistics.mean(d["jct"] for d in per)}
    sw = [s[0] for s in steps if s[1]]
    ns = [s[0] for s in steps if not s[1]]
    swd = [s[0] for s in steps if s[1] and not s[3]]
    nsd = [s[0] for s in steps if not s[1] and not s[3]]
    print(
        f"  {name}: mean JCT {res['jct'] * 1e3:.1f} ms; steps {len(steps)} (busy {sum(s[0] for s in steps):.2f} s), "
        f"with swap {len(sw)} mean {statistics.mean(sw) * 1e3 if sw else 0:.2f} ms vs {statistics.mean(ns) * 1e3:.2f} ms; "
        f"decode-only steps with swap {len(swd)} mean {statistics.mean(swd) * 1e3 if swd else 0:.2f} ms vs "
        f"{statistics.mean(nsd) * 1e3 if nsd else 0:.2f} ms; scheduler {sum(r['sched_s'] for r in runs):.2f} s; "
        f"mean batch {statistics.mean(s[2] for s in steps):.2f}; prefill steps "
        f"{sum(1 for s in steps if s[3])}; blocks out/in {sum(r['blocks'][0] for r in runs)}/"
        f"{sum(r['blocks'][1] for r in runs)}; preemptions {sum(d.get('pre', 0) for d in per)}"
    )
    for lo, hi in BUCKETS:
        b = [d for d in per if lo <= d["out"] <= hi]
        if not b:
            continue
        m = {k: statistics.mean(d[k] for d in b) * 1e3 for k in ("jct", "run", "stall", "queued", "swapped")}
        first = statistics.mean(d["first"] for d in b) * 1e3
        lv = defaultdict(float)
        for d in b:
            for k, v in d["lvl"].items():
                lv[k] += v / len(b) * 1e3
        print(
            f"    out {lo}-{hi if hi < 10**9 else 'max'} (n={len(b) // len(runs)}): JCT {m['jct']:.1f} = first {first:.1f} | run {m['run']:.1f} "
            f"stall {m['stall']:.1f} queued {m['queued']:.1f} swapped {m['swapped']:.1f} ms; preempt "
            f"{statistics.mean(d.get('pre', 0) for d in b):.2f}; per level "
            + " ".join(f"L{k}:{v:.1f}" for k, v in sorted(lv.items()))
        )
    return res


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch

    from bench.swap_resume import make_model

    args = build_parser().parse_args(argv)
    loads = [float(x) for x in args.loads.split(",")]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp), 1024)
        engines = {
            p: mlfq_jct.live_engine(path, args, p) for p in (SchedulingPolicy.FCFS, SchedulingPolicy.MLFQ)
        }
        w0 = mlfq_jct.live_workload(args, 1.0)
        for p, e in engines.items():
            mlfq_jct.live_run(e, Workload("warm", w0.requests[:8]), f"warm-{p.value}")
        burst = Workload("burst", tuple(WorkloadRequest(0.0, r.input_len, r.output_len) for r in w0.requests))
        cap = mlfq_jct.live_capacity(engines[SchedulingPolicy.FCFS], burst, args)
        print(f"burst throughput {cap:.2f} req/s; {args.live_requests} requests x {args.live_repeats}")
        for load in loads:
            w = mlfq_jct.live_workload(args, load * cap)
            runs: dict = defaultdict(list)
            for k in range(args.live_repeats):
                for p, e in engines.items():
                    runs[p].append(traced_run(e, w, f"{p.value}-{load}-{k}"))
            print(f"load {load}:")
            f = summarize("FCFS", runs[SchedulingPolicy.FCFS])
            m = summarize("MLFQ", runs[SchedulingPolicy.MLFQ])
            print(f"  MLFQ/FCFS mean JCT {m['jct'] / f['jct']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
