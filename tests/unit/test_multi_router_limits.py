"""What several routers share and what they do not (README, "Several routers").

Tenant in-flight quotas, request rates and client request ids (idempotency keys) live in each
router's memory (:class:`pdserve.auth.quota.TenantGate`, :class:`pdserve.auth.idempotency.
IdempotencyTable`, one of each per router process). With N routers a tenant may therefore have
up to N x ``max_inflight`` requests in flight and N x its rate, and a client id in flight at one
router is not known to another: that last property is what lets the SDK re-issue a request whose
router went away under the same id. These tests pin that behaviour down; the README states it.
"""

from __future__ import annotations

import pytest

from pdserve.auth.idempotency import IdempotencyTable
from pdserve.auth.quota import TenantGate
from pdserve.auth.tenants import AuthMode, Principal, TenantPolicy
from pdserve.errors import AlreadyExistsError, ResourceExhaustedError


def test_inflight_quota_is_per_router() -> None:
    p = Principal("acme", TenantPolicy(max_inflight=1), AuthMode.API_KEY, key_id="k1")
    router_a, router_b = TenantGate(clock=lambda: 0.0), TenantGate(clock=lambda: 0.0)
    held_a = router_a.admit(p)
    with pytest.raises(ResourceExhaustedError, match="max_inflight 1"):
        router_a.admit(p)  # enforced within one router
    held_b = router_b.admit(p)  # the other router does not see router a's request
    assert (router_a.inflight("acme"), router_b.inflight("acme")) == (1, 1)  # 2 = N x max_inflight
    held_a.release()
    held_b.release()


def test_request_rate_is_per_router() -> None:
    p = Principal("acme", TenantPolicy(rate_per_s=1.0), AuthMode.API_KEY, key_id="k1")
    router_a, router_b = TenantGate(clock=lambda: 0.0), TenantGate(clock=lambda: 0.0)
    router_a.admit(p).release()
    with pytest.raises(ResourceExhaustedError, match="request rate"):
        router_a.admit(p)
    router_b.admit(p).release()  # a second request in the same instant, at the other router


def test_client_request_id_in_flight_at_one_router_is_accepted_by_another() -> None:
    router_a, router_b = IdempotencyTable(), IdempotencyTable()
    ticket_a = router_a.begin("acme", "req-1")
    with pytest.raises(AlreadyExistsError):
        router_a.begin("acme", "req-1")  # one router refuses the id while it runs
    ticket_b = router_b.begin("acme", "req-1")  # the SDK's failover re-issue under the same id
    assert ticket_a.cluster_id != ticket_b.cluster_id
    ticket_a.finish()
    ticket_b.finish()
