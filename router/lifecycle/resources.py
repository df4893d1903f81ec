"""What a request holds while it runs, released exactly once whatever way it ends (pure).

:class:`Ledger` records the resources a request's lifecycle holds; a resource leaves it either by
an explicit release (the lifecycle then asks its driver to release it: one :class:`Release`
action) or by being handed over to someone who releases it (a decode worker that pulled the KV
releases its lease). Acquiring a held resource again, or releasing/handing over one not held,
raises :class:`ReleaseError`: a double release is a bug, not a no-op.

:class:`OnceReleases` is the same contract with callbacks, for what the router's edge holds
around the lifecycle (the tenant's in-flight slot, the client stream's stall deadline).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class ResourceKind(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hash, not Enum's hash(name) in Python (#12)
    # the placement-time reservation: prompt tokens queued on the first worker and the request in
    # flight on its decode worker, until the first leg's own accounting takes over
    RESERVATION = "reservation"
    POLICY_SLOT = "policy_slot"  # the placement policy's record of the request (feedback or release)
    WORKER_SLOT = "worker_slot"  # in flight (and its KV tokens) on a decode worker, per leg
    KV_LEASE = "kv_lease"  # a store lease pinning the handed-off KV blocks
    MIGRATION = "migration"  # a migration in progress towards a destination decode worker
    TENANT_SLOT = "tenant_slot"  # the edge: the tenant's in-flight slot and idempotency claim
    STREAM_DEADLINE = "stream_deadline"  # the edge: the client stream's stall timer


@dataclass(frozen=True)
class Resource:
    kind: ResourceKind
    key: str  # the worker id, the lease id, the request id


class ReleaseError(RuntimeError):
    """A resource acquired twice, or released (handed over) when not held."""


class Ledger:
    """Resources held by one request, in acquisition order."""

    def __init__(self) -> None:
        self._held: dict[Resource, None] = {}
        self.acquired: list[Resource] = []  # every acquisition, in order (a resource may come back)
        self.released: list[Resource] = []  # by the lifecycle, in order (for tests and logs)
        self.handed_over: list[Resource] = []

    def holds(self, r: Resource) -> bool:
        return r in self._held

    def held(self, kind: ResourceKind | None = None) -> list[Resource]:
        return [r for r in self._held if kind is None or r.kind is kind]

    def acquire(self, r: Resource) -> None:
        if r in self._held:
            raise ReleaseError(f"{r.kind.value} {r.key!r} acquired twice")
        self._held[r] = None
        self.acquired.append(r)

    def release(self, r: Resource) -> Resource:
        """Remove ``r`` (the caller then releases it, once)."""
        self._take(r, "released")
        self.released.append(r)
        return r

    def hand_over(self, r: Resource) -> None:
        """``r`` is now someone else's to release (no release by this request)."""
        self._take(r, "handed over")
        self.handed_over.append(r)

    def drain(self) -> list[Resource]:
        """Every resource still held, newest first, removed (the caller releases each once)."""
        out = list(reversed(self._held))
        for r in out:
            self.release(r)
        return out

    def _take(self, r: Resource, what: str) -> None:
        if r not in self._held:
            raise ReleaseError(f"{r.kind.value} {r.key!r} {what} but not held")
        del self._held[r]


class OnceReleases:
    """Release callbacks run exactly once each, newest first, by :meth:`release_all` (idempotent
    as a whole: a second call releases nothing). Registering a resource twice raises."""

    def __init__(self) -> None:
        self._ledger = Ledger()
        self._fns: dict[Resource, Callable[[], None]] = {}

    def hold(self, r: Resource, release: Callable[[], None]) -> None:
        self._ledger.acquire(r)
        self._fns[r] = release

    def release(self, r: Resource) -> None:
        """Release ``r`` now (raises :class:`ReleaseError` when not held)."""
        self._ledger.release(r)
        self._fns.pop(r)()

    def release_all(self) -> None:
        """Release everything held; a failing release does not keep the others from running (the
        first error is raised after all ran)."""
        first: BaseException | None = None
        for r in self._ledger.drain():
            try:
                self._fns.pop(r)()
            except BaseException as e:  # noqa: BLE001 - re-raised once every release ran
                first = first or e
        if first is not None:
            raise first

    @property
    def released(self) -> list[Resource]:
        return list(self._ledger.released)
