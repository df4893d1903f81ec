"""Read-only view of the cluster that placement policies decide on (pure).

An instance is anything with the :class:`InstanceView` attributes: the simulator's instances
implement it directly (no copying per decision); the router builds :class:`InstanceSnapshot`s
from worker load reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, takewhile
from operator import is_not
from typing import Protocol

import numpy as np

from engine.block_hash import BlockHash
from router.policy.adapter_cost import AdapterTiers, adapter_ready_s
from router.policy.types import InstanceRole


class InstanceView(Protocol):
    """Load and cache state of one engine instance.

    ``queued_tokens``: prompt tokens accepted but not yet prefilled. ``token_budget``: tokens the
    instance computes per step at most. ``cached_prefix_blocks(hashes)``: how many *leading*
    blocks of ``hashes`` the instance can serve from its cache (HBM or its host KV pool).
    """

    @property
    def instance_id(self) -> str: ...
    @property
    def role(self) -> InstanceRole: ...
    @property
    def queued_tokens(self) -> int: ...
    @property
    def queued_requests(self) -> int: ...
    @property
    def running_requests(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def total_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def token_budget(self) -> int: ...

    def cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int: ...

    def adapter_load_s(self, adapter: str) -> float:
        """Seconds before a request using LoRA ``adapter`` can run here (0: resident in an engine
        slot, or unknown): its load, the disk reads queued ahead of it and the wait for a slot
        when every slot is pinned (``router.policy.adapter_cost.adapter_ready_s``)."""
        ...


def adapter_load_time(
    adapter: str, in_slot: frozenset[str], in_host: frozenset[str], slot_s: float, disk_s: float
) -> float:
    """Pure: what loading ``adapter`` costs on an instance whose adapter tiers are idle: nothing
    when it is in an engine slot, a host -> slot copy (``slot_s``) when in host memory, a disk
    read and the copy otherwise (``disk_s + slot_s``; measured running means, 0 when not
    measured yet). The base model ("") costs nothing. :func:`adapter_ready_s` with no reads
    queued and free slots."""
    return adapter_ready_s(adapter, AdapterTiers(in_slot, in_host, slot_s, disk_s))


@dataclass(frozen=True)
class InstanceSnapshot:
    """A plain-value :class:`InstanceView` (router load reports, tests)."""

    instance_id: str
    role: InstanceRole
    queued_tokens: int = 0
    queued_requests: int = 0
    running_requests: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 16
    token_budget: int = 2048
    cached: frozenset[BlockHash] = field(default_factory=frozenset)
    # the worker's own step-time model, measured at its start-up and reported when it registered
    # (a ``LinearLatency``; None: not reported). Goodput placement scales its predictions for this
    # instance by it (``GoodputAwarePolicy``); other policies ignore it.
    latency: object | None = None
    # LoRA adapters in an engine slot / in host memory now, and measured load times (heartbeats)
    adapters_in_slot: frozenset[str] = field(default_factory=frozenset)
    adapters_in_host: frozenset[str] = field(default_factory=frozenset)
    adapter_slot_load_s: float = 0.0
    adapter_disk_load_s: float = 0.0
    # how busy the adapter tiers are (``router.policy.adapter_cost.AdapterTiers``; 0: not reported)
    adapter_slots: int = 0
    adapter_slots_pinned: int = 0
    adapter_slot_waiters: int = 0
    adapter_slot_free_s: float = 0.0
    adapter_reads_queued: int = 0

    def adapter_tiers(self) -> AdapterTiers:
        """This instance's reported adapter state as the pure pricing takes it."""
        return AdapterTiers(
            self.adapters_in_slot,
            self.adapters_in_host,
            self.adapter_slot_load_s,
            self.adapter_disk_load_s,
            self.adapter_slots,
            self.adapter_slots_pinned,
            self.adapter_slot_waiters,
            self.adapter_slot_free_s,
            self.adapter_reads_queued,
        )

    def adapter_load_s(self, adapter: str) -> float:
        if not adapter or adapter in self.adapters_in_slot:
            return 0.0
        return adapter_ready_s(adapter, self.adapter_tiers())

    def cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cached:
                break
            n += 1
        return n


