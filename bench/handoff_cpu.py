"""CPU per handoff of a prefill worker and its KV store node, by thread (#12: their cost per request).

A store node (``python -m kv_store``) and a prefill worker (``python -m prefill_worker``) run as
processes on 127.0.0.1 as :mod:`pdserve.launcher` starts them (their JSON logs piped into this
process), with no router and no decode worker. This process sends ``--requests`` Prefill calls
with ``--streams`` in flight (distinct prompts of ``--prompt-len`` tokens, the tiny Llama of
:mod:`tests.tiny_models`) over ``grpc.aio`` and releases each handoff's lease as a decode worker
does (:class:`kv_store.aio_client.AsyncKVStoreClient`: batched releases, the arena read counted).

Printed per round: CPU milliseconds per request of the store, the prefill worker and this
process (``/proc/<pid>/stat``, less each process's idle rate measured for ``--idle-s`` just before),
the split of the store's and the prefill worker's CPU by thread kind (gRPC pool threads, the
sync server's polling thread, gRPC's event engine, the engine loop: ``/proc/<pid>/task``, named
from Python's thread names), requests/s and the load average; then the medians over ``--rounds``.
On a shared machine compare only figures of one run, and repeat.

Usage: python bench/handoff_cpu.py [--requests 1500] [--streams 16] [--rounds 3] [--prompt-len 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cluster_load import load_avg, process_cpu_s, tiny_model  # noqa: E402
from pdserve.launcher import child_env  # noqa: E402

# names each process's threads get from Python's thread names (see _NAME_THREADS), by prefix
THREAD_KINDS = (
    ("engine-", "engine loop"),
    ("prefill-", "gRPC pool"),
    ("kvstore-", "gRPC pool"),
    ("Thread-", "gRPC server poll"),
    ("event_engine", "gRPC event engine"),
)
# a site hook for the spawned processes: each Python thread names its OS thread (prctl), so that
# /proc/<pid>/task/<tid>/comm tells the threads apart
_NAME_THREADS = """
import ctypes, threading
_libc = ctypes.CDLL(None)
_run = threading.Thread._bootstrap_inner
def _named(self):
    try:
        _libc.prctl(15, self.name[:15].encode(), 0, 0, 0)
    except Exception:
        pass
    return _run(self)
