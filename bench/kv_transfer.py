"""KV block transfer benchmark: pdserve transports vs raw baselines measured in the same run.

For 16 / 64 / 256 MiB of KV (``--quick``: 4 / 16 MiB) it times moving the blocks from a store node
(its own process, as in the cluster) into a destination buffer in this process:

* shm path   the prefill -> decode handoff as a decode worker really takes it. Once per size, not
             timed (the prefill worker does it): Put the blocks under a lease, which returns their
             arena slots (PutResponse.slots, carried by KVHandle.shm_slots). Timed, per repetition:
             ShmTransport.read_leased (no rpc: zero-copy views of the leased slots of the node's
             arena) + FetchedBlocks.copy_into the destination (one copy per run of adjacent slots)
             + the XXH3-64 check of the copy against the writer's checksums (KVHandle.block_checksums).
  vs memcpy  numpy copy of the same number of bytes between two private buffers.      target >= 0.70x
* shm+lease  context, no target: ShmTransport.fetch, the lookup-based read without a handle lease
             (one Lease rpc to pin the blocks and learn their slots + the same views and copy; the
             Release is deferred and rides on the next Lease). Its rpc costs ~1 ms per read, which
             dominates at small sizes.
* gRPC path  KVStoreClient.get_blocks_into (Get stream, protobuf chunks <= 1 MiB, copy into dest)
  vs raw gRPC  a trivial bytes-streaming service (no protobuf: identity serializers), same chunk
             size, same copy into the destination, server in its own process.            target >= 0.80x
  vs raw TCP   socket sendall / recv_into over loopback (reported, no target).

Each cell is the median of several repetitions, interleaved across paths; GB/s = 1e9 bytes / s.

Usage: python bench/kv_transfer.py [--quick] [--layout llama8b|smollm2] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from engine.block_hash import chain_hashes  # noqa: E402
from kv_store.checksum import block_checksum  # noqa: E402
from kv_store.client import KVStoreClient  # noqa: E402
from kv_store.handle import BlockLocation  # noqa: E402
from kv_store.layout import KVLayout  # noqa: E402
from kv_store.transport import ShmTransport  # noqa: E402
from pdserve.limits import MAX_CHUNK_BYTES, grpc_options  # noqa: E402
from pdserve.security import SecurityConfig, TLSMode, install  # noqa: E402

MiB = 1 << 20
LAYOUTS = {
    # Llama-3-8B-like: 2 MiB blocks -> two full 1 MiB chunks per block
    "llama8b": KVLayout(
        "bench-llama8b", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16
    ),
    # SmolLM2-135M: 360 KiB blocks -> one chunk per block
    "smollm2": KVLayout(
        "bench-smollm2", num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16", block_size=16
    ),
}
RAW_SERVICE = "/bench.RawBytes/Stream"
LEASE_TTL_S = 60.0  # the handoff lease of one size's blocks (the node's max, the default 60 s)

# ------------------------------------------------------------------ raw baselines (server side)


def _serve_raw(max_bytes: int) -> None:
    """Child process: raw bytes gRPC stream + raw TCP sender over one shared payload."""
    payload = os.urandom(max_bytes)

    def stream(request: bytes, context: grpc.ServicerContext):
        total, chunk = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:16], "little")
        for off in range(0, total, chunk):
            yield payload[off : min(off + chunk, total)]  # a bytes slice: one copy, like the store's

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_options())
    handler = grpc.unary_stream_rpc_method_handler(stream)  # identity (de)serializers: raw bytes
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.RawBytes", {"Stream": handler}),)
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    view = memoryview(payload)

    def tcp_loop() -> None:
        while True:
            conn, _ = lsock.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while True:
                    hdr = conn.recv(8, socket.MSG_WAITALL)
                    if len(hdr) < 8:
                        break
                    conn.sendall(view[: int.from_bytes(hdr, "little")])

    threading.Thread(target=tcp_loop, daemon=True).start()
    print(json.dumps({"grpc_port": grpc_port, "tcp_port": lsock.getsockname()[1]}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


# ------------------------------------------------------------------ helpers


def _spawn(args: list[str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        proc.kill()
        raise RuntimeError(f"child {args} died before reporting its ports")
    return proc, json.loads(line)


def _interleaved_median_s(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median seconds per function; repetitions are interleaved (a, b, c, a, b, c, ...) so that
    load from other processes on a shared machine hits every path alike."""
    for fn in fns.values():
        fn()  # warm-up (connections, mappings, page faults of the destination)
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def _gbps(nbytes: int, s: float) -> float:
    return nbytes / s / 1e9


# ------------------------------------------------------------------ the benchmark


