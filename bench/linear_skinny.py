"""fp32 skinny linear (engine.models.linear_native) vs torch's F.linear on a model's real shapes.

For each projection shape of the model (fused qkv, o_proj, fused gate_up, down_proj: one weight per
decoder layer, so a pass streams them from memory as a decode step does; lm_head: its one weight)
and each batch (rows), one pass over the weights is timed with F.linear and with the native kernel,
interleaved (torch, native, torch, native, ...) so a shared host's load hits both alike; medians of
``--reps`` passes. The bound is the weight bytes over the read bandwidth measured in the same run
(before and after the cell; streaming ``sum`` over 256 MiB). Printed per cell: torch and native
ms, each / bound, and native's speedup (torch / native; > 1: native faster). Then the whole model
(sum of the shapes) per row count, and the crossover: per shape and for the whole model, the largest
row count up to which native wins at every measured row count (what ``NATIVE_MAX_ROWS`` is set from).

``--busy N`` runs N busy-loop processes alongside (an oversubscribed host, reproducibly).

``--cpu-time``: one thread on both sides (torch and the native pool) timed by the thread's CPU time
(``time.thread_time``), which time spent descheduled does not count: on a shared, loaded host this
compares the two implementations' work where wall-clock medians mostly measure the other tenants
(memory-bandwidth contention still counts). The bound columns stay wall-clock figures. With
``--engine-ab`` it times each step by the calling thread's CPU time (one thread does all the work).

``--ref-rev REV``: also time the kernel as it was at git revision REV (its ``linear_native.py``
C source, built beside this tree's), interleaved with the other two: a before/after in one run. Per
cell it prints ``ref ms`` and ``new/ref`` (> 1: this tree's kernel faster); with ``--engine-ab``
the step is timed on the three paths.

``--engine-ab 256x1,2048x8``: instead, the whole decode step of an engine (SmolLM2, imported
random KV at that context x batch) with its projections switched between ``nn.Linear`` and
``NativeLinear`` (the same weights) every ``--steps`` steps, ``--reps`` times; medians per path.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.models import linear_native  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.models.linear_native import (  # noqa: E402
    HELPER_SPIN_US,
    NativeLinear,
    configure_pool,
    kernel,
    kernel_unavailable_reason,
    skinny_linear,
)

DEFAULT_MODEL = Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parent.parent


def ref_kernel(rev: str) -> ctypes.CDLL:
    """The fp32 linear kernel library as it was at git revision ``rev`` (built from that
    revision's ``engine/models/linear_native.py`` source, declared by this tree's ``_declare``)."""
    from engine.native_build import build_library

    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:engine/models/linear_native.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("linear_native_ref", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    exec(compile(text, f"{rev}:linear_native.py", "exec"), mod.__dict__)
    lib = build_library("f32_linear_ref", mod._SOURCE)
    linear_native._declare(lib)
    return lib


class _Kernel:
    """Switches ``skinny_linear`` (and so ``NativeLinear``) between kernel libraries."""

    def __init__(self, ref: ctypes.CDLL | None) -> None:
        self.new = kernel()
        self.ref = ref

    def use(self, lib: ctypes.CDLL | None) -> None:
        linear_native._LIB._lib = lib


def read_bandwidth(reps: int = 5) -> float:
    """Bytes/s of a streaming read (``sum`` over 256 MiB), median of ``reps``."""
    x = torch.ones(64 * 1024 * 1024)
    x.sum()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(ts)


def shapes(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(name, out_features, in_features, weights per pass) of the model's fused projections."""
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    n = cfg.num_hidden_layers
    return [
        ("qkv", qkv, h, n),
        ("o_proj", h, cfg.num_attention_heads * d, n),
        ("gate_up", 2 * cfg.intermediate_size, h, n),
        ("down", h, cfg.intermediate_size, n),
        ("lm_head", cfg.vocab_size, h, 1),
    ]


