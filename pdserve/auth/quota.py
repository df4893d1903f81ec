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
    """One admitted request; :meth:`release` (or leaving the ``with`` block) frees its slot once."""

    def __init__(self, gate: TenantGate, tenant: str) -> None:
        self._gate = gate
        self.tenant = tenant
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._release(self.tenant)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class TenantGate:
    """Admission control per tenant. Thread-safe."""

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
                raise ResourceExhaustedError(
                    f"tenant {p.tenant!r} has {st.inflight} requests in flight, its limit "
                    f"(max_inflight {pol.max_inflight}); retry when one finishes"
                )
            if pol.rate_per_s is not None:
                key = (pol.rate_per_s, pol.bucket_size)
                if st.bucket is None or st.bucket_key != key:  # new, or the policy changed
                    st.bucket, st.bucket_key = TokenBucket(key[0], key[1], now), key
                wait = st.bucket.take(now)
                if wait > 0:
                    raise ResourceExhaustedError(
                        f"tenant {p.tenant!r} is over its request rate ({pol.rate_per_s:g}/s, "
                        f"burst {pol.bucket_size}); retry in {wait:.3f} s",
                        retry_after_s=wait,
                    )
            st.inflight += 1
        return Admission(self, p.tenant)

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
