"""Quarantine of hung workers (pure: clock injected, no gRPC).

A worker whose call stalled (:mod:`router.progress`) is quarantined: it gets no new traffic until
it answers a health probe again (the router's prober, off the data path, calls its ``Stats`` with
a short deadline). Heartbeats do not lift a quarantine (a wedged engine may keep heartbeating),
and neither does the worker expiring and registering again (a SIGSTOPped worker's heartbeats stop;
on SIGCONT it re-registers): only a successful probe does.

State machine per worker id::

    (none) --quarantine()--> QUARANTINED --probe_result(ok=True)--> (none)   [restored]
                              |    ^
                              +----+ probe_result(ok=False): next probe after a backoff

:meth:`QuarantineBook.due` lists the workers whose next probe is due. Probes back off from
``probe_interval_s`` doubling up to ``max_probe_interval_s`` while they fail. A worker that
deregisters itself (a graceful shutdown) is forgotten (:meth:`QuarantineBook.forget`).
Thread-safe.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class QuarantineReason(enum.Enum):
    """Why a worker was quarantined (the log line's and the gauge's ``reason``)."""

    STALLED_PREFILL = "stalled_prefill"  # a Prefill call missed its deadline
    STALLED_DECODE = "stalled_decode"  # a Decode stream stopped making progress


@dataclass(frozen=True)
class QuarantineConfig:
    """``probe_interval_s``: the first probe comes this long after the quarantine; while probes
    fail the interval doubles, up to ``max_probe_interval_s``; ``probe_timeout_s``: deadline of
    one probe call."""

    probe_interval_s: float = 0.5
    max_probe_interval_s: float = 2.0
    probe_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("probe_interval_s", "max_probe_interval_s", "probe_timeout_s"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"quarantine {name} must be > 0, got {v}")
        if self.max_probe_interval_s < self.probe_interval_s:
            raise ValueError("quarantine max_probe_interval_s must be >= probe_interval_s")


@dataclass(frozen=True)
class QuarantineRecord:
    worker_id: str
    reason: QuarantineReason
    detail: str
    since: float  # clock value when quarantined
    next_probe_at: float
    failed_probes: int = 0


class QuarantineBook:
    """The quarantined workers of one router."""

    def __init__(
        self, config: QuarantineConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config if config is not None else QuarantineConfig()
        self.clock = clock
        self._records: dict[str, QuarantineRecord] = {}
        self._lock = threading.Lock()

    def quarantine(self, worker_id: str, reason: QuarantineReason, detail: str = "") -> bool:
        """Quarantine ``worker_id``; True when it was not already (an existing quarantine keeps
        its first reason and its probe schedule)."""
        now = self.clock()
        with self._lock:
            if worker_id in self._records:
                return False
            self._records[worker_id] = QuarantineRecord(
                worker_id, reason, detail, now, now + self.config.probe_interval_s
            )
            return True

    def is_quarantined(self, worker_id: str) -> bool:
        with self._lock:
            return worker_id in self._records

    def ids(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._records)

    def get(self, worker_id: str) -> QuarantineRecord | None:
        with self._lock:
            return self._records.get(worker_id)

    def records(self) -> list[QuarantineRecord]:
        with self._lock:
            return list(self._records.values())

    def due(self) -> list[QuarantineRecord]:
        """Quarantined workers whose next probe is due now."""
        now = self.clock()
        with self._lock:
            return [r for r in self._records.values() if r.next_probe_at <= now]

    def next_due_in(self) -> float | None:
        """Seconds until the next probe is due (0 when one is due; None: nobody quarantined)."""
        now = self.clock()
        with self._lock:
            if not self._records:
                return None
            return max(0.0, min(r.next_probe_at for r in self._records.values()) - now)

    def probe_result(self, worker_id: str, ok: bool) -> QuarantineRecord | None:
        """Record a probe of ``worker_id``. ``ok``: it answered, the quarantine is lifted; returns
        the lifted record. Not ok: the next probe is scheduled after a doubled interval (bounded);
        returns None. A worker not quarantined (any more) is ignored (None)."""
        now = self.clock()
        with self._lock:
            r = self._records.get(worker_id)
            if r is None:
                return None
            if ok:
                del self._records[worker_id]
                return r
            n = r.failed_probes + 1
            wait = min(self.config.max_probe_interval_s, self.config.probe_interval_s * 2**n)
            self._records[worker_id] = QuarantineRecord(
                r.worker_id, r.reason, r.detail, r.since, now + wait, n
            )
            return None

    def forget(self, worker_id: str) -> bool:
        """Drop ``worker_id``'s quarantine without a probe (it deregistered itself)."""
        with self._lock:
            return self._records.pop(worker_id, None) is not None
