"""Store node bookkeeping (pure policy, injected clock): which block is in which slot, and which
block may be evicted.

Contracts:

* A block is *stored* once :meth:`StoreNode.commit_put` ran for it; only stored blocks are
  visible to :meth:`get`, :meth:`pin`, :meth:`lease`, :meth:`exists`.
* A block is *pinned* while a put of it is in flight, while a reader holds a pin
  (:meth:`pin` / :meth:`unpin`), or while an unexpired lease names it. A pinned block is never
  evicted or deleted, so its slot's bytes stay valid.
* At capacity, a new put evicts the least recently used unpinned block. Use = put, get, pin,
  lease; a block whose last pin or lease ends counts as used at that moment. If every block is pinned
  the put fails with :class:`ResourceExhaustedError` (``retry_after_s`` = time until the earliest
  lease expires).
* Watermarks: when more than ``high_water * capacity`` slots are in use,
  :meth:`StoreNode.evict_to_low_water` evicts LRU unpinned blocks until at most
  ``low_water * capacity`` are (best effort: pinned and protected blocks stay).
* Keys are write-once. Every block has a checksum (:mod:`kv_store.checksum`, given by its writer
  at :meth:`StoreNode.begin_put`). Putting a stored (or in-flight) key with the same checksum is
  a no-op (no new slot, no data to write); with a different checksum it is a *conflict*: also no
  new slot and no write (the stored bytes are kept, never overwritten), and the ticket says so
  (``PutTicket.conflict``) so that the caller can report it. Only :meth:`delete` (of an unpinned
  block) or eviction frees a key for new bytes.
* Leases expire at ``now + ttl``; expired leases are reaped at the start of every operation. A
  ttl above ``max_lease_ttl_s`` is clamped to it (:attr:`Lease.ttl_clamped`), so no lease pins a
  block for longer, and eviction is never blocked for longer than that (puts in flight and
  readers' pins aside: they end with their call).
* Every lease has an *owner*: a tenant (``tenant:<name>``, :func:`kv_store.auth.tenant_owner`:
  the prefill worker charges a request's handoff lease to the request's tenant, which the router
  took from its API key) or a caller identity ("" if none). A tenant may hold leases on at most
  ``max_leased_blocks_per_tenant`` blocks at once, any other owner on at most
  ``max_leased_blocks_per_owner`` (counted per lease and block); a lease or a Put under a lease
  beyond that fails with :class:`ResourceExhaustedError` naming the tenant (or owner) and its
  quota, so one tenant cannot pin the whole node and make other tenants' requests fail.

Not thread-safe: :class:`kv_store.store.BlockStore` serialises access with a lock.
"""

from __future__ import annotations

import heapq
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from engine.block_hash import BlockHash
from kv_store.auth import owner_tenant
from kv_store.slots import SlotAllocator, SlotPool
from pdserve.errors import InvalidRequestError, RequestNotFoundError, ResourceExhaustedError


