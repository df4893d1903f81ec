"""Publishes a prefilled request's KV blocks to a store node and returns the KVHandle (I/O seam)."""

from __future__ import annotations

from typing import Protocol

from engine.llm_engine import KVExport
from kv_store.client import KVStoreClient
from kv_store.handle import KVHandle
from kv_store.layout import KVLayout
from kv_store.tensors import tensor_bytes


class KVPublisher(Protocol):
    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float) -> KVHandle: ...


class StorePublisher:
    """Puts blocks on the worker's store node under a lease (one streamed Put call).

    The returned handle carries the lease (id and expiry) and, when the node answered with the
    leased blocks' arena slots, ``shm_slots``, so that a same-host decode worker reads the blocks
    with no rpc (decode_worker/puller.py).
    """

    def __init__(self, client: KVStoreClient) -> None:
        self.client = client

    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float) -> KVHandle:
        blocks = [tensor_bytes(kv.blocks[i]) for i in range(kv.blocks.shape[0])]
        res = self.client.put_blocks(layout, kv.block_hashes, blocks, lease_ttl_s=lease_ttl_s)
        assert res.location is not None
        # slots index the arena the handle's location names; anything else: leave them out
        same_arena = bool(res.shm_name) and res.shm_name == res.location.shm_name
        use_slots = (
            bool(res.lease_id)
            and same_arena
            and len(res.slots) == len(kv.block_hashes)
            and res.slot_nbytes == layout.block_nbytes
        )
        return KVHandle(
            request_id=kv.request_id,
            block_hashes=tuple(kv.block_hashes),
            locations=(res.location,) * len(kv.block_hashes),
            layout=layout,
            num_tokens=len(kv.token_ids),
            lease_id=res.lease_id,
            shm_slots=res.slots if use_slots else (),
            lease_expires_at_unix_s=res.lease_expires_at_unix_s if res.lease_id else 0.0,
        )
