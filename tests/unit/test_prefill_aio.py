"""The prefill worker on ``grpc.aio`` (#12 §1, prefill_worker/aio_service.py): its Prefill calls
are tasks, not threads (more than the old 32-thread pool reach the engine at once), publish with
one ``grpc.aio`` PutBlocks, answer as the sync servicer does, and leave nothing behind when the
caller goes away (before the export: aborted; during the publish: the lease released)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.aio_client import AsyncKVStoreClient
from kv_store.arena import host_id
from kv_store.auth import tenant_owner
from kv_store.checksum import block_checksum
from kv_store.client import KVStoreClient
from kv_store.layout import KVLayout
from kv_store.service import serve
from kv_store.store import StoreConfig
from kv_store.transport import AutoTransport
from pdserve.errors import ResourceExhaustedError
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker_base import Role, WorkerConfig, WorkerState, engine_layout
from pdserve.worker_main import serve_worker, worker_services
from prefill_worker.aio_service import BLOCKING_THREADS, AsyncPrefillServicer
from prefill_worker.kv_stream import StreamStatus
from prefill_worker.prefix_policy import FetchMode, PrefixFetchConfig, PrefixFetchPolicy
from prefill_worker.publisher import StorePublisher
from prefill_worker.service import PrefillServicer
from tests.lora_adapters import make_tiny_llama

BLOCKS = 256


@dataclass
class Worker:
    svc: AsyncPrefillServicer
    stub: worker_pb2_grpc.WorkerStub
    store: KVStoreClient
    state: WorkerState
    channel: grpc.Channel


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[Worker]:
    base = make_tiny_llama(tmp_path_factory.mktemp("prefill_aio"))
    ecfg = EngineConfig(num_kv_blocks=BLOCKS)
    eng = LLMEngine.from_pretrained(base, ecfg)
    srv = serve(StoreConfig(node_id="kv0", layout=engine_layout(eng), capacity_blocks=4 * BLOCKS))
    store = KVStoreClient(srv.address, timeout_s=20)
    transport = AutoTransport(host_id())
    st = WorkerState(WorkerConfig("p0", Role.PREFILL, str(base), srv.address, engine=ecfg), eng)
    svc = AsyncPrefillServicer(st, StorePublisher(store), store, transport)
    services, _ = worker_services(svc, Role.PREFILL, None)
    server, port = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, "p0")
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield Worker(svc, worker_pb2_grpc.WorkerStub(ch), store, st, ch)
    ch.close()
    server.stop(0).wait()
    svc.close()
    st.close()
    transport.close()
    store.close()
    srv.stop(0)


def request(rid: str, ids: list[int], tenant: str = "") -> worker_pb2.PrefillRequest:
    sp = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4))
    return worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=ids, sampling=sp, lease_ttl_s=20.0, tenant=tenant
    )


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def hold_engine(w: Worker) -> threading.Event:
    """Block the engine thread until the returned event is set (the calls' adds queue up)."""
    gate = threading.Event()
    started = threading.Event()

    def hold(_e: LLMEngine) -> None:
        started.set()
        gate.wait(30)

    w.state.loop.submit(hold)
    assert started.wait(10)
    return gate


def leases(w: Worker) -> int:
    return w.store.stats().node.num_leases


def idle(w: Worker) -> bool:
    e = w.state.engine
    return not e.has_unfinished() and not w.state.loop._queues


def test_more_prefills_than_the_old_thread_pool_reach_the_engine_at_once(worker) -> None:
    n = BLOCKING_THREADS + 16
    gate = hold_engine(worker)
    try:
        calls = [
            worker.stub.Prefill.future(request(f"many-{i}", [3 + i % 50, 5, 7, 11, 13, 17]), timeout=60)
            for i in range(n)
        ]
        # every call's add is queued for the engine while it is held: none waits for a thread
        wait_for(lambda: len(worker.state.loop._queues) == n, f"{n} prefills queued for the engine")
    finally:
        gate.set()
    resps = [c.result() for c in calls]
    assert [r.request_id for r in resps] == [f"many-{i}" for i in range(n)]
    for r in resps:
        assert r.kv.lease_id and len(r.kv.block_hashes) == 1 and r.kv.block_checksums
        assert worker.store.release(r.kv.lease_id)
    assert worker.svc.publishes_on_loop >= n  # each published with one grpc.aio PutBlocks
    wait_for(lambda: idle(worker), "the engine idle")
    assert leases(worker) == 0


def test_answers_as_the_sync_servicer_does(worker) -> None:
    ids = list(range(3, 40))  # two full blocks and a partial one
    sync = PrefillServicer(worker.state, StorePublisher(worker.store), worker.store, None)

    class Ctx:
        def add_callback(self, fn) -> bool:
            return True

        def is_active(self) -> bool:
            return True

    a = worker.stub.Prefill(request("same-aio", ids), timeout=60)
    b = sync.Prefill(request("same-sync", ids), Ctx())
    assert a.first_token == b.first_token
    assert list(a.kv.block_hashes) == list(b.kv.block_hashes)
    assert list(a.kv.block_checksums) == list(b.kv.block_checksums)
    assert a.kv.shm_slots and len(a.kv.shm_slots) == len(b.kv.shm_slots) == 3
    assert a.num_computed_tokens + a.num_cached_tokens == len(ids)
    for r in (a, b):
        assert worker.store.release(r.kv.lease_id)


def test_a_request_the_engine_refuses_fails_with_its_status(worker) -> None:
    vocab = worker.state.engine.model_config.vocab_size
    with pytest.raises(grpc.RpcError) as ei:
        worker.stub.Prefill(request("bad-token", [3, vocab + 5]), timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of range" in ei.value.details()
    assert "bad-token" not in worker.state.loop._queues
    ok = worker.stub.Prefill(request("after-bad", [3, 4, 5]), timeout=30)  # serving goes on
    assert worker.store.release(ok.kv.lease_id)


def test_decode_sent_to_a_prefill_worker_is_refused_naming_it(worker) -> None:
    """Its refusing Decode is an async generator on the aio server (no sync streaming method)."""
    with pytest.raises(grpc.RpcError) as ei:
        list(worker.stub.Decode(worker_pb2.DecodeRequest(request_id="d"), timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this is a prefill worker: send Decode to a decode worker" in ei.value.details()


def test_a_caller_gone_before_the_export_aborts_the_prefill(worker) -> None:
    free = worker.state.engine.scheduler.kv.num_free_blocks
    gate = hold_engine(worker)
    try:
        call = worker.stub.Prefill.future(request("gone-early", [9, 8, 7, 6, 5]), timeout=60)
        wait_for(lambda: "gone-early" in worker.state.loop._queues, "the prefill queued")
        call.cancel()
        time.sleep(0.2)  # the server sees the cancellation while the engine is held
    finally:
        gate.set()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    wait_for(lambda: idle(worker), "the prefill aborted")  # its queue unregistered too
    assert worker.state.engine.scheduler.kv.num_free_blocks == free
    assert leases(worker) == 0


def test_a_caller_gone_during_the_publish_leaves_no_lease(worker, monkeypatch) -> None:
    put = AsyncKVStoreClient.put_blocks
    entered, done = threading.Event(), threading.Event()

    async def slow_put(self, *a, **k):
        entered.set()
        await asyncio.sleep(0.5)  # the caller goes away meanwhile
        res = await put(self, *a, **k)
        assert res is not None and res.lease_id
        done.set()
        return res

    monkeypatch.setattr(AsyncKVStoreClient, "put_blocks", slow_put)
    call = worker.stub.Prefill.future(request("gone-publishing", [4, 8, 15, 16, 23]), timeout=60)
    assert entered.wait(20)
    call.cancel()
    assert done.wait(20)  # the put went on and took its lease ...
    wait_for(lambda: leases(worker) == 0, "the orphaned lease released")  # ... released at once


def test_the_aio_put_charges_the_lease_to_its_owner(tmp_path) -> None:
    layout = KVLayout("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", block_size=2)
    srv = serve(StoreConfig(node_id="kvq", layout=layout, capacity_blocks=16, max_leased_blocks_per_tenant=1))
    sync = KVStoreClient(srv.address)
    blocks = [torch.full((layout.block_nbytes // 4,), float(i)).numpy().tobytes() for i in range(2)]
    hashes = [bytes([i]) * 16 for i in range(2)]

    async def run() -> None:
        c = AsyncKVStoreClient(srv.address, sync.call_metadata, 10.0)
        try:
            with pytest.raises(ResourceExhaustedError, match="t1"):  # the tenant's quota: 1 block
                await c.put_blocks(layout, hashes, blocks, lease_ttl_s=5.0, owner=tenant_owner("t1"))
            res = await c.put_blocks(layout, hashes, blocks, lease_ttl_s=5.0)  # this client's owner
            assert res is not None and res.lease_id and not res.conflicts
            assert await c.release(res.lease_id)
        finally:
            await c.close()

    try:
        asyncio.run(run())
        # stored as the sync client would have: the same bytes under the same checksums
        assert sync.get_blocks(layout, hashes, [block_checksum(b) for b in blocks]) == blocks
    finally:
        sync.close()
        srv.stop(0)


def test_a_kv_stream_reader_gone_mid_stream_cancels_the_stream(worker) -> None:
    """StreamKV on the event loop (prefill_worker/kv_stream_service.py): a reader that goes away
    while it waits for the next chunk cancels the stream (the producer's next add fails); the
    waiting thread is woken (the stream is forgotten once its wait returned)."""
    reg = worker.svc.streams
    s = reg.open("kvs-gone", worker.state.layout, 40, drop=lambda _c: None)
    stub = worker_pb2_grpc.KVStreamStub(worker.channel)
    call = stub.StreamKV(worker_pb2.ResumeStreamRequest(request_id="kvs-gone"), timeout=60)
    first = next(call)
    assert first.HasField("begin") and first.begin.request_id == "kvs-gone"
    call.cancel()
    wait_for(lambda: s.status is StreamStatus.CANCELLED, "the stream cancelled")
    wait_for(lambda: reg.get("kvs-gone") is None, "the stream forgotten")


def test_a_kv_stream_never_opened_is_not_found(worker, monkeypatch) -> None:
    monkeypatch.setattr(worker.svc.streams, "wait_s", 0.2)
    stub = worker_pb2_grpc.KVStreamStub(worker.channel)
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.StreamKV(worker_pb2.ResumeStreamRequest(request_id="never-opened"), timeout=30))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never-opened" in ei.value.details()


def test_a_prefix_in_the_store_is_pulled_from_the_event_loop(worker) -> None:
    """A second worker (its own engine, the same store) serving a prompt the first one published:
    the local probe awaited on its engine thread, the pull on a thread, the result the same."""
    cfg = worker.state.config
    ecfg = EngineConfig(num_kv_blocks=BLOCKS)
    eng = LLMEngine.from_pretrained(cfg.model_path, ecfg)
    st = WorkerState(WorkerConfig("p1", Role.PREFILL, cfg.model_path, cfg.store_address, engine=ecfg), eng)
    transport = AutoTransport(host_id())
    policy = PrefixFetchPolicy(PrefixFetchConfig(mode=FetchMode.ALWAYS))
    svc = AsyncPrefillServicer(st, StorePublisher(worker.store), worker.store, transport, policy)
    services, _ = worker_services(svc, Role.PREFILL, None)
    server, port = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, "p1")
    ids = list(range(50, 90))  # two full blocks and a partial one
    try:
        a = worker.stub.Prefill(request("prefix-a", ids), timeout=60)
        assert worker.store.release(a.kv.lease_id)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            b = worker_pb2_grpc.WorkerStub(ch).Prefill(request("prefix-b", ids), timeout=60)
        assert worker.store.release(b.kv.lease_id)
        assert svc.store_prefix_tokens_total == 32  # the two full blocks came from the store
        assert b.num_cached_tokens == 32 and b.num_computed_tokens == len(ids) - 32
        assert b.first_token == a.first_token
        # the pulled blocks are A's bytes (the partial one, computed by each, may differ in rounding)
        assert list(b.kv.block_checksums)[:2] == list(a.kv.block_checksums)[:2]
    finally:
        server.stop(0).wait()
        svc.close()
        st.close()
        transport.close()
