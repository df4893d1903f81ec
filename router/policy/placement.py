"""Placement policies: which instance prefills a request, which decodes it (pure).

Every policy shares one template (:meth:`PlacementPolicy.place`):

1. candidates = prefill-role instances, or mixed ones when the cluster has no prefill role;
2. :meth:`choose_prefill` (the policy proper) picks one and may plan a prefix fetch;
3. Splitwise overflow: when prefill instances exist *and* mixed ones do, and the pick's
   predicted queueing exceeds ``overflow_queue_s`` (default: the request's TTFT SLO), the
   request is re-placed on the mixed pool, which runs it whole;
4. :meth:`admit` (early rejection): the admission hooks, in order; the first
   :class:`Rejection` wins. A goodput-aware policy overrides :meth:`admit` or passes hooks.

The decode side is chosen when the KV is ready (:meth:`choose_decode`), default least-loaded by
free KV blocks, falling back to mixed instances when no decode instance has room.
"""

from __future__ import annotations

import enum
import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

from router.policy.estimate import TtftEstimator, TtftTable
from router.policy.protocols import Clock, LatencyEstimator, MonotonicClock
from router.policy.types import InstanceRole, Observation, Placement, Rejection, RejectReason, RequestInfo
from router.policy.view import ClusterView, InstanceView, PrefixHits

STORE_SOURCE = "kv_store"
"""``Placement.fetch_from`` when the prefix comes from the cluster's KV store, not an instance."""


def best_prefill_plan(
    req: RequestInfo,
    candidates: Sequence[InstanceView],
    hits: PrefixHits,
    table: TtftTable,
    *,
    remote: bool,
    from_view: bool = False,
    scales: Sequence[float] | None = None,
    least_loaded_ties: bool = False,
) -> Placement:
    """The candidate with the lowest predicted TTFT (the first in order among equals) and its plan.

    TTFT on a candidate = queue + prefill(tokens not reused); the reused prefix is what the
    candidate caches (``hits``), or with ``remote`` the longest prefix held anywhere else (another
    instance's cache, or the KV store: ``req.store_prefix_blocks``; the store on a tie, else the
    first instance in view order), fetched only when queue + fetch + prefill(rest) is strictly
    faster. O(candidates) after the per-request ``hits``: the remote prefix is no scan per
    candidate. ``from_view``: the candidates are the view's own instance objects (their hits are
    looked up by id without checking). ``candidates`` must be non-empty. ``scales`` (aligned with
    ``candidates``; None: all 1): each candidate's TTFT is multiplied by its own factor (its speed
    relative to the latency model, e.g. from its start-up profile) before the choice.
    ``least_loaded_ties``: among candidates of equal predicted TTFT, the one whose adapter is
    ready soonest (``req.adapter``; the base model: all equal), then the least loaded (fewest
    queued prompt tokens, fewest requests, most free blocks: :class:`LeastLoadedPolicy`'s key),
    instead of the first in order (:func:`tie_break`).
    """
    if not candidates:
        raise ValueError("best_prefill_plan needs at least one candidate")
    p = req.num_prompt_tokens
    store = req.store_prefix_blocks
    n = len(candidates)
    queues = table.queues(candidates)
    by_id = hits.by_id
    if from_view:
        holding = [k for k, c in enumerate(candidates) if c.instance_id in by_id] if by_id else []
        locs = {k: by_id[candidates[k].instance_id] for k in holding}
    else:
        every = [hits.local(c) for c in candidates]
        locs = {k: h for k, h in enumerate(every) if h}
    prefill, fetch, best_remote = table.prefill, table.fetch, hits.best_remote

    def price(k: int, bs: int) -> tuple[float, tuple[int, str | None, int]]:
        """TTFT on candidate ``k`` and its plan (reused, source, fetched blocks)."""
        inst = candidates[k]
        cap = (p - 1) // bs
        h = locs.get(k, 0)
        local = h if h < cap else cap
        if local < 0:
            local = 0
        qs = queues[k]
        t = qs + 0.0 + prefill(local * bs)  # table.ttft(qs, bs, local): no fetch
        plan = (local, None, 0)
        if remote:
            su = store if store < cap else cap
            src, r = best_remote(inst.instance_id, cap, su if su > 0 else 0, STORE_SOURCE)
            if r > local:
                fr = (table.store_fetch if src == STORE_SOURCE else fetch)(r - local, bs)
                tf = qs + fr + prefill(r * bs)  # table.ttft(qs, bs, r, r - local)
                if tf < t:
                    t, plan = tf, (r, src, r)
        return t, plan

    sizes = [c.block_size for c in candidates]
    bs0 = sizes[0]
    if sizes.count(bs0) == n:
        # One block size: every candidate caching nothing, other than the best holder, has the
        # same options (prefill all, or fetch the best remote prefix): priced once, then a
        # comprehension per term; holders (and the best holder) are priced one by one.
        top, p0, f, pr, fplan = _common_options(req, bs0, hits, table, remote)
        if fplan is None:
            ts = [q + 0.0 + p0 for q in queues]
        else:
            # fetch only when strictly faster: tf if tf < t else t
            ts = [tf if (tf := q + f + pr) < (t := q + 0.0 + p0) else t for q in queues]
        special = set(locs)
        if top is not None and not from_view:  # a foreign object with the best holder's id
            special.update(k for k, c in enumerate(candidates) if c.instance_id == top)
        plans: dict[int, tuple[int, str | None, int]] = {}
        for k in special:
            ts[k], plans[k] = price(k, bs0)
        if scales is not None:
            ts = [t * f for t, f in zip(ts, scales, strict=True)]
        best = min(range(n), key=ts.__getitem__)
        if least_loaded_ties:
            best = tie_break(ts, best, candidates, req.adapter)
        plan = plans.get(best)
        if plan is None:
            q = queues[best]
            plan = fplan if fplan is not None and q + f + pr < q + 0.0 + p0 else (0, None, 0)
        best_t = ts[best]
    else:
        best, best_t, plan = -1, 0.0, (0, None, 0)
        all_ts: list[float] = []
        all_plans: list[tuple[int, str | None, int]] = []
        for k in range(n):
            t, pl = price(k, sizes[k])
            if scales is not None:
                t *= scales[k]
            all_ts.append(t)
            all_plans.append(pl)
            if best < 0 or t < best_t:
                best, best_t, plan = k, t, pl
        if least_loaded_ties:
            best = tie_break(all_ts, best, candidates, req.adapter)
            plan = all_plans[best]
    reused, src, fetched = plan
    return Placement(
        candidates[best].instance_id,
        fetch_from=src,
        fetch_blocks=fetched,
        reused_blocks=reused,
        estimated_ttft_s=best_t,
    )


