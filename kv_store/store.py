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

Disk tier (``StoreConfig.disk_tier``, :mod:`kv_store.disk_tier`): a block evicted from the
arena (LRU or watermark) is copied to the node's disk tier and stays registered in the index as
:attr:`~kv_store.index.Tier.DISK`; a read of it (pin, lease, get, a conflicting put) first
*promotes* it: a slot is reserved (pinned), the bytes are read from the segment into it and
verified, and the block is committed and the read's pin or lease taken in one step under the
lock, so a promoted block is pinned for as long as its reader holds it. A Lookup that finds
blocks of this node on disk starts their promotion in the background. A disk block that fails its
checksum, was truncated, or whose segment vanished is a miss (unregistered), never served. On
start the node re-registers the blocks its segments hold (they survive restarts). Blocks this node
deleted are forgotten by the disk tier too.

With ``replication_factor > 1`` every newly stored block is also queued for background
replication to other nodes of the (shared) index (:class:`kv_store.replication.ReplicationLoop`;
best effort, never delays a put).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from engine.block_hash import BlockHash
from kv_store.arena import HeapArena, ShmArena, host_id
from kv_store.checksum import CHECKSUM_ALGORITHM, block_checksum
from kv_store.disk_tier import DiskTier, DiskTierConfig, DiskTierStats
from kv_store.handle import BlockLocation, check_hashes
from kv_store.index import InMemoryIndex, KVIndex, LookupResult, Tier
from kv_store.index_sync import IndexSyncer, SyncableIndex
from kv_store.layout import KVLayout
from kv_store.node import DeleteResult, NodeConfig, NodeStats, PutTicket, StoreNode, check_watermarks
from kv_store.segment import FileLayer, layout_fingerprint
from pdserve.errors import InvalidRequestError, RequestNotFoundError
from pdserve.limits import MAX_BLOCKS_PER_CALL
from pdserve.tracing import log_event

if TYPE_CHECKING:
    from kv_store.replication import ReplicationLoop

log = logging.getLogger(__name__)
_T = TypeVar("_T")
PROMOTION_WAIT_S = 30.0  # longest a read waits for another caller's promotion of the same block


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
    # local-disk tier behind the arena (None: evicted blocks are forgotten); see kv_store.disk_tier
    disk_tier: DiskTierConfig | None = None

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
    """``disk``: the disk tier's state (None without one); ``promotions``: blocks read back from
    it into the arena; ``promotion_misses``: disk blocks a read wanted that could not be used."""

    location: BlockLocation
    layout: KVLayout
    node: NodeStats
    disk: DiskTierStats | None = None
    promotions: int = 0
    promotion_misses: int = 0