_UNSET = object()


class PrefixHits:
    """How many leading blocks of one request's ``hashes`` each instance of a view caches,
    computed once per request (:meth:`ClusterView.prefix_hits`): one walk per instance instead of
    one per (candidate, instance) pair. Only holders (hit > 0) are stored, in view order.

    :meth:`best_remote` answers "the longest usable prefix another instance holds" in O(1) per
    candidate (the best two holders per prompt cap are kept, so excluding the candidate itself
    costs nothing); it decides exactly as a scan of every other instance in view order would.
    """

    __slots__ = ("hashes", "holders", "by_id", "_members", "_tops")

    def __init__(
        self,
        hashes: Sequence[BlockHash],
        holders: list[tuple[str, int]],
        members: dict[str, InstanceView],
    ) -> None:
        self.hashes = hashes
        self.holders = holders  # (instance id, hit blocks > 0) in view order
        self.by_id = dict(holders)  # valid for the view's own instance objects (see local())
        self._members = members
        self._tops: dict[int, tuple[str | None, int, str | None, int]] = {}

    def local(self, inst: InstanceView) -> int:
        """Leading blocks of the request ``inst`` caches (walked directly when ``inst`` is not the
        view's instance of that id, e.g. a candidate from elsewhere)."""
        iid = inst.instance_id
        if self._members.get(iid) is inst:
            return self.by_id.get(iid, 0)
        return inst.cached_prefix_blocks(self.hashes)

    def _top(self, cap: int) -> tuple[str | None, int, str | None, int]:
        """For prefixes clamped to ``cap`` blocks: the first holder with the longest one and its
        length, and the first holder other than that one with the longest and its length."""
        t = self._tops.get(cap)
        if t is None:
            m1, i1 = 0, None
            for iid, h in self.holders:
                u = h if h < cap else cap
                if u > m1:
                    m1, i1 = u, iid
            m2, i2 = 0, None
            for iid, h in self.holders:
                u = h if h < cap else cap
                if u > m2 and iid != i1:
                    m2, i2 = u, iid
            t = self._tops[cap] = (i1, m1, i2, m2)
        return t

    def top_holder(self, cap: int) -> str | None:
        """The first instance in view order holding the longest prefix clamped to ``cap`` blocks
        (None: nobody holds a usable block)."""
        if cap <= 0 or not self.holders:
            return None
        return self._top(cap)[0]

    def best_remote(
        self, exclude: str | None, cap: int, store_blocks: int, store_source: str
    ) -> tuple[str, int]:
        """Where an instance ``exclude`` could fetch the longest prefix from and its length in
        blocks: another instance's cache (each hit clamped to ``cap`` blocks, the usable part of
        the prompt) or the KV store (``store_blocks``, already clamped), whichever holds more,
        the store on a tie, the first instance in view order among equals. ``exclude=None``:
        the answer for any instance other than :meth:`top_holder`."""
        if cap <= 0 or not self.holders:
            return store_source, store_blocks
        i1, m1, i2, m2 = self._top(cap)
        iid, m = (i2, m2) if exclude == i1 else (i1, m1)
        if m > store_blocks and iid is not None:
            return iid, m
        return store_source, store_blocks


