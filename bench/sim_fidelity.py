"""Simulator fidelity: simulate the real engine from its own profile, compare with a measured run.

1. Profile the real engine (``simulator.profile.measure_profile``, a small grid) -> fitted
   :class:`simulator.latency.ProfiledLatencyModel`; the held-out fit error is printed.
2. Run the real engine (``LLMEngine`` in-process, SmolLM2-135M) on a small Poisson workload with
   wall-clock arrivals: a driver adds each request at its arrival time and steps the engine.
3. Simulate the same workload (same arrivals and lengths, same scheduler settings and KV size)
   on one colocated instance with the profiled latency model.
4. Print p50 TTFT and p50 TPOT, measured vs simulated, and their ratio. Target: within 15%.

Both runs use ``torch.set_num_threads(--threads)`` (default 1) so that the profile describes
the engine as it runs here. ``--clock cpu`` times profile steps and the replay by this process's
CPU time (a virtual clock, see :func:`run_engine`) for machines whose CPUs are shared. ``--target cluster`` measures a local cluster instead (router + 1 prefill + 1 decode worker +
store, separate processes over gRPC on 127.0.0.1, driven open loop by ``pdserve.loadgen``) and
simulates it disaggregated (1 prefill + 1 decode instance, KV transfer at ``--transfer-gbps``);
wall clock only. The cluster's serving path (client -> router -> worker RPCs, streaming back) is
not in the engine profile: with ``--calibrate N`` (default 4) the same cluster first serves N
lone requests, and their median TTFT minus the modelled prefill time is simulated as a fixed
per-request ``ClusterConfig.dispatch_overhead_s``; both simulations (without and with it) are
printed. Usage:
python bench/sim_fidelity.py [--requests 32] [--rate 0.8] [--clock wall|cpu] [--target engine|cluster]
    [--calibrate 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import SchedulerConfig  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402
from router.policy import SLO, InstanceRole  # noqa: E402
from simulator.config import CacheConfig, ClusterConfig, InstanceGroup, SimConfig  # noqa: E402
from simulator.latency import LatencySource, LatencySpec  # noqa: E402
from simulator.profile import ProfileGrid, holdout_error, measure_profile, save  # noqa: E402
from simulator.sim import Simulation  # noqa: E402
from simulator.workload import LengthDistribution, LengthKind, Workload, synthetic  # noqa: E402

GRID = ProfileGrid(
    prefill_tokens=(16, 64, 128, 256),
    prefill_batches=(1, 2),
    prefill_contexts=(0,),
    decode_batches=(1, 2, 4, 8),
    decode_contexts=(32, 160),
    decode_steps=4,
    repeats=3,
)


def run_engine(
    engine: LLMEngine, wl: Workload, seed: int, cpu_clock: bool
) -> tuple[list[float], list[float]]:
    """Replay ``wl`` against the real engine; returns per-request TTFT and TPOT (seconds).

    Wall clock (default): a driver adds each request at its wall-clock arrival time and steps the
    engine while it has work (idle: sleeps until the next arrival). CPU clock: the same driver on
    a virtual clock that advances by each step's process CPU time and jumps to the next arrival
    when idle, so that other processes competing for the CPU do not enter the measurement.
    """
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, 5000, r.input_len).tolist() for r in wl.requests]
    arrivals = [r.arrival_s for r in wl.requests]
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    t0 = time.perf_counter()
    vnow = 0.0

    def now() -> float:
        return vnow if cpu_clock else time.perf_counter() - t0

    nxt = 0
    n = len(wl.requests)
    while len(done) < n:
        while nxt < n and arrivals[nxt] <= now():
            r = wl.requests[nxt]
            params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            engine.add_request(str(nxt), prompts[nxt], params)
            nxt += 1
        if not engine.has_unfinished():
            if cpu_clock:
                vnow = arrivals[nxt]
            else:
                time.sleep(max(0.0, arrivals[nxt] - now()))
            continue
        c0 = time.process_time()
        outs = engine.step()
        vnow += time.process_time() - c0
        t = now()
        for o in outs:
            if o.request_id not in first and o.new_token_ids:
                first[o.request_id] = t
            if o.finished:
                done[o.request_id] = t
    ttft, tpot = [], []
    for i, r in enumerate(wl.requests):
        rid = str(i)
        ttft.append(first[rid] - arrivals[i])
        if r.output_len > 1:
            tpot.append((done[rid] - first[rid]) / (r.output_len - 1))
    return ttft, tpot


CALIB_GAP_S = 1.5  # calibration requests are this far apart: each finds the cluster idle
_PHASES = ("ttft_s", "queue_s", "prefill_s", "transfer_s", "decode_s")


def _router_done(lines: list[str]) -> list[dict]:
    """The router's JSON "request done" log records (per-request phase timings), in order."""
    out = []
    for line in list(lines):
        if line.startswith("{") and '"request done"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def run_cluster(
    model: Path, wl: Workload, seed: int, kv_blocks: int, calib: int = 0, calib_len: int = 112
) -> tuple[list[float], list[float], list[float]]:
    """Replay ``wl`` (wall clock, open loop) against a local cluster: router, 1 prefill, 1 decode, store.

    Returns (TTFT, TPOT, calibration TTFTs). With ``calib > 0`` the same cluster first serves
    ``calib`` lone requests (``calib_len`` prompt tokens, 2 output tokens, ``CALIB_GAP_S``
    apart) whose TTFTs measure the per-request overhead the latency model does not cover; the
    first one is a warm-up and is left out.
    """
    from pdserve.launcher import ClusterSpec, launch
    from pdserve.loadgen import LoadRequest, replay

    rng = np.random.default_rng(seed)
    reqs = [
        LoadRequest(r.arrival_s, tuple(rng.integers(100, 5000, r.input_len).tolist()), r.output_len)
        for r in wl.requests
    ]
    creqs = [
        LoadRequest(CALIB_GAP_S * i, tuple(rng.integers(100, 5000, calib_len).tolist()), 2)
        for i in range(calib + 1 if calib else 0)
    ]
    cl = launch(ClusterSpec(model_path=str(model), worker_kv_blocks=kv_blocks))
    try:
        cres = replay(cl.router_address, creqs, progress=False) if creqs else []
        n0 = len(_router_done(cl.logs.get("router", [])))
        res = replay(cl.router_address, reqs, progress=False)
        time.sleep(0.5)  # let the router's last log lines arrive
        done = _router_done(cl.logs.get("router", []))
    finally:
        cl.stop()
    # the router may log requests of its own (startup probes) before ours: take the last ones
    calib_rows = done[max(0, n0 - calib) : n0] if calib else []
    for label, rows in (("calibration", calib_rows), ("workload", done[n0:])):
        if rows:
            med = {k: 1e3 * statistics.median(r.get(k, math.nan) for r in rows) for k in _PHASES}
            print(
                f"router timing, {label} ({len(rows)} requests), p50 ms: "
                + "  ".join(f"{k[:-2]} {v:.1f}" for k, v in med.items())
            )
    bad = [r for r in (*cres, *res) if r.outcome != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed on the cluster: {bad[0].error}")
    return (
        [r.ttft_s for r in res],
        [r.tpot_s for r in res if r.output_tokens > 1],
        [r.ttft_s for r in cres[1:]],
    )


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=32, help="requests of the measured workload")
    ap.add_argument("--rate", type=float, default=0.8, help="mean Poisson arrival rate, requests/s")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the workload")
    ap.add_argument(
        "--target",
        default="engine",
        choices=["engine", "cluster"],
        help="measure LLMEngine in-process, or a local cluster (router + 1 prefill + 1 decode, gRPC)",
    )
    ap.add_argument(
        "--transfer-gbps",
        type=float,
        default=8.0,
        help="cluster target: simulated P->D KV bandwidth, Gb/s (shm through the store on one host)",
    )
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="time steps and arrivals by wall clock, or by this process's CPU time (contended CPUs)",
    )
    ap.add_argument(
        "--calibrate",
        type=int,
        default=4,
        help="cluster target: lone requests measuring the fixed per-request overhead (0 = off)",
    )
    return cli_help.apply(ap)


