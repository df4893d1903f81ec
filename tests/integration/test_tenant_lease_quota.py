"""Lease exhaustion across tenants (issue #13): the store caps leased blocks per tenant, and the
tenant is the one of the request's API key (the router sets it; the prefill worker charges its
handoff lease to it).

One cluster with API keys (store, router, 1 prefill, 1 decode; the real SmolLM2-135M model) on
loopback; the store allows 12 leased blocks per tenant. Tenant alice pins her whole quota (a
cluster member leases blocks as ``tenant:alice``, what alice's handoffs in flight hold); then
bob's requests are served, alice's own next request is refused with RESOURCE_EXHAUSTED naming her
quota, and once her leases are released she is served again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from engine.models.config import ModelConfig
from kv_store.auth import tenant_owner
from kv_store.client import KVStoreClient
from kv_store.layout import KVLayout
from pdserve.auth.keys import FileKeyStore, issue_key
from pdserve.client import Client
from pdserve.errors import ResourceExhaustedError
from pdserve.launcher import ClusterSpec, launch

pytestmark = pytest.mark.slow

TENANT_QUOTA = 12  # leased blocks per tenant on the store node
# ~6 full blocks of 16 tokens: a handoff leases fewer blocks than the quota
PROMPT = " ".join(f"Fact {i}: lighthouses guide ships along the coast at night." for i in range(7))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("auth") / "keys.yaml"
    store = FileKeyStore(path, create=True)
    return {"path": str(path), **{t: issue_key(store, t)[0] for t in ("alice", "bob")}}


@pytest.fixture(scope="module")
def cluster(smollm_path: Path, keys: dict[str, Any]):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=256,
            store_capacity_blocks=64,
            store_args=("--max-leased-blocks-per-tenant", str(TENANT_QUOTA)),
            router_args=("--api-keys", keys["path"]),
            startup_timeout_s=600,  # a loaded shared machine starts workers slowly
        )
    )
    yield cl
    cl.stop()


def _layout(model_path: Path) -> KVLayout:
    mc = ModelConfig.from_path(str(model_path))
    return KVLayout(model_path.name, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, "float32", 16)


def _served(cluster, key: str, prompt: str) -> int:
    with Client(cluster.router_address, timeout=120, api_key=key) as c:
        return c.complete(prompt, max_tokens=3, temperature=0.0, ignore_eos=True).finish.completion_tokens


def test_a_tenant_pinning_its_lease_quota_cannot_fail_another_tenants_requests(
    cluster, keys, smollm_path: Path
) -> None:
    layout = _layout(smollm_path)
    hashes = [os.urandom(16) for _ in range(TENANT_QUOTA)]
    blocks = [os.urandom(layout.block_nbytes) for _ in hashes]
    with KVStoreClient(cluster.store_address, timeout_s=60, lease_owner=tenant_owner("alice")) as alice_kv:
        pinned = alice_kv.put_blocks(layout, hashes, blocks, lease_ttl_s=60.0)  # alice's whole quota
        assert pinned.lease_id
        with pytest.raises(ResourceExhaustedError, match="lease quota of tenant 'alice'"):
            alice_kv.lease(hashes[:1])
        # bob's requests are served: his handoff leases are his, not alice's
        for i in range(3):
            assert _served(cluster, keys["bob"], f"{i} {PROMPT}") == 3
        # alice's own request: refused, naming her quota
        with pytest.raises(ResourceExhaustedError, match=f"tenant 'alice'.*at most {TENANT_QUOTA}"):
            _served(cluster, keys["alice"], f"alice {PROMPT}")
        assert alice_kv.release(pinned.lease_id)
    assert _served(cluster, keys["alice"], f"alice {PROMPT}") == 3  # her quota is free again
    with KVStoreClient(cluster.store_address, timeout_s=60) as kv:
        st = kv.stats().node
        assert st.num_leases == 0 and st.lease_quota_refusals >= 2