class RoleColumns:
    """The load columns of one role's instances (in view order) as int64 numpy arrays, read once
    per view (:meth:`ClusterView.columns`): a decision prices a whole pool with array arithmetic
    instead of a Python pass per term. ``batch`` = running + queued requests; ``index``: instance
    id -> position; ``free_list``: the free blocks as a list (read for a few instances);
    ``one_block_size``: every instance has the first one's block size; ``min_total``: the least
    ``total_blocks`` (0 when empty)."""

    __slots__ = (
        "index",
        "block_size",
        "total_blocks",
        "free_blocks",
        "free_list",
        "batch",
        "queued_tokens",
        "token_budget",
        "one_block_size",
        "min_total",
        "used",
        "queue_cache",
    )

    def __init__(self, insts: Sequence[InstanceView]) -> None:
        self.index = {i.instance_id: k for k, i in enumerate(insts)}
        self.free_list = [i.free_blocks for i in insts]
        i64 = np.int64
        self.block_size = np.array([i.block_size for i in insts], dtype=i64)
        self.total_blocks = np.array([i.total_blocks for i in insts], dtype=i64)
        self.free_blocks = np.array(self.free_list, dtype=i64)
        self.batch = np.array([i.running_requests + i.queued_requests for i in insts], dtype=i64)
        self.queued_tokens = np.array([i.queued_tokens for i in insts], dtype=i64)
        self.token_budget = np.array([i.token_budget for i in insts], dtype=i64)
        self._derive()

    def _derive(self) -> None:
        bs = self.block_size
        self.one_block_size = not len(bs) or bool((bs == bs[0]).all())
        self.min_total = int(self.total_blocks.min()) if len(bs) else 0
        t, f = self.total_blocks, self.free_blocks
        self.used = np.where(t > f, t - f, 0)  # blocks in use
        # (scale, model, memo, array, list, stale rows) of TtftTable.pool_queues, or None
        self.queue_cache: tuple | None = None

    def patched(self, insts: Sequence[InstanceView], changed: Sequence[int]) -> RoleColumns:
        """These columns with the rows ``changed`` re-read from ``insts`` (the same instance ids
        in the same order as the ones these were read from; the other rows unchanged)."""
        new = RoleColumns.__new__(RoleColumns)
        new.index = self.index
        new.free_list = list(self.free_list)
        cols = ("block_size", "total_blocks", "free_blocks", "batch", "queued_tokens", "token_budget")
        for name in cols:
            setattr(new, name, getattr(self, name).copy())
        for k in changed:
            i = insts[k]
            new.free_list[k] = i.free_blocks
            new.block_size[k] = i.block_size
            new.total_blocks[k] = i.total_blocks
            new.free_blocks[k] = i.free_blocks
            new.batch[k] = i.running_requests + i.queued_requests
            new.queued_tokens[k] = i.queued_tokens
            new.token_budget[k] = i.token_budget
        new._derive()
        q = self.queue_cache
        if q is not None:  # its rows of unchanged instances stay valid
            new.queue_cache = (q[0], q[1], q[2], q[3].copy(), list(q[4]), tuple({*q[5], *changed}))
        return new


class ColumnCache:
    """:class:`RoleColumns` kept from one view to the next (a router builds a view per request,
    reusing a worker's frozen snapshot while its state is unchanged: ``router.cluster_view``):
    rows of unchanged snapshot objects are reused, changed ones re-read, so a decision does not
    re-read every instance. Only views of snapshots are cached (:meth:`ClusterView.snapshots_only`;
    a simulator's instances change in place). Not thread-safe: its owner serialises calls."""

    def __init__(self) -> None:
        self._last: dict[tuple[InstanceRole, ...], tuple[tuple[InstanceView, ...], RoleColumns]] = {}

    def columns(self, view: ClusterView, *roles: InstanceRole) -> RoleColumns:
        """``view.columns(*roles)``, from the previous view's columns where its rows are the same."""
        if not view.snapshots_only():
            return view.columns(*roles)
        got = view._columns.get(roles)
        if got is not None:
            return got
        pool = view._role_tuple(roles)
        last = self._last.get(roles)
        got = None
        if last is not None and len(last[0]) == len(pool):
            old, cols = last
            changed = list(compress(range(len(pool)), map(is_not, pool, old)))
            if not changed:
                got = cols
            elif len(changed) * 8 <= len(pool) and all(
                pool[k].instance_id == old[k].instance_id for k in changed
            ):
                got = cols.patched(pool, changed)
        if got is None:
            got = RoleColumns(pool)
        self._last[roles] = (pool, got)
        view._columns[roles] = got
        return got


