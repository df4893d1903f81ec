"""Leases of cancelled requests: cancelled between prefill and decode, none stays pinned.

One cluster (store, router, 1 prefill, 1 decode; the real SmolLM2-135M model) over real processes
on loopback. Each request is cancelled by its client right after the first token (the prefill's,
relayed while the router hands the KV to the decode worker) or before it (during the prefill):
every handoff lease must be released within a few seconds, not left to its TTL (30 s here).
"""

from __future__ import annotations

import time

import pytest

from kv_store.client import KVStoreClient
from pdserve.client import Client
from pdserve.errors import UnavailableError
from pdserve.launcher import ClusterSpec, launch

pytestmark = pytest.mark.slow

RELEASE_BOUND_S = 5.0  # well under the 30 s handoff lease TTL


@pytest.fixture(scope="module")
def cluster(smollm_path):
    cl = launch(ClusterSpec(model_path=str(smollm_path), worker_kv_blocks=512, store_capacity_blocks=1024))
    yield cl
    cl.stop()


def _leases_after(store: KVStoreClient, bound_s: float) -> int:
    """Outstanding leases once they all went, or after ``bound_s`` (then: how many are left)."""
    deadline = time.monotonic() + bound_s
    while True:
        n = store.stats().node.num_leases
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def _wait_placeable(c: Client, timeout_s: float = 60.0) -> None:
    """One whole request served (the workers registered and heartbeating on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            c.complete("warm up", max_tokens=2, temperature=0.0)
            return
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_cancel_between_prefill_and_decode_releases_every_lease(cluster) -> None:
    store = KVStoreClient(cluster.store_address)
    prompt = "Write a long, detailed history of the lighthouse keepers of the northern coast. " * 3
    cancelled_after_first = 0
    try:
        assert _leases_after(store, 10.0) == 0
        with Client(cluster.router_address, timeout=60) as c:
            _wait_placeable(c)
            for i in range(16):
                s = c.generate(f"{i} {prompt}", max_tokens=64, temperature=0.0, ignore_eos=True)
                it = iter(s)
                if i % 4 != 3:
                    next(it)  # the first token: the prefill is done, the KV is being handed over
                    cancelled_after_first += 1
                else:
                    time.sleep(0.05)  # cancelled during the prefill or its publish
                s.cancel()
                list(it)  # drain what the stream still holds (nothing after a cancel)
        left = _leases_after(store, RELEASE_BOUND_S)
        assert left == 0, f"{left} handoff leases still pinned {RELEASE_BOUND_S}s after 16 cancellations"
        st = store.stats().node
        assert st.expired_leases == 0  # released, not left to expire
        assert cancelled_after_first == 12
    finally:
        store.close()
