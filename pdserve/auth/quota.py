"""Per-tenant admission: in-flight requests and request rate (pure: the clock is injected).

:class:`TokenBucket` is the rate limiter; :class:`TenantGate` applies a principal's
:class:`~pdserve.auth.tenants.TenantPolicy` (``max_inflight``, ``rate_per_s``/``burst``) and
hands out an :class:`Admission` that must be released when the request ends, however it ends
(it is a context manager). A refusal is ResourceExhaustedError with a retry-after: the time until
the bucket holds a token, or none for the in-flight limit (it frees when a request ends).

Memory stays bounded with arbitrary dev-mode tenant names: a tenant with nothing in flight and a
full bucket is indistinguishable from a new one, so such entries are pruned.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.auth.tenants import Principal
from pdserve.errors import ResourceExhaustedError


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; starts full."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.t = now

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
            self.t = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is available (not taken)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


@dataclass
class _TenantState:
    inflight: int = 0
    bucket: TokenBucket | None = None
    bucket_key: tuple[float, int] | None = None  # (rate, capacity) the bucket was made for


class Admission:
    """One admitted request; :meth:`release` (or leaving the ``with`` block) frees its slot once.
    ``release_fn``: what freeing the slot does (the gate that admitted it knows)."""

    def __init__(self, release_fn: Callable[[], None], tenant: str) -> None:
        self._release_fn: Callable[[], None] | None = release_fn
        self.tenant = tenant

    def release(self) -> None:
        fn, self._release_fn = self._release_fn, None
        if fn is not None:
            fn()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def inflight_refusal(tenant: str, inflight: int, limit: int) -> ResourceExhaustedError:
    """The refusal of a request over its tenant's in-flight limit (no retry-after: a slot frees
    when one of the tenant's requests ends)."""
    return ResourceExhaustedError(
        f"tenant {tenant!r} has {inflight} requests in flight, its limit (max_inflight {limit}); "
        "retry when one finishes"
    )


def rate_refusal(tenant: str, rate: float, burst: int, wait_s: float) -> ResourceExhaustedError:
    """The refusal of a request over its tenant's request rate, retry-after ``wait_s``."""
    return ResourceExhaustedError(
        f"tenant {tenant!r} is over its request rate ({rate:g}/s, burst {burst}); retry in {wait_s:.3f} s",
        retry_after_s=wait_s,
    )


class TenantGate:
    """Admission control per tenant, in this process's memory (one router; several routers share
    theirs through Redis: :class:`pdserve.auth.shared_state.SharedTenantGate`). Thread-safe."""

    PRUNE_AT = 4096  # tenants tracked before idle ones are pruned

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}

    def admit(self, p: Principal) -> Admission:
        """Admit one request of ``p`` or raise ResourceExhaustedError naming the limit."""
        pol = p.policy
        with self._lock:
            now = self.clock()
            st = self._tenants.get(p.tenant)
            if st is None:
                if len(self._tenants) >= self.PRUNE_AT:
                    self._prune(now)
                st = self._tenants[p.tenant] = _TenantState()
            if pol.max_inflight is not None and st.inflight >= pol.max_inflight:
                raise inflight_refusal(p.tenant, st.inflight, pol.max_inflight)
            if pol.rate_per_s is not None:
                key = (pol.rate_per_s, pol.bucket_size)
                if st.bucket is None or st.bucket_key != key:  # new, or the policy changed
                    st.bucket, st.bucket_key = TokenBucket(key[0], key[1], now), key
                wait = st.bucket.take(now)
                if wait > 0:
                    raise rate_refusal(p.tenant, pol.rate_per_s, pol.bucket_size, wait)
            st.inflight += 1
        return Admission(functools.partial(self._release, p.tenant), p.tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            st = self._tenants.get(tenant)
            if st is not None and st.inflight > 0:
                st.inflight -= 1

    def _prune(self, now: float) -> None:
        idle = [
            t
            for t, st in self._tenants.items()
            if st.inflight == 0 and (st.bucket is None or st.bucket.full(now))
        ]
        for t in idle:
            del self._tenants[t]

    def inflight(self, tenant: str) -> int:
        with self._lock:
            st = self._tenants.get(tenant)
            return st.inflight if st is not None else 0

    def tracked(self) -> int:
        """Tenants currently tracked (for tests of the memory bound)."""
        with self._lock:
            return len(self._tenants)
