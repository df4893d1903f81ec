"""The router's grpc.health.v1 status: SERVING exactly while it can place a request.

Pure part: :func:`needed_kinds` / :func:`missing_kinds` say which kinds of worker a placement
policy needs (a decode worker always; a prefill worker unless the policy is ``colocated``, whose
decode workers run whole requests) and which of them the cluster lacks. The router's Generate
refuses a request with UNAVAILABLE on the same condition (``GenerateServicer._place``).

I/O part: :class:`RouterHealth` sets the status of the overall service ``""`` and of the Generate
service on a ``grpc_health`` HealthServicer (Check and Watch callers both see it) whenever the
registry's set of workers changes (register, deregister, drop: a registry listener), and sweeps
the registry every ``sweep_interval_s`` so that workers that went silent (expiry happens when the
registry is read) and draining workers are noticed without a request. The Registry service itself
is left SERVING: workers must be able to register with a router that has none.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2

from router.policy import PolicyKind
from router.registry import Registry, WorkerKind

if TYPE_CHECKING:
    from router.service import RouterConfig

log = logging.getLogger(__name__)

GENERATE_SERVICE = "pdserve.v1.Generate"
HEALTH_SERVICES = ("", GENERATE_SERVICE)  # what the router's health reports on ("": overall)


def needed_kinds(policy: PolicyKind) -> tuple[WorkerKind, ...]:
    """Kinds of worker ``policy`` needs to place any request, decode first."""
    if policy is PolicyKind.COLOCATED:
        return (WorkerKind.DECODE,)
    return (WorkerKind.DECODE, WorkerKind.PREFILL)


def missing_kinds(policy: PolicyKind, alive: Mapping[WorkerKind, int]) -> list[WorkerKind]:
    """Needed kinds with no live worker in ``alive`` (count per kind); empty = can serve."""
    return [k for k in needed_kinds(policy) if alive.get(k, 0) <= 0]


class RouterHealth:
    """Keeps ``servicer``'s status of ``services`` equal to whether the router can place a request
    for ``model_id`` under ``policy`` (several ids: for any of them). :meth:`update` is called by the registry on every change;
    :meth:`start` adds the periodic sweep, :meth:`stop` ends it."""

    def __init__(
        self,
        registry: Registry,
        model_id: str | Sequence[str],
        policy: PolicyKind,
        servicer: health.HealthServicer,
        *,
        services: Sequence[str] = HEALTH_SERVICES,
        sweep_interval_s: float = 0.5,
    ) -> None:
        if sweep_interval_s <= 0:
            raise ValueError(f"sweep_interval_s must be > 0, got {sweep_interval_s}")
        self.registry = registry
        self.model_id = model_id
        # the served models: one, or several (a router serving several base models)
        self._models: tuple[str, ...] = (model_id,) if isinstance(model_id, str) else tuple(model_id)
        if not self._models:
            raise ValueError("RouterHealth needs at least one model id")
        self.policy = policy
        self.servicer = servicer
        self.services = tuple(services)
        self.sweep_interval_s = sweep_interval_s
        # a sweep late by a few intervals means the router itself stopped (Registry.tick)
        registry.pause_threshold_s = max(registry.pause_threshold_s, 3 * sweep_interval_s)
        self._lock = threading.RLock()
        self._updating = False  # an update is running in the thread holding the lock
        self._serving: bool | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        registry.add_listener(self.update)
        self.update()

    @property
    def serving(self) -> bool:
        """The status last set."""
        return bool(self._serving)

    def update(self) -> bool:
        """Recompute the status from the registry and set it (logged when it changes); returns
        whether the router is serving. Reading the registry may expire workers, which calls this
        again from inside: that nested call returns at once (the outer one reads after it)."""
        with self._lock:
            if self._updating:
                return self.serving
            self._updating = True
            try:
                per_model = {m: {k: len(self.registry.alive(k, m)) for k in WorkerKind} for m in self._models}
            finally:
                self._updating = False
            # several base models (router.multi_model): serving while any of them can place
            ready = [m for m, counts in per_model.items() if not missing_kinds(self.policy, counts)]
            model = ready[0] if ready else self._models[0]
            alive = per_model[model]
            missing = missing_kinds(self.policy, alive)
            serving = bool(ready)
            if serving != self._serving:
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if serving
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in self.services:
                    self.servicer.set(name, status)
                self._serving = serving
                if serving:
                    log.info("health: SERVING (%s)", ", ".join(f"{k.value}={n}" for k, n in alive.items()))
                else:
                    log.warning(
                        "health: NOT_SERVING (no %s worker registered for %r)",
                        " and no ".join(k.value for k in missing),
                        model,
                    )
            return serving

    def start(self) -> RouterHealth:
        """Start the periodic sweep (a daemon thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="router-health", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        self.registry.tick()
        while not self._stop.wait(self.sweep_interval_s):
            try:
                gap = self.registry.tick()
                if gap:
                    log.warning(
                        "router was not running for %.1fs (paused or starved): workers' silence "
                        "during it is not counted against them",
                        gap,
                    )
                self.update()
            except Exception:  # noqa: BLE001 - the sweep must outlive a bad moment
                log.exception("health sweep failed")


def start_router_health(
    registry: Registry,
    config: RouterConfig,
    servicer: health.HealthServicer,
    model_ids: Sequence[str] = (),
) -> RouterHealth:
    """The router's health on ``servicer`` (from ``start_server(..., not_serving=HEALTH_SERVICES)``),
    set now and kept current; silent workers are noticed within a quarter heartbeat timeout.
    ``model_ids``: a router serving several base models names them all (SERVING while any of
    them can place a request); default ``config.model_id``."""
    sweep = max(0.05, config.heartbeat_timeout_s / 4)
    models = tuple(model_ids) or config.model_id
    return RouterHealth(registry, models, config.policy, servicer, sweep_interval_s=sweep).start()
