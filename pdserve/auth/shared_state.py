"""Tenant quotas and request-id claims shared by several routers (issue #13, #12 section 4).

One router keeps each tenant's in-flight count, request-rate bucket and the client request ids
in flight in its own memory (:class:`~pdserve.auth.quota.TenantGate`,
:class:`~pdserve.auth.idempotency.IdempotencyTable`). N routers doing that would give a tenant N
times its quota and let one client id run once per router, so routers that serve one cluster
share that state through Redis (the place a cluster's shared state lives, like the KV index):
:class:`SharedEdgeState` hands out a :class:`SharedTenantGate` and a :class:`SharedIdempotency`
with the same interface as the in-memory ones, over a :class:`SharedBackend`
(:class:`pdserve.auth.shared_redis.RedisSharedBackend`: atomic Lua scripts).

Contracts
---------
* **Router liveness.** Each router instance (a random id per process) holds a liveness entry
  that it renews every ``refresh_interval_s`` and that expires after ``liveness_ttl_s``. The
  in-flight count of a tenant is the sum of the counts of *live* routers; a router that died
  (SIGKILL, crash, frozen past ``liveness_ttl_s``) stops counting at once when its entry
  expires, and its claims can be taken over. Nothing a dead router held outlives
  ``liveness_ttl_s`` in effect, nor ``entry_ttl_s`` in Redis (every entry has a TTL, renewed by
  its live owner every ``entry_ttl_s / 3``).
* **In-flight and rate** are checked and taken in one atomic step (a request over either limit
  takes nothing), with the refusals of the in-memory gate (RESOURCE_EXHAUSTED, retry-after for
  the rate). The rate bucket runs on the Redis server's clock, so the routers' clocks do not
  matter. A tenant with neither limit costs no Redis call.
* **Request ids.** A client id in flight anywhere in the cluster is refused (ALREADY_EXISTS)
  without touching the running request. When it is held by *another* router that is alive, the
  asynchronous claim (:meth:`SharedIdempotency.begin_async`, what the router uses) first waits,
  without blocking the event loop, up to ``liveness_ttl_s + refresh_interval_s`` for the claim to
  be released or for its router to be seen dead: that is the SDK's failover (a request re-issued
  under its id on the next router when its router went away) finding its old claim. A request
  without a client id claims nothing.
* **Release** (finish or cancel) is immediate. A release that cannot reach Redis is retried by
  the next renewal (each router also keeps its own counts and claims in memory, and rewrites
  them to Redis on renewal: after an outage, or when its liveness had lapsed and peers dropped
  its counts).
* **Redis unreachable**: a request that needs the shared state (a tenant with limits, or a client
  id) fails with UNAVAILABLE naming the Redis, never admitted unchecked; for ``breaker_s`` after
  a failure the router answers so at once instead of waiting on Redis again. Other requests are
  unaffected.

Configuration (:func:`add_tenant_state_args`, :func:`tenant_state_from_args`): ``--tenant-state
auto|local|URL`` and ``--cluster-routers N`` (how many routers serve the cluster; the launcher
passes it). ``auto``: a single router keeps its state in memory (nothing to share; no new way to
fail); several use the ``--index`` Redis, and without one are refused at start, naming the fix,
unless ``--tenant-state local`` accepts per-router limits explicitly (then a warning is logged
at start). A URL always shares, whatever the count.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from pdserve.auth.idempotency import IdempotencyTable, Ticket, id_in_use, new_cluster_id
from pdserve.auth.quota import Admission, TenantGate, inflight_refusal, rate_refusal
from pdserve.auth.tenants import Principal
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.redis_access import is_redis_url

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "pdserve:edge:"


class SharedStateError(Exception):
    """The shared state's backend could not be reached or answered an error (a backend raises
    it; :class:`SharedEdgeState` turns it into UnavailableError naming the backend)."""


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # the id is now this router's (new, or taken over from a dead router)
    HELD_HERE = "held_here"  # a request of this router holds it
    HELD_ELSEWHERE = "held_elsewhere"  # a request of another live router holds it


@dataclass(frozen=True)
class AdmitResult:
    """What one atomic admission step found: ``admitted``; ``inflight``: the tenant's requests
    in flight on live routers (before this one); ``retry_after_s`` > 0: refused by the rate."""

    admitted: bool
    inflight: int
    retry_after_s: float = 0.0


class SharedBackend(Protocol):
    """Where the shared state lives; every method is atomic (one Lua script in Redis) and raises
    :class:`SharedStateError` when the backend cannot be used. ``router`` is the calling router's
    instance id; ``tenant`` and ``claim`` keys are opaque strings of :func:`tenant_key` /
    :func:`claim_key`."""

    name: str  # for messages, without secrets (e.g. the Redis URL without its password)

    def beat(self, router: str, ttl_s: float) -> bool:
        """Renew ``router``'s liveness for ``ttl_s``; False when it had lapsed (or is new)."""
        ...

    def admit(
        self, tenant: str, router: str, max_inflight: int | None, rate: float | None, burst: int, ttl_s: float
    ) -> AdmitResult:
        """Check and take one in-flight slot and one rate token of ``tenant`` at once."""
        ...

    def release(self, tenant: str, router: str) -> None:
        """Give back one of ``router``'s in-flight slots of ``tenant`` (never below zero)."""
        ...

    def inflight(self, tenant: str) -> int:
        """``tenant``'s requests in flight on live routers."""
        ...

    def claim(
        self, claim: str, router: str, cluster_id: str, ttl_s: float, replace_own: bool
    ) -> ClaimOutcome:
        """Claim ``claim`` for ``router``'s request ``cluster_id`` unless a live router holds it;
        ``replace_own``: a claim ``router`` itself holds is stale (a release that did not reach
        the backend) and is replaced."""
        ...

    def unclaim(self, claim: str, router: str, cluster_id: str) -> None:
        """Drop ``claim`` if (and only if) it is still held by ``router``'s ``cluster_id``."""
        ...

    def sync(self, router: str, counts: dict[str, int], claims: dict[str, str], ttl_s: float) -> None:
        """Make ``router``'s entries what it knows: its in-flight count per tenant (0: none),
        its claims (claim -> cluster id; re-taken where absent, left where another router took
        them), every entry's TTL renewed to ``ttl_s``."""
        ...

    def leave(self, router: str, tenants: list[str], claims: dict[str, str]) -> None:
        """``router`` stops: its liveness, counts and claims are removed."""
        ...


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "big") + b)
    return h.hexdigest()[:32]


