"""Where KV blocks live and how a request's KV is handed over (pure value types).

Mirrors proto ``pdserve.v1.BlockLocation`` and ``pdserve.v1.KVHandle``; conversion in
:mod:`kv_store.convert`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.block_hash import KEY_BYTES, BlockHash
from kv_store.checksum import check_checksum_list
from kv_store.layout import KVLayout
from pdserve.errors import InvalidRequestError


@dataclass(frozen=True)
class BlockLocation:
    """One store node as a source of blocks.

    ``shm_name`` is empty when the node has no shared-memory arena; a reader whose own host id
    equals ``host_id`` may read the arena directly (see :func:`kv_store.transport.choose_transport`).
    """

    node_id: str
    address: str = ""  # host:port of the node's KVStore gRPC service
    shm_name: str = ""
    host_id: str = ""


def check_hashes(hashes: object, what: str = "block_hashes") -> tuple[BlockHash, ...]:
    """Validate a sequence of block keys (16 bytes each); returns them as a tuple of bytes."""
    out = tuple(bytes(h) for h in hashes)  # type: ignore[attr-defined]
    for i, h in enumerate(out):
        if len(h) != KEY_BYTES:
            raise InvalidRequestError(
                f"{what}[{i}] is {len(h)} bytes; block hashes are {KEY_BYTES}-byte BLAKE2b keys "
                "(engine/block_hash.py)"
            )
    return out


@dataclass(frozen=True)
class KVHandle:
    """A request's KV cache as published by a prefill worker.

    ``locations`` is per block, parallel to ``block_hashes`` (same length). ``lease_id`` pins the
    blocks on their node(s) until the consumer releases it (or it expires at
    ``lease_expires_at_unix_s``, unix seconds; 0.0 = unknown).

    ``shm_slots`` is empty (slots unknown) or parallel to ``block_hashes``: ``shm_slots[i]`` is the
    arena slot of block i in the shared-memory arena ``locations[i].shm_name``, valid while
    ``lease_id`` holds. A same-host consumer reads those slots directly, with no rpc
    (:meth:`kv_store.transport.ShmTransport.read_leased`).

    Direct handoff (:attr:`is_direct`, ``dist_address`` non-empty): the blocks are not in a
    store but in the outbox of the prefill worker at ``dist_address`` (its ``KVPeer`` service),
    which pushes them from rank ``dist_rank`` of the workers' torch.distributed process group
    (:mod:`prefill_worker.dist_outbox`, :mod:`decode_worker.dist_puller`). Such a handle has no
    lease and no shm slots; its locations name that rank (:func:`dist_location`). Otherwise
    ``dist_rank`` is 0.

    ``block_checksums`` is empty (unknown) or parallel to ``block_hashes``: the checksum of each
    block's bytes as the producer computed them (:mod:`kv_store.checksum`). A consumer verifies
    what it read against these; a mismatch is a miss, never used.
    """

    request_id: str
    block_hashes: tuple[BlockHash, ...]
    locations: tuple[BlockLocation, ...]
    layout: KVLayout
    num_tokens: int
    lease_id: str = ""
    shm_slots: tuple[int, ...] = ()
    lease_expires_at_unix_s: float = 0.0
    dist_address: str = ""
    dist_rank: int = 0
    block_checksums: tuple[int, ...] = ()

    @property
    def is_direct(self) -> bool:
        """True when the blocks come straight from a prefill worker's rank (no store)."""
        return bool(self.dist_address)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_hashes", check_hashes(self.block_hashes, "KVHandle.block_hashes"))
        object.__setattr__(self, "locations", tuple(self.locations))
        if len(self.locations) != len(self.block_hashes):
            raise InvalidRequestError(
                f"KVHandle: {len(self.locations)} locations for {len(self.block_hashes)} blocks; "
                "locations are per block (parallel to block_hashes)"
            )
        slots = tuple(int(s) for s in self.shm_slots)
        object.__setattr__(self, "shm_slots", slots)
        if slots and len(slots) != len(self.block_hashes):
            raise InvalidRequestError(
                f"KVHandle: {len(slots)} shm_slots for {len(self.block_hashes)} blocks; shm_slots is "
                "empty or per block (parallel to block_hashes)"
            )
        if any(s < 0 for s in slots):
            raise InvalidRequestError("KVHandle: shm_slots must be >= 0")
        object.__setattr__(
            self,
            "block_checksums",
            check_checksum_list(self.block_checksums, len(self.block_hashes), "KVHandle.block_checksums"),
        )
        exp = float(self.lease_expires_at_unix_s)
        if not math.isfinite(exp) or exp < 0:
            raise InvalidRequestError(
                f"KVHandle: lease_expires_at_unix_s must be finite and >= 0, got {self.lease_expires_at_unix_s!r}"
            )
        object.__setattr__(self, "lease_expires_at_unix_s", exp)
        rank = int(self.dist_rank)
        object.__setattr__(self, "dist_rank", rank)
        if rank < 0:
            raise InvalidRequestError(f"KVHandle: dist_rank must be >= 0, got {rank}")
        if self.dist_address:
            if self.lease_id or slots:
                raise InvalidRequestError(
                    "KVHandle: a direct handle (dist_address set) has no store lease and no shm_slots"
                )
        elif rank:
            raise InvalidRequestError(
                f"KVHandle: dist_rank={rank} without dist_address; set both for a direct handoff"
            )
        cap = len(self.block_hashes) * self.layout.block_size
        if not (0 <= self.num_tokens <= cap) or (
            self.block_hashes and self.num_tokens <= cap - self.layout.block_size
        ):
            raise InvalidRequestError(
                f"KVHandle: num_tokens={self.num_tokens} does not fit {len(self.block_hashes)} blocks "
                f"of {self.layout.block_size} tokens"
            )

    def blocks_by_node(self) -> dict[str, list[int]]:
        """Block indices grouped by node id, in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, loc in enumerate(self.locations):
            out.setdefault(loc.node_id, []).append(i)
        return out


def dist_location(rank: int, address: str) -> BlockLocation:
    """The location of blocks held for a direct handoff by process-group rank ``rank``, whose
    ``KVPeer`` service is at ``address`` (no store node, no arena: a store client cannot read it)."""
    return BlockLocation(node_id=f"dist-rank-{rank}", address=address)
