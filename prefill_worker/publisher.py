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
    """Puts blocks on the worker's store node under a lease (one streamed Put call)."""

    def __init__(self, client: KVStoreClient) -> None:
        self.client = client

    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float) -> KVHandle:
        blocks = [tensor_bytes(kv.blocks[i]) for i in range(kv.blocks.shape[0])]
        res = self.client.put_blocks(layout, kv.block_hashes, blocks, lease_ttl_s=lease_ttl_s)
        assert res.location is not None
        return KVHandle(
            request_id=kv.request_id,
            block_hashes=tuple(kv.block_hashes),
            locations=(res.location,) * len(kv.block_hashes),
            layout=layout,
            num_tokens=len(kv.token_ids),
            lease_id=res.lease_id,
        )
