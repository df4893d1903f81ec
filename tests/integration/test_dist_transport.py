"""torch.distributed block transfer: two real processes (gloo on CPU; NCCL on GPU, marked).

Also prefill -> decode directly over gloo: a prefill engine in one process exports each
request's KV and sends it; a decode engine in the other receives it into a preallocated tensor,
adopts it and decodes; the output equals the engine run whole.
"""

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


# ---------------------------------------------------------------------- engine to engine

GREEDY_TOKENS = 12


def engine_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 320, (k,), generator=g).tolist() for k in (5, 16, 17, 40, 70)]


def engine_rank_main(rank: int, port: int, model_path: str, q: Any) -> None:
    """Rank 0 prefills each prompt and sends its KV blocks (and, as the router would carry it
    in the KVHandle, the first token); rank 1 receives, adopts the KV and decodes."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    try:
        torch.set_num_threads(1)
        device = init_process_group(DistConfig(rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=60))
        params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
        eng = LLMEngine.from_pretrained(model_path, EngineConfig(num_kv_blocks=64, block_size=16))
        first = torch.zeros(1, dtype=torch.int64)
        out: dict[str, Any] = {}
        if rank == 0:
            tx = DistBlockSender(device)
            for i, p in enumerate(engine_prompts()):
                eng.add_request(f"r{i}", p, params, prefill_only=True)
                while eng.has_unfinished():
                    eng.step()
                kv = eng.export_kv(f"r{i}")
                first[0] = kv.first_token
                torch.distributed.send(first, 1)
                tx.send(1, f"r{i}", kv.blocks.contiguous())
                eng.release(f"r{i}")  # the receiver holds the blocks once send returns
            out["free_after"] = eng.kv.num_free_blocks == eng.kv.num_blocks
        else:
            rx = DistBlockReceiver(device)
            shp = eng.kv_shape
            buf = torch.empty(
                (8, shp.num_layers, 2, shp.block_size, shp.num_kv_heads, shp.head_dim), dtype=shp.dtype
            )
            for i, p in enumerate(engine_prompts()):
                torch.distributed.recv(first, 0)
                h = rx.recv_into(0, buf)
                assert h.request_id == f"r{i}"
                eng.import_kv(h.request_id, p, int(first[0]), buf[: h.n_blocks], params, shape=shp)
            while eng.has_unfinished():
                for o in eng.step():
                    if o.finished:
                        out[o.request_id] = list(o.token_ids)
        q.put((rank, "ok", out))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
    finally:
        destroy_process_group()


def test_gloo_prefill_to_decode_engines_equal_whole_engine(tiny_models) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    path = str(tiny_models["llama"])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=engine_rank_main, args=(r, port, path, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results: dict[int, dict[str, Any]] = {}
        for _ in procs:
            rank, status, payload = q.get(timeout=120)
            assert status == "ok", f"rank {rank} failed:\n{payload}"
            results[rank] = payload
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    whole = LLMEngine.from_pretrained(path, EngineConfig(num_kv_blocks=64, block_size=16))
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in whole.generate(engine_prompts(), params)]
    assert results[0]["free_after"] is True
    assert [results[1][f"r{i}"] for i in range(len(ref))] == ref