def tenant_key(tenant: str) -> str:
    """The opaque key of ``tenant``'s entries (fixed length whatever the name)."""
    return _digest("tenant", tenant)


def claim_key(tenant: str, client_id: str) -> str:
    """The opaque key of ``tenant``'s claim on ``client_id`` (ids are not stored in clear)."""
    return _digest("claim", tenant, client_id)


@dataclass(frozen=True)
class SharedStateConfig:
    """Timing of the shared state (see the module docstring). ``liveness_ttl_s``: a router silent
    this long is dead; ``refresh_interval_s``: how often a router renews it (well below the TTL);
    ``entry_ttl_s``: TTL of every count and claim in the backend (renewed by its owner every third
    of it); ``breaker_s``: after a backend failure, requests needing it are refused at once for
    this long; ``claim_poll_s``: how often a claim held elsewhere is looked at again."""

    liveness_ttl_s: float = 3.0
    refresh_interval_s: float = 1.0
    entry_ttl_s: float = 60.0
    breaker_s: float = 1.0
    claim_poll_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.refresh_interval_s < self.liveness_ttl_s:
            raise InvalidRequestError(
                f"refresh_interval_s ({self.refresh_interval_s}) must be > 0 and below liveness_ttl_s "
                f"({self.liveness_ttl_s})"
            )
        if self.entry_ttl_s < 3 * self.liveness_ttl_s:
            raise InvalidRequestError(
                f"entry_ttl_s ({self.entry_ttl_s}) must be at least 3 x liveness_ttl_s ({self.liveness_ttl_s})"
            )
        if self.breaker_s < 0 or self.claim_poll_s <= 0:
            raise InvalidRequestError("breaker_s must be >= 0 and claim_poll_s > 0")

    @property
    def claim_wait_s(self) -> float:
        """The longest a claim held by another live router is waited for: a dead router's
        liveness has expired by then."""
        return self.liveness_ttl_s + self.refresh_interval_s


