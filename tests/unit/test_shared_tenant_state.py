"""Tenant quotas and request-id claims shared by several routers (pdserve.auth.shared_state), on
an in-memory fake of the Redis backend with an injected clock: what the routers do with the
shared state (liveness, the claim wait, lost releases, lapses, outages, the configuration
choice). The Lua scripts themselves run against a real redis-server in
tests/integration/test_shared_tenant_state_redis.py."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import pytest

from pdserve.auth.edge import EdgeAuth
from pdserve.auth.shared_state import (
    AdmitResult,
    ClaimOutcome,
    SharedEdgeState,
    SharedStateConfig,
    SharedStateError,
    TenantStateChoice,
    choose_tenant_state,
)
from pdserve.auth.tenants import AuthMode, Principal, TenantPolicy
from pdserve.errors import AlreadyExistsError, InvalidRequestError, ResourceExhaustedError, UnavailableError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeBackend:
    """The Redis backend's semantics (pdserve/auth/shared_redis.py) in memory, with TTLs on
    ``clock``; ``down`` makes every call fail; ``calls`` counts calls."""

    clock: Clock
    name: str = "fake-redis"
    down: bool = False
    calls: int = 0
    alive_until: dict[str, float] = field(default_factory=dict)
    inflight_by: dict[str, dict[str, int]] = field(default_factory=dict)  # tenant -> router -> n
    buckets: dict[tuple[str, float, int], tuple[float, float]] = field(default_factory=dict)
    claims: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # -> (router, cid, until)

    def _call(self) -> None:
        self.calls += 1
        if self.down:
            raise SharedStateError("ConnectionError: connection refused")

    def _alive(self, router: str) -> bool:
        return self.alive_until.get(router, -1.0) > self.clock()

    def beat(self, router: str, ttl_s: float) -> bool:
        self._call()
        was = self._alive(router)
        self.alive_until[router] = self.clock() + ttl_s
        return was

    def admit(self, tenant, router, max_inflight, rate, burst, ttl_s) -> AdmitResult:
        self._call()
        h = self.inflight_by.setdefault(tenant, {})
        for r in [r for r in h if r != router and not self._alive(r)]:
            del h[r]
        total = sum(h.values())
        if max_inflight is not None and total >= max_inflight:
            return AdmitResult(False, total)
        if rate is not None:
            now = self.clock()
            tokens, ts = self.buckets.get((tenant, rate, burst), (float(burst), now))
            tokens = min(burst, tokens + (now - ts) * rate)
            if tokens < 1:
                return AdmitResult(False, total, (1 - tokens) / rate)
            self.buckets[(tenant, rate, burst)] = (tokens - 1, now)
        h[router] = h.get(router, 0) + 1
        return AdmitResult(True, total)

    def release(self, tenant, router) -> None:
        self._call()
        h = self.inflight_by.get(tenant, {})
        if h.get(router, 0) <= 1:
            h.pop(router, None)
        else:
            h[router] -= 1

    def inflight(self, tenant) -> int:
        self._call()
        return sum(n for r, n in self.inflight_by.get(tenant, {}).items() if self._alive(r))

    def claim(self, claim, router, cluster_id, ttl_s, replace_own) -> ClaimOutcome:
        self._call()
        held = self.claims.get(claim)
        if held is not None and held[2] > self.clock():
            if held[0] == router and not replace_own:
                return ClaimOutcome.HELD_HERE
            if held[0] != router and self._alive(held[0]):
                return ClaimOutcome.HELD_ELSEWHERE
        self.claims[claim] = (router, cluster_id, self.clock() + ttl_s)
        return ClaimOutcome.CLAIMED

    def unclaim(self, claim, router, cluster_id) -> None:
        self._call()
        held = self.claims.get(claim)
        if held is not None and held[:2] == (router, cluster_id):
            del self.claims[claim]

    def sync(self, router, counts, claims, ttl_s) -> None:
        self._call()
        for tenant, n in counts.items():
            h = self.inflight_by.setdefault(tenant, {})
            if n > 0:
                h[router] = n
            else:
                h.pop(router, None)
        for claim, cid in claims.items():
            held = self.claims.get(claim)
            if held is None or held[2] <= self.clock():
                self.claims[claim] = (router, cid, self.clock() + ttl_s)
            elif held[0] == router:
                self.claims[claim] = (router, held[1], self.clock() + ttl_s)

    def leave(self, router, tenants, claims) -> None:
        self._call()
        for tenant in tenants:
            self.inflight_by.get(tenant, {}).pop(router, None)
        for claim, cid in claims.items():
            self.unclaim(claim, router, cid)
        self.alive_until.pop(router, None)


CFG = SharedStateConfig(liveness_ttl_s=3.0, refresh_interval_s=1.0, entry_ttl_s=60.0, breaker_s=1.0)


def _routers(n: int = 2, cfg: SharedStateConfig = CFG, clock=None):
    clock = clock or Clock()
    backend = FakeBackend(clock if isinstance(clock, Clock) else Clock())
    if not isinstance(clock, Clock):
        backend.clock = clock  # type: ignore[assignment]
    states = []
    for i in range(n):
        st = SharedEdgeState(backend, cfg, router_id=f"r{i}", clock=clock)
        st.tick()  # first renewal: alive
        states.append(st)
    return clock, backend, states


def _p(**policy) -> Principal:
    return Principal("acme", TenantPolicy(**policy), AuthMode.API_KEY, key_id="k1")


def test_in_flight_quota_is_the_clusters_not_each_routers():
    _, _, (a, b) = _routers()
    p = _p(max_inflight=2)
    held_a, held_b = a.gate.admit(p), b.gate.admit(p)
    for st in (a, b):
        with pytest.raises(ResourceExhaustedError, match="has 2 requests in flight.*max_inflight 2"):
            st.gate.admit(p)
    assert a.gate.inflight("acme") == b.gate.inflight("acme") == 2
    held_a.release()
    held_a.release()  # once only
    assert b.gate.inflight("acme") == 1
    b.gate.admit(p).release()  # the freed slot is usable at the other router
    held_b.release()
    assert a.gate.inflight("acme") == 0


def test_request_rate_is_the_clusters():
    clock, _, (a, b) = _routers()
    p = _p(rate_per_s=1.0)
    a.gate.admit(p).release()
    with pytest.raises(ResourceExhaustedError, match="request rate") as ei:
        b.gate.admit(p)  # the same instant, at the other router
    assert ei.value.retry_after_s == pytest.approx(1.0)
    clock.t += 1.0
    b.gate.admit(p).release()


def test_a_refused_request_takes_nothing():
    _, backend, (a, b) = _routers()
    p = _p(max_inflight=1, rate_per_s=1.0, burst=5)
    held = a.gate.admit(p)
    with pytest.raises(ResourceExhaustedError, match="in flight"):
        b.gate.admit(p)
    assert backend.buckets[(next(iter(backend.inflight_by)), 1.0, 5)][0] == pytest.approx(4.0)
    held.release()


def test_a_tenant_without_limits_and_a_request_without_an_id_cost_no_backend_call():
    _, backend, (a, _) = _routers()
    before = backend.calls
    a.gate.admit(_p()).release()
    a.ids.begin("acme", "").finish()
    asyncio.run(a.ids.begin_async("acme", "")).finish()
    assert backend.calls == before


def test_a_client_id_in_flight_at_one_router_is_refused_by_another():
    _, _, (a, b) = _routers()
    t = a.ids.begin("acme", "req-1")
    with pytest.raises(AlreadyExistsError, match="'req-1' is already in use"):
        a.ids.begin("acme", "req-1")
    with pytest.raises(AlreadyExistsError):
        b.ids.begin("acme", "req-1")  # the synchronous claim never waits
    b.ids.begin("other-tenant", "req-1").finish()  # ids are scoped by tenant
    t.finish()
    b.ids.begin("acme", "req-1").finish()  # free again once it finished


def _fast(cfg_ttl: float = 0.3) -> SharedStateConfig:
    return SharedStateConfig(
        liveness_ttl_s=cfg_ttl, refresh_interval_s=cfg_ttl / 3, entry_ttl_s=10 * cfg_ttl, claim_poll_s=0.01
    )


def test_the_async_claim_waits_for_a_live_holder_then_refuses():
    cfg = _fast()
    _, _, (a, b) = _routers(cfg=cfg, clock=time.monotonic)
    a.start()  # renews its liveness in its thread
    try:
        t = a.ids.begin("acme", "req-1")
        t0 = time.monotonic()
        with pytest.raises(AlreadyExistsError):
            asyncio.run(b.ids.begin_async("acme", "req-1"))
        assert time.monotonic() - t0 >= cfg.claim_wait_s  # waited the whole bound: a is alive
        t.finish()
    finally:
        a.close()


def test_the_async_claim_gets_the_id_as_soon_as_the_holder_finishes():
    cfg = _fast(cfg_ttl=30.0)  # the holder stays alive throughout
    _, _, (a, b) = _routers(cfg=cfg, clock=time.monotonic)
    t = a.ids.begin("acme", "req-1")

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.05, t.finish)
        ticket = await b.ids.begin_async("acme", "req-1")
        assert ticket.cluster_id != t.cluster_id
        ticket.finish()

    asyncio.run(main())


def test_a_dead_routers_claim_is_taken_over_and_its_slots_stop_counting():
    """The SDK's failover: a request re-issued under its id on the next router when its router
    died (SIGKILL: nothing released) gets the id once the dead router's liveness expires."""
    cfg = _fast()
    _, backend, (a, b) = _routers(cfg=cfg, clock=time.monotonic)
    p = _p(max_inflight=1)
    a.gate.admit(p)
    a.ids.begin("acme", "req-1")  # a then dies: no tick, no release
    with pytest.raises(ResourceExhaustedError):
        b.gate.admit(p)

    async def main() -> None:
        ticket = await b.ids.begin_async("acme", "req-1")
        ticket.finish()

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 <= cfg.claim_wait_s + 0.5
    b.gate.admit(p).release()  # a's slot no longer counts
    assert "r0" not in next(iter(backend.inflight_by.values()))  # and was removed


