"""What the engine loses to work on the *other* core: shared cache and memory bandwidth (#12).

``bench/serving_efficiency.py`` compares the cluster with the same engine embedded, on the same
cores. The embedded engine runs with the other core idle; the decode worker's engine thread runs
while the client, router, prefill worker, store and its own event loop use the other core, and it
spends 1.2-1.4x the embedded engine's CPU per token although its own step does less (its text is
rendered on the event loop). This bench isolates the effect of a neighbour on the other core, with
no pdserve process, no gRPC and no shared GIL: the engine the workers run (tiny Llama, same KV pool
and batch limit, 1 torch thread) pinned to one core, stepped in a closed loop, with the other core

* ``idle``: nothing else (the embedded baseline's condition);
* ``compute``: a pure-Python busy loop pinned there (the CPU busy, its memory traffic tiny);
* ``memory``: a process pinned there summing a numpy array larger than the L2 caches in a loop
  (streaming memory, as protobuf, gRPC and asyncio do in bulk across many requests).

Printed per mode (medians of ``--repeats`` alternated runs): tokens/s and the engine's CPU per
token, each as a ratio to ``idle``. A ratio of CPU per token above 1 is time the engine spends
stalled on shared resources, which no change to the engine thread's code removes: the serving-
efficiency ratio on the same two cores is bounded by it. A measurement, not a target.

Run: ``python bench/engine_neighbour.py`` (about a minute; needs two cores it may pin to).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster_load import (  # noqa: E402
    Progress,
    add_closed_loop_args,
    closed_loop_blocks,
    engine_closed_loop,
    make_engine,
    parse_modes,
    require_positive,
    tiny_model,
    torch_threads,
)

MODES = ("idle", "compute", "memory")
NEIGHBOUR_START_S = 0.5  # the neighbour's start-up (imports, its array) before a measured run
_COMPUTE = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
_MEMORY = (
    "import os, sys\nimport numpy as np\nos.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "a = np.random.rand(int(sys.argv[2]) // 8)\nwhile True:\n    a.sum()\n"
)


@dataclass(frozen=True)
class Run:
    mode: str
    tokens: int
    wall_s: float
    cpu_s: float  # this process's CPU (the engine steps on this thread, 1 torch thread)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e6


def neighbour(mode: str, core: int, nbytes: int) -> subprocess.Popen | None:
    """Start the ``mode`` neighbour pinned to ``core`` (None for ``idle``)."""
    if mode == "idle":
        return None
    code = _COMPUTE if mode == "compute" else _MEMORY
    p = subprocess.Popen([sys.executable, "-c", code, str(core), str(nbytes)])
    time.sleep(NEIGHBOUR_START_S)
    if p.poll() is not None:
        raise RuntimeError(f"the {mode} neighbour exited at once (status {p.returncode})")
    return p


def run_once(
    eng,
    mode: str,
    core: int,
    nbytes: int,
    streams: int,
    total: int,
    max_tokens: int,
    prompt_len: int,
    offset: int,
) -> Run:
    """One measured closed loop of ``total`` requests with the ``mode`` neighbour on ``core``."""
    p = neighbour(mode, core, nbytes)
    try:
        c0 = time.process_time()
        r = engine_closed_loop(
            eng, streams, total, max_tokens, prompt_len, Progress(f"{mode}", total), offset=offset
        )
        cpu = time.process_time() - c0
    finally:
        if p is not None:
            p.kill()
            p.wait()
    if r.tokens != total * max_tokens:
        raise RuntimeError(f"{mode}: {r.tokens} tokens generated, {total * max_tokens} expected")
    return Run(mode, r.tokens, r.wall_s, cpu)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/engine_neighbour.py",
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_closed_loop_args(p, requests_per_stream=4, prompt_len=32)
    p.add_argument("--repeats", type=int, default=3, help="alternated runs of every mode (medians printed)")
    p.add_argument(
        "--memory-mib", type=int, default=32, help="the memory neighbour's array (larger than the L2 caches)"
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    modes = parse_modes(a.modes, MODES)
    require_positive(
        a, ("streams", "requests_per_stream", "max_tokens", "prompt_len", "repeats", "memory_mib")
    )
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit(
            f"needs two cores to pin the engine and its neighbour apart; this process may use {cores}"
        )
    engine_core, other_core = cores[0], cores[1]
    total = a.streams * a.requests_per_stream
    blocks = closed_loop_blocks(a.streams, a.prompt_len, a.max_tokens)
    runs: dict[str, list[Run]] = {m: [] for m in modes}
    os.sched_setaffinity(0, {engine_core})
    try:
        with tempfile.TemporaryDirectory() as tmp, torch_threads(1):
            eng = make_engine(str(tiny_model(Path(tmp))), blocks)
            try:
                engine_closed_loop(eng, min(a.streams, 16), 16, 32, a.prompt_len, offset=10**6)  # warm-up
                for rep in range(a.repeats):
                    for m in modes:
                        runs[m].append(
                            run_once(
                                eng,
                                m,
                                other_core,
                                a.memory_mib << 20,
                                a.streams,
                                total,
                                a.max_tokens,
                                a.prompt_len,
                                offset=rep * 10**5,
                            )
                        )
            finally:
                eng.close()
    finally:
        os.sched_setaffinity(0, set(cores))
    load = os.getloadavg()
    print(
        f"tiny Llama, {a.streams} streams, {total} requests of {a.max_tokens} tokens, prompt {a.prompt_len}, "
        f"1 torch thread, engine on core {engine_core}, neighbour on core {other_core}, "
        f"{a.repeats} alternated repeats (medians), load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )
    base = runs.get("idle")
    b_tps = statistics.median(r.tps for r in base) if base else None
    b_cpu = statistics.median(r.cpu_us_per_token for r in base) if base else None
    for m in modes:
        rs = runs[m]
        tps = statistics.median(r.tps for r in rs)
        cpu = statistics.median(r.cpu_us_per_token for r in rs)
        vs = f"/ idle {tps / b_tps:.3f}" if b_tps else "no idle run"
        vc = f"/ idle {cpu / b_cpu:.3f}" if b_cpu else "no idle run"
        each = ", ".join(f"{r.tps:.0f}" for r in rs)
        print(f"  {m:8s} {tps:8.0f} tokens/s ({vs}; runs {each})  engine CPU {cpu:6.1f} us/token ({vc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
