"""kv_store.aio_client.AsyncKVStoreClient against a real store node on loopback (#12): Release on
grpc.aio as the sync client's (True once, then False: idempotent), and a node that is down raised
as StoreUnavailableError naming it."""

from __future__ import annotations

import asyncio

import pytest

from kv_store.aio_client import AsyncKVStoreClient
from pdserve.errors import StoreUnavailableError


def test_release_on_grpc_aio_as_the_sync_client(tmp_path) -> None:
    from kv_store.client import KVStoreClient
    from kv_store.index import InMemoryIndex
    from kv_store.layout import KVLayout
    from kv_store.service import serve
    from kv_store.store import StoreConfig

    layout = KVLayout("m", 1, 1, 4, "float32", 2)
    srv = serve(StoreConfig(node_id="n1", layout=layout, capacity_blocks=8, use_shm=False), InMemoryIndex())
    try:
        sync = KVStoreClient(srv.address, timeout_s=10)
        blocks = [bytes([i]) * layout.block_nbytes for i in range(2)]
        grant = sync.put_blocks(layout, [b"h" * 15 + bytes([i]) for i in range(2)], blocks, lease_ttl_s=30)
        assert grant.lease_id

        async def main() -> tuple[bool, bool]:
            c = AsyncKVStoreClient(srv.address, sync.call_metadata, timeout_s=10)
            try:
                return await c.release(grant.lease_id), await c.release(grant.lease_id)
            finally:
                await c.close()

        assert asyncio.run(asyncio.wait_for(main(), 30)) == (True, False)
        sync.close()
    finally:
        srv.stop(0)


def test_a_node_that_is_down_is_named() -> None:
    async def main() -> None:
        c = AsyncKVStoreClient("127.0.0.1:1", timeout_s=5)
        try:
            await c.release("L")
        finally:
            await c.close()

    with pytest.raises(StoreUnavailableError, match="KV store 127.0.0.1:1"):
        asyncio.run(asyncio.wait_for(main(), 30))


def _node(servicer_cls=None):
    """(store, server, address) of a store node on loopback; ``servicer_cls``: a KVStoreServicer
    subclass (an older node) instead of :func:`kv_store.service.serve`'s."""
    from concurrent import futures

    import grpc

    from kv_store.index import InMemoryIndex
    from kv_store.layout import KVLayout
    from kv_store.service import SERVICE, serve
    from kv_store.store import BlockStore, StoreConfig
    from pdserve.limits import grpc_options
    from pdserve.status import add_servicer

    layout = KVLayout("m", 1, 1, 4, "float32", 2)
    if servicer_cls is None:
        srv = serve(
            StoreConfig(node_id="n1", layout=layout, capacity_blocks=16, use_shm=False), InMemoryIndex()
        )
        return srv.store, (lambda: srv.stop(0)), srv.address, layout
    store = BlockStore(StoreConfig("n-old", layout, capacity_blocks=16, use_shm=False))
    server = grpc.server(futures.ThreadPoolExecutor(4), options=grpc_options())
    add_servicer(server, SERVICE, servicer_cls(store))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    store.set_address(f"127.0.0.1:{port}")

    def stop() -> None:
        server.stop(0).wait()
        store.close()

    return store, stop, f"127.0.0.1:{port}", layout


def _leases(address: str, layout, n: int) -> list[str]:
    from kv_store.client import KVStoreClient

    sync = KVStoreClient(address, timeout_s=10)
    try:
        out = []
        for i in range(n):
            g = sync.put_blocks(
                layout, [b"k" * 14 + bytes([i, 1])], [bytes([i]) * layout.block_nbytes], lease_ttl_s=60
            )
            assert g.lease_id
            out.append(g.lease_id)
        return out
    finally:
        sync.close()


def test_releases_issued_together_go_in_one_call_each_answered() -> None:
    """Five releases of one turn of the loop: one ReleaseBatch; each caller gets its own answer
    (an unknown lease False), and every lease is released (none left pinned)."""
    store, stop, address, layout = _node()
    try:
        leases = _leases(address, layout, 4)
        assert store.stats().node.num_leases == 4

        async def main() -> tuple[list[bool], int, list[bool], int]:
            c = AsyncKVStoreClient(address, timeout_s=10)
            try:
                got = await asyncio.gather(*(c.release(x) for x in [*leases, "no-such-lease"]))
                calls = c.release_calls
                again = await asyncio.gather(*(c.release(x) for x in leases[:2]))
                return list(got), calls, list(again), c.release_calls - calls
            finally:
                await c.close()

        got, calls, again, calls2 = asyncio.run(asyncio.wait_for(main(), 30))
        assert (got, calls) == ([True, True, True, True, False], 1)
        assert (again, calls2) == ([False, False], 1)  # idempotent, as one Release each
        assert store.stats().node.num_leases == 0
    finally:
        stop()


