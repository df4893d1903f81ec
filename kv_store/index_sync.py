"""Keep a store node's entries in a shared index in step with what it holds.

A Redis index (:class:`kv_store.redis_index.RedisIndex`) runs without persistence and drops
writes while Redis is unreachable. :class:`IndexSyncer` repairs both: every ``interval_s`` it
probes the index's generation token (created afresh after a Redis restart) and its count of
dropped writes; if either changed since the last successful sync, it calls ``resync`` (the
store re-registers everything it holds and removes stale entries, atomically).

Contract: after Redis is reachable again, a store re-registers within ``interval_s`` plus one
resync call. A failed probe or resync is retried at the next tick; nothing is raised to the
store. :func:`needs_resync` is the pure decision; :meth:`IndexSyncer.tick` is one step (tests
drive it directly); :meth:`IndexSyncer.start` runs ticks on a daemon thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pdserve.errors import PdserveError

log = logging.getLogger(__name__)


@runtime_checkable
class SyncableIndex(Protocol):
    """An index that can lose state and tell (RedisIndex; InMemoryIndex is not one)."""

    @property
    def write_failures(self) -> int: ...

    def ensure_generation(self) -> str:
        """Current generation token, created if missing; raises UnavailableError when down."""
        ...


@dataclass(frozen=True)
class SyncState:
    """What the index looked like at the last successful resync."""

    generation: str | None = None
    write_failures: int = -1


def needs_resync(last: SyncState, generation: str, write_failures: int) -> bool:
    """Pure: resync unless the generation is the one synced against and no write was dropped."""
    return generation != last.generation or write_failures != last.write_failures


class IndexSyncer:
    """Probe ``index`` every ``interval_s`` and call ``resync()`` when it lost our entries."""

    def __init__(
        self,
        index: SyncableIndex,
        resync: Callable[[], object],
        *,
        interval_s: float = 1.0,
        name: str = "kv-index-sync",
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.index = index
        self._resync = resync
        self.interval_s = interval_s
        self.state = SyncState()
        self.resyncs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = name

    def tick(self) -> bool:
        """One probe (and resync if needed). True if it resynced; never raises pdserve errors."""
        try:
            failures = self.index.write_failures  # read first: a failure during resync reruns it
            gen = self.index.ensure_generation()
            if not needs_resync(self.state, gen, failures):
                return False
            self._resync()
        except PdserveError as e:
            log.debug("index sync deferred: %s", e)
            return False
        self.state = SyncState(gen, failures)
        self.resyncs += 1
        return True

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bug must not kill the thread silently forever
                log.exception("index sync tick failed")
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> IndexSyncer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
