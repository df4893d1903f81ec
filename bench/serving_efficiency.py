"""Serving efficiency: the cluster's tokens/s against the same engine embedded, same cores (#12).

For each concurrency C of ``--streams`` (default 64 and 256), in one run on one machine:

* embedded: the engine the workers run (tiny Llama of :mod:`tests.tiny_models`, same block pool
  and batch limit), in this process, continuous batching, C requests in flight, each finished
  one replaced at once, ``--requests-per-stream`` x C requests of ``--max-tokens`` tokens;
* cluster: router + 1 prefill + 1 decode worker (+ the KV store) launched as processes on
  127.0.0.1 (:func:`pdserve.launcher.launch`), the same requests sent through the SDK's
  :class:`pdserve.client.AsyncClient` from this process by C concurrent streams (closed loop),
  once per ``--modes`` entry: ``relay`` (the router relays every token) and ``direct`` (the
  client offers direct streams: the decode worker streams the tokens to it, the router out of
  the token path; router and decode worker run with ``--direct-streams``).

Printed: tokens/s of each, the ratio cluster / embedded (target >= 0.8: PASS/FAIL) and the CPU
milliseconds per token of every process over the cluster run (router, prefill, decode, store and
the client, this process; ``/proc/<pid>/stat``), the embedded engine's thread and the decode
worker's two busiest threads (its engine loop, its event loop) split into CPU, waiting for a CPU
and blocked (:mod:`bench.thread_meter`; blocked: waiting for the GIL, or for work), with the
router's target (<= 0.02 ms/token: PASS/FAIL), the tokens per message the clients received (the decode workers' coalescing:
``--stream-interval`` / ``--stream-window-ms``), the CPU milliseconds per request of every process,
and the machine's load average beside each figure. Each concurrency runs ``--repeats`` times (an
embedded run, then the cluster's per mode; on a shared 2-core host the ratio of two runs swings by
0.1 or more): the verdicts are on the median ratio and the median router CPU per token, and the
detailed figures are the median repeat's, with where the cluster's requests spent their time as
the client saw it (:mod:`bench.request_phases`: time to the first token, to the second message,
the pace after it, the share of a request's life outside streaming, the part of the first token's
wait before the router's own TTFT, and the size of the burst each request was sent in). After each direct run (``--floor on``), the gRPC
floor of the same run (:mod:`bench.grpc_floor`: the bare grpc.aio calls and messages of one direct
request between the same processes, no work) beside each process's CPU per request. Both runs use the cores this
process may use (``--cpus`` pins this process and so every process it starts to a set).
A progress line (requests done) goes to stderr.

Usage: python bench/serving_efficiency.py [--streams 64,256] [--requests-per-stream 4]
       [--max-tokens 32] [--repeats 3] [--prompt-len 8] [--stream-interval 1] [--stream-window-ms MS]
       [--modes relay,direct] [--floor on|off] [--cpus 0,1] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster_load import (  # noqa: E402
    CpuMeter,
    Progress,
    engine_closed_loop,
    load_avg,
    make_engine,
    process_cpu_s,
    sdk_closed_loop,
    tiny_model,
    torch_threads,
)
from bench.request_phases import Phases, phases_lines, request_phases  # noqa: E402
from bench.thread_meter import ThreadSplit, sample_threads, thread_split  # noqa: E402

RATIO_TARGET = 0.8
ROUTER_MS_PER_TOKEN_TARGET = 0.02
KV_BLOCKS = 2048  # at least; more when the streams' contexts need them (kv_blocks_for)
BLOCK_SIZE = 16  # bench.cluster_load.make_engine's and the workers' default


def kv_blocks_for(streams: list[int], prompt_len: int, max_tokens: int) -> int:
    """KV blocks of the engine and of each worker: every stream's whole context fits (at least
    ``KV_BLOCKS``), so neither side preempts and the run measures the token path. (With fewer, the
    decode worker preempts requests for long enough that the router's progress deadline takes a
    preempted stream for a hung worker and quarantines it: see README, #12.)"""
    per_request = -(-(prompt_len + max_tokens) // BLOCK_SIZE) + 1
    return max(KV_BLOCKS, max(streams, default=0) * per_request)


@dataclass
class EfficiencyResult:
    streams: int
    requests: int
    engine_tokens: int
    engine_wall_s: float
    engine_cpu_ms_per_token: float
    cluster_tokens: int
    cluster_wall_s: float
    cluster_failures: dict[str, int]
    cluster_messages: int = 0  # messages the clients received (tokens per message: coalescing)
    cpu_ms_per_token: dict[str, float] = field(default_factory=dict)
    load_engine: str = ""
    load_cluster: str = ""
    mode: str = "relay"  # relay | direct (the router out of the token path)
    # bench/grpc_floor.py in the same run (direct mode): CPU ms per request of each process for
    # the bare grpc.aio message pattern of one direct request (empty: not measured)
    floor_ms_per_request: dict[str, float] = field(default_factory=dict)
    load_floor: str = ""
    # the embedded engine's thread and the decode worker's two busiest threads (its engine loop,
    # then its event loop), each split into CPU / waiting for a CPU / blocked (bench.thread_meter)
    engine_thread: ThreadSplit | None = None
    decode_threads: list[ThreadSplit] = field(default_factory=list)
    repeat: int = 0  # which of --repeats (each an embedded run and a cluster run per mode)
    phases: Phases | None = None  # where the cluster's requests spent their time (client side)

    def cpu_ms_per_request(self) -> dict[str, float]:
        """CPU ms per request of each process (per token x tokens per request)."""
        per_req = self.cluster_tokens / max(self.requests, 1)
        return {k: v * per_req for k, v in self.cpu_ms_per_token.items()}

    @property
    def engine_tps(self) -> float:
        return self.engine_tokens / self.engine_wall_s

    @property
    def cluster_tps(self) -> float:
        return self.cluster_tokens / self.cluster_wall_s

    @property
    def ratio(self) -> float:
        return self.cluster_tps / self.engine_tps

    @property
    def cpu_ratio(self) -> float:
        """Engine CPU per token / the cluster's (all its processes): the tokens/s ratio the cluster
        would reach on as many dedicated cores as it keeps busy; unlike wall-clock tokens/s it
        does not move with other jobs' load on a shared machine."""
        total = self.cpu_ms_per_token.get("all", 0.0)
        return self.engine_cpu_ms_per_token / total if total > 0 else 0.0


def measure_engine(
    model: str, c: int, n: int, max_tokens: int, prompt_len: int, threads: int, kv_blocks: int
) -> tuple[int, float, float, ThreadSplit | None]:
    """(tokens, wall s, CPU ms per token, the stepping thread's split) of the embedded run
    (warmed up first), on ``threads`` torch threads, with ``kv_blocks`` KV blocks (as each worker)."""
    with torch_threads(threads):
        eng = make_engine(model, kv_blocks)
        try:
            engine_closed_loop(eng, min(c, 16), min(c, 16), max_tokens, prompt_len, offset=10**6)  # warm-up
            me, tid = os.getpid(), threading.get_native_id()
            cpu0 = process_cpu_s(me)
            t0 = sample_threads(me)
            r = engine_closed_loop(eng, c, n, max_tokens, prompt_len, Progress(f"embedded, {c} streams", n))
            cpu = process_cpu_s(me) - cpu0
            split = next((t for t in thread_split(t0, sample_threads(me), r.wall_s) if t.tid == tid), None)
        finally:
            eng.close()
    return r.tokens, r.wall_s, cpu / max(r.tokens, 1) * 1e3, split


def measure_cluster(cl, c: int, n: int, max_tokens: int, prompt_len: int, direct: bool = False):
    """(LoadResult, CPU ms per token by process) of the cluster run (warmed up first);
    ``direct``: the client takes its tokens from the decode worker."""
    asyncio.run(
        sdk_closed_loop(
            cl.router_address, min(c, 16), min(c, 16), max_tokens, prompt_len, offset=10**6, direct=direct
        )
    )
    pids = {name: p.pid for name, p in cl.procs.items()}
    pids["client"] = os.getpid()
    decode = pids["decode-0"]
    meter = CpuMeter(pids).start()
    threads0 = sample_threads(decode)
    mine0 = sample_threads(os.getpid())
    r = asyncio.run(
        sdk_closed_loop(
            cl.router_address,
            c,
            n,
            max_tokens,
            prompt_len,
            progress=Progress(f"cluster ({'direct' if direct else 'relay'}), {c} streams", n),
            record_arrivals=True,
            direct=direct,
        )
    )
    cpu = meter.stop()
    threads = thread_split(threads0, sample_threads(decode), r.wall_s)[:2]
    # the launcher's log pumps (pdserve/launcher.py, threads "log-<process>") run in this process:
    # the cluster's cost (as in `pdserve serve`), not the client's
    pumps = {t.native_id for t in threading.enumerate() if t.name.startswith("log-")}
    mine = thread_split(mine0, sample_threads(os.getpid()), r.wall_s)
    logs = sum(t.cpu_s for t in mine if t.tid in pumps)
    cpu["client"] -= logs
    cpu[LAUNCHER_LOGS] = logs
    per_tok = {k: v / max(r.tokens, 1) * 1e3 for k, v in cpu.items()}
    per_tok["all"] = sum(cpu.values()) / max(r.tokens, 1) * 1e3
    return r, per_tok, threads


def split_line(t: ThreadSplit, tokens: int) -> str:
    """A thread's CPU, waiting-for-a-CPU and blocked milliseconds per token."""
    k = 1e3 / max(tokens, 1)
    return f"CPU {t.cpu_s * k:.4f}  waiting for a CPU {t.run_delay_s * k:.4f}  blocked {t.blocked_s * k:.4f}"


LAUNCHER_LOGS = "launcher logs"  # the launcher's log-pump threads in the bench's own process

# cluster process name -> bench/grpc_floor.py process name
FLOOR_NAMES = {
    "router": "router",
    "prefill-0": "prefill",
    "decode-0": "decode",
    "store": "store",
    "client": "client",
}


def measure_floor_for(c: int, n: int, r, max_tokens: int) -> tuple[dict[str, float], str]:
    """bench/grpc_floor.py at ``c`` streams, ``n`` requests, with as many direct-stream messages
    per request as the clients received from the worker in run ``r`` (messages per request less
    the router's first token), each carrying the run's tokens per message; (CPU ms per request by
    process, load average)."""
    from bench.grpc_floor import measure_floor

    per_request = len(r.arrivals) / max(n, 1)
    deltas = max(1, round(per_request - 1))
    tpd = max(1, round((max_tokens - 1) / deltas))
    load = load_avg()
    f = measure_floor(c, n, deltas, tpd)
    return dict(f.cpu_ms_per_request), load


def floor_bound(engine_ms_per_request: float, floor_ms_per_request: float, cores: int) -> float:
    """The highest cluster / embedded tokens/s ratio the gRPC floor leaves: the embedded engine
    serves 1 / E requests per second on its one thread; the cluster spends at least E + F CPU ms
    per request (the engine's work E, split between its prefill and decode workers, plus the bare
    calls' F) on ``cores`` cores, and its decode engine thread cannot beat the embedded one, so
    its ratio is at most ``min(1, cores * E / (E + F))``."""
    if engine_ms_per_request <= 0 or floor_ms_per_request < 0 or cores < 1:
        raise ValueError(
            f"floor_bound needs E > 0, F >= 0, cores >= 1; got {engine_ms_per_request}, "
            f"{floor_ms_per_request}, {cores}"
        )
    return min(1.0, cores * engine_ms_per_request / (engine_ms_per_request + floor_ms_per_request))


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def grouped(results: list[EfficiencyResult]) -> list[list[EfficiencyResult]]:
    """The results by (streams, mode), in the order each first appears; each group's repeats in
    run order."""
    groups: dict[tuple[int, str], list[EfficiencyResult]] = {}
    for r in results:
        groups.setdefault((r.streams, r.mode), []).append(r)
    return list(groups.values())


def median_result(group: list[EfficiencyResult]) -> EfficiencyResult:
    """The repeat whose ratio is the median (the lower middle one of an even count)."""
    ranked = sorted(group, key=lambda r: r.ratio)
    return ranked[(len(ranked) - 1) // 2]


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(
        prog="python bench/serving_efficiency.py", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--streams", default="64,256", help="comma-separated concurrencies")
    ap.add_argument("--requests-per-stream", type=int, default=4, help="requests per stream (closed loop)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument(
        "--repeats",
        type=_positive,
        default=3,
        help="repeats per concurrency, each an embedded run then the cluster's (the ratio between two "
        "runs on a shared 2-core host swings by 0.1 or more): the verdict is on the median",
    )
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per request")
    ap.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="torch threads of the embedded engine (default 1: as each worker runs, OMP_NUM_THREADS=1)",
    )
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the decode worker's --stream-interval (tokens per message after the first)",
    )
    ap.add_argument(
        "--stream-window-ms",
        type=float,
        default=None,
        help="the decode worker's --stream-window-ms (adaptive coalescing; default: the worker's default)",
    )
    ap.add_argument(
        "--modes",
        default="relay,direct",
        help="cluster token paths to measure, in this order: relay (through the router), direct "
        "(decode worker to client)",
    )
    ap.add_argument(
        "--floor",
        default="on",
        choices=("on", "off"),
        help="after each direct run, measure the gRPC floor (bench/grpc_floor.py: the bare grpc.aio "
        "calls and messages of a direct request, no work) in the same run",
    )
    ap.add_argument("--cpus", default="", help="pin to these CPUs (e.g. 0,1); default: as allowed now")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, {int(x) for x in a.cpus.split(",")})
    cores = sorted(os.sched_getaffinity(0))
    from pdserve.launcher import ClusterSpec, launch
    from pdserve.worker_base import DEFAULT_STREAM_WINDOW_S

    window_ms = DEFAULT_STREAM_WINDOW_S * 1000.0 if a.stream_window_ms is None else a.stream_window_ms
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in ("relay", "direct")]
    if bad:
        raise SystemExit(f"--modes: unknown mode(s) {bad}: relay, direct")
    worker_args = (
        "--stream-interval",
        str(a.stream_interval),
        "--stream-window-ms",
        f"{window_ms:g}",
        *(("--direct-streams",) if "direct" in modes else ()),
    )
    sizes = [int(x) for x in a.streams.split(",") if x]
    kv_blocks = kv_blocks_for(sizes, a.prompt_len, a.max_tokens)
    results: list[EfficiencyResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_model(Path(tmp)))
        spec = ClusterSpec(
            model_path=model,
            num_prefill=1,
            num_decode=1,
            worker_kv_blocks=kv_blocks,
            worker_args=worker_args,
            router_args=("--direct-streams",) if "direct" in modes else (),
        )
        with launch(spec) as cl:
            for c, rep in ((c, rep) for c in sizes for rep in range(a.repeats)):
                n = c * a.requests_per_stream
                load_e = load_avg()
                e_tok, e_wall, e_cpu, e_thread = measure_engine(
                    model, c, n, a.max_tokens, a.prompt_len, a.engine_threads, kv_blocks
                )
                for mode in modes:
                    load_c = load_avg()
                    r, per_tok, d_threads = measure_cluster(
                        cl, c, n, a.max_tokens, a.prompt_len, direct=mode == "direct"
                    )
                    floor, load_f = {}, ""
                    if mode == "direct" and a.floor == "on" and rep == 0:
                        floor, load_f = measure_floor_for(c, n, r, a.max_tokens)
                    results.append(
                        EfficiencyResult(
                            c,
                            n,
                            e_tok,
                            e_wall,
                            e_cpu,
                            r.tokens,
                            r.wall_s,
                            r.failures,
                            len(r.arrivals),
                            per_tok,
                            load_e,
                            load_c,
                            mode,
                            floor,
                            load_f,
                            e_thread,
                            d_threads,
                            rep,
                            request_phases(r.timings),
                        )
                    )
    print(
        f"tiny Llama, {a.max_tokens} tokens per request, prompt {a.prompt_len}, "
        f"{a.requests_per_stream} requests per stream, decode --stream-interval {a.stream_interval} "
        f"--stream-window-ms {window_ms:g}, {kv_blocks} KV blocks, "
        f"cores {cores}, embedded engine on "
        f"{a.engine_threads} torch thread(s) (each worker: 1)"
    )
    ok = True
    for group in grouped(results):
        r = median_result(group)
        ratios = sorted(x.ratio for x in group)
        verdict = "PASS" if r.ratio >= RATIO_TARGET else "FAIL"
        rt = statistics.median(x.cpu_ms_per_token.get("router", float("nan")) for x in group)
        rverdict = "PASS" if rt <= ROUTER_MS_PER_TOKEN_TARGET else "FAIL"
        failures = [x.cluster_failures for x in group if x.cluster_failures]
        ok = ok and verdict == "PASS" and rverdict == "PASS" and not failures
        print(f"\n{r.streams} streams, {r.requests} requests, token path {r.mode}:")
        if len(group) > 1:
            print(
                f"  {len(group)} repeats (each an embedded run, then the cluster): ratios "
                + ", ".join(f"{x.ratio:.3f}" for x in group)
                + f"; median {r.ratio:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}."
                f" The figures below are those of the median repeat ({r.repeat + 1})"
            )
        print(
            f"  embedded: {r.engine_tps:9.0f} tokens/s  ({r.engine_tokens} tokens, {r.engine_wall_s:.2f} s; "
            f"{r.engine_cpu_ms_per_token:.4f} ms CPU/token)  [{r.load_engine}]"
        )
        print(
            f"  cluster:  {r.cluster_tps:9.0f} tokens/s  ({r.cluster_tokens} tokens, {r.cluster_wall_s:.2f} s; "
            f"{r.cluster_tokens / max(r.cluster_messages, 1):.2f} tokens per message)"
            f"  [{r.load_cluster}]"
        )
        print(
            f"  ratio cluster/embedded: {r.ratio:.3f}"
            f"{' (median of the repeats)' if len(group) > 1 else ''}  (target >= {RATIO_TARGET}: {verdict})"
        )
        print(
            f"  CPU-normalised ratio (engine CPU/token / cluster CPU/token, all processes): "
            f"{r.cpu_ratio:.3f}  (load-independent)"
        )
        for x in group:
            if x.cluster_failures:
                print(f"  cluster failures (repeat {x.repeat + 1}): {x.cluster_failures}")
        per = "  ".join(f"{k} {v:.4f}" for k, v in r.cpu_ms_per_token.items())
        print(f"  CPU ms per token: {per}")
        if r.engine_thread is not None and r.decode_threads:
            eng_t, dec = r.engine_thread, r.decode_threads
            print(
                "  threads, ms per token (bench/thread_meter.py; blocked: waiting for the GIL, or for work):"
            )
            print(f"    embedded engine         {split_line(eng_t, r.engine_tokens)}")
            print(f"    decode, busiest (engine) {split_line(dec[0], r.cluster_tokens)}")
            if len(dec) > 1:
                print(f"    decode, next (its loop)  {split_line(dec[1], r.cluster_tokens)}")
            ratio = (dec[0].cpu_s / max(r.cluster_tokens, 1)) / max(
                eng_t.cpu_s / max(r.engine_tokens, 1), 1e-12
            )
            print(f"    decode engine thread CPU / embedded engine CPU per token: {ratio:.2f}x")
        print(
            f"  router CPU per token {rt:.4f} ms{' (median of the repeats)' if len(group) > 1 else ''}"
            f" (target <= {ROUTER_MS_PER_TOKEN_TARGET}: {rverdict})"
        )
        if r.phases is not None:
            print("  the cluster's requests as the client saw them (bench/request_phases.py):")
            for line in phases_lines(r.phases):
                print(f"    {line}")
        per_req = r.cpu_ms_per_request()
        print("  CPU ms per request: " + "  ".join(f"{k} {v:.3f}" for k, v in per_req.items()))
        fr = next((x for x in group if x.floor_ms_per_request), None)  # measured after repeat 1
        if fr is not None:
            f = fr.floor_ms_per_request
            print(
                f"  gRPC floor (bench/grpc_floor.py, same calls and messages, no work; after repeat "
                f"{fr.repeat + 1})  [{fr.load_floor}]:"
            )
            for k, v in per_req.items():
                fk = "all" if k == "all" else FLOOR_NAMES.get(k)
                if fk in f:
                    print(
                        f"    {k:10s} {v:7.3f} ms/request, floor {f[fk]:6.3f}, {v / max(f[fk], 1e-9):5.2f}x the floor"
                    )
            e_req = r.engine_cpu_ms_per_token * r.engine_tokens / max(r.requests, 1)
            if "all" in f and e_req > 0:
                with_client = floor_bound(e_req, f["all"], len(cores))
                without = floor_bound(e_req, f["all"] - f.get("client", 0.0), len(cores))
                print(
                    f"  the highest ratio the floor leaves on {len(cores)} cores (min(1, cores*E/(E+F)); "
                    f"E {e_req:.3f} ms the embedded engine's CPU per request, F the floor's): "
                    f"{with_client:.3f} with the client's calls, {without:.3f} without"
                    f"{'  (the target is above it)' if max(with_client, without) < RATIO_TARGET else ''}"
                )
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                [
                    {
                        **asdict(r),
                        "engine_tps": r.engine_tps,
                        "cluster_tps": r.cluster_tps,
                        "ratio": r.ratio,
                        "cpu_ratio": r.cpu_ratio,
                        "cpu_ms_per_request": r.cpu_ms_per_request(),
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
