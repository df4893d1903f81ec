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

import asyncio
import threading
from typing import Protocol

import torch

from kv_store.aio_client import AsyncKVStoreClient
from kv_store.client import KVStoreClient
from kv_store.handle import BlockLocation, KVHandle
from kv_store.tensors import tensor_bytes
from kv_store.transport import BlockTransport, FetchedBlocks
from pdserve.errors import UnavailableError

# a pull at most this large may run on the caller's event loop (a memcpy from the arena)
ON_LOOP_PULL_MAX_BYTES = 1 << 20


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
        # grpc.aio clients for release_async, per (event loop, node address)
        self._aio: dict[tuple[asyncio.AbstractEventLoop, str], AsyncKVStoreClient] = {}

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

    def on_loop(self, handle: KVHandle) -> StorePuller | None:
        """This puller when :meth:`pull` of ``handle`` costs no rpc and little copying, so an event
        loop may run it itself (then :meth:`release_async`): every block group read from the
        handle's leased slots by shared memory, at most :data:`ON_LOOP_PULL_MAX_BYTES`, and no
        leased read refused so far (a refused read falls back to a blocking fetch). None: pull it
        on a thread."""
        if self.leased_refusals or not handle.block_hashes:
            return None
        if len(handle.block_hashes) * handle.layout.block_nbytes > ON_LOOP_PULL_MAX_BYTES:
            return None
        for idxs in handle.blocks_by_node().values():
            if not self._can_read_leased(handle, handle.locations[idxs[0]]):
                return None
        return self

    def _aio_client(self, address: str) -> AsyncKVStoreClient:
        key = (asyncio.get_running_loop(), address)
        c = self._aio.get(key)
        if c is None:
            sync = self._clients.get(address)
            md = sync.call_metadata if sync is not None else ()
            timeout = sync.timeout_s if sync is not None else 60.0
            c = self._aio[key] = AsyncKVStoreClient(address, md, timeout)
        return c

    async def aclose(self) -> None:
        """Close the ``grpc.aio`` channels :meth:`release_async` opened on the running event loop."""
        loop = asyncio.get_running_loop()
        for key in [k for k in self._aio if k[0] is loop]:
            await self._aio.pop(key).close()

    def close(self, timeout_s: float = 5.0) -> None:
        """Close every ``grpc.aio`` channel :meth:`release_async` opened (one per event loop and
        store node; call from no event loop): on its loop when that still runs, else on a loop of
        its own here (its loop has stopped: nothing else uses the channel). Idempotent."""
        while self._aio:
            (loop, _addr), client = self._aio.popitem()
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout_s)
            else:
                asyncio.run(client.close())

    def flush_releases(self) -> None:
        """Send the releases :meth:`release_async` queued on the running event loop now, instead
        of at the end of their batching window (:class:`AsyncKVStoreClient`: a caller waits on one)."""
        loop = asyncio.get_running_loop()
        for (lp, _addr), client in list(self._aio.items()):
            if lp is loop:
                client.flush()

    async def release_async(self, handle: KVHandle) -> None:
        """:meth:`release` on the running event loop (``grpc.aio``: no thread). Batched with other
        releases to the same node over a short window (:mod:`kv_store.aio_client`): a caller on
        the request's critical path runs it concurrently (a task) or calls
        :meth:`flush_releases` when it must wait on it."""
        with self._count_lock:
            shm_read = self._shm_read.pop((handle.request_id, handle.lease_id), 0)
        if handle.lease_id and handle.locations:
            await self._aio_client(handle.locations[0].address).release(
                handle.lease_id, shm_read_blocks=shm_read
            )
