"""BlockStore: one store node's blocks in memory, usable in-process and behind the gRPC service.

Composes the pure bookkeeping (:class:`kv_store.node.StoreNode`), the memory
(:class:`kv_store.arena.ShmArena`, or :class:`~kv_store.arena.HeapArena` without shm) and the
index the node reports to (:class:`kv_store.index.KVIndex`). Thread-safe: one lock around
bookkeeping; block bytes are copied outside the lock (a slot being written is pinned, and a
pinned slot is never reused).

A prefill worker embedding its store node writes blocks with :meth:`BlockStore.put_block` (one
copy into the arena); remote writers go through the gRPC Put, which uses the same
begin/write/commit steps.

Integrity (:mod:`kv_store.checksum`): every block is stored with its writer's checksum; a newly
written block is verified against it at :meth:`BlockStore.commit` (a mismatch is refused and the
slot given back) and readers get it back (:meth:`BlockStore.checksums`, ``LeaseGrant.checksums``).
Keys are write-once (see :mod:`kv_store.node`).

With ``replication_factor > 1`` every newly stored block is also queued for background
replication to other nodes of the (shared) index (:class:`kv_store.replication.ReplicationLoop`;
best effort, never delays a put).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.block_hash import BlockHash
from kv_store.arena import HeapArena, ShmArena, host_id
from kv_store.checksum import CHECKSUM_ALGORITHM, block_checksum
from kv_store.handle import BlockLocation, check_hashes
from kv_store.index import InMemoryIndex, KVIndex, LookupResult
from kv_store.index_sync import IndexSyncer, SyncableIndex
from kv_store.layout import KVLayout
from kv_store.node import DeleteResult, NodeConfig, NodeStats, PutTicket, StoreNode, check_watermarks
from pdserve.errors import InvalidRequestError, RequestNotFoundError
from pdserve.limits import MAX_BLOCKS_PER_CALL

if TYPE_CHECKING:
    from kv_store.replication import ReplicationLoop


@dataclass(frozen=True)
class StoreConfig:
    """A store node: identity, the one layout it serves, capacity, network and lease defaults."""

    node_id: str
    layout: KVLayout
    capacity_blocks: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (serve() reports the bound one)
    use_shm: bool = True  # False: private memory, no same-host zero-copy reads
    prefault: bool = True
    default_lease_ttl_s: float = 30.0
    max_lease_ttl_s: float = 60.0  # longer lease asks are clamped to this (NodeConfig)
    max_leased_blocks_per_owner: int | None = None  # None: half the capacity (NodeConfig)
    max_leased_blocks_per_tenant: int | None = None  # None: the owner quota (NodeConfig)
    max_workers: int = 8  # gRPC server threads
    high_water: float = 1.0  # see NodeConfig: watermark eviction (1.0/1.0: only at capacity)
    low_water: float = 1.0
    index_sync_interval_s: float = 1.0  # re-registration probe, for indexes that can lose state
    replication_factor: int = 1  # holders wanted per block (this node included); best effort
    # who may call the node's KVStore service (kv_store/auth.py); "" = from the process's security
    # configuration / environment; none at all: development mode, loopback only
    cluster_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must be non-empty")
        if self.replication_factor < 1:
            raise ValueError(f"replication_factor must be >= 1, got {self.replication_factor}")
        if self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")
        check_watermarks(self.high_water, self.low_water)


@dataclass(frozen=True)
class LeaseGrant:
    """A lease on blocks, and where their bytes are (slot i at ``slots[i] * slot_nbytes``).

    ``checksums`` (parallel to ``slots``): the stored checksum of each leased block, for the
    reader to verify what it reads; ``ttl_clamped``: the asked ttl was above the node's max."""

    lease_id: str
    ttl_s: float
    expires_at_unix_s: float
    shm_name: str
    slot_nbytes: int
    slots: tuple[int, ...]
    location: BlockLocation
    checksums: tuple[int, ...] = ()
    ttl_clamped: bool = False


