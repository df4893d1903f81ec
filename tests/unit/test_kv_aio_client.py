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
