"""Worker registry of the router (pure: clock injected, no gRPC).

Workers register, then heartbeat with their load; a worker silent for ``heartbeat_timeout_s`` is
dropped. The router also counts requests it has in flight on each worker, because heartbeats lag.
Listeners (:meth:`Registry.add_listener`) hear of every change of the set of workers (the
router's health follows it).

Quarantine (:mod:`router.quarantine`): a worker whose call stalled is quarantined
(:meth:`Registry.quarantine`); :meth:`Registry.alive` leaves it out (no new traffic) until
:meth:`Registry.probe_result` reports that it answered a health probe. Heartbeats, expiry and
re-registration do not lift a quarantine; the worker deregistering itself does.

The router's own pauses (SIGSTOP, a VM freeze, a starved process) are not the workers' silence: a
periodic sweep calls :meth:`Registry.tick`; while the last tick is older than
``pause_threshold_s`` nothing is expired (the router, not the workers, stopped), and a tick after
such a gap moves every worker's ``last_seen`` forward by it, so workers get a whole timeout to be
heard again. Without a sweep (no tick ever), expiry is judged on the clock alone.

A worker with calls in flight from this router (:meth:`Registry.add_inflight`) is not dropped for
a silent heartbeat until ``busy_timeout_s``: its calls watch it themselves (a dead worker's call
fails UNAVAILABLE, a hung one misses its progress deadline and is quarantined), and a worker busy
with a long prefill on a starved host may miss heartbeats while it is doing exactly its job
(#12: "a worker that streams is alive"). Every answer or streamed message counts as heard
(:meth:`Registry.seen`).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from router.quarantine import QuarantineBook, QuarantineConfig, QuarantineReason, QuarantineRecord


class WorkerKind(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hash, not Enum's hash(name) in Python (#12)
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class WorkerLoad:
    """A worker's last reported load (heartbeat); ``block_size``/``token_budget``: 0 = not reported."""

    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    block_size: int = 0
    token_budget: int = 0
    # LoRA adapters (heartbeat's adapters_in_slot / _in_host and measured load times): what a
    # request's adapter costs to load here before its prefill (router.policy: TTFT)
    adapters_in_slot: frozenset[str] = frozenset()
    adapters_in_host: frozenset[str] = frozenset()
    adapter_slot_load_s: float = 0.0
    adapter_disk_load_s: float = 0.0
    # how busy its adapter tiers are (router.policy.adapter_cost.AdapterTiers; 0: not reported)
    adapter_slots: int = 0
    adapter_slots_pinned: int = 0
    adapter_slot_waiters: int = 0
    adapter_slot_free_s: float = 0.0
    adapter_reads_queued: int = 0
    # what bounds one request in its KV pool (engine.kv_fit.PoolShape; router.pool_fit): its
    # context and sliding window (0: not reported / full attention)
    max_model_len: int = 0
    sliding_window: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class WorkerEntry:
    worker_id: str
    kind: WorkerKind
    address: str
    model: str
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_seen: float = 0.0
    inflight: int = 0
    draining: bool = False
    # the worker's start-up step-time model (``router.policy.LinearLatency``; None: not reported)
    profile: object | None = None
    # LoRA adapters the worker serves (registration's ``adapters``; router.adapters reads them)
    adapters: tuple[str, ...] = ()


