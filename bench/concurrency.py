"""Router concurrency: N concurrent Generate streams against the embedded cluster (tiny model).

``--model default`` runs the same sweep on the real SmolLM2-135M-Instruct (a 1,000-stream burst
with a real model's compute and tokenizer); the tiny model is the default so that the router's and
the data plane's cost dominates.

One embedded cluster (store, router, 1 prefill + 2 decode worker processes on 127.0.0.1, a tiny
random-weight Llama from :mod:`tests.tiny_models` with SmolLM2's tokenizer) receives, for each N of
the sweep (default 100 and 1,000; ``--sweep 100,1000,10000``), N Generate streams opened at once
(greedy, ``--max-tokens`` tokens each, prompt token ids). Printed per N:

* success rate (and the failures by status code);
* router CPU seconds (user + system, read from ``/proc/<router pid>/stat``) per relayed token and
  per request, over the N streams;
* the least number of registered workers seen during the run (the router's
  ``pdserve_router_workers`` gauge, polled every 0.25 s: a starved control plane drops them);
* p50 / p99 TTFT through the cluster, the same N requests' p99 TTFT on one engine alone (the same
  model and engine config, in this process, all N submitted at once), and the difference (the
  overhead of the router, the network hops and the KV handoff).

Each N runs once per ``--modes`` entry: ``relay`` (raw Generate stubs, the router relays every
token) and ``direct`` (the SDK's :class:`pdserve.client.AsyncClient` with ``direct=True``: the
decode workers stream the tokens to it, the router sends the first token, the redirect and the
finish; router and decode workers run with ``--direct-streams``).

Usage: python bench/concurrency.py [--sweep 100,1000] [--max-tokens 4] [--prompt-len 8]
       [--modes relay,direct] [--model tiny|default|PATH] [--kv-blocks 2048] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# shared with the other cluster benchmarks (and imported from here by tests)
from bench.cluster_load import (  # noqa: E402, F401
    CHANNELS,
    VOCAB,
    Progress,
    StreamOutcome,
    engine_ttfts,
    load_avg,
    percentile,
    process_cpu_s,
    prompt_ids,
    request,
    run_streams,
    run_streams_async,
    tiny_model,
)


@dataclass
class SweepResult:
    n: int
    ok: int
    failures: dict[str, int]
    wall_s: float
    tokens: int
    router_cpu_s: float | None = None
    min_workers: dict[str, int] = field(default_factory=dict)
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    engine_ttft_p99_s: float | None = None
    first_failure: str = ""
    load: str = ""  # the machine's load average when the sweep point ended
    mode: str = "relay"  # relay | direct (decode workers stream to the SDK client)

    @property
    def success_rate(self) -> float:
        return self.ok / self.n if self.n else 0.0


def registered_workers(metrics_address: str) -> dict[str, int]:
    """The router's live registered workers by role (its ``pdserve_router_workers`` gauge)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as r:
        body = r.read().decode()
    return {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'^pdserve_router_workers\{role="(\w+)"\} (\S+)$', body, re.M)
    }