def test_a_lapsed_router_rewrites_its_counts_and_claims():
    clock, backend, (a, b) = _routers()
    p = _p(max_inflight=1)
    held = a.gate.admit(p)
    t = a.ids.begin("acme", "req-1")
    clock.t += CFG.liveness_ttl_s + 0.1  # a frozen past its liveness; b keeps renewing
    b.tick()
    b.gate.admit(p).release()  # a's slot dropped by b's admission
    a.tick()  # a wakes: its liveness had lapsed
    assert a.gate.inflight("acme") == 1  # its count is back
    with pytest.raises(ResourceExhaustedError):
        b.gate.admit(p)
    with pytest.raises(AlreadyExistsError):
        b.ids.begin("acme", "req-1")  # its claim still stands (nobody took it)
    held.release()
    t.finish()
    b.gate.admit(p).release()


def test_a_release_that_does_not_reach_the_backend_is_repaired_by_the_next_renewal(caplog):
    clock, backend, (a, b) = _routers()
    p = _p(max_inflight=1)
    held = a.gate.admit(p)
    t = a.ids.begin("acme", "req-1")
    backend.down = True
    with caplog.at_level(logging.WARNING, logger="pdserve.auth.shared_state"):
        held.release()  # never raises: the request is over
        t.finish()
    assert "retried at the next renewal" in caplog.text
    backend.down = False
    with pytest.raises(ResourceExhaustedError):
        b.gate.admit(p)  # the backend still counts it
    clock.t += CFG.breaker_s
    a.tick()
    b.gate.admit(p).release()
    b.ids.begin("acme", "req-1").finish()


