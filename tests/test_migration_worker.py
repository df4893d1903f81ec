"""Live migration between two decode workers over gRPC on 127.0.0.1 (decode_worker/migration.py,
router/migration_client.py): a stream migrated mid-way goes on at the destination with no gap and
no duplicate (greedy and seeded equal an unmigrated run), and aborts leave no block held."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from router.migration_client import (
    MigrationReport,
    MigrationResult,
    MigrationTransport,
    migrate,
    open_resumed_stream,
)
from tests.workers import InProcDecodeWorker

GREEDY = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=160, temperature=0.8, seed=11, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)  # outlives the attach timeout
PROMPT = [int(x) for x in range(5, 45)]
CALL_S = 60.0  # every call's deadline: a hang fails the test instead of blocking the run


@pytest.fixture(scope="module")
def workers(tiny_models):
    path = tiny_models["llama"]
    a, b = InProcDecodeWorker(path, "dec-a", blocks=64), InProcDecodeWorker(path, "dec-b", blocks=64)
    small = InProcDecodeWorker(path, "dec-small", blocks=3)
    yield a, b, small
    for w in (a, b, small):
        w.stop()


def _wait_idle(*ws: InProcDecodeWorker, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(w.idle() for w in ws):
        assert time.monotonic() < deadline, "a worker still holds KV blocks"
        time.sleep(0.02)


def _decode_req(rid: str, params: SamplingParams) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=PROMPT, sampling=sampling_to_proto(params), local_prefill=True
    )


async def _reference(w: InProcDecodeWorker, rid: str, params: SamplingParams) -> list[int]:
    async with grpc.aio.insecure_channel(w.address) as ch:
        toks: list[int] = []
        async for m in worker_pb2_grpc.WorkerStub(ch).Decode(_decode_req(rid, params), timeout=CALL_S):
            toks.extend(m.token_ids)
        return toks


async def _migrate_after_first_tokens(
    src: InProcDecodeWorker,
    dst: InProcDecodeWorker,
    rid: str,
    params: SamplingParams,
    transport: MigrationTransport = MigrationTransport.GRPC,
) -> MigrationReport:
    """Stream ``rid`` from ``src``; once its first tokens came, migrate it to ``dst`` over
    ``transport`` and drop the source's stream (nobody follows it on ``dst``): the migration's
    report (or its error, raised)."""
    async with grpc.aio.insecure_channel(src.address) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        call = stub.Decode(_decode_req(rid, params), timeout=CALL_S)
        await call.__aiter__().__anext__()
        try:
            return await migrate(stub, rid, dst.address, transport=transport)
        finally:
            call.cancel()


async def _migrated_run(
    src: InProcDecodeWorker,
    dst: InProcDecodeWorker,
    rid: str,
    params: SamplingParams,
    after: int,
    transport: MigrationTransport = MigrationTransport.GRPC,
) -> tuple[list[int], MigrationResult, int]:
    """Stream ``rid`` from ``src``; after ``after`` tokens migrate it to ``dst`` and follow it there.
    Returns (every token the client saw, the result, the resume index)."""
    async with grpc.aio.insecure_channel(src.address) as sch, grpc.aio.insecure_channel(dst.address) as dch:
        sstub, dstub = worker_pb2_grpc.WorkerStub(sch), worker_pb2_grpc.WorkerStub(dch)
        call = sstub.Decode(_decode_req(rid, params), timeout=CALL_S)
        seen: list[int] = []
        migration = None
        status = None
        try:
            async for m in call:
                seen.extend(m.token_ids)
                if migration is None and len(seen) >= after:
                    migration = asyncio.create_task(
                        migrate(sstub, rid, dst.address, max_stages=3, transport=transport)
                    )
        except grpc.aio.AioRpcError as e:
            status = e
        assert migration is not None
        report = await migration
        if report.result is not MigrationResult.MIGRATED:
            assert status is None, report.message  # the source stream ran to its end
            return seen, report.result, 0
        assert (
            status is not None and status.code() == grpc.StatusCode.ABORTED and "migrated" in status.details()
        )
        assert len(seen) <= report.resume_token_index
        async for m in open_resumed_stream(dstub, rid, len(seen), timeout_s=CALL_S):
            seen.extend(m.token_ids)
            assert not m.has_text
        return seen, report.result, report.resume_token_index


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_stream_migrated_mid_way_has_no_gap_and_no_duplicate(workers, params):
    a, b, _ = workers
    ref = asyncio.run(_reference(a, "ref", params))
    assert len(ref) == params.max_tokens
    out, result, k = asyncio.run(_migrated_run(a, b, "mig", params, after=8))
    assert result is MigrationResult.MIGRATED
    assert 8 <= k < params.max_tokens
    assert out == ref
    _wait_idle(a, b)


def test_resume_from_an_earlier_index_replays_the_source_tokens(workers):
    a, b, _ = workers
    ref = asyncio.run(_reference(a, "ref2", GREEDY))

    async def run() -> list[int]:
        async with grpc.aio.insecure_channel(a.address) as sch, grpc.aio.insecure_channel(b.address) as dch:
            sstub, dstub = worker_pb2_grpc.WorkerStub(sch), worker_pb2_grpc.WorkerStub(dch)
            call = sstub.Decode(_decode_req("early", GREEDY), timeout=CALL_S)
            it = call.__aiter__()
            first = await it.__anext__()
            assert first.token_ids
            report = await migrate(sstub, "early", b.address)
            assert report.result is MigrationResult.MIGRATED and report.blocks_copied >= 3
            call.cancel()  # the router drops the source's stream; tokens it missed are replayed
            out: list[int] = []
            async for m in open_resumed_stream(dstub, "early", 0, timeout_s=CALL_S):
                out.extend(m.token_ids)
            # a second stream of the same request is refused
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in open_resumed_stream(dstub, "early", 0, timeout_s=CALL_S):
                    pass
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            return out

    assert asyncio.run(run()) == ref
    _wait_idle(a, b)


def test_destination_full_aborts_and_the_source_stream_completes(workers):
    a, _, small = workers
    ref = asyncio.run(_reference(a, "ref3", GREEDY))
    out, result, _ = asyncio.run(_migrated_run(a, small, "full", GREEDY, after=4))
    assert result is MigrationResult.ABORTED_DEST_FULL
    assert out == ref
    _wait_idle(a, small)


def test_dead_destination_aborts_and_the_source_stream_completes(workers):
    a, _, _ = workers
    ref = asyncio.run(_reference(a, "ref4", GREEDY))

    class _Gone:
        address = "127.0.0.1:1"  # nothing listens there

    out, result, _ = asyncio.run(_migrated_run(a, _Gone(), "dead", GREEDY, after=4))  # type: ignore[arg-type]
    assert result is MigrationResult.ABORTED_PEER_DIED
    assert out == ref
    _wait_idle(a)


def test_unknown_request_and_unopened_stream(workers):
    a, b, _ = workers

    async def unknown():
        async with grpc.aio.insecure_channel(a.address) as ch:
            return await migrate(worker_pb2_grpc.WorkerStub(ch), "nope", b.address)

    assert asyncio.run(unknown()).result is MigrationResult.ABORTED_SOURCE_FINISHED
    # a migrated request whose stream nobody opens is aborted after the attach timeout
    b.svc.migration.attach_timeout_s = 0.3
    try:
        assert (
            asyncio.run(_migrate_after_first_tokens(a, b, "orphan", LONG)).result is MigrationResult.MIGRATED
        )
        _wait_idle(a, b)  # aborted after the timeout (or finished meanwhile): no block held
        deadline = time.monotonic() + 5.0
        while b.svc.migration.pending():  # forgotten once the attach timeout passed
            assert time.monotonic() < deadline, b.svc.migration.pending()
            time.sleep(0.05)
    finally:
        b.svc.migration.attach_timeout_s = 30.0


def test_store_transport_moves_the_kv_through_the_store_node(workers):
    """MIGRATION_TRANSPORT_STORE: the source puts each stage on its store node (an in-process node
    with a shared-memory arena), the destination pulls it (shm: same host) and releases the lease."""
    from decode_worker.puller import StorePuller
    from kv_store.arena import host_id
    from kv_store.client import KVStoreClient
    from kv_store.service import serve
    from kv_store.store import StoreConfig
    from kv_store.transport import AutoTransport
    from prefill_worker.publisher import StorePublisher

    a, b, _ = workers
    node = serve(StoreConfig("mig-node", a.state.layout, capacity_blocks=64))
    pub_client, pull_client = (
        KVStoreClient(node.address, timeout_s=20),
        KVStoreClient(node.address, timeout_s=20),
    )
    transport = AutoTransport(host_id())
    a.svc.migration.publisher = StorePublisher(pub_client)
    b.svc.migration.puller = StorePuller(transport, {node.address: pull_client})
    try:
        ref = asyncio.run(_reference(a, "ref5", SEEDED))
        out, result, k = asyncio.run(
            _migrated_run(a, b, "via-store", SEEDED, after=6, transport=MigrationTransport.STORE)
        )
        assert result is MigrationResult.MIGRATED and k >= 6
        assert out == ref
        _wait_idle(a, b)
        node_stats = pub_client.stats().node
        assert node_stats.num_leases == 0 and node_stats.num_pinned == 0  # every stage's lease released
        assert b.svc.migration.puller.leased_reads >= 1  # read from the arena by shared memory, no rpc
        # without a publisher the source refuses STORE, naming it
        a.svc.migration.publisher = None
        with pytest.raises(InvalidRequestError, match="no KV store publisher"):
            asyncio.run(_migrate_after_first_tokens(a, b, "no-store", GREEDY, MigrationTransport.STORE))
        _wait_idle(a, b)
    finally:
        a.svc.migration.publisher = None
        b.svc.migration.puller = None
        pub_client.close()
        pull_client.close()
        transport.close()
        node.stop(0)
