"""Quarantine of stalled workers for the router's servicer: a worker whose call missed its
progress deadline is quarantined (no new traffic, logged, ``pdserve_router_quarantined_workers``)
until it answers a ``Stats`` probe with a short deadline; a task on the event loop probes the
quarantined workers (off the data path) while there are any."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from pdserve.tracing import log_event
from pdserve.v1 import worker_pb2
from router.failover import LostPhase, LostWorker
from router.lifecycle.grpc_calls import call_metadata
from router.quarantine import QuarantineReason, QuarantineRecord
from router.registry import WorkerKind

if TYPE_CHECKING:
    from router.service import GenerateServicer

log = logging.getLogger("router.service")  # the router's log records keep their logger name


class QuarantineProber:
    def __init__(self, svc: GenerateServicer) -> None:
        self.svc = svc
        self._task: asyncio.Task | None = None  # probes quarantined workers while there are any

    def quarantine(self, lost: LostWorker) -> None:
        """Quarantine the stalled worker of ``lost`` (logged once) and make sure it is probed."""
        reason = (
            QuarantineReason.STALLED_PREFILL
            if lost.phase is LostPhase.PREFILL
            else QuarantineReason.STALLED_DECODE
        )
        if self.svc.registry.quarantine(lost.worker_id, reason, lost.detail):
            log_event(
                log,
                "worker quarantined",
                logging.WARNING,
                worker=lost.worker_id,
                reason=reason.value,
                detail=lost.detail,
            )
        self.ensure()

    def ensure(self) -> None:
        """Start the probe task on the running loop unless one runs."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._probe_quarantined())

    async def _probe_quarantined(self) -> None:
        """Probe quarantined workers as they fall due until none is left (the task then ends;
        the next quarantine starts another)."""
        book = self.svc.registry.quarantined
        while True:
            wait = book.next_due_in()
            if wait is None:
                return
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                await asyncio.gather(*(self._probe(r) for r in book.due()))
            except Exception:  # noqa: BLE001 - the prober must outlive a bad moment
                log.exception("quarantine probe failed")
                await asyncio.sleep(book.config.probe_interval_s)

    async def _probe(self, r: QuarantineRecord) -> None:
        """One health probe of quarantined worker ``r``: its ``Stats`` within the probe timeout.
        A worker not registered (it went silent and expired) fails the probe: it registers
        again when it wakes up, and is probed then."""
        registry = self.svc.registry
        w = registry.get(r.worker_id)
        ok, why = False, "not registered"
        if w is not None:
            try:
                await self.svc.stubs.worker(w.address).Stats(
                    worker_pb2.StatsRequest(),
                    timeout=registry.quarantined.config.probe_timeout_s,
                    metadata=call_metadata(),
                )
                ok, why = True, ""
            except grpc.RpcError as e:
                why = f"{e.code().name}: {e.details() or ''}"
        lifted = registry.probe_result(r.worker_id, ok)
        if lifted is not None:
            log_event(
                log,
                "worker restored",
                worker=r.worker_id,
                reason=lifted.reason.value,
                quarantined_s=round(registry.clock() - lifted.since, 3),
            )
        elif not ok:
            log.debug("quarantined worker %s failed its probe: %s", r.worker_id, why)

    def counts(self) -> dict[str, int]:
        """Quarantined workers by role (gauge); a worker not registered counts under its
        quarantine's role guess: decode for a stalled stream, prefill for a stalled Prefill."""
        registry = self.svc.registry
        out = {k.value: 0 for k in WorkerKind}
        for rec in registry.quarantined.records():
            w = registry.get(rec.worker_id)
            if w is not None:
                role = w.kind.value
            else:
                role = (
                    WorkerKind.PREFILL
                    if rec.reason is QuarantineReason.STALLED_PREFILL
                    else WorkerKind.DECODE
                ).value
            out[role] += 1
        return out
