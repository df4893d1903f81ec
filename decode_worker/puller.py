"""Pulls a request's KV blocks named by a KVHandle into one tensor (I/O seam).

Blocks are grouped by node; each group is read with the transport chosen for that location
(shared memory on the same host, gRPC otherwise). The producer's lease is released after the pull.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kv_store.client import KVStoreClient
from kv_store.handle import KVHandle
from kv_store.tensors import block_tensor
from kv_store.transport import BlockTransport


class KVPuller(Protocol):
    def pull(self, handle: KVHandle) -> torch.Tensor: ...

    def release(self, handle: KVHandle) -> None: ...


class StorePuller:
    def __init__(self, transport: BlockTransport, clients: dict[str, KVStoreClient] | None = None) -> None:
        self.transport = transport
        self._clients = clients if clients is not None else {}

    def pull(self, handle: KVHandle) -> torch.Tensor:
        """``[n_blocks, num_layers, 2, block_size, kvh, hd]`` in handle order."""
        layout = handle.layout
        out = torch.empty((len(handle.block_hashes), *layout.block_shape), dtype=getattr(torch, layout.dtype))
        for _node, idxs in handle.blocks_by_node().items():
            loc = handle.locations[idxs[0]]
            with self.transport.fetch(loc, layout, [handle.block_hashes[i] for i in idxs]) as fetched:
                for i, view in zip(idxs, fetched.views, strict=True):
                    out[i].copy_(block_tensor(view, layout))
        return out

    def _client(self, address: str) -> KVStoreClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = KVStoreClient(address)
        return c

    def release(self, handle: KVHandle) -> None:
        if handle.lease_id and handle.locations:
            self._client(handle.locations[0].address).release(handle.lease_id)