def test_a_cancelled_caller_still_releases_its_lease() -> None:
    store, stop, address, layout = _node()
    try:
        (lease,) = _leases(address, layout, 1)

        async def main() -> None:
            c = AsyncKVStoreClient(address, timeout_s=10)
            try:
                t = asyncio.ensure_future(c.release(lease))
                await asyncio.sleep(0)  # queued
                t.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await t
            finally:
                await c.close()  # waits for the release in flight

        asyncio.run(asyncio.wait_for(main(), 30))
        assert store.stats().node.num_leases == 0
    finally:
        stop()


def test_a_node_without_release_batch_gets_one_release_per_lease() -> None:
    """An older node (ReleaseBatch UNIMPLEMENTED): the batch is sent as single Releases, and so
    are later releases issued together."""
    from kv_store.service import KVStoreServicer

    class OldServicer(KVStoreServicer):
        ReleaseBatch = None  # type: ignore[assignment]

    store, stop, address, layout = _node(OldServicer)
    try:
        leases = _leases(address, layout, 4)

        async def main() -> tuple[list[bool], list[bool], int]:
            c = AsyncKVStoreClient(address, timeout_s=10)
            try:
                first = await asyncio.gather(*(c.release(x) for x in leases[:2]))
                calls = c.release_calls
                second = await asyncio.gather(*(c.release(x) for x in leases[2:]))
                return list(first), list(second), c.release_calls - calls
            finally:
                await c.close()

        first, second, calls = asyncio.run(asyncio.wait_for(main(), 30))
        assert first == second == [True, True]
        assert calls == 2  # no second ReleaseBatch try: one Release each
        assert store.stats().node.num_leases == 0
    finally:
        stop()


def test_a_down_node_fails_every_release_of_a_batch_naming_it() -> None:
    async def main() -> list[object]:
        c = AsyncKVStoreClient("127.0.0.1:1", timeout_s=5)
        try:
            return await asyncio.gather(c.release("a"), c.release("b"), return_exceptions=True)
        finally:
            await c.close()

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(got) == 2 and got[0] is not got[1]
    for e in got:
        assert isinstance(e, StoreUnavailableError) and "KV store 127.0.0.1:1" in str(e)


def test_release_batch_refuses_an_item_without_a_release_before_releasing_any() -> None:
    import grpc

    from pdserve.v1 import kv_store_pb2, kv_store_pb2_grpc

    store, stop, address, layout = _node()
    try:
        (lease,) = _leases(address, layout, 1)
        with grpc.insecure_channel(address) as ch:
            stub = kv_store_pb2_grpc.KVStoreStub(ch)
            ok = kv_store_pb2.ReleaseBatchItem(release=kv_store_pb2.ReleaseRequest(lease_id=lease))
            with pytest.raises(grpc.RpcError) as ei:
                stub.ReleaseBatch(
                    kv_store_pb2.ReleaseBatchRequest(
                        items=[ok, kv_store_pb2.ReleaseBatchItem(request_id="r")]
                    ),
                    timeout=10,
                )
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item 1" in ei.value.details()
            assert store.stats().node.num_leases == 1  # nothing released
            resp = stub.ReleaseBatch(kv_store_pb2.ReleaseBatchRequest(items=[ok, ok]), timeout=10)
            assert list(resp.released) == [True, False]
    finally:
        stop()


def test_close_on_another_loop_after_its_own_stopped() -> None:
    """A client whose loop stopped with a release queued is closed from a new loop without error
    (as StorePuller.close does): nothing on the stopped loop waits any more."""
    store, stop, address, layout = _node()
    try:
        (lease,) = _leases(address, layout, 1)
        loop = asyncio.new_event_loop()
        c: list[AsyncKVStoreClient] = []
        t: list[asyncio.Future] = []

        async def queue_one() -> None:
            c.append(AsyncKVStoreClient(address, timeout_s=10))
            t.append(asyncio.ensure_future(c[0].release(lease)))
            await asyncio.sleep(0)  # queued; the loop stops before its send is awaited

        loop.run_until_complete(queue_one())
        asyncio.run(asyncio.wait_for(c[0].close(), 30))  # no error: the channel closes
        # the old loop, run again, finishes its send on the closed channel: the caller gets an error
        (got,) = loop.run_until_complete(asyncio.gather(t[0], return_exceptions=True))
        assert isinstance(got, Exception)
        loop.close()
    finally:
        stop()