class Registry:
    def __init__(
        self,
        heartbeat_timeout_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        quarantine: QuarantineConfig | None = None,
        pause_threshold_s: float | None = None,
        busy_timeout_s: float | None = None,
    ) -> None:
        if not heartbeat_timeout_s > 0:  # 0 or less: every worker expires as it registers
            raise ValueError(f"heartbeat_timeout_s must be > 0 seconds, got {heartbeat_timeout_s}")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # the silence allowed to a worker with calls in flight (see the module docstring)
        self.busy_timeout_s = (
            max(10 * heartbeat_timeout_s, 30.0) if busy_timeout_s is None else busy_timeout_s
        )
        if self.busy_timeout_s < heartbeat_timeout_s:
            raise ValueError(
                f"busy_timeout_s ({self.busy_timeout_s}) must be >= heartbeat_timeout_s ({heartbeat_timeout_s})"
            )
        # a sweep (tick) gap above this means the router itself was not running
        self.pause_threshold_s = heartbeat_timeout_s / 2 if pause_threshold_s is None else pause_threshold_s
        self._last_tick: float | None = None
        self.pauses_forgiven = 0  # ticks that found the router had been paused
        self.clock = clock
        self.quarantined = QuarantineBook(quarantine, clock)
        self._workers: dict[str, WorkerEntry] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after every change of the set of workers: a registration, a deregistration
        or drop, an expiry (seen when :meth:`alive` runs). It runs in the changing thread, outside
        the registry's lock (so it may read the registry), and must not raise."""
        self._listeners.append(fn)

    def _changed(self) -> None:
        for fn in list(self._listeners):
            fn()

    def register(
        self,
        worker_id: str,
        kind: WorkerKind,
        address: str,
        model: str,
        load: WorkerLoad,
        profile: object | None = None,
        adapters: tuple[str, ...] = (),
    ) -> None:
        with self._lock:
            old = self._workers.get(worker_id)
            self._workers[worker_id] = WorkerEntry(
                worker_id,
                kind,
                address,
                model,
                load,
                self.clock(),
                old.inflight if old else 0,
                profile=profile,
                adapters=tuple(adapters),
            )
        self._changed()

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """False when the worker is unknown (it must register again)."""
        with self._lock:
            w = self._workers.get(worker_id)
            if w is None:
                return False
            w.load = load
            w.last_seen = self.clock()
            return True

    def seen(self, worker_id: str) -> None:
        """Proof of life other than a heartbeat (the router got an answer or a streamed message
        from the worker): it is not expired for silence meanwhile. Its load stays as reported."""
        with self._lock:
            w = self._workers.get(worker_id)
            if w is not None:
                w.last_seen = self.clock()

    def deregister(self, worker_id: str) -> bool:
        """The worker leaves (it said so): forgotten, its quarantine too."""
        self.quarantined.forget(worker_id)
        return self._remove(worker_id)

    def _remove(self, worker_id: str) -> bool:
        with self._lock:
            found = self._workers.pop(worker_id, None) is not None
        if found:
            self._changed()
        return found

    def drop(self, worker_id: str) -> None:
        """Forget a worker now (e.g. after a call to it failed with UNAVAILABLE); a quarantine
        stays (it registers again quarantined)."""
        self._remove(worker_id)

    def quarantine(self, worker_id: str, reason: QuarantineReason, detail: str = "") -> bool:
        """Take ``worker_id`` out of :meth:`alive` until a probe succeeds; True when newly
        quarantined (listeners are told)."""
        new = self.quarantined.quarantine(worker_id, reason, detail)
        if new:
            self._changed()
        return new

    def probe_result(self, worker_id: str, ok: bool) -> QuarantineRecord | None:
        """A health probe of a quarantined worker answered (``ok``) or not; returns the lifted
        record when the worker is back in service (listeners are told)."""
        lifted = self.quarantined.probe_result(worker_id, ok)
        if lifted is not None:
            self._changed()
        return lifted

    def tick(self) -> float:
        """The router's periodic sweep is running (call it at least every ``pause_threshold_s``).
        After a longer gap (the router was paused or starved), every worker's ``last_seen`` moves
        forward by the gap; returns the gap forgiven (0.0 when none)."""
        with self._lock:
            now = self.clock()
            last, self._last_tick = self._last_tick, now
            if last is None or now - last <= self.pause_threshold_s:
                return 0.0
            gap = now - last
            for w in self._workers.values():
                w.last_seen = min(now, w.last_seen + gap)
            self.pauses_forgiven += 1
            return gap

    def _expire(self) -> bool:
        """Drop workers silent for longer than the timeout (``busy_timeout_s`` for one with calls in
        flight) (under the lock); whether any was.
        Nothing is dropped while the sweep's last tick is stale (see the module docstring)."""
        now = self.clock()
        if self._last_tick is not None and now - self._last_tick > self.pause_threshold_s:
            return False
        dead = [
            k
            for k, w in self._workers.items()
            if now - w.last_seen > (self.busy_timeout_s if w.inflight > 0 else self.heartbeat_timeout_s)
        ]
        for k in dead:
            del self._workers[k]
        return bool(dead)

    def alive(self, kind: WorkerKind | None = None, model: str | None = None) -> list[WorkerEntry]:
        out_of_service = self.quarantined.ids()
        with self._lock:
            expired = self._expire()
            out = [
                w
                for w in self._workers.values()
                if (kind is None or w.kind is kind)
                and (model is None or w.model == model)
                and not w.draining
                and w.worker_id not in out_of_service
            ]
        if expired:
            self._changed()
        return out

    def registered(self, kind: WorkerKind, model: str) -> list[WorkerEntry]:
        """Every registered worker of ``kind`` serving ``model``: quarantined and draining ones too
        (they come back), none expired (what :meth:`alive` last dropped)."""
        with self._lock:
            return [w for w in self._workers.values() if w.kind is kind and w.model == model]

    def get(self, worker_id: str) -> WorkerEntry | None:
        with self._lock:
            return self._workers.get(worker_id)

    def add_inflight(self, worker_id: str, delta: int) -> None:
        with self._lock:
            w = self._workers.get(worker_id)
            if w is not None:
                w.inflight = max(0, w.inflight + delta)


def least_loaded(workers: list[WorkerEntry]) -> WorkerEntry | None:
    """Fewest queued + running + router-inflight requests; ties by KV usage, then id."""
    if not workers:
        return None
    return min(
        workers,
        key=lambda w: (w.load.num_waiting + w.load.num_running + w.inflight, w.load.kv_usage, w.worker_id),
    )