def engine_ab(
    path: Path,
    context: int,
    batch: int,
    steps: int,
    reps: int,
    kern: _Kernel | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median decode step (seconds) per path: torch's and the native linear (and, with
    ``kern.ref``, the reference revision's kernel as ``ref``), alternated on one engine."""
    from bench import engine_bound
    from engine.sampling_params import SamplingParams

    os.environ["PDSERVE_LINEAR"] = "native"
    extra = 2 * steps * reps + 8
    eng = engine_bound._engine(path, batch, context, extra)
    mods = [m for m in eng.runner.model.modules() if type(m) is NativeLinear]
    assert mods, "the engine did not load the native linear"
    s = eng.kv_shape
    g = torch.Generator().manual_seed(batch * 7919 + context)
    blocks = torch.randn(
        -(-context // s.block_size), s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim, generator=g
    )
    sp = SamplingParams(max_tokens=extra + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.import_kv(
            f"r{i}", torch.randint(10, 40000, (context,), generator=g).tolist(), 100 + i, blocks, sp
        )
    paths: list[tuple[str, type, ctypes.CDLL | None]] = [("torch", torch.nn.Linear, None)]
    if kern is not None and kern.ref is not None:
        paths.append(("ref", NativeLinear, kern.ref))
    paths.append(("native", NativeLinear, None if kern is None else kern.new))
    times: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    for _ in range(2):
        eng.step()
    for _ in range(reps):
        for name, cls, lib in paths:
            for m in mods:
                m.__class__ = cls
            if kern is not None and lib is not None:
                kern.use(lib)
            eng.step()  # one untimed step after a switch
            for _ in range(steps):
                t = clock()
                eng.step()
                times[name].append(clock() - t)
    if kern is not None:
        kern.use(kern.new)
    eng.close()
    return {name: statistics.median(v) for name, v in times.items()}


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder (its config.json)")
    ap.add_argument("--batches", default="1,4,8,12,16,24,32", help="comma-separated row counts")
    ap.add_argument("--reps", type=int, default=7, help="timed passes per cell and path")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--check", action="store_true", help="also print max |native - torch| per cell")
    ap.add_argument("--engine-ab", default=None, help="CTXxBATCH,...: whole decode step A/B (see above)")
    ap.add_argument("--steps", type=int, default=8, help="--engine-ab: steps per path per repetition")
    ap.add_argument(
        "--busy", type=int, default=0, help="start this many busy-loop processes for the run (load the CPU)"
    )
    ap.add_argument(
        "--cpu-time", action="store_true", help="1 thread each side, timed by thread CPU time (see above)"
    )
    ap.add_argument("--spin-us", type=float, default=None, help="native pool: helper spin before sleeping")
    ap.add_argument("--ref-rev", default=None, help="also time the kernel of this git revision (see above)")
    ap.add_argument("--split-min-kb", type=int, default=None, help="native: weights below this use 1 thread")
    return cli_help.apply(ap)


def main() -> int:
    args = build_parser().parse_args()
    if args.cpu_time:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if kernel() is None:
        print(f"native kernel unavailable: {kernel_unavailable_reason()}")
        return 1
    if args.threads or args.spin_us is not None:
        configure_pool(torch.get_num_threads(), HELPER_SPIN_US if args.spin_us is None else args.spin_us)
    if args.split_min_kb is not None:
        linear_native.SPLIT_MIN_BYTES = args.split_min_kb * 1024
    busy = [
        subprocess.Popen([sys.executable, "-c", "while 1: pass"], stdin=subprocess.DEVNULL)
        for _ in range(args.busy)
    ]
    try:
        if busy:
            time.sleep(1.0)
            print(f"{len(busy)} busy-loop process(es) running alongside")
        return _run(args)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def _run(args: argparse.Namespace) -> int:
    kern = _Kernel(ref_kernel(args.ref_rev) if args.ref_rev else None)
    if kern.ref is not None and (args.threads or args.spin_us is not None):
        kern.ref.f32_pool_config(torch.get_num_threads(), int(1000 * (args.spin_us or HELPER_SPIN_US)))
    if args.engine_ab:
        print(
            f"engine A/B, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, reps {args.reps}"
        )
        for cell in args.engine_ab.split(","):
            ctx, b = (int(v) for v in cell.split("x"))
            bw0 = read_bandwidth()
            clock = time.thread_time if args.cpu_time else time.perf_counter
            med = engine_ab(args.model, ctx, b, args.steps, args.reps, kern, clock)
            mt, mn = med["torch"], med["native"]
            bw = (bw0 + read_bandwidth()) / 2
            ref = f"ref {med['ref'] * 1e3:.2f} ms (new/ref {med['ref'] / mn:.2f}x), " if "ref" in med else ""
            print(
                f"  ctx {ctx:>5} batch {b:>2}: read {bw / 1e9:.1f} GB/s, step torch {mt * 1e3:.2f} ms, "
                f"{ref}native {mn * 1e3:.2f} ms, speedup {mt / mn:.2f}x (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
        return 0
    cfg = ModelConfig.from_path(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(
        f"model {args.model.name}, threads {torch.get_num_threads()}, "
        f"{'thread CPU time' if args.cpu_time else 'wall clock'}, load {os.getloadavg()[0]:.2f} "
        f"{os.getloadavg()[1]:.2f}, reps {args.reps}"
    )
    print(
        f"{'shape':>8} {'N':>6} {'K':>5} {'rows':>4} {'GB/s':>5} {'bound ms':>8} {'torch ms':>8} "
        f"{'native ms':>9} {'torch/bd':>8} {'nat/bd':>6} {'speedup':>7}"
        + (f" {'ref ms':>7} {'new/ref':>7}" if kern.ref is not None else "")
        + ("  max|diff|" if args.check else "")
    )
    totals: dict[int, list[float]] = {b: [0.0, 0.0, 0.0, 0.0] for b in batches}
    speedups: dict[str, dict[int, float]] = {}
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, n, k, count in shapes(cfg):
            ws = [torch.randn(n, k) * 0.05 for _ in range(count)]
            for b in batches:
                x = torch.randn(b, k)
                F.linear(x, ws[0])
                skinny_linear(x, ws[0])
                bw0 = read_bandwidth()
                tt, tn, tr = [], [], []
                for _ in range(args.reps):
                    t = clock()
                    for w in ws:
                        F.linear(x, w)
                    tt.append(clock() - t)
                    t = clock()
                    for w in ws:
                        skinny_linear(x, w)
                    tn.append(clock() - t)
                    if kern.ref is not None:
                        kern.use(kern.ref)
                        t = clock()
                        for w in ws:
                            skinny_linear(x, w)
                        tr.append(clock() - t)
                        kern.use(kern.new)
                bw = (bw0 + read_bandwidth()) / 2
                bound = count * n * k * 4 / bw
                mt, mn = statistics.median(tt), statistics.median(tn)
                mr = statistics.median(tr) if tr else float("nan")
                speedups.setdefault(name, {})[b] = mt / mn
                for i, v in enumerate((bound, mt, mn, mr)):
                    totals[b][i] += v
                line = (
                    f"{name:>8} {n:>6} {k:>5} {b:>4} {bw / 1e9:>5.1f} {bound * 1e3:>8.2f} {mt * 1e3:>8.2f} "
                    f"{mn * 1e3:>9.2f} {mt / bound:>8.2f} {mn / bound:>6.2f} {mt / mn:>7.2f}"
                )
                if tr:
                    line += f" {mr * 1e3:>7.2f} {mr / mn:>7.2f}"
                if args.check:
                    diff = (skinny_linear(x, ws[0]) - F.linear(x, ws[0])).abs().max().item()
                    line += f"  {diff:.1e}"
                print(line, flush=True)
    print("whole model (sum of the shapes' medians):")
    for b, (bound, mt, mn, mr) in totals.items():
        ref = f", ref {mr * 1e3:.2f} ms (new/ref {mr / mn:.2f}x)" if kern.ref is not None else ""
        print(
            f"  rows {b:>2}: bound {bound * 1e3:.2f} ms, torch {mt * 1e3:.2f} ms ({mt / bound:.2f}x), "
            f"native {mn * 1e3:.2f} ms ({mn / bound:.2f}x), speedup {mt / mn:.2f}x{ref}"
        )
    speedups["whole model"] = {b: mt / mn for b, (_, mt, mn, _) in totals.items()}
    print("crossover (native wins at every measured row count up to):")
    for name, per_rows in speedups.items():
        print(f"  {name:>11}: {crossover(per_rows)} rows")
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    return 0


def crossover(speedup_by_rows: dict[int, float]) -> int:
    """The largest row count r such that native was faster (speedup > 1) at every measured row
    count <= r; 0 when it lost at the smallest."""
    best = 0
    for rows in sorted(speedup_by_rows):
        if speedup_by_rows[rows] <= 1.0:
            break
        best = rows
    return best


if __name__ == "__main__":
    raise SystemExit(main())