def main() -> int:
    ap = build_parser()
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_model_path(a.model)
    cfg = EngineConfig(device="cpu")
    engine = LLMEngine.from_pretrained(path, cfg)
    max_len = engine.max_model_len

    t = time.perf_counter()
    if a.target == "cluster" and a.clock == "cpu":
        ap.error("--clock cpu needs --target engine (the cluster runs in other processes)")
    cpu = a.clock == "cpu"
    timer = time.process_time if cpu else time.perf_counter
    prof = measure_profile(lambda: engine, GRID, progress=False, model=path.name, timer=timer)
    err = holdout_error(prof)
    print(f"profile: {len(prof.points)} points in {time.perf_counter() - t:.1f}s; ", end="")
    print(f"held-out fit error mean {100 * err.mean:.1f}% max {100 * err.max:.1f}% ({err.n} points)")

    wl = synthetic(
        a.requests,
        a.rate,
        LengthDistribution(LengthKind.UNIFORM, 32, 192),
        LengthDistribution(LengthKind.UNIFORM, 8, 24),
        seed=a.seed,
        name="fidelity",
    )
    t = time.perf_counter()
    kv_blocks = engine.kv.pool.num_blocks
    calib_len = int(statistics.median(r.input_len for r in wl.requests))
    c_ttft: list[float] = []
    if a.target == "cluster":
        kv_blocks = 1024
        del engine
        m_ttft, m_tpot, c_ttft = run_cluster(path, wl, a.seed, kv_blocks, a.calibrate, calib_len)
    else:
        m_ttft, m_tpot = run_engine(engine, wl, a.seed, cpu)
    print(f"real {a.target} ({a.clock} clock): {len(wl)} requests in {time.perf_counter() - t:.1f}s wall")

    with tempfile.TemporaryDirectory() as d:
        pfile = Path(d) / "profile.json"
        save(prof, pfile)
        sched = SchedulerConfig(
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            long_prefill_token_threshold=cfg.long_prefill_token_threshold,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            policy=cfg.scheduling_policy,
            max_model_len=max_len,
        )
        if a.target == "cluster":
            groups = (
                InstanceGroup(InstanceRole.PREFILL, 1, 1, sched),
                InstanceGroup(InstanceRole.DECODE, 1, 1, sched),
            )
        else:
            groups = (InstanceGroup(InstanceRole.MIXED, 1, 1, sched),)
        spec = LatencySpec(
            prof.model,
            source=LatencySource.PROFILE,
            profile_path=str(pfile),
            transfer_bandwidth=a.transfer_gbps * 1e9 / 8,
        )
        cluster = ClusterConfig(
            spec,
            groups,
            block_size=cfg.block_size,
            max_model_len=max_len,
            kv_blocks=kv_blocks,
            cache=CacheConfig(enable_prefix_caching=cfg.enable_prefix_caching),
        )
        variants = [("latency model only", cluster)]
        if c_ttft:
            # overhead = lone request's measured TTFT - the model's prefill time for it (its
            # simulated TTFT on an idle instance), from the same cluster in the same run
            lat = cluster.latency_model(1)
            pred = lat.step_time([calib_len], [0], 0, 0)
            over = max(0.0, statistics.median(c_ttft) - pred)
            print(
                f"calibration: {len(c_ttft)} lone {calib_len}-token requests, TTFT p50 "
                f"{1e3 * statistics.median(c_ttft):.1f} ms (min {1e3 * min(c_ttft):.1f}, max "
                f"{1e3 * max(c_ttft):.1f}) vs modelled prefill {1e3 * pred:.1f} ms -> "
                f"dispatch overhead {1e3 * over:.1f} ms"
            )
            variants.append(
                (f"+ dispatch overhead {1e3 * over:.0f} ms", replace(cluster, dispatch_overhead_s=over))
            )
        results = [(name, Simulation(c, SimConfig(slo=SLO())).run(wl)) for name, c in variants]

    worst = 0.0
    for label, res in results:
        s_ttft = res.array("ttft")
        s_tpot = np.array([r.tpot for r in res.records if r.finished and r.output_len > 1])
        rows = (
            ("TTFT", statistics.median(m_ttft), float(np.median(s_ttft))),
            ("TPOT", statistics.median(m_tpot), float(np.median(s_tpot))),
        )
        worst = 0.0
        print(f"simulated with {label}:")
        for name, meas, sim in rows:
            ratio = sim / meas
            worst = max(worst, abs(ratio - 1))
            print(
                f"  p50 {name}: measured {1e3 * meas:.1f} ms  simulated {1e3 * sim:.1f} ms  ratio {ratio:.3f}"
            )
    verdict = "PASS" if worst <= 0.15 else "MISS"
    print(f"worst |ratio - 1| = {100 * worst:.1f}% (last variant; target <= 15%): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
