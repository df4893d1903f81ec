"""Read-only view of the cluster that placement policies decide on (pure).

An instance is anything with the :class:`InstanceView` attributes: the simulator's instances
implement it directly (no copying per decision); the router builds :class:`InstanceSnapshot`s
from worker load reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.block_hash import BlockHash
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

    def cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cached:
                break
            n += 1
        return n


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

    def __len__(self) -> int:
        return len(self.instances)

    def get(self, instance_id: str) -> InstanceView:
        return self._by_id[instance_id]

    def with_role(self, *roles: InstanceRole) -> list[InstanceView]:
        """Instances of any of ``roles``, in view order (a new list; roles are fixed per instance)."""
        got = self._roles.get(roles)
        if got is None:
            got = self._roles[roles] = tuple([i for i in self.instances if i.role in roles])
        return list(got)

    def prefix_hits(self, hashes: Sequence[BlockHash]) -> PrefixHits:
        """Each instance's cached prefix of ``hashes`` (one walk per instance, now). Snapshots are
        walked inline (their frozen ``cached`` sets); any other instance is asked through
        ``cached_prefix_blocks``."""
        holders: list[tuple[str, int]] = []
        if hashes:
            h0 = hashes[0]
            snap = InstanceSnapshot
            # the common case, a snapshot that does not hold the first block, costs one set probe
            if self._all_snapshots is None:
                self._all_snapshots = set(map(type, self.instances)) <= {snap}
            if self._all_snapshots:
                maybe = [i for i in self.instances if h0 in i.cached]  # type: ignore[attr-defined]
            else:
                maybe = [i for i in self.instances if type(i) is not snap or h0 in i.cached]
            rest = hashes[1:]
            for inst in maybe:
                if type(inst) is snap:
                    c = inst.cached
                    n = 1
                    for h in rest:
                        if h not in c:
                            break
                        n += 1
                else:
                    n = inst.cached_prefix_blocks(hashes)
                    if n <= 0:
                        continue
                holders.append((inst.instance_id, n))
        return PrefixHits(hashes, holders, self._by_id)