def tie_break(ts: Sequence[float], best: int, candidates: Sequence[InstanceView], adapter: str) -> int:
    """Among the candidates whose predicted TTFT equals ``ts[best]`` (the least), the one whose
    ``adapter`` is ready soonest (``InstanceView.adapter_load_s``; "": the base model, all 0),
    then the least loaded (:func:`_load_key`), then the first in order; ``best`` when it is the
    only one. O(candidates) for the scan of ``ts``, the keys only of the tied ones.

    Why: with idle queues every candidate caching none of a prompt predicts the same TTFT, and
    the first in view order took them all until its queue grew (cache-aware placement of
    base-model requests at 1.25-1.37x least-loaded's mean TTFT in
    ``bench/sim_adapter_affinity.py``); a tie is no preference, so the load decides it."""
    m = ts[best]
    ties = [k for k, t in enumerate(ts) if t == m]
    if len(ties) <= 1:
        return best

    def key(k: int) -> tuple[float, int, int, int]:
        c = candidates[k]
        return (c.adapter_load_s(adapter) if adapter else 0.0, *_load_key(c))

    return min(ties, key=key)


def _common_options(
    req: RequestInfo, bs: int, hits: PrefixHits, table: TtftTable, remote: bool
) -> tuple[str | None, float, float, float, tuple[int, str | None, int] | None]:
    """For a candidate of block size ``bs`` caching none of the prompt and not its best holder:
    (the best holder to exclude, prefill(all), and with ``remote`` the fetch time, prefill(rest)
    and plan (reused, source, fetched) of the best remote prefix, None when there is none)."""
    cap = (req.num_prompt_tokens - 1) // bs
    top = hits.top_holder(cap)
    p0 = table.prefill(0)
    if not remote:
        return top, p0, 0.0, 0.0, None
    su = min(req.store_prefix_blocks, cap)
    src, r = hits.best_remote(None, cap, su if su > 0 else 0, STORE_SOURCE)  # excluding anyone but top
    if r <= 0:
        return top, p0, 0.0, 0.0, None
    f = table.store_fetch(r, bs) if src == STORE_SOURCE else table.fetch(r, bs)
    return top, p0, f, table.prefill(r * bs), (r, src, r)


