"""Live migration of decoding requests between simulated instances (Llumnix, issue #14).

The *decisions* are the router's: :mod:`router.policy.migration` (virtual usage, load balancing
past a freeness gap, priority headroom) runs unchanged every ``interval_s`` over a
:class:`router.policy.migration.DecodeLoad` snapshot of each decode-capable instance
(:func:`decode_load`). This module holds the configuration, the snapshot and the per-migration
record; :class:`simulator.sim._Run` executes the moves with this cost model:

* the destination allocates blocks stage by stage (``KVCacheManager.extend_blocks``, as the
  engine's migration destination does) and counts as one more running request
  (``SimInstance.in_transfer``) until the switch;
* stage 1 copies the blocks the request holds while it keeps decoding on the source
  (``blocks * block bytes / bandwidth``); each further stage copies the blocks filled or
  extended meanwhile, until at most ``stop_blocks`` blocks remain or ``max_stages`` ran;
* stop-and-copy: at the source's next step boundary the request leaves the batch
  (``Scheduler.pause_request``); after ``stop_copy_s`` (a constant: control round trips, the
  switch) plus the last blocks' copy it joins the destination's batch and the source frees its
  blocks. That pause is the downtime; nothing else of the copy delays the request;
* abort (the request keeps running where it is, the destination frees what it allocated): the
  request finished, was preempted (recompute or swap) or cannot be paused on the source, or the
  destination has no room for a stage.

De-fragmentation (``MigrationReason.DEFRAGMENT`` in ``reasons``; :func:`defrag_decisions`): the
head of an instance's queue (a decode handoff waiting for room, or a waiting request) that no
instance's free blocks can hold gets room made on that instance
(:func:`router.policy.migration.defragment` with ``target``), as the router's rebalancer does
for a request that waits at its decode worker (:mod:`router.rebalancer`).

Not modelled: link contention between concurrent migrations (each gets the full bandwidth;
``max_concurrent`` bounds how many run per instance), drains.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from engine.request import RequestStatus
from router.policy.migration import (
    DecodeLoad,
    MigrationConfig,
    MigrationDecision,
    MigrationReason,
    RunningRequest,
    defragment,
)


class MigrationResult(enum.Enum):
    DONE = "done"
    FINISHED = "finished"  # the request finished on the source before the switch
    PREEMPTED = "preempted"  # the source preempted it mid-copy
    NO_ROOM = "no_room"  # the destination could not allocate a stage's blocks


SIM_REASONS = (MigrationReason.LOAD_BALANCE, MigrationReason.PRIORITY, MigrationReason.DEFRAGMENT)


@dataclass(frozen=True)
class SimMigrationConfig:
    """Periodic live migration in the simulator (``ClusterConfig.migration``; None = off).

    ``policy``: the router's migration policy config. ``interval_s``: how often the policies
    run. ``bandwidth_gb_s``: KV copy bandwidth between two instances, GB/s (assumed default:
    a 100 Gb/s link). ``stop_copy_s``: constant part of the final stop-and-copy (Llumnix reports
    a near-constant ~20-30 ms downtime). ``stop_blocks``: stop-and-copy once at most this many
    blocks remain to copy. ``max_stages``: stages before the stop-and-copy at most.
    ``max_concurrent``: migrations an instance takes part in at once (as source or
    destination). ``reasons``: which policies run (load balancing, priority headroom,
    de-fragmentation; the default leaves de-fragmentation off, as the router's rebalancer
    before #14).
    """

    policy: MigrationConfig = field(default_factory=MigrationConfig)
    interval_s: float = 0.5
    bandwidth_gb_s: float = 12.5
    stop_copy_s: float = 0.02
    stop_blocks: int = 2
    max_stages: int = 8
    max_concurrent: int = 1
    reasons: frozenset[MigrationReason] = frozenset({MigrationReason.LOAD_BALANCE, MigrationReason.PRIORITY})

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and math.isfinite(self.interval_s)):
            raise ValueError(f"migration interval_s must be > 0, got {self.interval_s}")
        if not (self.bandwidth_gb_s > 0 and math.isfinite(self.bandwidth_gb_s)):
            raise ValueError(f"migration bandwidth_gb_s must be > 0, got {self.bandwidth_gb_s}")
        if not (self.stop_copy_s >= 0 and math.isfinite(self.stop_copy_s)):
            raise ValueError(f"migration stop_copy_s must be >= 0, got {self.stop_copy_s}")
        if self.stop_blocks < 0 or self.max_stages < 1 or self.max_concurrent < 1:
            raise ValueError("stop_blocks must be >= 0, max_stages and max_concurrent >= 1")
        unsupported = set(self.reasons) - set(SIM_REASONS)
        if unsupported:
            names = ", ".join(sorted(r.value for r in unsupported))
            raise ValueError(
                f"the simulator's periodic migration runs load_balance, priority and defragment only, not: {names}"
            )


@dataclass
class MigrationRecord:
    """One migration: times in simulated seconds; ``downtime_s``: the request's pause (NaN when
    it never paused); ``blocks_copied``: every block sent, re-sent partial blocks included."""

    request_id: str
    source: str
    destination: str
    reason: MigrationReason
    start: float
    end: float = math.nan
    result: MigrationResult | None = None
    stages: int = 0
    blocks_copied: int = 0
    downtime_s: float = math.nan


def decode_load(inst, migrating: set[str], draining: bool = False) -> DecodeLoad:
    """The migration policies' view of a simulated instance: its pool, its running decodes
    (those not already migrating; a request mid-prefill is not movable), and the blocks its queue
    needs (decode handoffs waiting for room, queued or preempted requests)."""
    kv = inst.kv
    sched = inst.sched
    running = tuple(
        RunningRequest(r.request_id, kv.num_held_blocks(r.request_id), r.priority)
        for r in sched.running
        if r.status is RequestStatus.RUNNING and r.request_id not in migrating and r.is_decoding
    )
    queued = sum(kv.blocks_needed(x.input_len + 1) for x, _ in inst.pending)
    queued += sum(kv.blocks_needed(r.num_tokens + 1) for r in sched.waiting)
    queued += sum(kv.blocks_needed(r.num_tokens + 1) for r in sched.swapped)
    return DecodeLoad(
        inst.instance_id,
        inst.total_blocks,
        kv.num_free_blocks,
        running,
        queued_blocks=queued,
        draining=draining,
    )


def queue_head_blocks(inst) -> int | None:
    """Blocks the head of a simulated instance's queue needs (a decode handoff waiting for room
    first, else the first waiting request); None when nothing waits."""
    kv = inst.kv
    if inst.pending:
        x, _ = inst.pending[0]
        return kv.blocks_needed(x.input_len + 1)
    head = next(iter(inst.sched.waiting), None)
    return None if head is None else kv.blocks_needed(head.num_tokens + 1)


def defrag_decisions(instances, loads, cfg: MigrationConfig) -> list[MigrationDecision]:
    """De-fragmentation over simulated instances (``loads[i]`` is ``instances[i]``'s
    :func:`decode_load`): for each instance whose queue head no instance's free blocks can hold,
    the moves that free room for it there. Pure over the snapshots."""
    live = [x for x in loads if not x.draining]
    most_free = max((x.free_blocks for x in live), default=0)
    out: list[MigrationDecision] = []
    taken: set[str] = set()
    for inst, load in zip(instances, loads, strict=True):
        need = queue_head_blocks(inst)
        if need is None or need <= most_free or load.draining:
            continue
        for d in defragment(loads, need, cfg, target=load.instance_id):
            if d.request_id not in taken:
                out.append(d)
                taken.add(d.request_id)
    return out
