"""``pdserve bench``: replay a workload open-loop against a cluster and write a report.

Either against a running cluster (``--address``) or an embedded one it launches on 127.0.0.1
(``--embedded``, optional ``--policy`` passed to the router). For each ``--rates`` value the
workload is rescaled to that mean rate (requests sharing a coarse trace timestamp spread over its
bucket first: :func:`spread_ties`), materialised to tokens (:func:`pdserve.loadgen.materialize`:
lengths divided by ``--length-scale``; Mooncake hash_ids become shared token prefixes), replayed,
and summarised (TTFT/TPOT/e2e p50/p90/p99, SLO attainment, goodput, rejections, prefix hit rate).
Writes ``report.json``, ``requests_rate<r>.csv`` and PNG plots (attainment vs rate, latency CDFs)
into ``--out``; the goodput over the sweep is the largest rate whose attainment reaches
``--target``.

Warm-up (``--warmup N``, default 8; 0: none): before the first measured rate, N requests of the
same workload (another seed) are sent one at a time without an SLO (placed best effort, never
refused), so the first measured rate does not pay for cold engines and the router's online
correction has samples of the cluster's own service times (one at a time: no queueing of
warm-up requests behind each other, which only the cold start would cause). Their summary is printed and reported (``warmup`` in ``report.json``)
apart from the sweep. Each rate's summary states how many requests were rejected, why and the
retry-after hints, and SLO attainment of all requests (a rejection is a miss) vs of the admitted.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from pdserve import loadgen
from pdserve.arg_types import fraction, positive_int, positive_seconds


def register(subparsers) -> None:
    b = subparsers.add_parser("bench", help="replay a trace open-loop against a cluster; JSON + PNG report")
    b.add_argument("--address", default="", help="router address of a running cluster (or --embedded)")
    b.add_argument("--embedded", action="store_true", help="launch the embedded cluster for the run")
    b.add_argument("--model", default=None, help="model folder (embedded; default: bundled SmolLM2)")
    b.add_argument("--policy", default="", help="router placement policy (embedded), e.g. goodput")
    b.add_argument("--workload", default="mooncake", help="mooncake | azure-code | sharegpt | PATH")
    b.add_argument("-n", "--num-requests", type=positive_int, default=32, help="requests replayed per rate")
    b.add_argument("--rates", default="0.5", help="comma-separated request rates (req/s) to sweep")
    b.add_argument("--length-scale", type=positive_int, default=16, help="divide trace lengths by this")
    b.add_argument("--max-input", type=positive_int, default=512, help="clip prompts to this many tokens")
    b.add_argument("--max-output", type=positive_int, default=32, help="clip outputs to this many tokens")
    b.add_argument("--ttft", type=positive_seconds, default=2.0, help="TTFT SLO (s)")
    b.add_argument("--tpot", type=positive_seconds, default=0.2, help="TPOT SLO (s)")
    b.add_argument("--target", type=fraction, default=0.9, help="attainment target for goodput")
    b.add_argument("--seed", type=int, default=0, help="seed of the workload and its token contents")
    b.add_argument("--out", default="pdserve-bench", help="output folder")
    b.add_argument(
        "--warmup",
        type=int,
        default=8,
        help="warm-up requests replayed (no SLO, best effort) before the first measured rate and "
        "reported apart (0: no warm-up)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run)


def _rates(s: str) -> list[float]:
    """``--rates``: comma-separated finite rates > 0 (an empty entry, as in "1,,2", is refused,
    not skipped)."""
    import math

    try:
        rates = [float(x) for x in s.split(",")]
    except ValueError:
        raise SystemExit(f"--rates: expected comma-separated numbers, got {s!r}") from None
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise SystemExit(f"--rates: need finite positive rates, got {s!r}")
    return rates


def at_rate(w, rate: float, seed: int = 0):
    """``w`` arriving at mean ``rate`` req/s: its own arrival pattern rescaled, or, when the trace
    slice has no spread (all arrivals equal), Poisson arrivals at ``rate`` in trace order.

    A trace whose timestamps are coarse (the Mooncake conversation trace stamps requests in 3 s
    buckets: 10 requests at 0 ms, 16 at 3000 ms, ...) is first de-quantised
    (:func:`spread_ties`): requests sharing a timestamp arrived somewhere within its bucket, not
    at one instant; replayed together, each bucket became a burst of up to 16 simultaneous
    prompts, which no 2 s TTFT SLO can absorb on a small cluster at any mean rate (issue #19)."""
    import math
    from dataclasses import replace

    import numpy as np

    from simulator.workload import Workload

    if len(w) >= 2 and math.isfinite(w.rate):
        return spread_ties(w, seed).with_rate(rate)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(w))
    gaps[0] = 0.0
    t = np.cumsum(gaps)
    return Workload(w.name, tuple(replace(r, arrival_s=float(x)) for r, x in zip(w.requests, t, strict=True)))