class PolicyKind(enum.Enum):
    RANDOM = "random"
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    LOCAL_CACHE_AWARE = "local_cache_aware"
    GLOBAL_CACHE_AWARE = "global_cache_aware"
    GOODPUT = "goodput"  # SLO-predictive placement with early rejection (router.policy.goodput)
    COLOCATED = "colocated"  # every request runs whole on a decode instance (router.policy.goodput)


AdmissionHook = Callable[[RequestInfo, Placement, ClusterView], Rejection | None]
"""Early-rejection hook: return a :class:`Rejection` to refuse ``placement``, ``None`` to accept."""


def _load_key(inst: InstanceView) -> tuple[int, int, int]:
    return (inst.queued_tokens, inst.running_requests + inst.queued_requests, -inst.free_blocks)


class PlacementPolicy(ABC):
    """Base of all placement policies; see the module docstring for the contract.

    ``clock`` and ``latency`` are injected (simulated time and a latency model in the simulator;
    wall time and profiled models in the router). Policies that predict latency need ``latency``.
    """

    kind: ClassVar[PolicyKind]
    needs_latency: ClassVar[bool] = False

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        latency: LatencyEstimator | None = None,
        admission: Sequence[AdmissionHook] = (),
        overflow_queue_s: float | None = None,
    ) -> None:
        if self.needs_latency and latency is None:
            raise ValueError(f"{type(self).__name__} needs a latency estimator")
        self.clock = clock or MonotonicClock()
        self.latency = latency
        self.estimator = TtftEstimator(latency) if latency is not None else None
        self.admission = tuple(admission)
        self.overflow_queue_s = overflow_queue_s

    # ------------------------------------------------------------------ template
    def place(self, req: RequestInfo, view: ClusterView) -> Placement | Rejection:
        pool = view.with_role(InstanceRole.PREFILL) or view.with_role(InstanceRole.MIXED)
        if not pool:
            return Rejection(RejectReason.NO_INSTANCE, "no prefill or mixed instance is available")
        placement = self.choose_prefill(req, pool, view)
        placement = self._overflow(req, placement, view)
        return self.admit(req, placement, view) or placement

    def admit(self, req: RequestInfo, placement: Placement, view: ClusterView) -> Rejection | None:
        """Early rejection: the first hook that refuses wins. Override to add policy-level checks."""
        for hook in self.admission:
            rej = hook(req, placement, view)
            if rej is not None:
                return rej
        return None

    @abstractmethod
    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        """Pick the instance that prefills ``req`` among ``candidates`` (non-empty)."""

    def choose_decode(self, req: RequestInfo, view: ClusterView, num_blocks: int) -> str | None:
        """Decode instance for a prefilled request needing ``num_blocks`` KV blocks.

        Decode instances with room first (most free blocks), then mixed ones with room, then the
        decode instance with the most free blocks (the request queues there). ``None``: none.
        """
        dec = view.with_role(InstanceRole.DECODE)
        fits = [i for i in dec if i.free_blocks >= num_blocks]
        if not fits:
            fits = [i for i in view.with_role(InstanceRole.MIXED) if i.free_blocks >= num_blocks]
        pool = fits or dec
        if not pool:
            return None
        return self.pick_decode(pool, num_blocks).instance_id

    def pick_decode(self, pool: list[InstanceView], num_blocks: int) -> InstanceView:
        """Pick among decode candidates (non-empty). Default: least loaded."""
        return min(pool, key=lambda i: (-i.free_blocks, i.running_requests + i.queued_requests))

    # ------------------------------------------------------------------ feedback
    def on_finished(self, obs: Observation) -> None:
        """A placed request finished with these measurements (no-op unless the policy learns)."""
        return None

    def release(self, request_id: str) -> None:
        """A placed request ended without an observation (failure, cancel): forget it. No-op here."""
        return None

    # ------------------------------------------------------------------ helpers
    def _overflow(self, req: RequestInfo, placement: Placement, view: ClusterView) -> Placement:
        if self.estimator is None:
            return placement
        limit = self.overflow_queue_s
        if limit is None and req.slo is not None:
            limit = req.slo.ttft_s
        if limit is None or not view.with_role(InstanceRole.PREFILL):
            return placement
        mixed = view.with_role(InstanceRole.MIXED)
        if not mixed or self.estimator.queue_time(view.get(placement.instance_id)) <= limit:
            return placement
        return self.choose_prefill(req, mixed, view)

    def _require_estimator(self) -> TtftEstimator:
        assert self.estimator is not None
        return self.estimator