@dataclass(frozen=True)
class PutResult:
    """Outcome of one Put call.

    With a lease (``lease_id``) on a node with a shared-memory arena, ``slots`` are the arena slots
    of the blocks of the call (parallel to them, in the order sent; slot i at
    ``slots[i] * slot_nbytes`` of the arena ``shm_name``), pinned until the lease is released or
    expires at ``lease_expires_at_unix_s``. Otherwise (or if a block of the call was not yet stored
    when the call ended, e.g. a concurrent writer's in-flight put) ``slots`` is empty and
    ``slot_nbytes`` 0.

    ``conflicts``: indices (in the call's order) of blocks whose key was already stored with a
    different checksum; write-once, their bytes were dropped and the stored ones kept.
    ``conflict_checksums``: parallel to ``conflicts``, the kept bytes' checksums (empty from an
    older node).
    ``lease_ttl_s``: the granted lease ttl; ``lease_ttl_clamped``: it is lower than asked.
    """

    num_blocks: int
    num_stored: int
    num_existing: int
    lease_id: str = ""
    lease_expires_at_unix_s: float = 0.0
    location: BlockLocation | None = None
    slots: tuple[int, ...] = ()
    slot_nbytes: int = 0
    shm_name: str = ""
    conflicts: tuple[int, ...] = ()
    conflict_checksums: tuple[int, ...] = ()
    lease_ttl_s: float = 0.0
    lease_ttl_clamped: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(int(s) for s in self.slots))
        object.__setattr__(self, "conflicts", tuple(int(i) for i in self.conflicts))
        object.__setattr__(self, "conflict_checksums", tuple(int(c) for c in self.conflict_checksums))
        if self.conflict_checksums and len(self.conflict_checksums) != len(self.conflicts):
            raise InvalidRequestError(
                f"PutResult: {len(self.conflict_checksums)} conflict checksums for "
                f"{len(self.conflicts)} conflicts; they are parallel"
            )
        if self.slots and len(self.slots) != self.num_blocks:
            raise InvalidRequestError(
                f"PutResult: {len(self.slots)} slots for {self.num_blocks} blocks; slots are empty "
                "or per block of the call"
            )


@dataclass(frozen=True)
class DeleteCounts:
    num_deleted: int
    num_missing: int
    num_pinned: int


@dataclass(frozen=True)
class StoreStats:
    location: BlockLocation
    layout: KVLayout
    node: NodeStats


def check_hash_list(hashes: Sequence[bytes], what: str = "block_hashes") -> tuple[BlockHash, ...]:
    """Validate a request's hash list: count within MAX_BLOCKS_PER_CALL, 16 bytes each."""
    if len(hashes) > MAX_BLOCKS_PER_CALL:
        raise InvalidRequestError(
            f"{what}: {len(hashes)} blocks in one call, at most {MAX_BLOCKS_PER_CALL}; split the request"
        )
    return check_hashes(hashes, what)


