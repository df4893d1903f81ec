"""Publishes a prefilled request's KV blocks to a store node and returns the KVHandle (I/O seam)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from typing import TYPE_CHECKING, Protocol

import torch

from engine.llm_engine import KVExport
from kv_store.auth import tenant_owner
from kv_store.checksum import block_checksum
from kv_store.client import KVStoreClient, put_blocks_fits
from kv_store.handle import KVHandle
from kv_store.layout import KVLayout
from kv_store.store import PutResult
from kv_store.tensors import block_tensor, tensor_bytes
from pdserve.errors import InvalidRequestError, RequestNotFoundError
from pdserve.tracing import log_event

if TYPE_CHECKING:
    from kv_store.aio_client import AsyncKVStoreClient

log = logging.getLogger(__name__)

MAX_LEASE_TTL_S = 60.0  # the longest handoff lease a publisher asks for (the store caps it too)


class KVPublisher(Protocol):
    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float, tenant: str = "") -> KVHandle:
        """Publish ``kv`` for a decode worker; a store lease is charged to ``tenant`` (the
        request's tenant, set by the router from its API key; "" = the dev-mode anonymous one)."""
        ...


def capped_lease_ttl(lease_ttl_s: float, max_lease_ttl_s: float) -> float:
    """The handoff lease ttl to ask for: ``lease_ttl_s`` (e.g. a Prefill request's) at most
    ``max_lease_ttl_s``; InvalidRequestError when it is not a positive finite number."""
    if not math.isfinite(lease_ttl_s) or lease_ttl_s <= 0:
        raise InvalidRequestError(f"lease_ttl_s must be a positive number of seconds, got {lease_ttl_s!r}")
    return min(lease_ttl_s, max_lease_ttl_s)


class StorePublisher:
    """Puts blocks on the worker's store node under a lease (one streamed Put call).

    The returned handle carries the lease (id and expiry), the checksum of every block as computed
    here (``block_checksums``: the decode worker verifies its copy against them, so bytes that are
    not this worker's are never used) and, when the node answered with the leased blocks' arena
    slots, ``shm_slots``, so that a same-host decode worker reads the blocks with no rpc
    (decode_worker/puller.py).

    The lease ttl is capped at ``max_lease_ttl_s`` (whatever a Prefill request asked for). The
    lease is charged to the request's tenant (:func:`kv_store.auth.tenant_owner`), so the store's
    per-tenant quota of leased blocks applies: one tenant's pinned handoffs cannot exhaust the
    node for the others (a tenant over its quota gets RESOURCE_EXHAUSTED naming it).

    Write-once keys: when the node already held some keys with other bytes (``PutResult.conflicts``:
    a racing writer whose KV differs in its last bits, or junk put under the prompt's keys before
    it was sent), the publisher releases its lease, deletes those blocks (the node refuses to
    delete pinned ones) and puts the request's blocks once more. Keys still held by other bytes
    then are pinned by another request's lease. Two prefill workers prefilling the same prompt
    (a re-dispatched request, twin requests) write such blocks: the same tokens' KV, differing in
    its last bits. Each kept block is read back and compared with this worker's own; when it is
    numerically the same KV (:func:`equivalent_kv`), the handle carries the stored bytes'
    checksum (``PutResult.conflict_checksums``), so the decode worker uses it as it would a
    prefix-cache hit. (Carrying this worker's checksum would turn every pull of it into a miss
    and re-dispatch the request until its budget ran out.) Anything else (junk) keeps this
    worker's checksum: the decode worker's check turns it into a miss, never wrong KV.
    """

    def __init__(self, client: KVStoreClient, max_lease_ttl_s: float = MAX_LEASE_TTL_S) -> None:
        self.client = client
        self.max_lease_ttl_s = max_lease_ttl_s
        self.conflicts_replaced = 0  # blocks deleted and put again after a conflict
        self.conflicts_kept = 0  # blocks still held with other bytes after the retry
        self.conflicts_adopted = 0  # of which handed off as stored (equivalent KV)

    def _put(
        self, layout: KVLayout, kv: KVExport, blocks: list, sums: list[int], ttl: float, owner: str
    ) -> PutResult:
        return self.client.put_blocks(
            layout, kv.block_hashes, blocks, lease_ttl_s=ttl, checksums=sums, owner=owner
        )

    def _adopt_equivalent(self, layout: KVLayout, kv: KVExport, res: PutResult, sums: list[int]) -> list[int]:
        """``sums`` with each kept conflicting block that is equivalent KV given its stored
        checksum (see the class docstring); unchanged when the node sent no stored checksums."""
        if not res.conflicts or len(res.conflict_checksums) != len(res.conflicts):
            return sums
        keys = [kv.block_hashes[i] for i in res.conflicts]
        try:
            stored = self.client.get_blocks(layout, keys, res.conflict_checksums)
        except RequestNotFoundError:  # KVChecksumError too
            return sums  # gone or not the bytes the node reported: leave the miss
        out = list(sums)
        for i, raw, stored_sum in zip(res.conflicts, stored, res.conflict_checksums, strict=True):
            theirs = block_tensor(bytearray(raw), layout)
            if equivalent_kv(theirs, kv.blocks[i]):
                out[i] = stored_sum
                self.conflicts_adopted += 1
        return out

    def _prepare(
        self, kv: KVExport, lease_ttl_s: float, tenant: str
    ) -> tuple[float, str, list[memoryview], list[int]]:
        """(lease ttl, lease owner, each block's bytes, each block's checksum) of a publish."""
        ttl = capped_lease_ttl(lease_ttl_s, self.max_lease_ttl_s)
        owner = tenant_owner(tenant)
        blocks = [tensor_bytes(kv.blocks[i]) for i in range(kv.blocks.shape[0])]
        return ttl, owner, blocks, [block_checksum(b) for b in blocks]

    def publish(self, kv: KVExport, layout: KVLayout, lease_ttl_s: float, tenant: str = "") -> KVHandle:
        ttl, owner, blocks, sums = self._prepare(kv, lease_ttl_s, tenant)
        res = self._put(layout, kv, blocks, sums, ttl, owner)
        if res.conflicts:
            res, sums = self._resolve_conflicts(layout, kv, res, blocks, sums, ttl, owner)
        return self._handle(kv, layout, res, sums)

    async def publish_async(
        self, kv: KVExport, layout: KVLayout, lease_ttl_s: float, tenant: str, aclient: AsyncKVStoreClient
    ) -> KVHandle | None:
        """:meth:`publish` from an event loop: the put is one ``PutBlocks`` call on ``aclient``
        (a ``grpc.aio`` client of this publisher's node), no thread hop. None when that does not
        apply (blocks beyond one message, a node without ``PutBlocks``): the caller publishes
        with :meth:`publish` (on a thread). Conflicting keys (rare: see the class docstring) are
        resolved on a thread as :meth:`publish` resolves them."""
        ttl, owner, blocks, sums = self._prepare(kv, lease_ttl_s, tenant)
        if not self.client.unary_put or not put_blocks_fits(len(blocks), layout.block_nbytes):
            return None
        res = await aclient.put_blocks(layout, kv.block_hashes, blocks, sums, lease_ttl_s=ttl, owner=owner)
        if res is None:
            return None
        if res.conflicts:
            ctx = contextvars.copy_context()  # the request id goes with the store calls
            res, sums = await asyncio.get_running_loop().run_in_executor(
                None, ctx.run, self._resolve_conflicts, layout, kv, res, blocks, sums, ttl, owner
            )
        return self._handle(kv, layout, res, sums)

    def _resolve_conflicts(
        self,
        layout: KVLayout,
        kv: KVExport,
        res: PutResult,
        blocks: list,
        sums: list[int],
        ttl: float,
        owner: str,
    ) -> tuple[PutResult, list[int]]:
        """After a put whose ``res.conflicts`` is not empty: its lease released, the clashing
        keys deleted and the blocks put again (class docstring); the new result and checksums."""
        clash = [kv.block_hashes[i] for i in res.conflicts]
        if res.lease_id:
            self.client.release(res.lease_id)
        deleted = self.client.delete(clash)
        self.conflicts_replaced += deleted.num_deleted
        res = self._put(layout, kv, blocks, sums, ttl, owner)
        self.conflicts_kept += len(res.conflicts)
        log_event(
            log,
            "kv publish conflict",
            logging.WARNING,
            request_id=kv.request_id,
            blocks=len(clash),
            replaced=deleted.num_deleted,
            still_conflicting=len(res.conflicts),
        )
        return res, self._adopt_equivalent(layout, kv, res, sums)

    @staticmethod
    def _handle(kv: KVExport, layout: KVLayout, res: PutResult, sums: list[int]) -> KVHandle:
        """The KVHandle of a put's result."""
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
            block_checksums=tuple(sums),
        )


# Two computations of the same tokens' KV differ by float rounding (batch shape, kernel order):
# within this share of the block's largest magnitude, elementwise. Junk (random bytes read as
# floats) is far outside it, or not finite.
KV_EQUIVALENCE_RTOL = 0.02


def equivalent_kv(theirs: torch.Tensor, mine: torch.Tensor) -> bool:
    """True if ``theirs`` is numerically the same KV block as ``mine`` (finite, and within
    ``KV_EQUIVALENCE_RTOL`` of ``mine``'s largest magnitude everywhere)."""
    a = theirs.detach().float().cpu().reshape(-1)
    b = mine.detach().float().cpu().reshape(-1)
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
    scale = max(float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= KV_EQUIVALENCE_RTOL * scale