class SharedEdgeState:
    """One router's view of the shared tenant state: :attr:`gate` and :attr:`ids` go to
    :class:`~pdserve.auth.edge.EdgeAuth`; :meth:`start` begins renewing this router's liveness
    (a daemon thread; :meth:`tick` is one renewal, for tests), :meth:`close` leaves (releases
    everything this router holds). Thread-safe."""

    def __init__(
        self,
        backend: SharedBackend,
        config: SharedStateConfig = SharedStateConfig(),
        *,
        router_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        make_id: Callable[[], str] = new_cluster_id,
    ) -> None:
        self.backend = backend
        self.config = config
        self.router_id = router_id or uuid.uuid4().hex[:16]
        self.clock = clock
        self.lock = threading.Lock()  # orders Redis writes with the local mirror below
        self.counts: dict[str, int] = {}  # tenant key -> this router's requests in flight
        self.claims: dict[str, str] = {}  # claim key -> cluster id, this router's
        self.stale_claims: dict[str, str] = {}  # released here, not yet in the backend (retried)
        self._dirty = False  # a release did not reach the backend: sync on the next tick
        self._down_until = -1.0
        self._last_error = ""
        self._last_sync = -float("inf")
        self._beaten = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.gate = SharedTenantGate(self)
        self.ids = SharedIdempotency(self, make_id)

    # ------------------------------------------------------------------ backend calls
    def check_up(self) -> None:
        """UnavailableError at once while the breaker is open (a recent backend failure)."""
        if self.clock() < self._down_until:
            raise UnavailableError(self._unavailable_message())

    def _unavailable_message(self) -> str:
        return (
            f"the routers' shared tenant state ({self.backend.name}) is unreachable: {self._last_error}; "
            "tenant quotas and request ids cannot be checked (retry shortly)"
        )

    def call(self, fn: Callable[[], object]) -> object:
        """``fn()`` (a backend call); a :class:`SharedStateError` opens the breaker and becomes
        UnavailableError naming the backend."""
        self.check_up()
        try:
            return fn()
        except SharedStateError as e:
            self._last_error = str(e)
            self._down_until = self.clock() + self.config.breaker_s
            raise UnavailableError(self._unavailable_message()) from None

    def quiet(self, what: str, fn: Callable[[], object]) -> bool:
        """``fn()`` where a failure must not fail the request (a release): logged, and the next
        renewal rewrites this router's state. Returns whether it went through."""
        try:
            fn()
            return True
        except SharedStateError as e:
            self._dirty = True
            log.warning(
                "shared tenant state (%s): %s failed (%s); retried at the next renewal",
                self.backend.name,
                what,
                e,
            )
            return False

    # ------------------------------------------------------------------ renewal
    def tick(self) -> None:
        """One renewal: liveness; and this router's counts and claims written again when a
        release was lost, when its liveness had lapsed (peers then dropped its counts), and every
        ``entry_ttl_s / 3`` (their TTLs)."""
        cfg = self.config
        try:
            alive = self.backend.beat(self.router_id, cfg.liveness_ttl_s)
        except SharedStateError as e:
            log.warning("shared tenant state (%s): liveness renewal failed: %s", self.backend.name, e)
            self._dirty = True
            return
        lapsed = not alive and self._beaten
        self._beaten = True
        if lapsed:
            log.warning(
                "shared tenant state (%s): this router's liveness had lapsed (paused or cut off for over "
                "%.1f s): peers may have dropped its in-flight counts and taken over its request ids; "
                "rewriting them",
                self.backend.name,
                cfg.liveness_ttl_s,
            )
        with self.lock:
            stale = dict(self.stale_claims)
        for key, cid in stale.items():  # releases that did not reach the backend
            if self.quiet(
                "request id release", lambda k=key, c=cid: self.backend.unclaim(k, self.router_id, c)
            ):
                with self.lock:
                    if self.stale_claims.get(key) == cid:
                        del self.stale_claims[key]
        now = self.clock()
        if lapsed or self._dirty or now - self._last_sync >= cfg.entry_ttl_s / 3:
            # under the lock: an admission or release between reading the counts and writing
            # them would otherwise be overwritten (a slot counted until the next sync)
            with self.lock:
                try:
                    self.backend.sync(self.router_id, dict(self.counts), dict(self.claims), cfg.entry_ttl_s)
                except SharedStateError as e:
                    self._dirty = True
                    log.warning("shared tenant state (%s): renewal failed: %s", self.backend.name, e)
                    return
                self._dirty = False
                self._last_sync = now
                for t in [t for t, n in self.counts.items() if n == 0]:  # written as 0: forget them
                    del self.counts[t]

    def start(self) -> SharedEdgeState:
        """Renew liveness now (a backend that cannot be reached is an UnavailableError here, at
        start) and then every ``refresh_interval_s`` in a daemon thread."""
        try:
            self.backend.beat(self.router_id, self.config.liveness_ttl_s)
        except SharedStateError as e:
            raise UnavailableError(f"the routers' shared tenant state ({self.backend.name}): {e}") from None
        self._beaten = True
        self._thread = threading.Thread(target=self._run, name="shared-tenant-state", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.config.refresh_interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the renewal thread must not die
                log.exception("shared tenant state: renewal error")

    def close(self) -> None:
        """Stop renewing and release everything this router holds (best effort: what cannot be
        removed expires with this router's liveness)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.lock:
            tenants, claims = list(self.counts), {**self.stale_claims, **self.claims}
            self.counts.clear()
            self.claims.clear()
        self.quiet("leave", lambda: self.backend.leave(self.router_id, tenants, claims))


class SharedTenantGate(TenantGate):
    """:class:`~pdserve.auth.quota.TenantGate` over the routers' shared state: a tenant's
    in-flight count is the cluster's, its rate bucket the cluster's (see the module docstring)."""

    def __init__(self, state: SharedEdgeState) -> None:
        super().__init__(state.clock)
        self._state = state

    def admit(self, p: Principal) -> Admission:
        pol = p.policy
        if pol.max_inflight is None and pol.rate_per_s is None:
            return Admission(lambda: None, p.tenant)  # nothing to count: no Redis call
        st = self._state
        t = tenant_key(p.tenant)
        ttl = st.config.entry_ttl_s

        def take() -> AdmitResult:
            with st.lock:
                r = st.backend.admit(t, st.router_id, pol.max_inflight, pol.rate_per_s, pol.bucket_size, ttl)
                if r.admitted:
                    st.counts[t] = st.counts.get(t, 0) + 1
                return r

        r = st.call(take)
        assert isinstance(r, AdmitResult)
        if not r.admitted:
            if r.retry_after_s > 0 and pol.rate_per_s is not None:
                raise rate_refusal(p.tenant, pol.rate_per_s, pol.bucket_size, r.retry_after_s)
            raise inflight_refusal(p.tenant, r.inflight, pol.max_inflight or 0)
        return Admission(functools.partial(self._release_shared, t), p.tenant)

    def _release_shared(self, t: str) -> None:
        st = self._state

        def give() -> None:
            with st.lock:
                st.counts[t] = max(0, st.counts.get(t, 0) - 1)  # 0 stays until synced (tick)
                st.backend.release(t, st.router_id)

        st.quiet("release", give)

    def inflight(self, tenant: str) -> int:
        """``tenant``'s requests in flight on every live router (a backend call)."""
        st = self._state
        n = st.call(lambda: st.backend.inflight(tenant_key(tenant)))
        assert isinstance(n, int)
        return n

    def tracked(self) -> int:
        """Tenants with requests in flight on this router."""
        with self._state.lock:
            return sum(1 for n in self._state.counts.values() if n > 0)


class SharedIdempotency(IdempotencyTable):
    """:class:`~pdserve.auth.idempotency.IdempotencyTable` over the routers' shared state: a client
    id in flight on any live router is refused (see the module docstring for the wait)."""

    def __init__(self, state: SharedEdgeState, make_id: Callable[[], str] = new_cluster_id) -> None:
        super().__init__(make_id)
        self._state = state

    def _try(self, key: str, cid: str) -> ClaimOutcome:
        st = self._state

        def claim() -> ClaimOutcome:
            with st.lock:
                stale = key not in st.claims  # this router runs no request under it
                out = st.backend.claim(key, st.router_id, cid, st.config.entry_ttl_s, stale)
                if out is ClaimOutcome.CLAIMED:
                    st.claims[key] = cid
                return out

        out = st.call(claim)
        assert isinstance(out, ClaimOutcome)
        return out

    def begin(self, tenant: str, client_id: str) -> Ticket:
        """Claim at once (no wait): refused whenever a live router holds the id."""
        cid = self._make_id()
        if not client_id:
            return Ticket(None, None, cid)
        key = claim_key(tenant, client_id)
        if self._try(key, cid) is not ClaimOutcome.CLAIMED:
            raise id_in_use(client_id)
        return Ticket(self, key, cid)

    async def begin_async(self, tenant: str, client_id: str) -> Ticket:
        """Claim; an id held by another live router is looked at again every ``claim_poll_s`` for
        up to ``claim_wait_s`` (released, or its router dead: claimed), then refused."""
        cid = self._make_id()
        if not client_id:
            return Ticket(None, None, cid)
        key = claim_key(tenant, client_id)
        cfg = self._state.config
        deadline = self._state.clock() + cfg.claim_wait_s
        while True:
            out = self._try(key, cid)
            if out is ClaimOutcome.CLAIMED:
                return Ticket(self, key, cid)
            if out is ClaimOutcome.HELD_HERE or self._state.clock() >= deadline:
                raise id_in_use(client_id)
            await asyncio.sleep(cfg.claim_poll_s)

    def _finish(self, key: Hashable, cluster_id: str) -> None:
        st = self._state
        assert isinstance(key, str)

        def drop() -> None:
            with st.lock:
                if st.claims.get(key) == cluster_id:
                    del st.claims[key]
                st.stale_claims[key] = cluster_id  # until the backend has it dropped
                st.backend.unclaim(key, st.router_id, cluster_id)
                del st.stale_claims[key]

        st.quiet("request id release", drop)

    def __len__(self) -> int:
        with self._state.lock:
            return len(self._state.claims)


# ---------------------------------------------------------------------------- configuration
class TenantStateKind(enum.Enum):
    AUTO = "auto"  # one router: local; several: the --index Redis (refused without one)
    LOCAL = "local"  # this router's memory


@dataclass(frozen=True)
class TenantStateChoice:
    """Pure: where the tenant state lives. ``url``: a Redis URL (shared), or "" (this router's
    memory); ``warning``: what to log at start ("" for none)."""

    url: str
    warning: str = ""


def choose_tenant_state(spec: str, index_url: str | None, cluster_routers: int) -> TenantStateChoice:
    """Pure: the tenant-state choice of ``--tenant-state spec`` for a router whose ``--index`` is
    ``index_url`` in a cluster of ``cluster_routers`` routers. InvalidRequestError when several
    routers would keep per-router state without saying so (``auto`` without a Redis index),
    naming the flags that fix it."""
    if cluster_routers < 1:
        raise InvalidRequestError(f"--cluster-routers must be >= 1, got {cluster_routers}")
    s = spec.strip()
    if is_redis_url(s):
        return TenantStateChoice(s)
    try:
        kind = TenantStateKind(s.lower())
    except ValueError:
        raise InvalidRequestError(
            f"--tenant-state must be auto, local or a redis://, rediss:// or unix:// URL, got {spec!r}"
        ) from None
    if cluster_routers == 1:
        return TenantStateChoice("")  # one router: its memory is the whole cluster's state
    if kind is TenantStateKind.AUTO and index_url and is_redis_url(index_url):
        return TenantStateChoice(index_url)
    multiplied = (
        f"with {cluster_routers} routers each keeping its own tenant state, a tenant gets {cluster_routers} x "
        "its in-flight quota and request rate, and one client request_id can run once on each router"
    )
    if kind is TenantStateKind.AUTO:
        raise InvalidRequestError(
            f"{multiplied}. Share it through Redis: --tenant-state redis://HOST:PORT/DB (or run the routers "
            "with --index redis://...), or accept per-router limits explicitly with --tenant-state local"
        )
    return TenantStateChoice("", warning=multiplied + " (--tenant-state local)")


def add_tenant_state_args(p: argparse.ArgumentParser) -> None:
    """The router's tenant-state flags."""
    g = p.add_argument_group(
        "tenant quotas and request ids shared by several routers (pdserve/auth/shared_state.py)"
    )
    g.add_argument(
        "--tenant-state",
        default=TenantStateKind.AUTO.value,
        metavar="auto|local|URL",
        help="where per-tenant in-flight counts, request rates and in-flight client request ids live: "
        "a redis:// (rediss://, unix://) URL shared by every router of the cluster; local = this "
        "router's memory; auto = local for a single router, the --index Redis for several "
        "(--cluster-routers > 1; refused without one) (default: %(default)s)",
    )
    g.add_argument(
        "--tenant-state-prefix",
        default=DEFAULT_PREFIX,
        help="key prefix of the shared tenant state in Redis (default: %(default)s)",
    )
    g.add_argument(
        "--cluster-routers",
        type=int,
        default=1,
        help="how many routers serve this cluster (the launcher and `pdserve serve --routers` pass it); "
        "above 1, per-router tenant state must be asked for (--tenant-state local) (default: %(default)s)",
    )


def tenant_state_from_args(a: argparse.Namespace) -> SharedEdgeState | None:
    """The started :class:`SharedEdgeState` the flags describe, or None for this router's memory
    (a warning logged when several routers were configured that way). InvalidRequestError for a
    refused choice; UnavailableError when the Redis cannot be reached at start."""
    choice = choose_tenant_state(a.tenant_state, getattr(a, "index", None), a.cluster_routers)
    if choice.warning:
        log.warning("%s", choice.warning)
    if not choice.url:
        return None
    from pdserve.auth.shared_redis import RedisSharedBackend

    return SharedEdgeState(RedisSharedBackend.from_url(choice.url, prefix=a.tenant_state_prefix)).start()