@dataclass(frozen=True)
class NodeConfig:
    capacity_blocks: int
    block_nbytes: int
    default_lease_ttl_s: float = 30.0
    max_lease_ttl_s: float = 60.0  # longer asks are clamped to this
    # leased blocks one owner may hold at once (None: half the capacity, at least 1)
    max_leased_blocks_per_owner: int | None = None
    # leased blocks one tenant (owner ``tenant:<name>``) may hold at once (None: the owner quota)
    max_leased_blocks_per_tenant: int | None = None
    # watermarks, fractions of capacity_blocks: once more than high_water * capacity slots are in
    # use, evict LRU unpinned blocks down to low_water * capacity (1.0 / 1.0: only at capacity)
    high_water: float = 1.0
    low_water: float = 1.0

    def __post_init__(self) -> None:
        if self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")
        if self.block_nbytes < 1:
            raise ValueError(f"block_nbytes must be >= 1, got {self.block_nbytes}")
        if not (0 < self.default_lease_ttl_s <= self.max_lease_ttl_s):
            raise ValueError("need 0 < default_lease_ttl_s <= max_lease_ttl_s")
        for name in ("max_leased_blocks_per_owner", "max_leased_blocks_per_tenant"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {v}")
        check_watermarks(self.high_water, self.low_water)

    @property
    def high_water_blocks(self) -> int:
        return int(self.high_water * self.capacity_blocks)

    @property
    def low_water_blocks(self) -> int:
        return int(self.low_water * self.capacity_blocks)

    @property
    def owner_quota_blocks(self) -> int:
        """Leased blocks one owner may hold at once."""
        if self.max_leased_blocks_per_owner is not None:
            return self.max_leased_blocks_per_owner
        return max(1, self.capacity_blocks // 2)

    @property
    def tenant_quota_blocks(self) -> int:
        """Leased blocks one tenant may hold at once."""
        if self.max_leased_blocks_per_tenant is not None:
            return self.max_leased_blocks_per_tenant
        return self.owner_quota_blocks

    def quota_of(self, owner: str) -> tuple[int, str]:
        """(leased blocks ``owner`` may hold, the setting that says so)."""
        if owner_tenant(owner) is not None:
            return self.tenant_quota_blocks, "max_leased_blocks_per_tenant"
        return self.owner_quota_blocks, "max_leased_blocks_per_owner"


def check_watermarks(high_water: float, low_water: float) -> None:
    if not (0 < low_water <= high_water <= 1.0):
        raise ValueError(f"need 0 < low_water <= high_water <= 1, got {low_water=}, {high_water=}")


@dataclass(frozen=True)
class NodeStats:
    capacity_blocks: int
    num_blocks: int  # stored (committed) blocks
    num_pending: int  # puts in flight
    num_pinned: int  # stored blocks that cannot be evicted now
    bytes_used: int
    capacity_bytes: int
    num_leases: int
    evictions: int
    expired_leases: int
    hits: int
    misses: int
    puts: int
    put_dedups: int
    checksum_failures: int = 0  # puts refused: bytes did not match the writer's checksum
    put_conflicts: int = 0  # puts of a stored key with a different checksum (ignored)
    lease_ttl_clamps: int = 0  # leases granted a shorter ttl than asked
    lease_quota_refusals: int = 0  # leases refused by a tenant's or owner's quota
    denied_calls: int = 0  # calls refused: the caller is not a cluster member


@dataclass(frozen=True)
class Lease:
    lease_id: str
    hashes: tuple[BlockHash, ...]
    expires_at: float  # on the node's clock
    ttl_s: float
    ttl_clamped: bool = False  # the asked ttl was above max_lease_ttl_s
    owner: str = ""


@dataclass(frozen=True)
class PutTicket:
    """Result of :meth:`StoreNode.begin_put`. Write ``slot`` then commit, only if ``is_new``.

    ``conflict``: the key is already stored (or in flight) with another checksum; nothing is
    written (write-once), ``slot`` is the stored block's and ``stored_checksum`` its checksum."""

    block_hash: BlockHash
    slot: int
    is_new: bool
    evicted: tuple[BlockHash, ...] = ()  # blocks evicted to make room (unregister them)
    checksum: int = 0  # the writer's checksum of the bytes to write
    conflict: bool = False
    stored_checksum: int = 0  # set on a conflict: the kept bytes' checksum


@dataclass(frozen=True)
class DeleteResult:
    deleted: tuple[BlockHash, ...]
    num_missing: int
    num_pinned: int


@dataclass
class _Entry:
    slot: int
    checksum: int = 0
    committed: bool = False
    pins: int = 0
    leases: int = 0


@dataclass
class _LeaseState:
    entries: list[tuple[BlockHash, _Entry]]  # the entry objects pinned (identity, not just hash)
    expires_at: float
    ttl_s: float
    owner: str = ""

    @property
    def hashes(self) -> tuple[BlockHash, ...]:
        return tuple(h for h, _ in self.entries)


def _hex(h: BlockHash) -> str:
    return h.hex()[:12]


class StoreNode:
    """Hash -> slot map with LRU eviction of unpinned blocks and leases (see module docstring)."""

    def __init__(
        self,
        config: NodeConfig,
        slots: SlotAllocator | None = None,
        clock: Callable[[], float] = time.monotonic,
        new_lease_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        on_evict: Callable[[BlockHash, int, int], None] | None = None,
    ) -> None:
        """``on_evict(key, slot, checksum)``: called for each block evicted to make room (LRU or
        watermark; not for deletes) just before its slot is freed, while its bytes are still in
        the slot (a store with a disk tier copies them there)."""
        self.config = config
        self._on_evict = on_evict
        self._slots = slots if slots is not None else SlotPool(config.capacity_blocks)
        if self._slots.capacity != config.capacity_blocks:
            raise ValueError(
                f"slot allocator has {self._slots.capacity} slots, config says {config.capacity_blocks}"
            )
        self._clock = clock
        self._new_lease_id = new_lease_id
        self._entries: dict[BlockHash, _Entry] = {}
        self._lru: OrderedDict[BlockHash, None] = OrderedDict()  # evictable blocks, oldest first
        self._leases: dict[str, _LeaseState] = {}
        self._expiry: list[tuple[float, str]] = []  # heap
        self._evictions = self._expired = self._hits = self._misses = 0
        self._puts = self._dedups = 0
        self._checksum_failures = self._conflicts = self._ttl_clamps = 0
        self._quota_refusals = self._denied = 0
        self._owner_blocks: dict[str, int] = {}  # leased blocks held per owner

    # ------------------------------------------------------------------ helpers
    def _refresh(self, h: BlockHash, e: _Entry, touch: bool = False) -> None:
        evictable = e.committed and e.pins == 0 and e.leases == 0
        if evictable:
            if h not in self._lru:
                self._lru[h] = None
            elif touch:
                self._lru.move_to_end(h)
        else:
            self._lru.pop(h, None)

    def _stored(self, h: BlockHash) -> _Entry | None:
        e = self._entries.get(h)
        return e if e is not None and e.committed else None

    def _require(self, hashes: Iterable[BlockHash], count: bool = True) -> list[tuple[BlockHash, _Entry]]:
        out, missing = [], []
        for h in hashes:
            e = self._stored(h)
            if e is None:
                missing.append(h)
            else:
                out.append((h, e))
        if missing:
            self._misses += len(missing) if count else 0
            raise RequestNotFoundError(
                f"{len(missing)} of {len(out) + len(missing)} KV blocks are not stored on this node "
                f"(evicted or never put), first missing: {_hex(missing[0])}...; "
                "look the prefix up again or recompute it"
            )
        self._hits += len(out) if count else 0
        return out

    def _retry_after(self) -> float:
        if self._expiry:
            return max(0.0, min(t for t, _ in self._expiry) - self._clock())
        return 0.1

    def reap(self) -> list[str]:
        """Expire leases whose time has come; returns their ids. Called by every operation."""
        now = self._clock()
        out = []
        while self._expiry and self._expiry[0][0] <= now:
            t, lid = heapq.heappop(self._expiry)
            st = self._leases.get(lid)
            if st is not None and st.expires_at == t:
                self._drop_lease(lid)
                self._expired += 1
                out.append(lid)
        return out

    def _drop_lease(self, lease_id: str) -> None:
        st = self._leases.pop(lease_id)
        left = self._owner_blocks.get(st.owner, 0) - len(st.entries)
        if left > 0:
            self._owner_blocks[st.owner] = left
        else:
            self._owner_blocks.pop(st.owner, None)
        for h, e in st.entries:
            e.leases -= 1
            if self._entries.get(h) is e:  # the block may have been aborted and put again since
                self._refresh(h, e, touch=True)

    def _ttl(self, ttl_s: float | None) -> tuple[float, bool]:
        """(granted ttl, clamped): 0/None = the default; above ``max_lease_ttl_s`` = the max."""
        if ttl_s is None or ttl_s == 0:
            return self.config.default_lease_ttl_s, False
        if math.isnan(ttl_s) or ttl_s < 0:
            raise InvalidRequestError(
                f"lease ttl_s must be > 0 (0 = default {self.config.default_lease_ttl_s}; longer than "
                f"{self.config.max_lease_ttl_s} is clamped to it), got {ttl_s!r}"
            )
        if ttl_s > self.config.max_lease_ttl_s:
            self._ttl_clamps += 1
            return self.config.max_lease_ttl_s, True
        return float(ttl_s), False

    def _charge_owner(self, owner: str, n: int) -> None:
        """Count ``n`` more leased blocks against ``owner``; ResourceExhaustedError over its
        quota (a tenant's or an owner's: :meth:`NodeConfig.quota_of`)."""
        quota, setting = self.config.quota_of(owner)
        held = self._owner_blocks.get(owner, 0)
        if held + n > quota:
            self._quota_refusals += 1
            mine = [st.expires_at for st in self._leases.values() if st.owner == owner]
            wait = max(0.0, min(mine) - self._clock()) if mine else 0.1
            tenant = owner_tenant(owner)
            who = (
                f"tenant {tenant or '<anonymous>'!r}"
                if tenant is not None
                else f"owner {owner or '<anonymous>'!r}"
            )
            raise ResourceExhaustedError(
                f"lease quota of {who} exceeded: it holds leases on {held} blocks and asks for {n} "
                f"more, at most {quota} ({setting}) on a node of {self.config.capacity_blocks} "
                "blocks; retry once its requests in flight finish (their leases are released)",
                retry_after_s=wait,
            )
        self._owner_blocks[owner] = held + n

    def count_checksum_failure(self) -> None:
        """A put whose bytes did not match its writer's checksum (refused)."""
        self._checksum_failures += 1

    def count_denied(self) -> None:
        """A call refused because its caller is not a cluster member."""
        self._denied += 1

    def checksum_of(self, h: BlockHash) -> int | None:
        """Checksum of a stored block (None if not stored)."""
        e = self._stored(h)
        return e.checksum if e is not None else None

    # ------------------------------------------------------------------ queries
    def exists(self, hashes: Iterable[BlockHash]) -> list[bool]:
        self.reap()
        return [self._stored(h) is not None for h in hashes]

    def slot_of(self, h: BlockHash) -> int | None:
        """Slot of a stored block (no LRU touch, no stats)."""
        e = self._stored(h)
        return e.slot if e is not None else None

    def count_read_hits(self, n: int) -> None:
        """Count ``n`` block reads served without a lookup here (zero-rpc arena reads of a lease)."""
        self._hits += n

    def get(self, h: BlockHash) -> int | None:
        """Slot of a stored block, counted as a hit and marked recently used; None (a miss) if absent."""
        self.reap()
        e = self._stored(h)
        if e is None:
            self._misses += 1
            return None
        self._hits += 1
        self._refresh(h, e, touch=True)
        return e.slot

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.committed)

    # ------------------------------------------------------------------ puts
    def begin_put(self, h: BlockHash, checksum: int = 0) -> PutTicket:
        """Reserve a slot for ``h`` whose bytes hash to ``checksum`` (evicting LRU blocks if
        needed), or report it already there: same checksum, a dedup; another, a conflict
        (write-once: nothing to write either way)."""
        self.reap()
        e = self._entries.get(h)
        if e is not None:
            self._refresh(h, e, touch=True)
            if e.checksum != checksum:
                self._conflicts += 1
                return PutTicket(
                    h, e.slot, is_new=False, checksum=checksum, conflict=True, stored_checksum=e.checksum
                )
            self._dedups += 1
            return PutTicket(h, e.slot, is_new=False, checksum=checksum)
        evicted: list[BlockHash] = []
        slot = self._slots.alloc()
        while slot is None and self._lru:
            victim, _ = self._lru.popitem(last=False)
            ve = self._entries.pop(victim)
            if self._on_evict is not None:
                self._on_evict(victim, ve.slot, ve.checksum)
            self._slots.free(ve.slot)
            self._evictions += 1
            evicted.append(victim)
            slot = self._slots.alloc()
        if slot is None:
            raise ResourceExhaustedError(
                f"KV store node is full: all {self.config.capacity_blocks} blocks are leased or being "
                "read; release leases or add store capacity",
                retry_after_s=self._retry_after(),
            )
        self._entries[h] = _Entry(slot=slot, checksum=checksum, pins=1)
        return PutTicket(h, slot, is_new=True, evicted=tuple(evicted), checksum=checksum)

    def commit_put(self, ticket: PutTicket, *, count: bool = True) -> None:
        """Make a written block visible (no-op for a dedup ticket). ``count``: count it as a
        put (False: a block read back from the node's own disk tier, not a new block)."""
        if not ticket.is_new:
            return
        e = self._entries[ticket.block_hash]
        if e.committed:
            raise ValueError("put already committed")
        e.committed = True
        e.pins -= 1
        self._puts += 1 if count else 0
        self._refresh(ticket.block_hash, e)

    def abort_put(self, ticket: PutTicket) -> None:
        """Give back the slot of a put that will not complete (no-op for a dedup ticket)."""
        if not ticket.is_new:
            return
        e = self._entries.get(ticket.block_hash)
        if e is None or e.committed:
            return
        del self._entries[ticket.block_hash]
        self._lru.pop(ticket.block_hash, None)
        self._slots.free(e.slot)

    # ------------------------------------------------------------------ pins (readers)
    def pin(self, hashes: Iterable[BlockHash], *, count: bool = True) -> list[int]:
        """Pin stored blocks for reading; returns their slots. All or nothing (NOT_FOUND).
        ``count``: count them as read hits (False: an internal hold, not a read)."""
        self.reap()
        found = self._require(list(hashes), count)
        for h, e in found:
            e.pins += 1
            self._refresh(h, e)
        return [e.slot for _, e in found]

    def unpin(self, hashes: Iterable[BlockHash]) -> None:
        for h in hashes:
            e = self._entries.get(h)
            if e is None or e.pins <= 0:
                raise ValueError(f"block {_hex(h)} is not pinned")
            e.pins -= 1
            self._refresh(h, e, touch=True)

    # ------------------------------------------------------------------ leases
    def lease(self, hashes: Iterable[BlockHash], ttl_s: float | None = None, owner: str = "") -> Lease:
        """Pin stored blocks until :meth:`release` or ``ttl_s`` from now (clamped to
        ``max_lease_ttl_s``), charged to ``owner``'s quota. All or nothing (NOT_FOUND,
        RESOURCE_EXHAUSTED over the quota)."""
        self.reap()
        ttl, clamped = self._ttl(ttl_s)
        found = self._require(list(hashes))
        self._charge_owner(owner, len(found))
        lid = self._new_lease_id()
        st = _LeaseState(list(found), self._clock() + ttl, ttl, owner)
        self._leases[lid] = st
        heapq.heappush(self._expiry, (st.expires_at, lid))
        for h, e in found:
            e.leases += 1
            self._refresh(h, e)
        return Lease(lid, st.hashes, st.expires_at, ttl, clamped, owner)

    def add_to_lease(self, lease_id: str, h: BlockHash) -> None:
        """Add one stored (or in-flight) block to an existing lease (Put under a lease), charged
        to the lease owner's quota."""
        self.reap()
        st = self._leases.get(lease_id)
        if st is None:
            raise RequestNotFoundError(f"lease {lease_id!r} is unknown or expired")
        e = self._entries.get(h)
        if e is None:
            raise RequestNotFoundError(f"KV block {_hex(h)}... is not stored on this node")
        self._charge_owner(st.owner, 1)
        st.entries.append((h, e))
        e.leases += 1
        self._refresh(h, e)

    def get_lease(self, lease_id: str) -> Lease | None:
        self.reap()
        st = self._leases.get(lease_id)
        return None if st is None else Lease(lease_id, st.hashes, st.expires_at, st.ttl_s, owner=st.owner)

    def release(self, lease_id: str) -> bool:
        """Unpin a lease's blocks. False if unknown or already expired (idempotent)."""
        self.reap()
        if lease_id not in self._leases:
            return False
        self._drop_lease(lease_id)
        return True

    # ------------------------------------------------------------------ deletes
    def delete(self, hashes: Iterable[BlockHash]) -> DeleteResult:
        """Remove stored, unpinned blocks; pinned ones are kept and counted."""
        self.reap()
        deleted: list[BlockHash] = []
        missing = pinned = 0
        for h in hashes:
            e = self._stored(h)
            if e is None:
                missing += 1
            elif e.pins or e.leases:
                pinned += 1
            else:
                del self._entries[h]
                self._lru.pop(h, None)
                self._slots.free(e.slot)
                deleted.append(h)
        return DeleteResult(tuple(deleted), missing, pinned)

    # ------------------------------------------------------------------ watermarks
    def watermark_excess(self) -> int:
        """Blocks to evict to get down to the low-water mark; 0 unless over the high-water mark."""
        used = len(self._entries)
        if used <= self.config.high_water_blocks:
            return 0
        return used - self.config.low_water_blocks

    def evictable(self, limit: int | None = None) -> list[BlockHash]:
        """Unpinned stored blocks, least recently used first (at most ``limit``)."""
        out = []
        for h in self._lru:
            if limit is not None and len(out) >= limit:
                break
            out.append(h)
        return out

    def evict_to_low_water(self, protected: Collection[BlockHash] = ()) -> tuple[BlockHash, ...]:
        """If over the high-water mark, evict LRU unpinned blocks not in ``protected`` until at the
        low-water mark (or nothing evictable is left); returns the evicted blocks."""
        self.reap()
        need = self.watermark_excess()
        evicted: list[BlockHash] = []
        if need <= 0:
            return ()
        for h in list(self._lru):
            if len(evicted) >= need:
                break
            if h in protected:
                continue
            del self._lru[h]
            e = self._entries.pop(h)
            if self._on_evict is not None:
                self._on_evict(h, e.slot, e.checksum)
            self._slots.free(e.slot)
            self._evictions += 1
            evicted.append(h)
        return tuple(evicted)

    def stored_hashes(self) -> list[BlockHash]:
        """Every stored (committed) block."""
        return [h for h, e in self._entries.items() if e.committed]

    # ------------------------------------------------------------------ stats
    def stats(self) -> NodeStats:
        self.reap()
        stored = sum(1 for e in self._entries.values() if e.committed)
        cfg = self.config
        return NodeStats(
            capacity_blocks=cfg.capacity_blocks,
            num_blocks=stored,
            num_pending=len(self._entries) - stored,
            num_pinned=sum(1 for e in self._entries.values() if e.committed and (e.pins or e.leases)),
            bytes_used=stored * cfg.block_nbytes,
            capacity_bytes=cfg.capacity_blocks * cfg.block_nbytes,
            num_leases=len(self._leases),
            evictions=self._evictions,
            expired_leases=self._expired,
            hits=self._hits,
            misses=self._misses,
            puts=self._puts,
            put_dedups=self._dedups,
            checksum_failures=self._checksum_failures,
            put_conflicts=self._conflicts,
            lease_ttl_clamps=self._ttl_clamps,
            lease_quota_refusals=self._quota_refusals,
            denied_calls=self._denied,
        )
