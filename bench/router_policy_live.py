"""Router placement policies on a real embedded cluster: the same Mooncake replay, five policies.

For each policy (random, round_robin, least_loaded, cache_aware, goodput) a fresh embedded cluster
(store + router ``--policy NAME`` + P prefill + D decode worker processes on 127.0.0.1, one torch
thread each) replays the same slices of the Mooncake conversation trace scaled to this machine
(:func:`pdserve.loadgen.materialize`: lengths / ``--length-scale``, ``hash_ids`` -> shared token
prefixes), open loop, in two phases:

* **base**: ``--rate`` req/s (default ``auto``: the cluster's capacity estimated from the latency
  profile, see :func:`estimate_capacity`);
* **overload**: twice that rate (``--overload`` x), over a fresh slice of the trace.

Every request carries the same SLO (``--ttft``, ``--tpot``). Printed per policy and phase: goodput
(requests/s meeting both SLOs over the replay span), SLO attainment of all requests, attainment of
the admitted (not rejected) ones, rejection rate, p50/p90 TTFT and TPOT, and goodput / goodput of
least_loaded measured in the same run. Then PASS/FAIL of the issue's two targets:

1. goodput-aware has the highest goodput (in each phase);
2. under overload its attainment of admitted requests is >= ``--admitted-target`` (0.9) while every
   other policy collapses (attainment of admitted < ``--collapse-below``, 0.5).

The goodput policy is seeded with a latency profile of this machine (``--latency-profile``; by
default measured once with ``pdserve profile --quick --threads 1`` and cached under
``~/.cache/pdserve/profiles/``) and told that every worker shares this host's cores
(``--shared-cores``: predictions grow with busy workers per core). Writes a JSON report (``--out``) and, with ``--png``, a chart.

Cluster defaults, the same for every policy: 2 prefill + 2 decode workers, 512 KV blocks each, a
512-token step budget (prefill runs one chunk at a time, first come first served, instead of
prefilling four prompts together that then all finish late), router heartbeat timeout 10 s (a busy
worker's heartbeat waits for its engine step). Each cluster gets ``--warmup`` requests first (one a
second, not measured) so engines are warm and goodput's online correction has samples.

``--quick``: a smoke run (least_loaded and goodput, short phases; about 2 minutes, results only
indicative). Full run: about 9-10 minutes on a 2-core machine (under 12). ``--logs DIR`` keeps
every process's log lines (the router logs each placement with its predicted TTFT).

Usage: python bench/router_policy_live.py [--quick] [--policies a,b] [--rate auto|R] [--out PATH]
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve import loadgen  # noqa: E402
from pdserve.bench_cli import at_rate  # noqa: E402

POLICIES = ("random", "round_robin", "least_loaded", "cache_aware", "goodput")
QUICK_POLICIES = ("least_loaded", "goodput")
BASELINE = "least_loaded"
GOODPUT = "goodput"
PROFILE_CACHE = Path.home() / ".cache" / "pdserve" / "profiles"


class Phase(enum.Enum):
    BASE = "base"
    OVERLOAD = "overload"


class Verdict(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"  # a policy the check needs was not run


@dataclass(frozen=True)
class BenchConfig:
    """One bench run. ``rate`` None: estimated capacity (``capacity_scale`` x the estimate)."""

    model: str
    policies: tuple[str, ...]
    num_prefill: int = 2
    num_decode: int = 2
    rate: float | None = None
    capacity_scale: float = 1.0
    overload: float = 2.0
    window_s: float = 20.0  # arrival window of each phase
    min_requests: int = 12
    warmup: int = 8  # one a second: lets goodput's online latency correction settle
    length_scale: int = 16
    max_input: int = 512
    max_output: int = 24
    ttft_s: float = 2.0
    tpot_s: float = 0.25
    admitted_target: float = 0.9
    collapse_below: float = 0.5
    seed: int = 0
    latency_profile: str | None = None
    worker_args: tuple[str, ...] = ()
    worker_kv_blocks: int = 512  # per worker: 16-token blocks of 737 kB (SmolLM2 float32)
    store_blocks: int = 1024
    # heartbeats carry engine stats read between engine steps: under 2x overload on shared cores a
    # step can outlast the router's default 3 s timeout and the worker would be dropped as dead
    heartbeat_timeout_s: float = 10.0
    logs_dir: str | None = None  # keep every process's log lines here, per policy
    # engine token budget per step: one 512-token chunk at a time makes prefill first-come
    # first-served; the default 2048 prefills up to four prompts together, and under load they all
    # finish late together (processor sharing), which no placement policy can fix
    max_batched_tokens: int = 512


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str


# ----------------------------------------------------------------------------- latency profile
def ensure_profile(model_path: Path, given: str | None, refresh: bool = False) -> Path | None:
    """The latency profile to seed goodput with: ``given`` ("none": the seed model, no profile),
    else the cached one for this model, measured first (``pdserve profile --quick --threads 1``)
    when missing or ``refresh``."""
    if given and given.lower() == "none":
        return None
    if given:
        p = Path(given)
        if not p.is_file():
            raise SystemExit(f"--latency-profile {given!r}: no such file")
        return p
    p = PROFILE_CACHE / f"{model_path.name}-cpu-t1-quick.json"
    if p.is_file() and not refresh:
        print(f"[profile] reusing {p}", flush=True)
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    print(f"[profile] measuring a latency profile of {model_path.name} (about a minute) -> {p}", flush=True)
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    tmp = p.with_suffix(".tmp.json")
    subprocess.run(
        [sys.executable, "-m", "simulator.cli", "profile", "--model", str(model_path), "--quick",
         "--threads", "1", "--quiet", "--out", str(tmp)],
        check=True, cwd=ROOT, env=env,
    )  # fmt: skip
    tmp.replace(p)
    print(f"[profile] done in {time.monotonic() - t0:.0f}s", flush=True)
    return p


# ----------------------------------------------------------------------------- capacity estimate
def _uncached_tokens(reqs: list[loadgen.LoadRequest], block_size: int) -> list[tuple[int, int]]:
    """(new, reused) prompt tokens per request with an ideal cluster-wide prefix cache (the KV
    store makes every published prefix reachable by every prefill worker)."""
    seen: set[int] = set()
    out = []
    for r in reqs:
        n = len(r.prompt)
        keys = [hash(r.prompt[: (i + 1) * block_size]) for i in range(n // block_size)]
        hits = 0
        for k in keys:
            if k not in seen:
                break
            hits += 1
        reused = min(hits, (n - 1) // block_size) * block_size
        seen.update(keys)
        out.append((n - reused, reused))
    return out


def estimate_capacity(
    latency,
    reqs: list[loadgen.LoadRequest],
    num_prefill: int,
    num_decode: int,
    tpot_s: float,
    cores: int,
    block_size: int = 16,
) -> tuple[float, dict[str, float]]:
    """Requests/s the cluster sustains on ``reqs``: min of the prefill side (one prompt per step,
    ``num_prefill`` workers) and the decode side (the largest batch whose step stays within 90% of
    ``tpot_s``, ``num_decode`` workers), divided by CPU oversubscription ``(P + D) / cores`` when
    the workers outnumber the cores. ``latency``: any model with ``prefill_time``/``decode_time``.
    Returns (rate, the parts)."""
    toks = _uncached_tokens(reqs, block_size)
    t_pf = sum(latency.prefill_time([n], [c]) for n, c in toks) / len(toks)
    out = sum(r.max_tokens for r in reqs) / len(reqs)
    ctx = sum(len(r.prompt) for r in reqs) / len(reqs) + out / 2
    best_b, step = 1, latency.decode_time(1, int(ctx))
    for b in range(2, 129):
        s = latency.decode_time(b, int(b * ctx))
        if s > 0.9 * tpot_s:
            break
        best_b, step = b, s
    cap_p = num_prefill / t_pf
    cap_d = num_decode * best_b / (max(1.0, out) * step)
    over = max(1.0, (num_prefill + num_decode) / max(1, cores))
    rate = min(cap_p, cap_d) / over
    return rate, {
        "prefill_s_per_request": t_pf,
        "prefill_rps": cap_p,
        "decode_batch": best_b,
        "decode_rps": cap_d,
        "oversubscription": over,
    }


# ----------------------------------------------------------------------------- workload
def phase_requests(cfg: BenchConfig, base_rate: float, vocab: int) -> dict[str, list[loadgen.LoadRequest]]:
    """Warm-up, base and overload slices of the trace (consecutive, disjoint), materialised and
    timed: warm-up one request a second, the phases at ``base_rate`` and ``overload`` x it."""
    from simulator.workload import Workload, named_workload

    n_base = max(cfg.min_requests, round(cfg.window_s * base_rate))
    n_over = max(cfg.min_requests, round(cfg.window_s * base_rate * cfg.overload))
    total = cfg.warmup + n_base + n_over
    w = named_workload("mooncake", n=total, seed=cfg.seed)
    if len(w) < total:
        raise SystemExit(f"the trace has only {len(w)} requests; need {total}")
    cuts = {
        "warmup": (0, cfg.warmup, 1.0),
        Phase.BASE.value: (cfg.warmup, cfg.warmup + n_base, base_rate),
        Phase.OVERLOAD.value: (cfg.warmup + n_base, total, base_rate * cfg.overload),
    }
    out = {}
    for i, (name, (a, b, rate)) in enumerate(cuts.items()):
        if b <= a:
            out[name] = []
            continue
        sl = Workload(w.name, w.requests[a:b])
        if name == "warmup":
            sl = Workload(sl.name, tuple(replace(r, arrival_s=float(j)) for j, r in enumerate(sl.requests)))
        else:
            sl = at_rate(sl, rate, seed=cfg.seed + i)
        out[name] = loadgen.materialize(
            sl, cfg.length_scale, vocab, cfg.max_input, cfg.max_output, seed=cfg.seed + i
        )
    return out


# ----------------------------------------------------------------------------- one policy
def run_policy(
    cfg: BenchConfig,
    policy: str,
    reqs: dict[str, list[loadgen.LoadRequest]],
    rates: dict[str, float],
    profile: Path | None,
    slo: loadgen.SLO,
) -> tuple[dict[str, loadgen.Report], dict[str, list[str]]]:
    """A fresh cluster with router ``--policy policy``; warm-up, then each phase.

    Returns (report by phase, up to 3 distinct error messages by phase)."""
    from pdserve.launcher import ClusterSpec, launch

    router_args: tuple[str, ...] = ("--policy", policy, "--heartbeat-timeout-s", str(cfg.heartbeat_timeout_s))
    if profile is not None:
        router_args += ("--latency-profile", str(profile))
    if policy == "goodput":
        # every worker (1 torch thread each) runs on this host's cores: the policy's predictions
        # include the contention of busy workers per core
        router_args += ("--shared-cores", str(os.cpu_count() or 1))
    spec = ClusterSpec(
        model_path=cfg.model,
        num_prefill=cfg.num_prefill,
        num_decode=cfg.num_decode,
        router_args=router_args,
        worker_args=("--max-batched-tokens", str(cfg.max_batched_tokens), *cfg.worker_args),
        worker_kv_blocks=cfg.worker_kv_blocks,
        store_capacity_blocks=cfg.store_blocks,
    )
    t0 = time.monotonic()
    cl = launch(spec)
    print(
        f"[{policy}] cluster up in {time.monotonic() - t0:.0f}s ({cfg.num_prefill}P+{cfg.num_decode}D)",
        flush=True,
    )
    out: dict[str, loadgen.Report] = {}
    errs: dict[str, list[str]] = {}
    try:
        if reqs["warmup"]:
            t1 = time.monotonic()
            loadgen.replay(cl.router_address, reqs["warmup"], slo, progress=False)
            print(
                f"[{policy}] warm-up: {len(reqs['warmup'])} requests in {time.monotonic() - t1:.0f}s",
                flush=True,
            )
        for ph in Phase:
            t1 = time.monotonic()
            res = loadgen.replay(cl.router_address, reqs[ph.value], slo, progress=True)
            rep = loadgen.summarize(res, slo, rates[ph.value])
            out[ph.value] = rep
            errs[ph.value] = sorted({r.error for r in res if r.outcome == "error"})[:3]
            print(
                f"[{policy}] {ph.value:>8} {rates[ph.value]:.2f} req/s: goodput {rep.goodput_rps:.2f} req/s  "
                f"attain {rep.attainment:.0%} (admitted {rep.attainment_admitted:.0%})  "
                f"rejected {rep.rejected}/{rep.n}  errors {rep.errors}  TTFT p50 "
                f"{rep.latency['ttft_s']['p50']:.2f}s  TPOT p50 {rep.latency['tpot_s']['p50'] * 1e3:.0f}ms  "
                f"({time.monotonic() - t1:.0f}s)",
                flush=True,
            )
            if errs[ph.value]:
                print(f"[{policy}] errors: {errs[ph.value]}", flush=True)
    finally:
        cl.stop()
        if cfg.logs_dir:
            d = Path(cfg.logs_dir) / policy
            d.mkdir(parents=True, exist_ok=True)
            for name, lines in cl.logs.items():
                (d / f"{name}.log").write_text("\n".join(lines) + "\n")
    return out, errs


# ----------------------------------------------------------------------------- verdicts
def ratio(x: float, base: float) -> float:
    if base > 0:
        return x / base
    return math.inf if x > 0 else math.nan


def checks(
    results: dict[str, dict[str, loadgen.Report]], admitted_target: float, collapse_below: float
) -> list[Check]:
    """The issue's two targets over ``results[policy][phase]`` (SKIP when goodput or no other
    policy was run)."""
    others = [p for p in results if p != GOODPUT]
    if GOODPUT not in results or not others:
        why = "needs the goodput policy and at least one other"
        return [
            Check("highest goodput", Verdict.SKIP, why),
            Check("overload admitted attainment", Verdict.SKIP, why),
        ]
    parts, ok = [], True
    for ph in Phase:
        g = results[GOODPUT][ph.value].goodput_rps
        best_other = max(others, key=lambda p: results[p][ph.value].goodput_rps)
        o = results[best_other][ph.value].goodput_rps
        ok &= g >= o
        parts.append(f"{ph.value}: goodput {g:.2f} vs best other {best_other} {o:.2f}")
    c1 = Check("highest goodput", Verdict.PASS if ok else Verdict.FAIL, "; ".join(parts))
    ov = Phase.OVERLOAD.value
    ga = results[GOODPUT][ov].attainment_admitted
    collapsed = {p: results[p][ov].attainment_admitted for p in others}
    ok2 = ga >= admitted_target and all(a < collapse_below for a in collapsed.values())
    detail = (
        f"goodput admitted attainment {ga:.0%} (target >= {admitted_target:.0%}); others "
        + ", ".join(f"{p} {a:.0%}" for p, a in collapsed.items())
        + f" (collapse: < {collapse_below:.0%})"
    )
    c2 = Check("overload admitted attainment", Verdict.PASS if ok2 else Verdict.FAIL, detail)
    return [c1, c2]


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else ("inf" if x > 0 else "n/a")


def table(results: dict[str, dict[str, loadgen.Report]]) -> str:
    head = (
        f"{'policy':>13} {'phase':>8} {'rate':>5} | {'goodput':>7} {'ratio':>6} | {'attain':>6} {'admit.':>6} "
        f"{'reject':>6} | {'TTFT p50':>8} {'p90':>6} | {'TPOT p50':>8} {'p90':>6}"
    )
    lines = [head, "-" * len(head)]
    for ph in Phase:
        base = results[BASELINE][ph.value].goodput_rps if BASELINE in results else math.nan
        for pol, reps in results.items():
            r = reps[ph.value]
            L = r.latency
            lines.append(
                f"{pol:>13} {ph.value:>8} {r.rate:>5.2f} | {r.goodput_rps:>7.2f} {_fmt_ratio(ratio(r.goodput_rps, base)):>6} | "
                f"{r.attainment:>6.0%} {r.attainment_admitted:>6.0%} {r.rejected / max(1, r.n):>6.0%} | "
                f"{L['ttft_s']['p50']:>7.2f}s {L['ttft_s']['p90']:>5.2f}s | "
                f"{L['tpot_s']['p50'] * 1e3:>6.0f}ms {L['tpot_s']['p90'] * 1e3:>4.0f}ms"
            )
    return "\n".join(lines)


def _finite(x):
    """JSON-safe copy of ``x``: non-finite floats (no baseline, no samples) become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def plot(results: dict[str, dict[str, loadgen.Report]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, ph in zip(axes, Phase, strict=True):
        xs = range(len(pols))
        ax.bar(
            xs, [results[p][ph.value].goodput_rps for p in pols], color="tab:blue", label="goodput (req/s)"
        )
        ax.set_xticks(list(xs), pols, rotation=20, fontsize=8)
        ax.set_ylabel("goodput (req/s)")
        ax.set_title(f"{ph.value} ({results[pols[0]][ph.value].rate:.2f} req/s)")
        ax2 = ax.twinx()
        ax2.plot(list(xs), [results[p][ph.value].attainment_admitted for p in pols], "o", color="tab:red")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("attainment of admitted", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="bench/router_policy_live.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 policies, short phases (~2 min)")
    ap.add_argument("--policies", default=None, help=f"comma-separated, default {','.join(POLICIES)}")
    ap.add_argument("--prefill", type=int, default=2, help="prefill workers per cluster")
    ap.add_argument("--decode", type=int, default=2, help="decode workers per cluster")
    ap.add_argument("--kv-blocks", type=int, default=512, help="KV blocks per worker")
    ap.add_argument("--max-batched-tokens", type=int, default=512, help="workers' token budget per step")
    ap.add_argument("--store-blocks", type=int, default=1024, help="KV store capacity in blocks")
    ap.add_argument(
        "--heartbeat-timeout-s", type=float, default=10.0, help="router's worker liveness timeout"
    )
    ap.add_argument("--rate", default="auto", help="base rate req/s, or 'auto' (estimated capacity)")
    ap.add_argument("--capacity-scale", type=float, default=1.0, help="multiplies the auto rate")
    ap.add_argument("--overload", type=float, default=2.0, help="overload phase rate / base rate")
    ap.add_argument("--window-s", type=float, default=None, help="arrival window per phase (20; quick 8)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests per cluster (8; quick 3)")
    ap.add_argument("--length-scale", type=int, default=16, help="divide trace lengths by this")
    ap.add_argument("--max-input", type=int, default=512, help="clip prompts to this many tokens")
    ap.add_argument("--max-output", type=int, default=24, help="clip outputs to this many tokens")
    ap.add_argument("--ttft", type=float, default=2.0, help="TTFT SLO (s)")
    ap.add_argument("--tpot", type=float, default=0.25, help="TPOT SLO (s)")
    ap.add_argument(
        "--admitted-target",
        type=float,
        default=0.9,
        help="overload: goodput's attainment of admitted requests must reach this",
    )
    ap.add_argument(
        "--collapse-below",
        type=float,
        default=0.5,
        help="overload: other policies count as collapsed below this attainment",
    )
    ap.add_argument(
        "--latency-profile", default=None, help="profile JSON, or 'none' (default: cached/measured)"
    )
    ap.add_argument("--refresh-profile", action="store_true", help="re-measure the cached profile")
    ap.add_argument("--seed", type=int, default=0, help="seed of the workload")
    ap.add_argument("--out", default="router_policy_live.json", help="JSON report path")
    ap.add_argument("--png", default=None, help="also write a chart here")
    ap.add_argument(
        "--logs", default=None, help="write each cluster process's log here (DIR/policy/name.log)"
    )
    return cli_help.apply(ap)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, BenchConfig]:
    ap = build_parser()
    a = ap.parse_args(argv)
    pols = tuple(a.policies.split(",")) if a.policies else (QUICK_POLICIES if a.quick else POLICIES)
    bad = [p for p in pols if p not in POLICIES]
    if bad:
        ap.error(f"unknown policies {bad}; choose from {POLICIES}")
    rate = None if a.rate == "auto" else float(a.rate)
    if rate is not None and rate <= 0:
        ap.error("--rate must be > 0")
    cfg = BenchConfig(
        model="",
        policies=pols,
        num_prefill=a.prefill,
        num_decode=a.decode,
        worker_kv_blocks=a.kv_blocks,
        max_batched_tokens=a.max_batched_tokens,
        store_blocks=a.store_blocks,
        heartbeat_timeout_s=a.heartbeat_timeout_s,
        logs_dir=a.logs,
        rate=rate,
        capacity_scale=a.capacity_scale,
        overload=a.overload,
        window_s=a.window_s if a.window_s is not None else (8.0 if a.quick else 20.0),
        min_requests=6 if a.quick else 12,
        warmup=a.warmup if a.warmup is not None else (3 if a.quick else 8),
        length_scale=a.length_scale,
        max_input=a.max_input,
        max_output=a.max_output,
        ttft_s=a.ttft,
        tpot_s=a.tpot,
        admitted_target=a.admitted_target,
        collapse_below=a.collapse_below,
        seed=a.seed,
    )
    return a, cfg


def main(argv: list[str] | None = None) -> int:
    from engine.models.config import ModelConfig
    from pdserve.model_setup import resolve_model_path
    from router.policy_factory import seed_latency

    t_start = time.monotonic()
    a, cfg = parse(argv)
    path = resolve_model_path(a.model)
    profile = ensure_profile(path, a.latency_profile, a.refresh_profile)
    cfg = replace(cfg, model=str(path), latency_profile=str(profile) if profile else None)
    vocab = ModelConfig.from_path(path).vocab_size
    slo = loadgen.SLO(cfg.ttft_s, cfg.tpot_s)
    capacity, parts = None, {}
    if cfg.rate is None:
        probe = phase_requests(replace(cfg, window_s=max(cfg.window_s, 20.0)), 1.0, vocab)[Phase.BASE.value]
        capacity, parts = estimate_capacity(
            seed_latency(str(profile) if profile else None), probe, cfg.num_prefill, cfg.num_decode,
            cfg.tpot_s, os.cpu_count() or 1,
        )  # fmt: skip
        base_rate = capacity * cfg.capacity_scale
        print(
            f"[rate] estimated capacity {capacity:.2f} req/s (prefill side {parts['prefill_rps']:.2f}, decode side "
            f"{parts['decode_rps']:.2f}, CPU oversubscription {parts['oversubscription']:.1f}x) -> base rate "
            f"{base_rate:.2f} req/s",
            flush=True,
        )
    else:
        base_rate = cfg.rate
    rates = {Phase.BASE.value: base_rate, Phase.OVERLOAD.value: base_rate * cfg.overload}
    reqs = phase_requests(cfg, base_rate, vocab)
    print(
        f"workload: Mooncake conversation trace /{cfg.length_scale} (prompts <= {cfg.max_input}, outputs <= "
        f"{cfg.max_output}); base {len(reqs['base'])} req at {rates['base']:.2f}/s, overload "
        f"{len(reqs['overload'])} req at {rates['overload']:.2f}/s; SLO TTFT {cfg.ttft_s}s TPOT {cfg.tpot_s}s; "
        f"policies {', '.join(cfg.policies)}",
        flush=True,
    )
    results: dict[str, dict[str, loadgen.Report]] = {}
    errors: dict[str, dict[str, list[str]]] = {}
    for pol in cfg.policies:
        results[pol], errors[pol] = run_policy(cfg, pol, reqs, rates, profile, slo)
        print(f"[{pol}] done at {time.monotonic() - t_start:.0f}s", flush=True)
    print()
    print(table(results))
    cks = checks(results, cfg.admitted_target, cfg.collapse_below)
    print()
    for c in cks:
        print(f"{c.verdict.value}: {c.name}: {c.detail}")
    elapsed = time.monotonic() - t_start
    print(f"total {elapsed:.0f}s")
    base_g = {
        ph.value: results[BASELINE][ph.value].goodput_rps if BASELINE in results else math.nan for ph in Phase
    }
    report = {
        "config": asdict(cfg),
        "slo": asdict(slo),
        "rates": rates,
        "capacity_estimate_rps": capacity,
        "capacity_parts": parts,
        "baseline": BASELINE,
        "results": {
            pol: {
                ph: {
                    **rep.to_dict(),
                    "rejection_rate": rep.rejected / max(1, rep.n),
                    "goodput_ratio_vs_baseline": ratio(rep.goodput_rps, base_g[ph]),
                    "error_samples": errors[pol][ph],
                }
                for ph, rep in reps.items()
            }
            for pol, reps in results.items()
        },  # fmt: skip
        "checks": [{"name": c.name, "verdict": c.verdict.value, "detail": c.detail} for c in cks],
        "elapsed_s": elapsed,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(report), indent=2))
    print(f"report: {out}")
    if a.png:
        print(f"chart: {plot(results, Path(a.png))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
