"""Pulls a request's KV blocks named by a KVHandle into one tensor (I/O seam).

Blocks are grouped by node; each group is read with the transport chosen for that location
(shared memory on the same host, gRPC otherwise). The producer's lease is released after the pull.

Zero-rpc handoff: when the handle carries the arena slots of its leased blocks
(``KVHandle.shm_slots``, from the prefill worker's leased Put) and the transport would read the
group's location by shared memory, the group is read straight from those slots with
``read_leased`` (no Lease rpc: the handle's lease pins them). If that is refused (lease about to
expire, arena not attachable, ...), the group goes through ``transport.fetch`` as before, which
keeps the shm -> gRPC fallback of :class:`kv_store.transport.AutoTransport`.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from kv_store.client import KVStoreClient
from kv_store.handle import BlockLocation, KVHandle
from kv_store.tensors import tensor_bytes
from kv_store.transport import BlockTransport, FetchedBlocks
from pdserve.errors import UnavailableError


class KVPuller(Protocol):
    def pull(self, handle: KVHandle) -> torch.Tensor: ...

    def release(self, handle: KVHandle) -> None: ...


class StorePuller:
    """:class:`KVPuller` over a :class:`~kv_store.transport.BlockTransport`.

    Counters (per node group, cumulative): ``leased_reads`` read from the handle's leased slots
    with no rpc; ``leased_refusals`` such reads refused and redone through ``fetch``;
    ``fetches`` groups read through ``transport.fetch`` (refusals included).
    """

    def __init__(self, transport: BlockTransport, clients: dict[str, KVStoreClient] | None = None) -> None:
        self.transport = transport
        self._clients = clients if clients is not None else {}
        self._count_lock = threading.Lock()
        self.leased_reads = 0
        self.leased_refusals = 0
        self.fetches = 0
        # blocks read by read_leased, per (request id, lease id), reported with the release
        self._shm_read: dict[tuple[str, str], int] = {}

    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + 1)

    def _can_read_leased(self, handle: KVHandle, loc: BlockLocation) -> bool:
        if not (handle.shm_slots and handle.lease_id):
            return False
        chooses = getattr(self.transport, "chooses_shm", None)
        return chooses is not None and hasattr(self.transport, "read_leased") and bool(chooses(loc))

    def _read(self, handle: KVHandle, loc: BlockLocation, idxs: list[int]) -> FetchedBlocks:
        """The blocks ``idxs`` of ``handle`` (all on ``loc``), by the cheapest path that works,
        verified against the producer's checksums (``handle.block_checksums``) when it has them."""
        layout = handle.layout
        sums = [handle.block_checksums[i] for i in idxs] if handle.block_checksums else []
        if self._can_read_leased(handle, loc):
            try:
                got = self.transport.read_leased(  # type: ignore[attr-defined]
                    loc, layout, [handle.shm_slots[i] for i in idxs], handle.lease_expires_at_unix_s, 0, sums
                )
            except UnavailableError:
                self._count("leased_refusals")
            else:
                self._count("leased_reads")
                with self._count_lock:
                    key = (handle.request_id, handle.lease_id)
                    self._shm_read[key] = self._shm_read.get(key, 0) + len(idxs)
                return got
        self._count("fetches")
        hashes = [handle.block_hashes[i] for i in idxs]
        if sums:
            return self.transport.fetch(loc, layout, hashes, sums)  # type: ignore[call-arg]
        return self.transport.fetch(loc, layout, hashes)

    def pull(self, handle: KVHandle) -> torch.Tensor:
        """``[n_blocks, num_layers, 2, block_size, kvh, hd]`` in handle order. Call before
        :meth:`release` (leased reads rely on the handle's lease)."""
        layout = handle.layout
        out = torch.empty((len(handle.block_hashes), *layout.block_shape), dtype=getattr(torch, layout.dtype))
        for _node, idxs in handle.blocks_by_node().items():
            loc = handle.locations[idxs[0]]
            with self._read(handle, loc, idxs) as fetched:
                first = idxs[0]
                if idxs == list(range(first, first + len(idxs))):
                    # consecutive in the handle: few large copies (adjacent slots merged in spans)
                    fetched.copy_into(tensor_bytes(out[first : first + len(idxs)]))
                else:
                    for i, view in zip(idxs, fetched.views, strict=True):
                        tensor_bytes(out[i])[:] = view  # one memcpy; read-only sources are fine
        return out

    def _client(self, address: str) -> KVStoreClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = KVStoreClient(address)
        return c

    def release(self, handle: KVHandle) -> None:
        """Release the handle's lease (after :meth:`pull`), telling the node how many blocks were
        read from its arena with no rpc (it counts them as shm transfers out)."""
        with self._count_lock:
            shm_read = self._shm_read.pop((handle.request_id, handle.lease_id), 0)
        if handle.lease_id and handle.locations:
            client = self._client(handle.locations[0].address)
            if shm_read:
                client.release(handle.lease_id, shm_read_blocks=shm_read)
            else:
                client.release(handle.lease_id)