def test_a_stale_claim_of_this_router_does_not_block_its_id():
    _, backend, (a, _) = _routers()
    t = a.ids.begin("acme", "req-1")
    backend.down = True
    t.finish()  # the release is lost
    backend.down = False
    a.ids.begin("acme", "req-1").finish()  # this router knows it runs nothing under that id


def test_an_unreachable_backend_fails_requests_that_need_it_and_then_fails_fast():
    clock, backend, (a, _) = _routers()
    backend.down = True
    with pytest.raises(UnavailableError, match=r"shared tenant state \(fake-redis\) is unreachable"):
        a.gate.admit(_p(max_inflight=1))
    calls = backend.calls
    with pytest.raises(UnavailableError):
        a.ids.begin("acme", "req-1")  # the breaker: no new attempt for breaker_s
    assert backend.calls == calls
    a.gate.admit(_p()).release()  # unlimited, without an id: served
    backend.down = False
    clock.t += CFG.breaker_s
    a.gate.admit(_p(max_inflight=1)).release()


def test_close_releases_everything_at_once():
    _, backend, (a, b) = _routers()
    p = _p(max_inflight=1)
    a.gate.admit(p)
    a.ids.begin("acme", "req-1")
    a.close()
    b.gate.admit(p).release()
    b.ids.begin("acme", "req-1").finish()
    assert "r0" not in backend.alive_until