threading.Thread._bootstrap_inner = _named
"""


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread of ``pid`` by thread kind (THREAD_KINDS; else "other")."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        kind = next((k for prefix, k in THREAD_KINDS if name.startswith(prefix)), "other")
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def spawn(args: list[str], site_dir: str, lines: list[str]) -> tuple[subprocess.Popen, dict]:
    """Start ``python *args`` as the launcher does; (process, its ready line)."""
    p = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(site_dir),
        cwd=ROOT,
    )
    ready: dict = {}
    got = threading.Event()

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if not got.is_set() and line.startswith("{") and '"address"' in line and '"level"' not in line:
                ready.update(json.loads(line))
                got.set()
        got.set()

    threading.Thread(target=pump, daemon=True).start()
    got.wait(180)
    if not ready:
        p.kill()
        raise SystemExit(f"{args[1]} did not start:\n" + "".join(lines[-20:]))
    return p, ready


def prompt(i: int, length: int, vocab: int) -> list[int]:
    """A distinct prompt for request ``i`` (base-(vocab-3) digits of i, each offset by its place)."""
    base = vocab - 3
    return [3 + ((i // base**k) + 5 * k) % base for k in range(length)]


async def drive(
    worker: str, store: str, n: int, streams: int, offset: int, prompt_len: int, vocab: int
) -> float:
    """Send ``n`` Prefill calls, ``streams`` in flight, releasing each lease; returns wall seconds."""
    import grpc

    from kv_store.aio_client import AsyncKVStoreClient
    from pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    channel = grpc.aio.insecure_channel(worker)
    stub = worker_pb2_grpc.WorkerStub(channel)
    releaser = AsyncKVStoreClient(store)
    releases: set[asyncio.Task] = set()
    next_i = 0

    async def stream() -> None:
        nonlocal next_i
        while next_i < n:
            i = offset + next_i
            next_i += 1
            resp = await stub.Prefill(
                worker_pb2.PrefillRequest(
                    request_id=f"h{i}",
                    prompt_token_ids=prompt(i, prompt_len, vocab),
                    sampling=common_pb2.SamplingParams(max_tokens=32, temperature=0.0),
                    lease_ttl_s=30.0,
                ),
                timeout=120,
            )
            if resp.kv.lease_id:
                t = asyncio.ensure_future(
                    releaser.release(resp.kv.lease_id, shm_read_blocks=len(resp.kv.block_hashes))
                )
                releases.add(t)
                t.add_done_callback(releases.discard)

    t0 = time.monotonic()
    await asyncio.gather(*(stream() for _ in range(streams)))
    wall = time.monotonic() - t0
    if releases:
        await asyncio.gather(*releases)
    await releaser.close()
    await channel.close()
    return wall


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python bench/handoff_cpu.py", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="Prefill calls per round")
    ap.add_argument("--streams", type=int, default=16, help="Prefill calls in flight")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (medians printed)")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per request")
    ap.add_argument("--idle-s", type=float, default=1.0, help="idle seconds measured before each round")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.requests < 1 or a.streams < 1 or a.rounds < 1 or a.prompt_len < 1 or a.idle_s <= 0:
        raise SystemExit("--requests, --streams, --rounds and --prompt-len must be >= 1, --idle-s > 0")
    from engine.models.config import ModelConfig

    os.environ.setdefault("PDSERVE_TLS", "off")  # loopback only (as pdserve.launcher's clusters)
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_NAME_THREADS)
        model = tiny_model(Path(tmp))
        mc = ModelConfig.from_path(str(model))
        store_p, store = spawn(
            ["-m", "kv_store", "--node-id", "kv0", "--capacity-blocks", "4096", "--model-id", model.name,
             "--num-layers", str(mc.num_hidden_layers), "--num-kv-heads", str(mc.num_key_value_heads),
             "--head-dim", str(mc.head_dim), "--dtype", "float32", "--block-size", "16", "--tls", "off"],
            str(site),
            lines,
        )  # fmt: skip
        try:
            pre_p, pre = spawn(
                ["-m", "prefill_worker", "--worker-id", "prefill-0", "--model", str(model),
                 "--store", store["address"], "--kv-blocks", "2048", "--tls", "off"],
                str(site),
                lines,
            )  # fmt: skip
        except BaseException:
            store_p.kill()
            raise
        pids = {"store": store_p.pid, "prefill": pre_p.pid, "client": os.getpid()}
        rows: list[dict[str, float]] = []
        try:
            asyncio.run(
                drive(pre["address"], store["address"], 200, a.streams, 10**7, a.prompt_len, mc.vocab_size)
            )
            print(
                f"{a.requests} Prefill calls per round, {a.streams} in flight, {a.prompt_len}-token prompts, "
                "leases released as a decode worker does; CPU ms per request"
            )
            for r in range(a.rounds):
                c0 = {k: process_cpu_s(p) for k, p in pids.items()}
                time.sleep(a.idle_s)
                c1 = {k: process_cpu_s(p) for k, p in pids.items()}
                idle = {k: (c1[k] - c0[k]) / a.idle_s for k in pids}
                t1 = {k: thread_cpu_s(pids[k]) for k in ("store", "prefill")}
                load = load_avg()
                wall = asyncio.run(
                    drive(pre["address"], store["address"], a.requests, a.streams, r * a.requests, a.prompt_len,
                          mc.vocab_size)
                )  # fmt: skip
                c2 = {k: process_cpu_s(p) for k, p in pids.items()}
                t2 = {k: thread_cpu_s(pids[k]) for k in ("store", "prefill")}
                row = {k: (c2[k] - c1[k] - idle[k] * wall) / a.requests * 1e3 for k in pids}
                row["requests/s"] = a.requests / wall
                rows.append(row)
                split = {
                    k: ", ".join(
                        f"{kind} {(t2[k][kind] - t1[k].get(kind, 0.0)) / a.requests * 1e3:.3f}"
                        for kind in sorted(t2[k], key=lambda x: t1[k].get(x, 0.0) - t2[k][x])
                        if t2[k][kind] - t1[k].get(kind, 0.0) > 0
                    )
                    for k in t2
                }
                print(
                    f"  round {r + 1}: store {row['store']:.3f} ({split['store']})\n"
                    f"           prefill {row['prefill']:.3f} ({split['prefill']})\n"
                    f"           client {row['client']:.3f}; {row['requests/s']:.0f} requests/s  [{load}]"
                )
        finally:
            for p in (pre_p, store_p):
                p.terminate()
            for p in (pre_p, store_p):
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    print(
        f"median of {a.rounds}: store {med['store']:.3f}  prefill {med['prefill']:.3f}  client "
        f"{med['client']:.3f} ms CPU per request; {med['requests/s']:.0f} requests/s  [{load_avg()}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
