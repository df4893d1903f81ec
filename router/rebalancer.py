"""Periodic rebalancing of decode workers by live migration (Llumnix), on the router's event loop.

Every ``RebalanceConfig.interval_s`` the :class:`Rebalancer` reads the decode workers' loads
(:func:`decode_loads`: each worker's KV blocks from its heartbeats, the requests this router
decodes there with the blocks their tokens fill and their priority), asks the pure policies of
:mod:`router.policy.migration` for moves (:func:`plan`: priority headroom first, then
de-fragmentation for a request handed to a worker that has waited ``defrag_wait_s`` without a
token and that no worker's free blocks can hold (:func:`waiting_requests`,
:func:`defrag_targets`: room is made on the worker it waits at), then load balancing past the
freeness gap ``balance_threshold``) and starts them with
``GenerateServicer.migrate``. At most ``max_concurrent`` migrations run at once (drains'
included), and a request already being moved is never picked again until its migration ended.

The decision (:func:`plan`) is pure; only :func:`decode_loads` and :class:`Rebalancer` read the
servicer. Requests queued at a worker are not known to the router (only its heartbeat's count):
``queued_blocks`` is 0, so the virtual usage is running blocks + priority headroom.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pdserve.errors import PdserveError
from pdserve.tracing import log_event
from router.lifecycle.states import LifecycleError, State
from router.policy.migration import (
    DecodeLoad,
    MigrationConfig,
    MigrationDecision,
    RunningRequest,
    balance,
    defragment,
    protect_priority,
)
from router.registry import WorkerKind

if TYPE_CHECKING:
    from router.service import GenerateServicer

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16  # a worker that reported no block size (old heartbeat): the engine default


@dataclass(frozen=True)
class RebalanceConfig:
    """``interval_s``: seconds between two passes (0: no rebalancing). ``max_concurrent``:
    migrations in flight at once, at most. ``policy``: the Llumnix thresholds
    (``balance_threshold``, ``priority_headroom_blocks``, ``high_priority``, ``max_decisions``)."""

    interval_s: float = 0.0
    max_concurrent: int = 2
    policy: MigrationConfig = field(default_factory=MigrationConfig)
    # De-fragmentation: a request handed to a decode worker that has not started decoding for
    # this long, whose KV no decode worker's free blocks can hold, gets room made on its worker
    # (router.policy.migration.defragment). None: no de-fragmentation.
    defrag_wait_s: float | None = 2.0

    def __post_init__(self) -> None:
        if not self.interval_s >= 0 or math.isinf(self.interval_s):
            raise ValueError(f"rebalance interval_s must be a finite number >= 0, got {self.interval_s}")
        if self.defrag_wait_s is not None and not (
            self.defrag_wait_s >= 0 and math.isfinite(self.defrag_wait_s)
        ):
            raise ValueError(
                f"rebalance defrag_wait_s must be a finite number >= 0, got {self.defrag_wait_s}"
            )
        if self.max_concurrent < 1:
            raise ValueError(f"rebalance max_concurrent must be >= 1, got {self.max_concurrent}")


# ---------------------------------------------------------------------------- pure decision
@dataclass(frozen=True)
class WaitingRequest:
    """A request handed to decode worker ``instance_id`` that has not started decoding there
    since ``since`` (the router's clock): its KV of ``need_blocks`` blocks may be queued for
    room (the router cannot see a worker's queue, only how long its request waits)."""

    request_id: str
    instance_id: str
    need_blocks: int
    since: float


def defrag_targets(
    loads: Sequence[DecodeLoad], waiting: Iterable[WaitingRequest], now: float, wait_s: float
) -> list[WaitingRequest]:
    """The waiting requests de-fragmentation is for: waited at least ``wait_s``, on a worker of
    ``loads`` that is not draining, and no single non-draining worker's free blocks hold them
    (a request one worker can hold is balancing's or admission's business). Longest waiting
    first. Pure."""
    live = {x.instance_id: x for x in loads if not x.draining}
    most_free = max((x.free_blocks for x in live.values()), default=0)
    out = [
        w for w in waiting if w.instance_id in live and now - w.since >= wait_s and w.need_blocks > most_free
    ]
    return sorted(out, key=lambda w: (w.since, w.request_id))


def plan(
    loads: Sequence[DecodeLoad],
    cfg: MigrationConfig,
    busy: Iterable[str],
    slots: int,
    defrag: Sequence[WaitingRequest] = (),
) -> list[MigrationDecision]:
    """The moves to start now: :func:`~router.policy.migration.protect_priority`, then for each
    request of ``defrag`` (:func:`defrag_targets`) :func:`~router.policy.migration.defragment`
    on the worker it waits at, then :func:`~router.policy.migration.balance` on the loads after
    those moves' sources; requests in ``busy`` (being migrated) are not candidates; at most
    ``slots`` decisions and at most one per request. Pure."""
    if slots <= 0:
        return []
    taken = set(busy)
    live = [replace(x, running=tuple(r for r in x.running if r.request_id not in taken)) for x in loads]
    out: list[MigrationDecision] = []
    for d in protect_priority(live, cfg):
        if d.request_id not in taken and len(out) < slots:
            out.append(d)
            taken.add(d.request_id)
    for w in defrag:
        if len(out) >= slots:
            break
        live = [replace(x, running=tuple(r for r in x.running if r.request_id not in taken)) for x in live]
        for d in defragment(live, w.need_blocks, cfg, target=w.instance_id):
            if d.request_id not in taken and len(out) < slots:
                out.append(d)
                taken.add(d.request_id)
    if len(out) < slots:
        live = [replace(x, running=tuple(r for r in x.running if r.request_id not in taken)) for x in live]
        for d in balance(live, cfg):
            if d.request_id not in taken and len(out) < slots:
                out.append(d)
                taken.add(d.request_id)
    return out


# ---------------------------------------------------------------------------- servicer reads
def decode_loads(svc: GenerateServicer, include: Iterable[str] = ()) -> list[DecodeLoad]:
    """The decode workers of ``svc``'s model as the migration policies see them: routable ones
    and those named in ``include`` (a draining worker; ``draining`` set from the registry).
    Workers that reported no KV capacity yet are left out. Running requests: those this router
    decodes there (state DECODING), with the KV blocks their prompt + output fill; a worker's
    used blocks are at least theirs (its last heartbeat may predate them)."""
    reg = svc.registry
    workers = {w.worker_id: w for w in reg.alive(WorkerKind.DECODE, svc.config.model_id)}
    for wid in include:
        w = reg.get(wid)
        if w is not None and w.kind is WorkerKind.DECODE:
            workers[wid] = w
    running: dict[str, list[RunningRequest]] = {wid: [] for wid in workers}
    for rid, driver in svc.running().items():
        if driver.state is not State.DECODING:
            continue
        wid = driver.m.decode_id
        if wid not in running:
            continue
        legs = driver.legs
        w = workers[wid]
        bs = w.load.block_size or DEFAULT_BLOCK_SIZE
        tokens = len(legs.run.ids) + len(legs.run.out_ids)  # type: ignore[attr-defined]
        prio = int(getattr(legs.req, "priority", 0))  # type: ignore[attr-defined]
        adapter = str(getattr(legs.req, "adapter", ""))  # type: ignore[attr-defined]
        running[wid].append(RunningRequest(rid, max(1, -(-tokens // bs)), prio, adapter))
    out = []
    for wid, w in sorted(workers.items()):
        total = w.load.kv_blocks_total
        if total < 1:
            continue
        # the heartbeat's count lags: at least the blocks of the requests known to run there
        used = max(w.load.kv_blocks_used, sum(r.num_blocks for r in running[wid]))
        free = min(total, max(0, total - used))
        out.append(DecodeLoad(wid, total, free, tuple(running[wid]), 0, w.draining, frozenset(w.adapters)))
    return out


def waiting_requests(svc: GenerateServicer) -> list[WaitingRequest]:
    """The requests ``svc`` handed to a decode worker that has not sent a token yet (state
    HANDING_OFF), with the blocks their prompt + output so far need there and when they entered
    that state (their lifecycle's clock: the router's monotonic clock)."""
    reg = svc.registry
    out = []
    for rid, driver in svc.running().items():
        m = driver.m
        if (
            driver.state is not State.HANDING_OFF
            or not m.history
            or m.history[-1].dst is not State.HANDING_OFF
        ):
            continue
        w = reg.get(m.decode_id) if m.decode_id else None
        if w is None:
            continue
        bs = w.load.block_size or DEFAULT_BLOCK_SIZE
        run = getattr(driver.legs, "run", None)
        if run is None:
            continue
        tokens = len(run.ids) + len(run.out_ids) + 1  # the next token's slot too
        out.append(WaitingRequest(rid, m.decode_id, -(-tokens // bs), m.history[-1].at))
    return out


def start_moves(
    svc: GenerateServicer, decisions: Iterable[MigrationDecision]
) -> list[tuple[MigrationDecision, asyncio.Future]]:
    """Start each decision with ``svc.migrate`` (on its event loop); the ones started with their
    outcome futures. A request that ended, is not decoding any more, or is already being moved
    is skipped (logged)."""
    started = []
    for d in decisions:
        try:
            fut = svc.migrate(d.request_id, d.destination, d.reason)
        except (PdserveError, LifecycleError) as e:
            log_event(log, "migration skipped", logging.DEBUG, cluster_request_id=d.request_id, error=str(e))
            continue
        log_event(
            log,
            "migration started",
            cluster_request_id=d.request_id,
            source=d.source,
            destination=d.destination,
            reason=d.reason.value,
            blocks=d.num_blocks,
        )
        started.append((d, fut))
    return started


class Rebalancer:
    """The rebalancing loop of ``svc`` (see the module doc). :meth:`tick` is one pass;
    :meth:`start` runs the loop on the servicer's event loop until :meth:`stop`."""

    def __init__(
        self, svc: GenerateServicer, cfg: RebalanceConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``clock``: the clock the requests' lifecycles run on (the router's monotonic one)."""
        if cfg.interval_s > 0 and svc.migrator is None:
            raise ValueError("rebalancing moves requests by live migration: turn migration on")
        self.svc = svc
        self.cfg = cfg
        self.clock = clock
        self._future: Future | None = None

    def tick(self) -> list[MigrationDecision]:
        """One pass (on the servicer's loop): the moves it started."""
        busy = self.svc.migrations.in_flight()
        slots = self.cfg.max_concurrent - len(busy)
        loads = decode_loads(self.svc)
        defrag: list[WaitingRequest] = []
        if self.cfg.defrag_wait_s is not None and slots > 0:
            defrag = defrag_targets(loads, waiting_requests(self.svc), self.clock(), self.cfg.defrag_wait_s)
        decisions = plan(loads, self.cfg.policy, busy, slots, defrag)
        return [d for d, _ in start_moves(self.svc, decisions)]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - one bad pass must not end rebalancing
                log_event(log, "rebalance pass failed", logging.WARNING, error=f"{type(e).__name__}: {e}")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the loop on ``loop`` (the servicer's event loop, from another thread); no-op when
        ``interval_s`` is 0."""
        if self.cfg.interval_s > 0 and self._future is None:
            self._future = asyncio.run_coroutine_threadsafe(self.run(), loop)

    def stop(self) -> None:
        if self._future is not None:
            self._future.cancel()
            self._future = None