def test_edge_auth_on_the_shared_state_admits_and_releases_through_it():
    _, _, (a, b) = _routers()
    edges = [EdgeAuth(None, gate=st.gate, ids=st.ids) for st in (a, b)]
    p = Principal("u", TenantPolicy(max_inflight=1), AuthMode.DEV)
    first = asyncio.run(edges[0].begin_async(p, "id-1", ""))
    with pytest.raises(ResourceExhaustedError):
        edges[1].begin(p, "id-2", "")
    first.close()
    with edges[1].begin(p, "id-1", ""):
        pass


@pytest.mark.parametrize(
    ("spec", "index", "routers", "expected"),
    [
        ("auto", None, 1, TenantStateChoice("")),
        ("auto", "redis://127.0.0.1:6379/0", 1, TenantStateChoice("")),  # one router: its memory
        ("auto", "redis://127.0.0.1:6379/0", 3, TenantStateChoice("redis://127.0.0.1:6379/0")),
        ("redis://h:1/2", None, 1, TenantStateChoice("redis://h:1/2")),
        ("rediss://h:1/2", None, 2, TenantStateChoice("rediss://h:1/2")),
        ("local", None, 1, TenantStateChoice("")),
    ],
)
def test_the_tenant_state_choice(spec, index, routers, expected):
    assert choose_tenant_state(spec, index, routers) == expected


def test_several_routers_without_shared_state_are_refused_unless_asked_for():
    with pytest.raises(InvalidRequestError, match=r"2 x its in-flight quota.*--tenant-state redis://"):
        choose_tenant_state("auto", None, 2)
    with pytest.raises(InvalidRequestError, match="--tenant-state local"):
        choose_tenant_state("auto", "memory", 2)
    c = choose_tenant_state("LOCAL", None, 2)
    assert c.url == "" and "2 x its in-flight quota" in c.warning
    with pytest.raises(InvalidRequestError, match="--tenant-state must be"):
        choose_tenant_state("memcached://x", None, 1)
    with pytest.raises(InvalidRequestError, match="--cluster-routers"):
        choose_tenant_state("auto", None, 0)


def test_the_launcher_tells_each_router_how_many_routers_there_are(caplog):
    from pdserve.launcher import ClusterSpec, router_tenant_state_args

    assert router_tenant_state_args(ClusterSpec(model_path="m")) == []
    redis = "redis://127.0.0.1:1/0"
    assert router_tenant_state_args(ClusterSpec(model_path="m", num_routers=2, index_url=redis)) == [
        "--cluster-routers",
        "2",
    ]
    with caplog.at_level(logging.WARNING, logger="pdserve.launcher"):
        args = router_tenant_state_args(ClusterSpec(model_path="m", num_routers=2))
    assert args == ["--cluster-routers", "2", "--tenant-state", "local"]
    assert "2 x its quota" in caplog.text
    spec = ClusterSpec(model_path="m", num_routers=2, tenant_state="redis://127.0.0.1:2/0")
    assert router_tenant_state_args(spec)[-2:] == ["--tenant-state", "redis://127.0.0.1:2/0"]


def test_the_router_refuses_several_routers_without_shared_state(capsys):
    from router.__main__ import _shared_tenant_state, build_parser

    ap = build_parser()
    a = ap.parse_args(["--model", "m", "--cluster-routers", "2"])
    with pytest.raises(SystemExit) as ei:
        _shared_tenant_state(ap, a)
    assert ei.value.code == 2
    assert "--tenant-state redis://" in capsys.readouterr().err
    assert _shared_tenant_state(ap, ap.parse_args(["--model", "m"])) is None