def spread_ties(w, seed: int = 0):
    """``w`` (sorted by arrival, at least two distinct arrival times) with every group of requests
    sharing one timestamp spread over that timestamp's bucket: uniform (seeded) times in
    ``[t, next distinct t)``, sorted, trace order kept within the group; the last group over the
    median bucket width. The first request stays at its time; a trace without ties is returned
    as it is. Bucket counts (the trace's rate at its own resolution) are unchanged."""
    from dataclasses import replace

    import numpy as np

    from simulator.workload import Workload

    times = [r.arrival_s for r in w.requests]
    distinct = sorted(set(times))
    if len(distinct) == len(times) or len(distinct) < 2:
        return w
    widths = [b - a for a, b in zip(distinct, distinct[1:], strict=False)]
    width_of = dict(zip(distinct, widths, strict=False))
    width_of[distinct[-1]] = float(np.median(widths))
    rng = np.random.default_rng(seed)
    out = []
    i = 0
    while i < len(times):
        j = i
        while j < len(times) and times[j] == times[i]:
            j += 1
        t, k = times[i], j - i
        offsets = np.sort(rng.uniform(0.0, width_of[t], k)) if k > 1 else np.zeros(1)
        if i == 0:
            offsets[0] = 0.0  # the replay starts with its first request
        out.extend(replace(r, arrival_s=t + float(o)) for r, o in zip(w.requests[i:j], offsets, strict=True))
        i = j
    return Workload(w.name, tuple(out))


def _no_router(address: str, timeout_s: float = 10.0) -> str:
    """Why a sweep against ``address`` cannot run ('' when a router answers there): before
    replaying anything, so that a wrong address or a stopped cluster is one clear error, not a
    report of requests that all failed. A router that answers NOT_SERVING (no worker registered
    yet) is reported on stderr and the sweep goes on."""
    from pdserve.client import Client, ServingStatus
    from pdserve.errors import PdserveError

    try:
        with Client(address, timeout=timeout_s) as c:
            status = c.health()
    except PdserveError as e:
        return (
            f"no router answers at {address} ({e}); start a cluster with `pdserve serve` and give its "
            "router's --address, or launch one for the run with --embedded"
        )
    if status is not ServingStatus.SERVING:
        print(
            f"pdserve bench: the router at {address} is {status.name} (no worker to place a request "
            "on yet?); replaying anyway",
            file=sys.stderr,
        )
    return ""


def run(a: argparse.Namespace) -> int:
    from engine.models.config import ModelConfig
    from pdserve.model_setup import resolve_model_path
    from simulator.workload import named_workload

    if bool(a.address) == bool(a.embedded):
        print("pdserve bench: give exactly one of --address or --embedded", file=sys.stderr)
        return 2
    rates = _rates(a.rates)
    if a.warmup < 0:
        print("pdserve bench: --warmup must be >= 0", file=sys.stderr)
        return 2
    named_workload(a.workload, n=1, seed=a.seed)  # a bad workload is refused before a cluster starts
    path = resolve_model_path(a.model)
    vocab = ModelConfig.from_path(path).vocab_size
    slo = loadgen.SLO(a.ttft, a.tpot)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = None
    address = a.address
    if a.embedded:
        from pdserve.launcher import ClusterSpec, launch

        router_args = ("--policy", a.policy) if a.policy else ()
        cluster = launch(ClusterSpec(model_path=str(path), router_args=router_args))
        address = cluster.router_address
    else:
        missing = _no_router(address)
        if missing:
            print(f"pdserve bench: {missing}", file=sys.stderr)
            return 2
    reports, all_results = [], []
    warm = None
    try:
        if a.warmup:
            ww = named_workload(a.workload, n=a.warmup, seed=a.seed + 1)
            wreqs = loadgen.materialize(ww, a.length_scale, vocab, a.max_input, a.max_output, a.seed + 1)
            wres = [  # one at a time
                r
                for q in wreqs
                for r in loadgen.replay(address, [replace(q, arrival_s=0.0)], None, progress=False)
            ]
            warm = loadgen.summarize(wres, slo, min(rates))
            print(f"warm-up ({a.warmup} requests one at a time, no SLO, not part of the sweep):")
            print(loadgen.format_report(warm))
        for rate in rates:
            w = at_rate(named_workload(a.workload, n=a.num_requests, seed=a.seed), rate, a.seed)
            reqs = loadgen.materialize(w, a.length_scale, vocab, a.max_input, a.max_output, a.seed)
            res = loadgen.replay(address, reqs, slo, progress=not a.no_progress)
            rep = loadgen.summarize(res, slo, rate)
            reports.append(rep)
            all_results.append(res)
            print(loadgen.format_report(rep))
            with open(out / f"requests_rate{rate:g}.csv", "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(asdict(res[0]).keys()))
                wr.writeheader()
                wr.writerows(asdict(r) for r in res)
    finally:
        if cluster is not None:
            cluster.stop()
    goodput = loadgen.goodput_from_sweep(reports, a.target)
    pngs = loadgen.plot(reports, all_results, str(out / "bench"))
    report = {
        "workload": a.workload,
        "policy": a.policy or "default",
        "slo": asdict(slo),
        "target": a.target,
        "goodput_rps": goodput,
        "warmup": warm.to_dict() if warm is not None else None,
        "sweep": [r.to_dict() for r in reports],
        "plots": pngs,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"goodput (attainment >= {a.target:.0%}): {goodput:.2f} req/s; report in {out}/report.json")
    return 0
