"""CPU per handoff Put, unary PutBlocks against the streaming Put (#12: a prefill worker's and the
store's cost per request).

A store node runs in a child process on 127.0.0.1; this process puts ``--puts`` distinct
requests' KV (``--blocks`` blocks each, the tiny Llama's layout by default: 8 KiB blocks) under a
lease, as a prefill worker's handoff does, and releases each lease (as the decode worker does
after its read), through one :class:`kv_store.client.KVStoreClient`, from ``--threads`` threads.
The two ways alternate ``--rounds`` times so that a shared machine's load hits both alike.
Printed per round and way: CPU milliseconds per Put of the client (this process) and of the store
process (``/proc/<pid>/stat``), wall time, the load average; then the medians and their ratio.

Usage: python bench/kv_put_cpu.py [--puts 2000] [--blocks 1] [--threads 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster_load import load_avg, process_cpu_s  # noqa: E402
from kv_store.layout import KVLayout  # noqa: E402

# the tiny Llama of tests/tiny_models.py: 2 layers, 2 KV heads of 16, float32, 16-token blocks
TINY = KVLayout("tiny", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=16)


def _node(layout: KVLayout, capacity: int, q: mp.Queue, stop: mp.Event) -> None:
    from kv_store.service import serve
    from kv_store.store import StoreConfig

    srv = serve(StoreConfig("bench", layout, capacity_blocks=capacity, max_leased_blocks_per_owner=capacity))
    q.put(srv.address)
    stop.wait()
    srv.stop(0)


def run(client, layout: KVLayout, n: int, blocks: int, threads: int, unary: bool, base: int) -> float:
    """Put and release ``n`` requests' KV; returns wall seconds."""
    from engine.block_hash import chain_hashes

    client.unary_put = unary
    data = [os.urandom(layout.block_nbytes) for _ in range(blocks)]

    def one(i: int) -> None:
        toks = list(range(base + i, base + i + blocks * layout.block_size))
        hs = chain_hashes(toks, layout.block_size, layout.model_id, salt=str(base + i))
        res = client.put_blocks(layout, hs, data, lease_ttl_s=30.0)
        client.release(res.lease_id)
        client.delete(hs)

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(n)))
    return time.monotonic() - t0


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python bench/kv_put_cpu.py", description=__doc__.split("\n")[0])
    ap.add_argument("--puts", type=int, default=2000, help="Puts per round and way")
    ap.add_argument("--blocks", type=int, default=1, help="blocks per Put")
    ap.add_argument("--threads", type=int, default=4, help="client threads putting at once")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each with both ways")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from kv_store.client import KVStoreClient, put_blocks_fits

    layout = TINY
    if not put_blocks_fits(a.blocks, layout.block_nbytes):
        raise SystemExit(f"--blocks {a.blocks}: too large for one PutBlocks message")
    os.environ.setdefault("PDSERVE_TLS", "off")  # loopback only (as pdserve.launcher's clusters)
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_node, args=(layout, max(64, 4 * a.threads * a.blocks), q, stop))
    proc.start()
    try:
        address = q.get(timeout=60)
        client = KVStoreClient(address, timeout_s=30)
        client.wait_ready()
        run(client, layout, 200, a.blocks, a.threads, True, 10**8)  # warm-up, both ways
        run(client, layout, 200, a.blocks, a.threads, False, 2 * 10**8)
        out: dict[str, list[tuple[float, float]]] = {"unary": [], "stream": []}
        print(
            f"{a.puts} Puts of {a.blocks} block(s) of {layout.block_nbytes} B, lease + release, {a.threads} threads"
        )
        for r in range(a.rounds):
            for way in ("stream", "unary") if r % 2 else ("unary", "stream"):
                me0, st0 = process_cpu_s(os.getpid()), process_cpu_s(proc.pid)
                load = load_avg()
                wall = run(client, layout, a.puts, a.blocks, a.threads, way == "unary", (3 + r) * 10**8)
                me = (process_cpu_s(os.getpid()) - me0) / a.puts * 1e3
                st = (process_cpu_s(proc.pid) - st0) / a.puts * 1e3
                out[way].append((me, st))
                print(
                    f"  round {r + 1} {way:6s}: client {me:.3f} ms CPU/put, store {st:.3f} ms CPU/put, "
                    f"wall {wall:.2f} s  [{load}]"
                )
        client.close()
    finally:
        stop.set()
        proc.join(10)
    med = {
        w: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for w, v in out.items()
    }
    for w, (c, s) in med.items():
        print(f"median {w:6s}: client {c:.3f} ms, store {s:.3f} ms CPU per put (incl. release and delete)")
    print(
        f"unary / stream: client {med['unary'][0] / med['stream'][0]:.2f}x, "
        f"store {med['unary'][1] / med['stream'][1]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
