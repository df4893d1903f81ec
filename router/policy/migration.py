"""Llumnix's live-migration policies (OSDI'24), pure: which running request to move, from which
decode instance to which, and why. Shared by the router and the simulator; no I/O, no clock.

Load is Llumnix's *freeness*: ``F = (M - virtual_usage) / B`` with ``M`` the instance's KV
blocks and ``B`` its batch size (running requests, at least 1). The *virtual usage* is more
than the blocks the running requests hold:

* running: the blocks they hold (physical usage);
* queued: the blocks the requests waiting there need (their demand makes the instance look
  loaded, so running requests move out and the queue drains);
* priority headroom: ``MigrationConfig.priority_headroom_blocks`` for every high-priority request
  running there (``priority <= high_priority``; lower value = more important, as the engine):
  room kept free so it never waits for blocks and shares its batch with fewer requests;
* draining: an instance being drained has infinite virtual usage (freeness ``-inf``): it is
  always a source, never a destination.

Policies (each returns :class:`MigrationDecision` s, never acts):

* :func:`balance`: from the least free to the most free instance when their freeness gap passes
  ``balance_threshold`` (blocks per batch slot).
* :func:`defragment`: a request no single instance can hold (its blocks exceed every instance's
  free blocks) gets room: the fewest, smallest running requests of the instance closest to
  fitting it move to instances with room, freeing enough contiguous capacity there.
* :func:`protect_priority`: an instance whose free blocks are below its priority headroom moves
  low-priority requests out.
* :func:`drain`: every running request of a draining instance goes elsewhere (most free first).

The request to move (:func:`pick_request`) is the least important, then the one holding the
fewest blocks (the cheapest to copy: Llumnix prefers short sequences).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class MigrationReason(enum.Enum):
    LOAD_BALANCE = "load_balance"
    DEFRAGMENT = "defragment"
    PRIORITY = "priority"
    DRAIN = "drain"


@dataclass(frozen=True)
class RunningRequest:
    """A request decoding on an instance: its id, the KV blocks it holds, its priority, and the
    LoRA adapter it runs with ("" = the base model; only an instance serving it can take it)."""

    request_id: str
    num_blocks: int
    priority: int = 0
    adapter: str = ""


@dataclass(frozen=True)
class DecodeLoad:
    """One decode instance as the migration policies see it. ``queued_blocks``: blocks the
    requests queued there need (admission backlog); ``draining``: being emptied."""

    instance_id: str
    total_blocks: int
    free_blocks: int
    running: tuple[RunningRequest, ...] = ()
    queued_blocks: int = 0
    draining: bool = False
    adapters: frozenset[str] = frozenset()  # LoRA adapters the instance serves

    def __post_init__(self) -> None:
        if self.total_blocks < 1 or not 0 <= self.free_blocks <= self.total_blocks:
            raise ValueError(
                f"instance {self.instance_id!r}: free_blocks {self.free_blocks} must be in [0, total_blocks "
                f"{self.total_blocks}] and total_blocks >= 1"
            )
        if self.queued_blocks < 0:
            raise ValueError(f"instance {self.instance_id!r}: queued_blocks must be >= 0")


@dataclass(frozen=True)
class MigrationConfig:
    """``balance_threshold``: freeness gap (blocks per batch slot) that triggers a balancing
    migration. ``high_priority``: requests with ``priority <=`` this are high-priority.
    ``priority_headroom_blocks``: blocks kept free per high-priority running request.
    ``max_decisions``: decisions one call returns at most."""

    balance_threshold: float = 8.0
    high_priority: int = -1
    priority_headroom_blocks: int = 0
    max_decisions: int = 1

    def __post_init__(self) -> None:
        if not self.balance_threshold >= 0:
            raise ValueError(f"balance_threshold must be >= 0, got {self.balance_threshold}")
        if self.priority_headroom_blocks < 0:
            raise ValueError(f"priority_headroom_blocks must be >= 0, got {self.priority_headroom_blocks}")
        if self.max_decisions < 1:
            raise ValueError(f"max_decisions must be >= 1, got {self.max_decisions}")


@dataclass(frozen=True)
class MigrationDecision:
    request_id: str
    source: str
    destination: str
    reason: MigrationReason
    num_blocks: int  # blocks the request holds (what the copy moves)


# ------------------------------------------------------------------ load


def priority_headroom(load: DecodeLoad, cfg: MigrationConfig) -> int:
    """Blocks kept free on ``load`` for its high-priority running requests."""
    n = sum(1 for r in load.running if r.priority <= cfg.high_priority)
    return n * cfg.priority_headroom_blocks


def virtual_usage(load: DecodeLoad, cfg: MigrationConfig) -> float:
    """Running (physical) + queued demand + priority headroom; ``inf`` while draining."""
    if load.draining:
        return math.inf
    return (load.total_blocks - load.free_blocks) + load.queued_blocks + priority_headroom(load, cfg)


def freeness(load: DecodeLoad, cfg: MigrationConfig) -> float:
    """Llumnix's load metric: ``(total - virtual usage) / max(1, running)``; lower = more loaded
    (negative when the virtual usage exceeds the pool; ``-inf`` while draining)."""
    return (load.total_blocks - virtual_usage(load, cfg)) / max(1, len(load.running))


def pick_request(running: Iterable[RunningRequest], exclude: Iterable[str] = ()) -> RunningRequest | None:
    """The request to move: least important (highest priority value), then fewest blocks, then id."""
    ex = set(exclude)
    cands = [r for r in running if r.request_id not in ex]
    if not cands:
        return None
    return min(cands, key=lambda r: (-r.priority, r.num_blocks, r.request_id))


def _room(load: DecodeLoad, cfg: MigrationConfig) -> int:
    """Blocks a destination can take without eating its priority headroom (or its queue's)."""
    if load.draining:
        return 0
    return load.free_blocks - priority_headroom(load, cfg) - load.queued_blocks


def _serves(dest: DecodeLoad, req: RunningRequest) -> bool:
    """Whether ``dest`` can run ``req``: the base model, or an adapter it serves."""
    return not req.adapter or req.adapter in dest.adapters


def _fits(req: RunningRequest, dest: DecodeLoad, cfg: MigrationConfig) -> bool:
    # +1: the request's next token may need a fresh block right after the move
    return _serves(dest, req) and req.num_blocks + 1 <= _room(dest, cfg)


# ------------------------------------------------------------------ policies


def balance(loads: Sequence[DecodeLoad], cfg: MigrationConfig) -> list[MigrationDecision]:
    """Move requests from the least free to the most free instance while their freeness gap
    exceeds ``cfg.balance_threshold`` (at most ``cfg.max_decisions``; a move that would not
    narrow the gap, or does not fit the destination, is not made). Draining instances are left
    to :func:`drain`."""
    live = [x for x in loads if not x.draining]
    out: list[MigrationDecision] = []
    state = {x.instance_id: x for x in live}
    moved: set[str] = set()
    while len(out) < cfg.max_decisions and len(state) >= 2:
        ranked = sorted(state.values(), key=lambda x: (freeness(x, cfg), x.instance_id))
        src, dst = ranked[0], ranked[-1]
        gap = freeness(dst, cfg) - freeness(src, cfg)
        if gap <= cfg.balance_threshold:
            break
        req = pick_request((r for r in src.running if _serves(dst, r)), moved)
        if req is None or not _fits(req, dst, cfg):
            break
        new_src, new_dst = _moved(src, dst, req)
        if freeness(new_dst, cfg) < freeness(new_src, cfg) - cfg.balance_threshold:
            break  # the move would overshoot the other way (ping-pong): not taken
        out.append(
            MigrationDecision(
                req.request_id, src.instance_id, dst.instance_id, MigrationReason.LOAD_BALANCE, req.num_blocks
            )
        )
        moved.add(req.request_id)
        state[src.instance_id], state[dst.instance_id] = new_src, new_dst
    return out


def _moved(src: DecodeLoad, dst: DecodeLoad, req: RunningRequest) -> tuple[DecodeLoad, DecodeLoad]:
    """The two loads after ``req`` moved from ``src`` to ``dst`` (planning several moves)."""
    s = DecodeLoad(
        src.instance_id,
        src.total_blocks,
        src.free_blocks + req.num_blocks,
        tuple(r for r in src.running if r.request_id != req.request_id),
        src.queued_blocks,
        src.draining,
        src.adapters,
    )
    d = DecodeLoad(
        dst.instance_id,
        dst.total_blocks,
        dst.free_blocks - req.num_blocks,
        (*dst.running, req),
        dst.queued_blocks,
        dst.draining,
        dst.adapters,
    )
    return s, d


def defragment(
    loads: Sequence[DecodeLoad], need_blocks: int, cfg: MigrationConfig, target: str | None = None
) -> list[MigrationDecision]:
    """Free room for a request of ``need_blocks`` blocks that no instance can hold now: on the
    instance that needs the fewest moves (``target``: on that instance only, e.g. where the
    request already waits), move its smallest (least important first) requests to other
    instances with room until ``need_blocks`` are free there. Empty when one instance fits it
    already, or when no plan frees enough (nothing is half done)."""
    live = [x for x in loads if not x.draining]
    if any(x.free_blocks >= need_blocks for x in live):
        return []
    best: list[MigrationDecision] | None = None
    for target_load in sorted(live, key=lambda x: (-x.free_blocks, x.instance_id)):
        if target is not None and target_load.instance_id != target:
            continue
        if target_load.total_blocks < need_blocks:
            continue
        target_load_id = target_load.instance_id
        plan = _clear(target_load, [x for x in live if x.instance_id != target_load_id], need_blocks, cfg)
        if plan is not None and (best is None or len(plan) < len(best)):
            best = plan
    return best or []


def _clear(
    target: DecodeLoad, others: list[DecodeLoad], need: int, cfg: MigrationConfig
) -> list[MigrationDecision] | None:
    free = target.free_blocks
    dests = {x.instance_id: x for x in others}
    plan: list[MigrationDecision] = []
    for req in sorted(target.running, key=lambda r: (-r.priority, r.num_blocks, r.request_id)):
        if free >= need:
            break
        fitting = [d for d in dests.values() if _fits(req, d, cfg)]
        if not fitting:
            continue
        dest = max(fitting, key=lambda d: (_room(d, cfg), d.instance_id))
        plan.append(
            MigrationDecision(
                req.request_id,
                target.instance_id,
                dest.instance_id,
                MigrationReason.DEFRAGMENT,
                req.num_blocks,
            )
        )
        dests[dest.instance_id] = _moved(target, dest, req)[1]
        free += req.num_blocks
    return plan if free >= need else None


def protect_priority(loads: Sequence[DecodeLoad], cfg: MigrationConfig) -> list[MigrationDecision]:
    """On each instance whose free blocks are below its priority headroom, move its least
    important (non-high-priority) requests to instances with room until the headroom is free."""
    out: list[MigrationDecision] = []
    state = {x.instance_id: x for x in loads}
    for inst in sorted(loads, key=lambda x: x.instance_id):
        cur = state[inst.instance_id]
        short = priority_headroom(cur, cfg) - cur.free_blocks
        low = [r for r in cur.running if r.priority > cfg.high_priority]
        while short > 0 and len(out) < cfg.max_decisions:
            req = pick_request(low)
            if req is None:
                break
            low = [r for r in low if r.request_id != req.request_id]
            others = [d for k, d in state.items() if k != cur.instance_id and _fits(req, d, cfg)]
            if not others:
                continue
            dest = max(others, key=lambda d: (freeness(d, cfg), d.instance_id))
            out.append(
                MigrationDecision(
                    req.request_id,
                    cur.instance_id,
                    dest.instance_id,
                    MigrationReason.PRIORITY,
                    req.num_blocks,
                )
            )
            cur, state[dest.instance_id] = _moved(cur, dest, req)
            state[cur.instance_id] = cur
            short -= req.num_blocks
    return out


def drain(loads: Sequence[DecodeLoad], instance_id: str, cfg: MigrationConfig) -> list[MigrationDecision]:
    """Every running request of ``instance_id`` to the freest instance that fits it (most
    important and largest first, so the hardest to place gets the most room). A request that
    fits nowhere now is left out (the caller retries, or lets it finish in place)."""
    state = {x.instance_id: x for x in loads}
    src = state.get(instance_id)
    if src is None:
        raise KeyError(f"no decode instance {instance_id!r} to drain")
    out: list[MigrationDecision] = []
    for req in sorted(src.running, key=lambda r: (r.priority, -r.num_blocks, r.request_id)):
        others = [d for k, d in state.items() if k != instance_id and _fits(req, d, cfg)]
        if not others:
            continue
        dest = max(others, key=lambda d: (freeness(d, cfg), d.instance_id))
        out.append(
            MigrationDecision(
                req.request_id, instance_id, dest.instance_id, MigrationReason.DRAIN, req.num_blocks
            )
        )
        state[dest.instance_id] = _moved(src, dest, req)[1]
    return out
