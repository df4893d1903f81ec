"""torch.distributed block transfer benchmark: DistBlockSender/Receiver vs raw send/recv.

Two processes (rank 0 sends, rank 1 receives) in one gloo group on 127.0.0.1 (``--backend nccl``
for two GPUs: same code path). For 16 / 64 / 256 MiB of KV (``--quick``: 4 / 16 MiB) it times,
interleaved in the same run:

* transport  ``DistBlockSender.send`` of a ``[n_blocks, L, 2, bs, kvh, hd]`` tensor (header +
             payload, then the receiver's delivery reply) -> ``DistBlockReceiver.recv_into`` a
             preallocated tensor
* raw        ``dist.send`` / ``dist.recv`` of a uint8 tensor of the same number of bytes, then a
             1-element ack from the receiver

Both are timed by the sender until it knows the bytes were delivered (the transport's own reply
plays the ack's part). Cell = median over reps; GB/s = 1e9 B/s.
The ratio is transport / raw throughput (1.0 = no overhead). The first transport rep of each
size is checked bit-exact on the receiver.

Usage: python bench/gloo_transport.py [--quick] [--reps N] [--backend gloo|nccl]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kv_store.dist_transport import (  # noqa: E402
    DistBlockReceiver,
    DistBlockSender,
    DistConfig,
    destroy_process_group,
    init_process_group,
)

MiB = 1 << 20
BLOCK = (32, 2, 16, 8, 128)  # Llama-3-8B-like bf16 block: 2 MiB
DTYPE = torch.bfloat16


def block_nbytes() -> int:
    n = 2  # bf16
    for d in BLOCK:
        n *= d
    return n


def worker(rank: int, port: int, backend: str, sizes: list[int], reps: int, q: mp.Queue) -> None:
    device = init_process_group(DistConfig(rank, 2, f"tcp://127.0.0.1:{port}", backend=backend))
    ack = torch.zeros(1, dtype=torch.int64, device=device)
    results: dict[int, dict[str, list[float]]] = {}
    exact: dict[int, bool] = {}
    try:
        for size in sizes:
            n_blocks = size // block_nbytes()
            g = torch.Generator().manual_seed(size)
            blocks = torch.randn((n_blocks, *BLOCK), generator=g).to(DTYPE).to(device)
            raw = torch.empty(size, dtype=torch.uint8, device=device)
            if rank == 1:
                out = torch.empty_like(blocks)
                rx = DistBlockReceiver(device)
            else:
                raw.copy_(blocks.reshape(-1).view(torch.uint8))
                tx = DistBlockSender(device)
            times: dict[str, list[float]] = {"transport": [], "raw": []}
            for rep in range(reps + 1):  # rep 0 is a warm-up
                for path in ("transport", "raw") if rep % 2 == 0 else ("raw", "transport"):
                    if rank == 0:
                        t0 = time.perf_counter()
                        if path == "transport":
                            tx.send(1, f"bench-{size}-{rep}", blocks)  # returns on delivery
                        else:
                            dist.send(raw, 1)
                            dist.recv(ack, 1)
                        if rep:
                            times[path].append(time.perf_counter() - t0)
                    else:
                        if path == "transport":
                            rx.recv_into(0, out)
                            if rep == 0:
                                exact[size] = torch.equal(out, blocks)
                        else:
                            dist.recv(raw, 0)
                            dist.send(ack, 0)
            results[size] = times
        q.put((rank, results, exact))
    finally:
        destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 and 16 MiB only")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per size (median)")
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="torch.distributed backend")
    return cli_help.apply(ap)


def main() -> int:
    ap = build_parser()
    a = ap.parse_args()
    sizes = [4 * MiB, 16 * MiB] if a.quick else [16 * MiB, 64 * MiB, 256 * MiB]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, a.backend, sizes, a.reps, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict((rank, (res, exact)) for rank, res, exact in (q.get(timeout=600) for _ in procs))
    for p in procs:
        p.join()
    times, exact = got[0][0], got[1][1]
    print(f"torch.distributed {a.backend} on 127.0.0.1, {a.reps} reps, median; block {BLOCK} {DTYPE}")
    print(f"{'size':>8} {'transport GB/s':>15} {'raw GB/s':>10} {'ratio':>7} exact")
    rows = []
    for size in sizes:
        t = statistics.median(times[size]["transport"])
        r = statistics.median(times[size]["raw"])
        row = {
            "size_mib": size // MiB,
            "transport_gbps": size / t / 1e9,
            "raw_gbps": size / r / 1e9,
            "ratio": r / t,
            "exact": exact[size],
        }
        rows.append(row)
        print(
            f"{row['size_mib']:>5}MiB {row['transport_gbps']:>15.2f} {row['raw_gbps']:>10.2f} "
            f"{row['ratio']:>6.2f}x {row['exact']}"
        )
    print(json.dumps({"bench": "gloo_transport", "backend": a.backend, "rows": rows}))
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
