"""Draining a decode worker with live migration (Llumnix): the router stops routing new requests
to it and moves the requests it decodes there to other decode workers while they keep streaming,
instead of waiting for them to finish or re-prefilling them elsewhere.

:func:`drain_decode_worker` (on the servicer's event loop) marks the worker draining, then until
no request of this router runs there (or ``timeout_s``): asks
:func:`router.policy.migration.drain` where each decoding request goes (the freest worker that
fits it) and starts those migrations (reason ``drain``; at most ``max_concurrent`` in flight,
none twice at once). A request whose migration aborted (no destination with room, a worker lost,
the request finishing meanwhile) is not tried again: it finishes where it is (the fallback:
waiting; a worker that dies meanwhile re-dispatches it as always). Requests still prefilling or
being handed off to the worker are moved once they decode there. With migration off
(``RouterConfig.migration``) the drain only waits.

``pdserve drain WORKER`` and ``pdserve scale`` (down) reach it through the router actor's
``drain`` (:mod:`pdserve.ray_actors`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.errors import InvalidRequestError, RequestNotFoundError
from router.lifecycle.grpc_migrator import MigrationOutcome
from router.policy.migration import DecodeLoad, MigrationConfig, drain
from router.rebalancer import decode_loads, start_moves
from router.registry import WorkerKind

if TYPE_CHECKING:
    from router.service import GenerateServicer


@dataclass(frozen=True)
class DrainReport:
    """``migrated``: requests moved off the worker; ``aborted``: migrations that did not move
    theirs (those requests finished in place, or are still there); ``remaining``: requests of
    this router still on the worker at the end; ``drained``: none remained."""

    worker_id: str
    migrated: int
    aborted: int
    remaining: int
    drained: bool
    elapsed_s: float

    def to_dict(self) -> dict[str, object]:
        return {
            "worker_id": self.worker_id,
            "migrated": self.migrated,
            "aborted": self.aborted,
            "remaining": self.remaining,
            "drained": self.drained,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _on_worker(svc: GenerateServicer, worker_id: str) -> set[str]:
    """Requests of this router whose decode worker is ``worker_id`` (any live state)."""
    return {rid for rid, d in svc.running().items() if d.m.decode_id == worker_id and not d.m.terminal}


async def drain_decode_worker(
    svc: GenerateServicer,
    worker_id: str,
    *,
    policy: MigrationConfig | None = None,
    max_concurrent: int = 4,
    timeout_s: float = 120.0,
    poll_s: float = 0.05,
) -> DrainReport:
    """Drain decode worker ``worker_id`` (see the module doc); returns when no request of this
    router runs there, or after ``timeout_s`` (the worker stays draining either way). Raises
    RequestNotFoundError for an unknown worker, InvalidRequestError for a prefill worker or a
    bad bound."""
    if max_concurrent < 1 or timeout_s <= 0 or poll_s <= 0:
        raise InvalidRequestError("drain: max_concurrent >= 1, timeout_s > 0 and poll_s > 0 are required")
    w = svc.registry.get(worker_id)
    if w is None:
        raise RequestNotFoundError(f"no worker {worker_id!r} is registered with this router")
    if w.kind is not WorkerKind.DECODE:
        raise InvalidRequestError(
            f"worker {worker_id!r} is a {w.kind.value} worker: only decode workers are drained by migration"
        )
    w.draining = True
    cfg = policy if policy is not None else MigrationConfig(max_decisions=max_concurrent)
    t0 = time.monotonic()
    given_up: set[str] = set()  # their migration aborted: they finish here
    pending: dict[str, asyncio.Future] = {}
    migrated = aborted = 0
    while True:
        for rid, fut in list(pending.items()):
            if fut.done():
                del pending[rid]
                outcome: MigrationOutcome | None = None if fut.cancelled() else fut.result()
                if outcome is not None and outcome.migrated:
                    migrated += 1
                else:
                    aborted += 1
                    given_up.add(rid)
        on = _on_worker(svc, worker_id)
        if not on and not pending:
            break
        if time.monotonic() - t0 >= timeout_s:
            break
        if svc.migrator is not None and len(pending) < max_concurrent:
            busy = svc.migrations.in_flight() | given_up
            loads = [_without(x, busy) for x in decode_loads(svc, include=(worker_id,))]
            if any(x.instance_id == worker_id for x in loads):
                decisions = drain(loads, worker_id, cfg)[: max_concurrent - len(pending)]
                for d, fut in start_moves(svc, decisions):
                    pending[d.request_id] = fut
        await asyncio.sleep(poll_s)
    remaining = len(_on_worker(svc, worker_id))
    return DrainReport(worker_id, migrated, aborted, remaining, remaining == 0, time.monotonic() - t0)


def _without(load: DecodeLoad, busy: set[str]) -> DecodeLoad:
    from dataclasses import replace

    return replace(load, running=tuple(r for r in load.running if r.request_id not in busy))