class ClusterView:
    """The instances a decision may use, in a stable order (ties break by this order).

    Per-role lists are computed once per view. The view does not copy its instances: the
    simulator's instances change between decisions, so nothing derived from their *state* (load,
    caches) is kept across calls; :meth:`prefix_hits` is per request.
    """

    def __init__(self, instances: Iterable[InstanceView]) -> None:
        self.instances: tuple[InstanceView, ...] = tuple(instances)
        self._by_id = {i.instance_id: i for i in self.instances}
        if len(self._by_id) != len(self.instances):
            raise ValueError("instance ids must be unique")
        self._roles: dict[tuple[InstanceRole, ...], tuple[InstanceView, ...]] = {}
        self._all_snapshots: bool | None = None  # every instance a plain InstanceSnapshot
        self._columns: dict[tuple[InstanceRole, ...], RoleColumns] = {}
        self._profile: object | None = _UNSET

    def __len__(self) -> int:
        return len(self.instances)

    def get(self, instance_id: str) -> InstanceView:
        return self._by_id[instance_id]

    def snapshots_only(self) -> bool:
        """Whether every instance is a plain (frozen) :class:`InstanceSnapshot`: then what is
        derived from their state may be kept for the view's life."""
        if self._all_snapshots is None:
            self._all_snapshots = set(map(type, self.instances)) <= {InstanceSnapshot}
        return self._all_snapshots

    def columns(self, *roles: InstanceRole) -> RoleColumns:
        """:class:`RoleColumns` of :meth:`with_role` ``(*roles)``: read once per view of
        snapshots, afresh per call otherwise (a simulator's instances change between calls)."""
        got = self._columns.get(roles)
        if got is None:
            got = RoleColumns(self.with_role(*roles))
            if self.snapshots_only():
                self._columns[roles] = got
        return got

    def first_profile(self) -> object | None:
        """The reported step-time model (``latency``) of the first instance in view order that
        has one (None: none has); kept for the view's life when it holds snapshots only."""
        if self._profile is not _UNSET:
            return self._profile
        if self.snapshots_only():
            lat = [i.latency for i in self.instances]  # type: ignore[attr-defined]
            self._profile = None if lat.count(None) == len(lat) else next(p for p in lat if p is not None)
            return self._profile
        return next((p for i in self.instances if (p := getattr(i, "latency", None)) is not None), None)

    def with_role(self, *roles: InstanceRole) -> list[InstanceView]:
        """Instances of any of ``roles``, in view order (a new list; roles are fixed per instance)."""
        return list(self._role_tuple(roles))

    def _role_tuple(self, roles: tuple[InstanceRole, ...]) -> tuple[InstanceView, ...]:
        got = self._roles.get(roles)
        if got is None:
            insts = self.instances
            if len(roles) == 1:  # (an identity test is cheaper than a tuple's "in")
                r = roles[0]
                got = tuple([i for i in insts if i.role is r])
            else:
                got = tuple([i for i in insts if i.role in roles])
            self._roles[roles] = got
        return got

    def prefix_hits(self, hashes: Sequence[BlockHash]) -> PrefixHits:
        """Each instance's cached prefix of ``hashes`` (one walk per instance, now). Snapshots are
        walked inline (their frozen ``cached`` sets); any other instance is asked through
        ``cached_prefix_blocks``."""
        holders: list[tuple[str, int]] = []
        if hashes:
            h0 = hashes[0]
            snap = InstanceSnapshot
            # the common case, a snapshot that does not hold the first block, costs one set probe
            if self.snapshots_only():
                maybe = [i for i in self.instances if h0 in i.cached]  # type: ignore[attr-defined]
            else:
                maybe = [i for i in self.instances if type(i) is not snap or h0 in i.cached]
            rest = hashes[1:]
            for inst in maybe:
                if type(inst) is snap:  # 1 + the leading run of rest in its cache, walked in C
                    n = 1 + len(list(takewhile(inst.cached.__contains__, rest)))
                else:
                    n = inst.cached_prefix_blocks(hashes)
                    if n <= 0:
                        continue
                holders.append((inst.instance_id, n))
        return PrefixHits(hashes, holders, self._by_id)
