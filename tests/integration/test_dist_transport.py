"""torch.distributed block transfer: two real processes (gloo on CPU; NCCL on GPU, marked)."""

from __future__ import annotations

import multiprocessing as mp
import socket
import traceback
from typing import Any

import pytest
import torch

from kv_store.dist_transport import (
    HEADER_BYTES,
    DistBlockReceiver,
    DistBlockSender,
    DistConfig,
    TransferHeader,
    destroy_process_group,
    init_process_group,
)
from pdserve.errors import InvalidRequestError, LayoutMismatchError, ResourceExhaustedError

BLOCK = (2, 2, 4, 2, 8)  # L, 2, block_size, kv_heads, head_dim
BIG = (30, 2, 16, 3, 64)  # SmolLM2-135M float32 block: 720 KiB
# (request id, n_blocks, dtype, block shape): the sender's side of each transfer
CASES: list[tuple[str, int, torch.dtype, tuple[int, ...]]] = [
    ("req-f32", 3, torch.float32, BLOCK),
    ("req-bf16", 2, torch.bfloat16, BLOCK),
    ("req-empty", 0, torch.float32, BLOCK),
    ("req-big", 24, torch.float32, BIG),  # ~17 MiB
]


def blocks_for(i: int, n: int, dtype: torch.dtype, shape: tuple[int, ...], device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn((n, *shape), generator=g).to(dtype).to(device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, backend: str, q: Any) -> None:
    """Rank 0 sends CASES then two transfers the receiver must reject, then one more good one;
    rank 1 receives into preallocated buffers and reports what it checked."""
    try:
        device = init_process_group(
            DistConfig(rank, 2, f"tcp://127.0.0.1:{port}", backend=backend, timeout_s=20)
        )
        dev = str(device)
        report: dict[str, Any] = {}
        if rank == 0:
            tx = DistBlockSender(device)
            for i, (rid, n, dt, shape) in enumerate(CASES):
                tx.send(1, rid, blocks_for(i, n, dt, shape, dev))
            for rid, dt, n in (("bad-dtype", torch.float16, 2), ("too-many", torch.float32, 9)):
                try:
                    tx.send(1, rid, blocks_for(0, n, dt, BLOCK, dev))
                    report[rid] = "sent"
                except (LayoutMismatchError, ResourceExhaustedError) as e:
                    report[rid] = type(e).__name__
            tx.send(1, "after", blocks_for(7, 1, torch.float32, BLOCK, dev))
        else:
            rx = DistBlockReceiver(device)
            for i, (rid, n, dt, shape) in enumerate(CASES):
                cap = n + 2
                out = torch.full((cap, *shape), 7.0, dtype=dt, device=dev)
                h = rx.recv_into(0, out)
                want = blocks_for(i, n, dt, shape, dev)
                report[rid] = (
                    h.request_id == rid
                    and h.n_blocks == n
                    and torch.equal(out[:n], want)
                    and bool((out[n:] == 7.0).all())  # nothing written past n_blocks
                )
            for rid in ("bad-dtype", "too-many"):
                try:
                    rx.recv_into(0, torch.zeros((8, *BLOCK), dtype=torch.float32, device=dev))
                    report["rx-" + rid] = "received"
                except (LayoutMismatchError, ResourceExhaustedError) as e:
                    report["rx-" + rid] = type(e).__name__
            out = torch.zeros((1, *BLOCK), dtype=torch.float32, device=dev)
            report["after"] = rx.recv_into(0, out).request_id == "after" and torch.equal(
                out, blocks_for(7, 1, torch.float32, BLOCK, dev)
            )
        q.put((rank, "ok", report))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
    finally:
        destroy_process_group()


def run_pair(backend: str, timeout_s: float = 60) -> dict[int, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, backend, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, status, payload = q.get(timeout=timeout_s)
            assert status == "ok", f"rank {rank} failed:\n{payload}"
            results[rank] = payload
        return results
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def check(results: dict[int, dict[str, Any]]) -> None:
    rx = results[1]
    for rid, *_ in CASES:
        assert rx[rid] is True, rid
    # rejections raise on both sides, and the channel stays usable afterwards
    assert results[0]["bad-dtype"] == rx["rx-bad-dtype"] == "LayoutMismatchError"
    assert results[0]["too-many"] == rx["rx-too-many"] == "ResourceExhaustedError"
    assert rx["after"] is True


def test_gloo_pair_exchanges_blocks_exactly() -> None:
    check(run_pair("gloo"))


@pytest.mark.gpu
def test_nccl_pair_exchanges_blocks_exactly() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL point-to-point needs 2 CUDA devices (one per rank)")
    check(run_pair("nccl"))


def test_header_round_trip_and_validation() -> None:
    h = TransferHeader("r" * 10, torch.bfloat16, (5, *BLOCK))
    raw = h.encode()
    assert len(raw) == HEADER_BYTES
    assert TransferHeader.decode(raw) == h
    assert h.nbytes == 5 * 2 * 2 * 4 * 2 * 8 * 2
    with pytest.raises(InvalidRequestError, match="at most"):
        TransferHeader("x" * 500, torch.float32, (1, *BLOCK)).encode()
    with pytest.raises(InvalidRequestError, match="6-D"):
        TransferHeader("x", torch.float32, (1, 2)).encode()
    with pytest.raises(InvalidRequestError, match="malformed"):
        TransferHeader.decode(b"\0" * HEADER_BYTES)
