"""Drains of one router, whichever front asks for them: the Ray router actor (``pdserve drain``,
``pdserve scale`` down) and the router's Admin service (``pdserve drain WORKER --router ADDR`` on
a ``pdserve serve`` or hand-started cluster).

:meth:`WorkerDrains.drain` stops routing new requests to a worker; a decode worker's running
requests are moved off it by live migration when the router has it on
(:func:`router.drain.drain_decode_worker`, in the background on the data plane's event loop);
the others finish where they are. :meth:`report` gives the migration drain's outcome once it
ended, :meth:`inflight` the requests still there, :meth:`resume` undoes the drain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from router.registry import Registry, WorkerKind

if TYPE_CHECKING:
    from router.service import GenerateServicer


class WorkerDrains:
    """``loop``: returns the event loop the router's data plane runs on (where migrations run);
    called when a drain starts, so a front may build this before its server exists."""

    def __init__(
        self, generate: GenerateServicer, registry: Registry, loop: Callable[[], asyncio.AbstractEventLoop]
    ) -> None:
        self.generate = generate
        self.registry = registry
        self._loop = loop
        self.draining: set[str] = set()
        self._drains: dict[str, Future] = {}  # decode worker id -> its migration drain

    def drain(self, worker_id: str, timeout_s: float = 120.0) -> bool:
        """Stop routing new requests to ``worker_id`` and, for a decode worker on a router with
        migration on, start moving its requests off it (see the module doc). False when the
        router does not know the worker."""
        from router.drain import drain_decode_worker

        w = self.registry.get(worker_id)
        if w is None:
            return False
        w.draining = True
        self.draining.add(worker_id)
        prev = self._drains.get(worker_id)
        if (
            w.kind is WorkerKind.DECODE
            and self.generate.migrator is not None
            and (prev is None or prev.done())
        ):
            self._drains[worker_id] = asyncio.run_coroutine_threadsafe(
                drain_decode_worker(self.generate, worker_id, timeout_s=timeout_s), self._loop()
            )
        return True

    def migrating(self, worker_id: str) -> bool:
        """Whether a migration drain of ``worker_id`` is still running."""
        f = self._drains.get(worker_id)
        return f is not None and not f.done()

    def report(self, worker_id: str) -> dict[str, Any] | None:
        """The migration drain of ``worker_id`` once it ended (:class:`router.drain.DrainReport`
        as a dict; ``error`` when it failed), None while it runs or when there was none."""
        f = self._drains.get(worker_id)
        if f is None or not f.done():
            return None
        if f.cancelled():
            return {"worker_id": worker_id, "error": "cancelled"}
        e = f.exception()
        if e is not None:
            return {"worker_id": worker_id, "error": f"{type(e).__name__}: {e}"}
        return f.result().to_dict()

    def resume(self, worker_id: str) -> bool:
        """Undo :meth:`drain`: route to ``worker_id`` again (a migration drain in progress stops
        starting migrations). False when the router does not know it."""
        self.draining.discard(worker_id)
        f = self._drains.pop(worker_id, None)
        if f is not None:
            f.cancel()
        w = self.registry.get(worker_id)
        if w is None:
            return False
        w.draining = False
        return True

    def inflight(self, worker_id: str) -> int:
        """Requests the router has in flight on ``worker_id`` (0 when unknown)."""
        w = self.registry.get(worker_id)
        return w.inflight if w is not None else 0