def disk_fingerprint(layout: KVLayout) -> bytes:
    """What a disk tier's segments record about the layout of their blocks."""
    return layout_fingerprint(dataclasses.asdict(layout), layout.block_nbytes)


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
        disk_files: FileLayer | None = None,
    ) -> None:
        """``disk_files``: the disk tier's file-system seam (tests inject faults; default the OS)."""
        self.config = config
        self.layout = config.layout
        nbytes = config.layout.block_nbytes
        self.arena: ShmArena | HeapArena
        if config.use_shm:
            self.arena = ShmArena(nbytes, config.capacity_blocks, prefault=config.prefault)
        else:
            self.arena = HeapArena(nbytes, config.capacity_blocks)
        self.disk: DiskTier | None = None
        recovered: list[tuple[BlockHash, int]] = []
        if config.disk_tier is not None:
            try:
                fp = disk_fingerprint(config.layout)
                self.disk, recovered = DiskTier.open(config.disk_tier, nbytes, fp, files=disk_files)
            except BaseException:
                self.arena.close()
                raise
        self._demoted: list[BlockHash] = []  # filled by _on_evict during one node call (lock held)
        self._promoting: dict[BlockHash, threading.Event] = {}
        self._promotions = self._promotion_misses = 0
        self._prefetcher: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None  # parallel disk reads of one promotion
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
            on_evict=self._on_evict if self.disk is not None else None,
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
        if self.disk is not None:
            self.disk.on_dropped = self._disk_dropped
            if recovered:
                self.index.register(self.location.node_id, [h for h, _ in recovered], Tier.DISK)
                log_event(log, "kv disk tier recovered", blocks=len(recovered), path=config.disk_tier.path)  # type: ignore[union-attr]
            self._prefetcher = ThreadPoolExecutor(2, thread_name_prefix=f"kv-prefetch-{config.node_id}")
            self._readers = ThreadPoolExecutor(
                config.disk_tier.read_threads,  # type: ignore[union-attr]
                thread_name_prefix=f"kv-disk-read-{config.node_id}",
            )
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
        """Reserve a slot for block ``h`` whose bytes hash to ``checksum`` (see StoreNode.begin_put).

        A key held only on the disk tier with other bytes is promoted first, so that the
        write-once rule reports the conflict and keeps the stored bytes."""
        disk = self.disk
        if disk is not None:
            on_disk = disk.checksum_of(h)
            if on_disk is not None and on_disk != checksum and self.checksum_of(h, dram_only=True) is None:
                self._with_promoted([h], lambda: None)
        with self._lock:
            ticket = self.node.begin_put(h, checksum)
            self._after_evict(ticket.evicted)
            return ticket

    # ------------------------------------------------------------------ disk tier
    def _on_evict(self, h: BlockHash, slot: int, checksum: int) -> None:
        """(lock held; StoreNode hook) Copy an evicted block to the disk tier."""
        assert self.disk is not None
        if self.disk.stage(h, checksum, self.arena.view(slot)):
            self._demoted.append(h)

    def _after_evict(self, evicted: Sequence[BlockHash]) -> None:
        """(lock held) Index the blocks a node call evicted: on disk if demoted, else gone."""
        if not evicted:
            self._demoted.clear()
            return
        demoted = set(self._demoted)
        self._demoted.clear()
        if demoted:
            self.index.register(self.location.node_id, [h for h in evicted if h in demoted], Tier.DISK)
        gone = [h for h in evicted if h not in demoted]
        if gone:
            self.index.unregister(self.location.node_id, gone)

    def _disk_dropped(self, hashes: Sequence[BlockHash]) -> None:
        """The disk tier lost blocks (segment evicted, corrupt, deleted, write failed): those
        not in the arena are no longer held by this node."""
        with self._lock:
            if self._closed:
                return
            gone = [h for h in hashes if self.node.slot_of(h) is None]
            if gone:
                self.index.unregister(self.location.node_id, gone)

    def _with_promoted(self, hashes: Sequence[BlockHash], op: Callable[[], _T]) -> _T:
        """Run ``op`` under the lock with every block of ``hashes`` that is on the disk tier
        (and not in the arena) promoted into the arena first. Blocks of ``hashes`` already in
        the arena are pinned meanwhile (a promotion's eviction cannot take them), and promoted
        blocks are committed in the same critical section as ``op`` (nothing can evict them
        before ``op`` pins or leases them). A disk block that cannot be read is simply absent
        (``op`` then sees a miss, as for any missing block)."""
        disk = self.disk
        if disk is None:
            with self._lock:
                return op()
        uniq = list(dict.fromkeys(hashes))
        deadline = time.monotonic() + PROMOTION_WAIT_S
        while True:
            with self._lock:
                self.node.reap()
                present = [h for h in uniq if self.node.slot_of(h) is not None]
                need = [h for h in uniq if self.node.slot_of(h) is None and disk.contains(h)]
                if not need:
                    return op()
                waits = [self._promoting[h] for h in need if h in self._promoting]
                if not waits or time.monotonic() >= deadline:
                    # claim them (none is being promoted by another caller, or that one is stuck:
                    # then only the blocks nobody claimed), holding what is in DRAM meanwhile
                    mine = [h for h in need if h not in self._promoting]
                    for h in mine:
                        self._promoting[h] = threading.Event()
                    self.node.pin(present, count=False)
                    break
            # another caller is promoting some of them: wait (claiming nothing, so no caller
            # waits on one that waits on it), then look again
            for ev in waits:
                ev.wait(max(0.0, deadline - time.monotonic()))
        tickets: list[PutTicket] = []
        try:
            sums = [(h, disk.checksum_of(h)) for h in mine]
            with self._lock:  # reserve every slot first (one lock round)
                for h, cs in sums:
                    if cs is None:
                        continue
                    ticket = self.node.begin_put(h, cs)
                    self._after_evict(ticket.evicted)
                    if ticket.is_new:  # else: put meanwhile by a writer, the node has it
                        tickets.append(ticket)
            # read into the reserved (pinned) slots, several at once: overlapping I/O
            if len(tickets) > 1 and self._readers is not None:
                got = list(self._readers.map(self._read_promoted, tickets))
            else:
                got = [self._read_promoted(t) for t in tickets]
            bad = [t for t, ok in zip(tickets, got, strict=True) if not ok]
            if bad:
                tickets = [t for t, ok in zip(tickets, got, strict=True) if ok]
                with self._lock:
                    for t in bad:
                        self.node.abort_put(t)
                    self._promotion_misses += len(bad)
            with self._lock:
                for t in tickets:
                    self.node.commit_put(t, count=False)
                self._promotions += len(tickets)
                if tickets:
                    self.index.register(self.location.node_id, [t.block_hash for t in tickets], Tier.DRAM)
                tickets = []  # committed: nothing to abort below
                return op()
        finally:
            with self._lock:
                for t in tickets:  # not committed (an error on the way)
                    self.node.abort_put(t)
                self.node.unpin(present)
                for h in mine:
                    self._promoting.pop(h).set()

    def _read_promoted(self, ticket: PutTicket) -> bool:
        assert self.disk is not None
        return self.disk.read_into(ticket.block_hash, self.arena.view(ticket.slot)) is not None

    def prefetch(self, hashes: Sequence[BlockHash]) -> None:
        """Start promoting those of ``hashes`` held only on this node's disk tier (background;
        returns at once)."""
        if self.disk is None or self._prefetcher is None or self._closed or not hashes:
            return
        hs = list(hashes)
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            self._prefetcher.submit(self._prefetch, hs)

    def _prefetch(self, hashes: list[BlockHash]) -> None:
        try:
            self._with_promoted(hashes, lambda: None)
        except Exception as e:  # e.g. the arena is full of pinned blocks: a later read retries
            log_event(log, "kv disk prefetch failed", logging.INFO, error=str(e), blocks=len(hashes))

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
                if self.disk is not None:
                    self.disk.forget_if_other(ticket.block_hash, ticket.checksum)
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
        self._after_evict(evicted)

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
        slots = self._with_promoted(hashes, lambda: self.node.pin(hashes))
        try:
            yield [self.arena.view(s) for s in slots]
        finally:
            with self._lock:
                self.node.unpin(hashes)

    def checksums(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Stored checksums of ``hashes`` in the arena (NOT_FOUND if one is not there); stable
        while pinned."""
        with self._lock:
            out = [self.node.checksum_of(h) for h in hashes]
        if any(c is None for c in out):
            raise RequestNotFoundError("a KV block was evicted while being read; read it again")
        return out  # type: ignore[return-value]

    def checksum_of(self, h: BlockHash, *, dram_only: bool = False) -> int | None:
        """Checksum of block ``h`` in the arena, else on the disk tier (unless ``dram_only``)."""
        with self._lock:
            c = self.node.checksum_of(h)
        if c is None and self.disk is not None and not dram_only:
            c = self.disk.checksum_of(h)
        return c

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

        def take() -> tuple:
            lease = self.node.lease(hashes, ttl_s, owner)
            slots = tuple(self.node.slot_of(h) for h in lease.hashes)
            sums = tuple(self.node.checksum_of(h) for h in lease.hashes)
            return lease, slots, sums, self.location

        lease, slots, sums, loc = self._with_promoted(hashes, take)
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
        return self.leased_slots_and_expiry(lease_id, hashes, expected)[0]

    def leased_slots_and_expiry(
        self, lease_id: str, hashes: Sequence[BlockHash], expected: Sequence[int] | None = None
    ) -> tuple[tuple[int, ...], float]:
        """(:meth:`leased_slots`, :meth:`lease_expires_at_unix`) of one lease, read together
        under one acquisition of the lock (a Put's answer names both)."""
        want_slots = bool(self.arena.name) and bool(hashes)
        if want_slots and expected is not None and len(expected) != len(hashes):
            raise ValueError(f"leased_slots: {len(expected)} expected slots for {len(hashes)} hashes")
        with self._lock:
            lease = self.node.get_lease(lease_id)
            if lease is None:
                return (), 0.0
            expires = lease.expires_at
            slots: list[int] = []
            if want_slots:
                held = set(lease.hashes)
                for i, h in enumerate(hashes):
                    s = self.node.slot_of(h)
                    if s is None or h not in held or (expected is not None and s != expected[i]):
                        slots = []
                        break
                    slots.append(s)
        return tuple(slots), self._unix(expires)

    def lease_expires_at_unix(self, lease_id: str) -> float:
        with self._lock:
            lease = self.node.get_lease(lease_id)
        return self._unix(lease.expires_at) if lease else 0.0

    # ------------------------------------------------------------------ misc
    def exists(self, hashes: Sequence[BlockHash]) -> list[bool]:
        """Per block: held by this node (in the arena or on its disk tier)."""
        with self._lock:
            out = self.node.exists(hashes)
        if self.disk is not None:
            out = [e or self.disk.contains(h) for e, h in zip(out, hashes, strict=True)]
        return out

    def delete(self, hashes: Sequence[BlockHash]) -> DeleteResult:
        """Delete unpinned blocks from the arena and the disk tier (a block only on disk counts
        as deleted; a pinned one is kept on both)."""
        with self._lock:
            res = self.node.delete(hashes)
            if self.disk is not None and res.num_missing:
                pinned = {h for h in hashes if self.node.slot_of(h) is not None}
                deleted = set(res.deleted)
                disk_only = [h for h in dict.fromkeys(hashes) if h not in pinned and h not in deleted]
                forgotten = [h for h in disk_only if self.disk.forget([h])]
                res = DeleteResult(
                    (*res.deleted, *forgotten), res.num_missing - len(forgotten), res.num_pinned
                )
            elif self.disk is not None:
                self.disk.forget(res.deleted)
            if res.deleted:
                self.index.unregister(self.location.node_id, res.deleted)
            return res

    def lookup(self, hashes: Sequence[BlockHash]) -> LookupResult:
        """The index's answer; blocks it places on this node's disk tier start promoting."""
        with self._lock:
            found = self.index.lookup(hashes)
        if self.disk is not None and found.tiers:
            me = self.location.node_id
            on_disk = [
                hashes[i]
                for i in range(found.num_prefix_blocks)
                if any(loc.node_id == me for loc in found.locations[i]) and found.tier_of(i, me) is Tier.DISK
            ]
            self.prefetch(on_disk)
        return found

    def resync_index(self) -> int:
        """Make the index hold exactly this node's stored blocks (after the index lost state; see
        :mod:`kv_store.index_sync`). Returns the number of blocks registered."""
        with self._lock:
            if self._closed:
                return 0
            hashes = self.node.stored_hashes()
            if self.disk is None:
                self.index.sync_node(self.location, hashes)  # type: ignore[attr-defined]
                return len(hashes)
            disk = [h for h in self.disk.hashes() if self.node.slot_of(h) is None]
            self.index.sync_node(self.location, hashes, disk)  # type: ignore[attr-defined]
            return len(hashes) + len(disk)

    def stats(self) -> StoreStats:
        disk = self.disk.stats() if self.disk is not None else None
        with self._lock:
            return StoreStats(
                self.location, self.layout, self.node.stats(), disk, self._promotions, self._promotion_misses
            )

    def close(self) -> None:
        """Drop this node from the index and free the arena (unlinks the shm segment). Idempotent."""
        if self.syncer is not None:
            self.syncer.stop()
        if self.replication is not None:
            self.replication.stop()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()  # writes what is staged: it survives a restart
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