def run(sizes_mib: list[int], layout: KVLayout, reps: int) -> list[dict]:
    nb = layout.block_nbytes
    max_blocks = max(-(-s * MiB // nb) for s in sizes_mib)
    store_args = ["-m", "kv_store", "--node-id", "bench-node", "--capacity-blocks", str(max_blocks)]
    store_args += ["--model-id", layout.model_id, "--num-layers", str(layout.num_layers)]
    store_args += ["--num-kv-heads", str(layout.num_kv_heads), "--head-dim", str(layout.head_dim)]
    store_args += ["--dtype", layout.dtype, "--block-size", str(layout.block_size), "--max-workers", "4"]
    # this one client (one lease owner) holds a size's handoff lease on all its blocks while the
    # shm+lease path leases them again: lift the per-owner quota (default: half the capacity)
    store_args += ["--max-leased-blocks-per-owner", str(4 * max_blocks)]
    # plaintext on 127.0.0.1, asked for explicitly (pdserve never picks it by itself): the store
    # node and this process's own store channels
    store_args += ["--tls", "off"]
    install(SecurityConfig(tls=TLSMode.OFF))
    store, info = _spawn(store_args)
    raw, ports = _spawn([str(Path(__file__).resolve()), "--serve-raw", str(max_blocks * nb)])
    rows = []
    try:
        client = KVStoreClient(info["address"], timeout_s=120)
        loc = BlockLocation(info["node_id"], info["address"], info["shm_name"], info["host_id"])
        hashes = chain_hashes(list(range(max_blocks * layout.block_size)), layout.block_size, layout.model_id)
        block = os.urandom(nb)
        for i in range(0, max_blocks, 64):  # fill the node (not timed)
            n = min(64, max_blocks - i)
            client.put_blocks(layout, hashes[i : i + n], [block] * n)
        shm = ShmTransport()
        raw_ch = grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}", options=grpc_options())
        raw_stream = raw_ch.unary_stream(RAW_SERVICE)
        tcp = socket.create_connection(("127.0.0.1", ports["tcp_port"]))
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for size in sizes_mib:
                rows.append(_bench_size(size, layout, reps, client, shm, loc, hashes, block, raw_stream, tcp))
        finally:
            tcp.close()
            raw_ch.close()
            shm.close()
            client.close()
    finally:
        for p in (store, raw):
            if p.poll() is None:
                p.stdin.close()  # type: ignore[union-attr]
                p.terminate()
            p.wait(timeout=10)
    return rows


def _bench_size(
    size: int,
    layout: KVLayout,
    reps: int,
    client: KVStoreClient,
    shm: ShmTransport,
    loc: BlockLocation,
    hashes: list[bytes],
    block: bytes,
    raw_stream: grpc.UnaryStreamMultiCallable,
    tcp: socket.socket,
) -> dict:
    nb = layout.block_nbytes
    reps *= max(1, min(4, 64 // size))  # small sizes are cheap: more repetitions, less noise
    n_blocks = -(-size * MiB // nb)
    total = n_blocks * nb
    hs = hashes[:n_blocks]
    src = np.frombuffer(os.urandom(total), dtype=np.uint8).copy()
    dst = np.zeros(total, dtype=np.uint8)
    dst_mv = memoryview(dst)
    src_mv = memoryview(src)
    dst_blocks = [dst_mv[i * nb : (i + 1) * nb] for i in range(n_blocks)]
    # our Get stream sends each block as ceil(nb / 1 MiB) chunks; the raw stream uses the same size
    chunk = min(MAX_CHUNK_BYTES, nb)
    req = total.to_bytes(8, "little") + chunk.to_bytes(8, "little")

    def memcpy() -> None:
        np.copyto(dst, src)

    def memcpy_blocks() -> None:
        for i in range(n_blocks):
            dst_blocks[i][:] = src_mv[i * nb : (i + 1) * nb]

    # the handoff: put under a lease once (as the prefill worker does; not timed); the lease's
    # slots then serve every timed read with no rpc. ttl well beyond this size's repetitions.
    put = client.put_blocks(layout, hs, [block] * n_blocks, lease_ttl_s=LEASE_TTL_S)
    if len(put.slots) != n_blocks or put.shm_name != loc.shm_name:
        raise RuntimeError(f"leased put returned no arena slots ({len(put.slots)} of {n_blocks})")
    slots, slot_nbytes, expires = put.slots, put.slot_nbytes, put.lease_expires_at_unix_s
    sums = [block_checksum(block)] * n_blocks  # the writer's checksums, as a KVHandle carries them

    def shm_path() -> None:
        with shm.read_leased(loc, layout, slots, expires, slot_nbytes, sums) as got:
            got.copy_into(dst)

    def shm_lease_path() -> None:
        with shm.fetch(loc, layout, hs) as got:
            got.copy_into(dst)

    def grpc_path() -> None:
        client.get_blocks_into(layout, hs, dst_blocks)

    def raw_grpc() -> None:
        off = 0
        for data in raw_stream(req, timeout=120):
            dst_mv[off : off + len(data)] = data
            off += len(data)
        assert off == total

    def raw_tcp() -> None:
        tcp.sendall(total.to_bytes(8, "little"))
        off = 0
        while off < total:
            off += tcp.recv_into(dst_mv[off:], total - off)

    r: dict = {"size_mib": size, "bytes": total, "blocks": n_blocks}
    paths = {
        "memcpy": memcpy,
        "memcpy_blk": memcpy_blocks,
        "shm": shm_path,
        "shm_lease": shm_lease_path,
        "grpc": grpc_path,
        "raw_grpc": raw_grpc,
        "raw_tcp": raw_tcp,
    }
    for name, sec in _interleaved_median_s(paths, reps).items():
        r[name] = _gbps(total, sec)
    # what was timed really moved the blocks
    for path in (shm_path, shm_lease_path):
        dst[:] = 0
        path()
        assert bytes(dst[:nb]) == block and bytes(dst[(n_blocks - 1) * nb :]) == block
    dst[:] = 0
    grpc_path()
    assert bytes(dst_blocks[-1]) == block and bytes(dst_blocks[0]) == block
    client.release(put.lease_id)
    return r


def report(rows: list[dict], layout: KVLayout) -> bool:
    print(
        f"\nKV transfer, layout {layout.model_id}: block {layout.block_nbytes / MiB:.2f} MiB, chunk <= 1 MiB"
    )
    hdr = (
        f"{'KV MiB':>7} {'blocks':>6} | {'memcpy':>7} {'memcpy/blk':>10} {'shm':>7} {'shm/memcpy':>10} "
        f"{'shm+lease':>9} | "
        f"{'raw TCP':>7} {'raw gRPC':>8} {'gRPC':>7} {'gRPC/raw':>8} {'gRPC/TCP':>8} |  (GB/s)"
    )
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for r in rows:
        s_ratio = r["shm"] / r["memcpy"]
        g_ratio = r["grpc"] / r["raw_grpc"]
        t_ratio = r["grpc"] / r["raw_tcp"]
        flags = []
        flags.append("shm PASS" if s_ratio >= 0.70 else "shm FAIL")
        flags.append("gRPC PASS" if g_ratio >= 0.80 else "gRPC FAIL")
        ok &= s_ratio >= 0.70 and g_ratio >= 0.80
        print(
            f"{r['size_mib']:>7} {r['blocks']:>6} | {r['memcpy']:>7.2f} {r['memcpy_blk']:>10.2f} "
            f"{r['shm']:>7.2f} {s_ratio:>9.2f}x {r['shm_lease']:>9.2f} | "
            f"{r['raw_tcp']:>7.2f} {r['raw_grpc']:>8.2f} {r['grpc']:>7.2f} {g_ratio:>7.2f}x {t_ratio:>7.2f}x | "
            + ", ".join(flags)
        )
    print("targets: shm >= 0.70x memcpy, gRPC >= 0.80x raw gRPC stream")
    print("memcpy = one numpy copy of all bytes; memcpy/blk = the same bytes copied block by block (context)")
    print(
        "shm = decode-side handoff read: blocks put under a lease once (untimed, as by the prefill worker), "
        "then read_leased (no rpc) + copy"
    )
    print(
        "shm+lease = ShmTransport.fetch: Lease rpc per read + copy (lookup-based prefix reads; context, no target)"
    )
    print("OVERALL:", "PASS" if ok else "FAIL")
    return ok


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description="KV block transfer throughput vs raw baselines")
    ap.add_argument("--quick", action="store_true", help="4 and 16 MiB, fewer repetitions")
    ap.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="llama8b", help="KV block layout (model shape)"
    )
    ap.add_argument("--sizes", type=int, nargs="*", help="KV sizes in MiB (default 16 64 256)")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per cell (median)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--serve-raw", type=int, metavar="BYTES", help=argparse.SUPPRESS)
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.serve_raw:
        _serve_raw(a.serve_raw)
        return 0
    sizes = a.sizes or ([4, 16] if a.quick else [16, 64, 256])
    reps = a.reps or (3 if a.quick else 7)
    layout = LAYOUTS[a.layout]
    rows = run(sizes, layout, reps)
    ok = report(rows, layout)
    if a.json:
        a.json.write_text(json.dumps({"layout": a.layout, "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
