"""``Worker.MigrateIn`` on the decode worker's grpc.aio server (#12: no sync streaming handler on
an aio server, whose thread blocks for good when the server stops mid-stream): chunks driven by
hand against one in-process worker. A stream cancelled, ended early or refused mid-migration frees
every block it allocated; chunks out of order are INVALID_ARGUMENT; stopping the server while a
stream is open returns at once."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch

from decode_worker.migration_wire import header_to_proto, stage_chunks
from engine.migration import KVStage, MigrationHeader
from engine.sampling_params import SamplingParams
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from tests.workers import InProcDecodeWorker

CALL_S = 30.0
PROMPT = tuple(range(5, 45))  # 40 tokens: 2 full blocks of 16, a partial third


@pytest.fixture(scope="module")
def worker(tiny_models):
    w = InProcDecodeWorker(tiny_models["llama"], "mig-in", blocks=32)
    yield w
    w.stop()


def _begin(w: InProcDecodeWorker, rid: str) -> worker_pb2.MigrationChunk:
    e = w.state.engine
    h = MigrationHeader(rid, e.model_id, e.kv_shape, PROMPT, SamplingParams(max_tokens=8), seed=0)
    return worker_pb2.MigrationChunk(begin=header_to_proto(h, "test-source"))


def _stage(w: InProcDecodeWorker, first: int, n: int, end: bool) -> list[worker_pb2.MigrationChunk]:
    s = w.state.engine.kv_shape
    blocks = torch.randn(n, s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim).to(s.dtype)
    return [worker_pb2.MigrationChunk(blocks=b) for b in stage_chunks(KVStage(first, blocks), end)]


def _wait_free(w: InProcDecodeWorker, want: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while w.free_blocks() != want:
        assert time.monotonic() < deadline, f"{w.free_blocks()} blocks free, want {want}"
        time.sleep(0.02)


async def _open(w: InProcDecodeWorker):
    ch = grpc.aio.insecure_channel(w.address)
    return ch, worker_pb2_grpc.WorkerStub(ch).MigrateIn(timeout=CALL_S)


def test_a_stage_is_acked_and_a_cancelled_stream_frees_its_blocks(worker):
    total = worker.free_blocks()

    async def run() -> int:
        ch, call = await _open(worker)
        async with ch:
            await call.write(_begin(worker, "cancelled"))
            for c in _stage(worker, 0, 2, end=True):
                await call.write(c)
            ack = await call.read()
            assert worker.free_blocks() == total - 2  # held while the stream is open
            call.cancel()
            return ack.blocks_held

    assert asyncio.run(run()) == 2
    _wait_free(worker, total)
    assert not worker.svc.migration.pending()


def test_a_source_that_closes_before_final_frees_the_blocks(worker):
    total = worker.free_blocks()

    async def run() -> list[worker_pb2.MigrationAck]:
        ch, call = await _open(worker)
        async with ch:
            await call.write(_begin(worker, "closed"))
            for c in _stage(worker, 0, 1, end=False):
                await call.write(c)
            await call.done_writing()
            acks = [a async for a in call]
            assert await call.code() == grpc.StatusCode.OK
            return acks

    assert asyncio.run(run()) == []  # no stage ended: nothing acked
    assert worker.free_blocks() == total  # freed before the call ended


@pytest.mark.parametrize(
    "chunks, words",
    [
        (lambda w: _stage(w, 0, 1, end=True), "before begin"),
        (lambda w: [_begin(w, "twice"), _begin(w, "twice")], "a second begin"),
        (lambda w: [_begin(w, "gap"), *_stage(w, 1, 1, end=True)], "starts at block 1"),
        (lambda w: [_begin(w, "empty"), worker_pb2.MigrationChunk()], "empty chunk"),
    ],
    ids=["blocks-first", "second-begin", "gap", "empty"],
)
def test_chunks_out_of_order_are_refused_and_free_what_was_taken(worker, chunks, words):
    total = worker.free_blocks()

    async def run() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(worker.address) as ch:
            call = worker_pb2_grpc.WorkerStub(ch).MigrateIn(iter(chunks(worker)), timeout=CALL_S)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in call:
                    pass
            return ei.value

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert words in err.details()
    assert worker.free_blocks() == total


def test_server_stop_with_a_stream_open_returns(tiny_models):
    """The hazard a sync bidirectional handler had on grpc.aio: stopping the server while a
    MigrateIn waits for its next chunk must not leave a thread blocked (the process's exit)."""
    w = InProcDecodeWorker(tiny_models["llama"], "mig-in-stop", blocks=16)
    total = w.free_blocks()
    opened = threading.Event()
    stop = threading.Event()

    async def client() -> None:
        ch, call = await _open(w)
        async with ch:
            await call.write(_begin(w, "held"))
            for c in _stage(w, 0, 1, end=True):
                await call.write(c)
            await call.read()
            opened.set()
            while not stop.is_set():  # the stream stays open, waiting for the next chunk
                await asyncio.sleep(0.02)
            call.cancel()

    t = threading.Thread(target=lambda: asyncio.run(client()), daemon=True)
    t.start()
    assert opened.wait(CALL_S)
    try:
        t0 = time.monotonic()
        w.server.stop(0).wait(timeout=10.0)
        assert time.monotonic() - t0 < 10.0
        _wait_free(w, total)  # the stream's blocks were freed as the server cancelled it
        busy = [x.name for x in threading.enumerate() if x.name.startswith("mig-in-stop")]
        assert not busy, busy
    finally:
        stop.set()
        t.join(10.0)
        w.svc.close()
        w.state.close()