class RandomPolicy(PlacementPolicy):
    """Uniformly random prefill and decode instances (seeded)."""

    kind = PolicyKind.RANDOM

    def __init__(self, *, seed: int = 0, **kw) -> None:
        super().__init__(**kw)
        self._rng = random.Random(seed)

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        return Placement(self._rng.choice(candidates).instance_id)

    def pick_decode(self, pool: list[InstanceView], num_blocks: int) -> InstanceView:
        return self._rng.choice(pool)


class RoundRobinPolicy(PlacementPolicy):
    """Cycle through candidates (separate cycles for prefill and decode)."""

    kind = PolicyKind.ROUND_ROBIN

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._pre = itertools.count()
        self._dec = itertools.count()

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        return Placement(candidates[next(self._pre) % len(candidates)].instance_id)

    def pick_decode(self, pool: list[InstanceView], num_blocks: int) -> InstanceView:
        return pool[next(self._dec) % len(pool)]


class LeastLoadedPolicy(PlacementPolicy):
    """Fewest queued prompt tokens, then fewest requests, then most free blocks (load balance)."""

    kind = PolicyKind.LEAST_LOADED

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        return Placement(min(candidates, key=_load_key).instance_id)


class LocalCacheAwarePolicy(PlacementPolicy):
    """Minimise predicted TTFT = queue + adapter ready + prefill(tokens not cached *on that
    instance*); among equal predictions the adapter ready soonest, then the least loaded
    (:func:`tie_break`)."""

    kind = PolicyKind.LOCAL_CACHE_AWARE
    needs_latency = True

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        table = TtftTable.of(self._require_estimator(), req)
        # equally fast candidates: the adapter ready soonest, then the least loaded
        return best_prefill_plan(
            req, candidates, view.prefix_hits(req.block_hashes), table, remote=False, least_loaded_ties=True
        )


class GlobalCacheAwarePolicy(PlacementPolicy):
    """Mooncake's Conductor: TTFT = queue + fetch(remote prefix) + prefill(uncached).

    The longest cached prefix anywhere in the cluster (another instance's cache, or the KV store:
    ``req.store_prefix_blocks``) may be pulled to the candidate; it is pulled only when that is
    predicted faster than recomputing the extra blocks locally. Cost per decision: one cached-prefix
    walk per instance plus O(1) per candidate (:func:`best_prefill_plan`). Among equal
    predictions: the adapter ready soonest, then the least loaded (:func:`tie_break`).
    """

    kind = PolicyKind.GLOBAL_CACHE_AWARE
    needs_latency = True

    def choose_prefill(
        self, req: RequestInfo, candidates: list[InstanceView], view: ClusterView
    ) -> Placement:
        table = TtftTable.of(self._require_estimator(), req)
        # equally fast candidates: the adapter ready soonest, then the least loaded
        return best_prefill_plan(
            req, candidates, view.prefix_hits(req.block_hashes), table, remote=True, least_loaded_ties=True
        )


_POLICIES: dict[PolicyKind, type[PlacementPolicy]] = {
    cls.kind: cls
    for cls in (
        RandomPolicy,
        RoundRobinPolicy,
        LeastLoadedPolicy,
        LocalCacheAwarePolicy,
        GlobalCacheAwarePolicy,
    )
}


def make_policy(kind: PolicyKind | str, **kw) -> PlacementPolicy:
    """Build a policy by kind (``PolicyKind`` or its value); ``kw`` go to its constructor."""
    kind = PolicyKind(kind)
    if kind not in _POLICIES:
        from router.policy.goodput import ColocatedPolicy, GoodputAwarePolicy  # imports this module

        _POLICIES.update({c.kind: c for c in (GoodputAwarePolicy, ColocatedPolicy)})
    cls = _POLICIES[kind]
    if kind is not PolicyKind.RANDOM:
        kw.pop("seed", None)
    return cls(**kw)