class WorkerWatch:
    """Polls :func:`registered_workers` every ``interval_s`` on a thread; ``minimum`` is the least
    count per role seen (a role missing from a scrape counts 0; a failed scrape is recorded)."""

    def __init__(self, metrics_address: str, interval_s: float = 0.25) -> None:
        self.metrics_address = metrics_address
        self.interval_s = interval_s
        self.minimum: dict[str, int] = {}
        self.samples = 0
        self.scrape_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-watch")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = registered_workers(self.metrics_address)
            except OSError:
                self.scrape_errors += 1
            else:
                self.samples += 1
                for role in set(now) | set(self.minimum):
                    self.minimum[role] = min(self.minimum.get(role, now.get(role, 0)), now.get(role, 0))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def sdk_streams(
    address: str, n: int, max_tokens: int, prompt_len: int, timeout_s: float, progress: Progress, direct: bool
) -> list[StreamOutcome]:
    """``n`` streams opened at once through one :class:`pdserve.client.AsyncClient` (``direct``:
    offering direct streams); one outcome per stream (the SDK's typed errors by class name)."""
    from pdserve.client import AsyncClient

    async with AsyncClient(address, timeout=timeout_s, direct=direct) as client:

        async def one(i: int) -> StreamOutcome:
            t0 = time.monotonic()
            out = StreamOutcome("OK")
            finished = False
            try:
                async for c in client.generate(
                    prompt_ids(i, prompt_len), max_tokens=max_tokens, temperature=0.0, ignore_eos=True
                ):
                    if c.token_ids and out.ttft_s is None:
                        out.ttft_s = time.monotonic() - t0
                    out.tokens += len(c.token_ids)
                    finished = finished or c.finish is not None
            except Exception as e:  # noqa: BLE001 - counted, the run goes on
                return StreamOutcome(type(e).__name__, out.tokens, out.ttft_s, str(e))
            finally:
                progress.add()
            return out if finished else StreamOutcome("NO_FINISH", out.tokens, out.ttft_s)

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def sweep_one(
    cl, n: int, max_tokens: int, prompt_len: int, timeout_s: float, mode: str = "relay"
) -> SweepResult:
    router_pid = cl.procs["router"].pid
    cpu0 = process_cpu_s(router_pid)
    t0 = time.monotonic()
    with WorkerWatch(cl.metrics["router"]) as watch:
        if mode == "direct":
            outs = asyncio.run(
                sdk_streams(
                    cl.router_address,
                    n,
                    max_tokens,
                    prompt_len,
                    timeout_s,
                    Progress(f"{n} streams (direct)", n),
                    direct=True,
                )
            )
        else:
            outs = run_streams(
                cl.router_address, n, max_tokens, prompt_len, timeout_s, Progress(f"{n} streams", n)
            )
    wall = time.monotonic() - t0
    cpu = process_cpu_s(router_pid) - cpu0
    ok = [o for o in outs if o.code == "OK"]
    bad = [o for o in outs if o.code != "OK"]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    return SweepResult(
        n=n,
        ok=len(ok),
        failures=dict(Counter(o.code for o in bad)),
        wall_s=wall,
        tokens=sum(o.tokens for o in outs),
        router_cpu_s=cpu,
        min_workers=dict(watch.minimum),
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p99_s=percentile(ttfts, 0.99),
        first_failure=f"{bad[0].code}: {bad[0].detail}" if bad else "",
        load=load_avg(),
        mode=mode,
    )


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python bench/concurrency.py", description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default="100,1000", help="comma-separated stream counts (e.g. 100,1000,10000)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens generated per stream")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per stream")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each stream")
    ap.add_argument(
        "--modes",
        default="relay,direct",
        help="token paths to measure at each N: relay (through the router), direct (decode workers "
        "to the SDK client)",
    )
    ap.add_argument(
        "--model",
        default="tiny",
        help="tiny: a random-weight 2-layer Llama (system overhead dominates); default: the real "
        "SmolLM2-135M-Instruct (converted on first use); or an HF Llama-family folder",
    )
    ap.add_argument("--kv-blocks", type=int, default=2048, help="KV blocks of each worker")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine-alone TTFT reference")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    from pdserve.launcher import ClusterSpec, launch

    sizes = [int(x) for x in a.sweep.split(",") if x]
    modes = [m for m in a.modes.split(",") if m]
    if any(m not in ("relay", "direct") for m in modes):
        ap.error(f"--modes: relay and/or direct, got {a.modes!r}")
    direct_args = ("--direct-streams",) if "direct" in modes else ()
    results: list[SweepResult] = []
    if a.kv_blocks < 1:
        ap.error(f"--kv-blocks must be >= 1, got {a.kv_blocks}")
    with tempfile.TemporaryDirectory() as tmp:
        if a.model == "tiny":
            model = tiny_model(Path(tmp))
        else:
            from pdserve.errors import ModelNotFoundError
            from pdserve.model_setup import resolve_model_path

            try:
                model = resolve_model_path(a.model)
            except ModelNotFoundError as e:
                ap.error(f"--model: {e}")
        kv_blocks = a.kv_blocks
        spec = ClusterSpec(
            model_path=str(model),
            num_prefill=1,
            num_decode=2,
            worker_kv_blocks=kv_blocks,
            worker_args=direct_args,
            router_args=direct_args,
        )
        with launch(spec) as cl:
            for n in sizes:
                for mode in modes:
                    results.append(sweep_one(cl, n, a.max_tokens, a.prompt_len, a.timeout_s, mode))
        if not a.no_engine:
            engine_p99: dict[int, float | None] = {}
            for r in results:
                if r.n not in engine_p99:
                    engine_p99[r.n] = percentile(
                        engine_ttfts(str(model), r.n, a.max_tokens, a.prompt_len, kv_blocks), 0.99
                    )
                r.engine_ttft_p99_s = engine_p99[r.n]
    print(
        f"{'mode':>6} {'streams':>8} {'success':>8} {'wall s':>7} {'tokens':>7} {'cpu s/token':>12} {'cpu s/req':>10} "
        f"{'min workers':>14} {'ttft p50':>9} {'ttft p99':>9} {'engine p99':>10} {'overhead p99':>12}"
    )
    for r in results:
        cpu_tok = r.router_cpu_s / r.tokens if r.tokens and r.router_cpu_s is not None else float("nan")
        cpu_req = r.router_cpu_s / r.n if r.router_cpu_s is not None else float("nan")
        mw = "/".join(f"{r.min_workers.get(k, 0)}" for k in ("prefill", "decode"))
        over = (
            r.ttft_p99_s - r.engine_ttft_p99_s
            if r.ttft_p99_s is not None and r.engine_ttft_p99_s is not None
            else None
        )

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        print(
            f"{r.mode:>6} {r.n:>8} {r.success_rate:>8.1%} {r.wall_s:>7.1f} {r.tokens:>7} {cpu_tok:>12.6f} {cpu_req:>10.5f} "
            f"{mw + ' (P/D)':>14} {f(r.ttft_p50_s):>9} {f(r.ttft_p99_s):>9} {f(r.engine_ttft_p99_s):>10} "
            f"{f(over):>12}"
        )
        print(f"{'':>15} [{r.load}]")
        if r.failures:
            print(f"{'':>15} failures: {r.failures}; first: {r.first_failure[:200]}")
    if a.out:
        Path(a.out).write_text(
            json.dumps([{**asdict(r), "success_rate": r.success_rate} for r in results], indent=2)
        )
    return 0 if all(r.ok == r.n for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