class BlockStore:
    def __init__(
        self,
        config: StoreConfig,
        index: KVIndex | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.layout = config.layout
        nbytes = config.layout.block_nbytes
        self.arena: ShmArena | HeapArena
        if config.use_shm:
            self.arena = ShmArena(nbytes, config.capacity_blocks, prefault=config.prefault)
        else:
            self.arena = HeapArena(nbytes, config.capacity_blocks)
        self.node = StoreNode(
            NodeConfig(
                config.capacity_blocks,
                nbytes,
                config.default_lease_ttl_s,
                config.max_lease_ttl_s,
                max_leased_blocks_per_owner=config.max_leased_blocks_per_owner,
                max_leased_blocks_per_tenant=config.max_leased_blocks_per_tenant,
                high_water=config.high_water,
                low_water=config.low_water,
            ),
            slots=self.arena,
            clock=clock,
        )
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self.index: KVIndex = index if index is not None else InMemoryIndex()
        self.location = BlockLocation(
            config.node_id, "", self.arena.name, host_id() if config.use_shm else ""
        )
        self.index.add_node(self.location)
        self._closed = False
        self.replication = self._make_replication() if config.replication_factor > 1 else None
        self.syncer: IndexSyncer | None = None
        if isinstance(self.index, SyncableIndex) and config.index_sync_interval_s > 0:
            self.syncer = IndexSyncer(
                self.index,
                self.resync_index,
                interval_s=config.index_sync_interval_s,
                name=f"kv-index-sync-{config.node_id}",
            ).start()

    def _make_replication(self) -> ReplicationLoop:
        from kv_store.replication import ReplicationConfig, ReplicationLoop, Replicator  # grpc client

        replicator = Replicator(self.index, ReplicationConfig(factor=self.config.replication_factor))  # type: ignore[arg-type]
        return ReplicationLoop(
            replicator,
            self.layout,
            lambda: self.location,
            self.exists,
            lambda hs: [self.get_block(h) for h in hs],
        ).start()

    # ------------------------------------------------------------------ identity
    def set_address(self, address: str) -> None:
        """Record the bound gRPC address (host:port) and re-announce the node to the index."""
        with self._lock:
            self.location = BlockLocation(
                self.location.node_id, address, self.location.shm_name, self.location.host_id
            )
            self.index.add_node(self.location)

    def check_layout(self, layout: KVLayout, what: str = "KV blocks") -> None:
        """LayoutMismatchError (FAILED_PRECONDITION) unless ``layout`` is this node's layout."""
        self.layout.check_compatible(layout, what=what)

    def _unix(self, t_mono: float) -> float:
        return self._wall() + (t_mono - self._clock())

    # ------------------------------------------------------------------ puts
    def begin_put(self, h: BlockHash, checksum: int) -> PutTicket:
        """Reserve a slot for block ``h`` whose bytes hash to ``checksum`` (see StoreNode.begin_put)."""
        with self._lock:
            ticket = self.node.begin_put(h, checksum)
            if ticket.evicted:
                self.index.unregister(self.location.node_id, ticket.evicted)
            return ticket

    def write(self, ticket: PutTicket, offset: int, data: bytes | memoryview) -> None:
        """Copy ``data`` into the reserved slot at ``offset`` (outside the lock; slot is pinned)."""
        n = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        if offset < 0 or offset + n > self.arena.slot_nbytes:
            raise InvalidRequestError(
                f"block data out of range: bytes [{offset}, {offset + n}) of a {self.arena.slot_nbytes}-byte block"
            )
        self.arena.view(ticket.slot)[offset : offset + n] = data

    def commit(self, ticket: PutTicket, lease_id: str = "", *, verify: bool = True) -> None:
        """Make the block visible, register it in the index, optionally add it to a lease.

        A newly written block is first verified (``verify``): its slot must hash to the ticket's
        checksum, else InvalidRequestError and the caller aborts the ticket (nothing stored)."""
        if ticket.is_new and verify:
            got = block_checksum(self.arena.view(ticket.slot))
            if got != ticket.checksum:
                with self._lock:
                    self.node.count_checksum_failure()
                raise InvalidRequestError(
                    f"Put: block {ticket.block_hash.hex()[:12]}... does not match its checksum "
                    f"({CHECKSUM_ALGORITHM} of the received bytes {got:016x}, the writer's "
                    f"{ticket.checksum:016x}): corrupted in transit or a bad writer; not stored"
                )
        with self._lock:
            self.node.commit_put(ticket)
            if lease_id:
                self.node.add_to_lease(lease_id, ticket.block_hash)
            if ticket.is_new:
                self.index.register(self.location.node_id, (ticket.block_hash,))
                self._evict_over_high_water()
                if self.replication is not None:
                    self.replication.submit((ticket.block_hash,))

    def _evict_over_high_water(self) -> None:
        """Watermark eviction (lock held): skips blocks the index reports leased, if it can."""
        need = self.node.watermark_excess()
        if need <= 0:
            return
        protected: set[BlockHash] = set()
        leased = getattr(self.index, "leased", None)
        if leased is not None:
            cands = self.node.evictable(limit=2 * need + 16)
            protected = {h for h, p in zip(cands, leased(self.location.node_id, cands), strict=True) if p}
        evicted = self.node.evict_to_low_water(protected)
        if evicted:
            self.index.unregister(self.location.node_id, evicted)

    def abort(self, ticket: PutTicket) -> None:
        with self._lock:
            self.node.abort_put(ticket)

    def put_block(
        self, h: BlockHash, data: bytes | memoryview, lease_id: str = "", checksum: int | None = None
    ) -> bool:
        """In-process put of one whole block; True if newly stored, False if already there (same
        or - write-once - different bytes: see :meth:`checksum_of`). ``checksum``: the writer's
        (verified against the stored copy); None: computed here from ``data``."""
        (h,) = check_hashes((h,))
        n = memoryview(data).nbytes
        if n != self.arena.slot_nbytes:
            raise InvalidRequestError(
                f"block has {n} bytes, this node's layout needs {self.arena.slot_nbytes}"
            )
        given = checksum is not None
        ticket = self.begin_put(h, checksum if given else block_checksum(data))
        try:
            if ticket.is_new:
                self.write(ticket, 0, data)
            self.commit(ticket, lease_id, verify=given)
        except BaseException:
            self.abort(ticket)
            raise
        return ticket.is_new

    # ------------------------------------------------------------------ reads
    @contextlib.contextmanager
    def pinned_views(self, hashes: Sequence[BlockHash]) -> Iterator[list[memoryview]]:
        """Zero-copy views of stored blocks, pinned for the duration of the ``with`` (NOT_FOUND
        if any is missing). Views must not be used after the block exits."""
        hashes = list(hashes)
        with self._lock:
            slots = self.node.pin(hashes)
        try:
            yield [self.arena.view(s) for s in slots]
        finally:
            with self._lock:
                self.node.unpin(hashes)

    def checksums(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Stored checksums of ``hashes`` (NOT_FOUND if one is not stored); stable while pinned."""
        with self._lock:
            out = [self.node.checksum_of(h) for h in hashes]
        if any(c is None for c in out):
            raise RequestNotFoundError("a KV block was evicted while being read; read it again")
        return out  # type: ignore[return-value]

    def checksum_of(self, h: BlockHash) -> int | None:
        with self._lock:
            return self.node.checksum_of(h)

    def count_denied(self) -> None:
        """Count a call refused because its caller is not a cluster member."""
        with self._lock:
            self.node.count_denied()

    def get_block(self, h: BlockHash) -> bytes:
        """A copy of one stored block's bytes."""
        with self.pinned_views([h]) as (view,):
            return bytes(view)

    # ------------------------------------------------------------------ leases
    def lease(self, hashes: Sequence[BlockHash], ttl_s: float | None = None, owner: str = "") -> LeaseGrant:
        """Pin blocks for ``owner`` (see StoreNode.lease: ttl clamped, per-tenant / per-owner quota)."""
        with self._lock:
            lease = self.node.lease(hashes, ttl_s, owner)
            slots = tuple(self.node.slot_of(h) for h in lease.hashes)
            sums = tuple(self.node.checksum_of(h) for h in lease.hashes)
            loc = self.location
        return LeaseGrant(
            lease.lease_id,
            lease.ttl_s,
            self._unix(lease.expires_at),
            self.arena.name,
            self.arena.slot_nbytes,
            slots,  # type: ignore[arg-type]  # leased blocks are stored: never None
            loc,
            sums,  # type: ignore[arg-type]
            lease.ttl_clamped,
        )

    def no_lease(self) -> LeaseGrant:
        """The answer to a Lease of no blocks: where the arena is, no lease id."""
        return LeaseGrant("", 0.0, 0.0, self.arena.name, self.arena.slot_nbytes, (), self.location)

    def release(self, lease_id: str) -> bool:
        with self._lock:
            return self.node.release(lease_id)

    def release_counted(self, lease_id: str, blocks_read: int = 0) -> tuple[bool, int]:
        """Release a lease: (released, how many blocks it held); (False, 0) if unknown or expired.
        ``blocks_read`` (capped at the lease's size): blocks the holder read from the arena without
        an rpc; they count as read hits, as a Lease or Get of them would have."""
        with self._lock:
            lease = self.node.get_lease(lease_id)
            if lease is None or not self.node.release(lease_id):
                return False, 0
            self.node.count_read_hits(min(max(0, blocks_read), len(lease.hashes)))
            return True, len(lease.hashes)

    def leased_slots(
        self, lease_id: str, hashes: Sequence[BlockHash], expected: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """Arena slots of ``hashes`` (in order) if this node has a shared-memory arena, ``lease_id``
        is live, and every block is stored (committed), on that lease and (when ``expected`` is
        given, parallel to ``hashes``) still in the slot its put ticket named; else ``()``. The
        slots stay valid while the lease holds: a leased slot is never reused. Tells a Put's caller
        where its leased blocks are (zero-rpc same-host reads)."""
        if not self.arena.name or not hashes:
            return ()
        if expected is not None and len(expected) != len(hashes):
            raise ValueError(f"leased_slots: {len(expected)} expected slots for {len(hashes)} hashes")
        with self._lock:
            lease = self.node.get_lease(lease_id)
            if lease is None:
                return ()
            held = set(lease.hashes)
            slots = []
            for i, h in enumerate(hashes):
                s = self.node.slot_of(h)
                if s is None or h not in held or (expected is not None and s != expected[i]):
                    return ()
                slots.append(s)
        return tuple(slots)

    def lease_expires_at_unix(self, lease_id: str) -> float:
        with self._lock:
            lease = self.node.get_lease(lease_id)
        return self._unix(lease.expires_at) if lease else 0.0

    # ------------------------------------------------------------------ misc
    def exists(self, hashes: Sequence[BlockHash]) -> list[bool]:
        with self._lock:
            return self.node.exists(hashes)

    def delete(self, hashes: Sequence[BlockHash]) -> DeleteResult:
        with self._lock:
            res = self.node.delete(hashes)
            if res.deleted:
                self.index.unregister(self.location.node_id, res.deleted)
            return res

    def lookup(self, hashes: Sequence[BlockHash]) -> LookupResult:
        with self._lock:
            return self.index.lookup(hashes)

    def resync_index(self) -> int:
        """Make the index hold exactly this node's stored blocks (after the index lost state; see
        :mod:`kv_store.index_sync`). Returns the number of blocks registered."""
        with self._lock:
            if self._closed:
                return 0
            hashes = self.node.stored_hashes()
            self.index.sync_node(self.location, hashes)  # type: ignore[attr-defined]
            return len(hashes)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self.location, self.layout, self.node.stats())

    def close(self) -> None:
        """Drop this node from the index and free the arena (unlinks the shm segment). Idempotent."""
        if self.syncer is not None:
            self.syncer.stop()
        if self.replication is not None:
            self.replication.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.index.drop_node(self.location.node_id)
        self.arena.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
