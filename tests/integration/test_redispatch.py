"""The router re-dispatches when a decode worker dies (DESIGN lifecycle step 5), over real
processes on loopback with the real SmolLM2-135M model.

One cluster (store, router, 1 prefill, decode-0) serves the module. Each test adds a decode
worker with more KV blocks than decode-0, so the placement policy (most free blocks first) puts
the request on it, and kills it with SIGKILL:

* mid-stream: after the client received the first ``K`` tokens of a long greedy generation; the
  router prefills prompt + tokens so far again and continues on decode-0;
* before decoding: right after it registered (the router still counts it alive: the heartbeat
  timeout is long), so the Decode call fails at once; the router hands the same KV to decode-0.

Either way the client gets the whole output, equal token for token to the engine run whole, and
no block or lease leaks.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.client import KVStoreClient
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, LocalCluster, _spawn, launch
from tests.integration.clusters import paced_workers
from tests.workers import worker_stats

SMALL_KV_BLOCKS = 128  # decode-0 (and the prefill worker)
BIG_KV_BLOCKS = 256  # the decode workers that get killed: preferred by placement (more free blocks)
K = 6  # tokens the client receives before the kill
# each step of a victim worker lasts at least this long (tests.integration.clusters.paced_workers;
# decode-0 and the prefill worker run unpaced): the request must still run there when the client
# has K tokens and the test kills it (SmolLM2 decodes ~10 ms a step on a quiet host; a client
# lagging its stream could see the end first). Paced: >= 1.7 s left at K (test_parallel_sampling_
# cluster's group, 3 of 48 tokens each: >= 1.3 s).
VICTIM_MIN_STEP_S = 0.03


@pytest.fixture(scope="module")
def cluster(smollm_path):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=SMALL_KV_BLOCKS,
            store_capacity_blocks=1024,
            # a killed worker stays registered: the router learns of its death from a failed call
            # every prompt prefilled on prefill-0 (the tests count its requests): no local prefill
            # on a decode worker, which the goodput policy prefers for a short prompt on an idle
            # cluster since it prices the KV handoff
            router_args=("--heartbeat-timeout-s", "120", "--local-prefill-max-tokens", "0"),
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def whole(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=64))


def _router_metric(cluster: LocalCluster, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://{cluster.metrics['router']}/metrics", timeout=10) as r:
        body = r.read().decode()
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def _redispatches(cluster: LocalCluster) -> float:
    return _router_metric(cluster, "pdserve_router_redispatches_total", 'phase="decode"')


def _add_big_decode_worker(cluster: LocalCluster, name: str) -> str:
    """Start decode worker ``name`` with BIG_KV_BLOCKS, paced to ``VICTIM_MIN_STEP_S`` a step, and
    wait until the router counts it."""
    before = _router_metric(cluster, "pdserve_router_workers", 'role="decode"')
    with paced_workers(VICTIM_MIN_STEP_S):
        info = _spawn(
            cluster,
            name,
            [
                "-m",
                "decode_worker",
                "--worker-id",
                name,
                "--model",
                cluster.spec.model_path,
                "--store",
                cluster.store_address,
                "--router",
                cluster.router_address,
                "--kv-blocks",
                str(BIG_KV_BLOCKS),
                "--block-size",
                str(cluster.spec.block_size),
            ],
            cluster.spec.startup_timeout_s,
        )
    cluster.workers[name] = info["address"]
    deadline = time.monotonic() + 60
    while _router_metric(cluster, "pdserve_router_workers", 'role="decode"') < before + 1:
        assert time.monotonic() < deadline, f"{name} did not register with the router"
        time.sleep(0.1)
    return info["address"]


def _wait_baseline(cluster: LocalCluster, timeout: float = 20.0) -> None:
    """decode-0 holds no blocks and the store no lease (nothing leaked by the failover)."""
    store = KVStoreClient(cluster.store_address)
    deadline = time.monotonic() + timeout
    try:
        while True:
            used = worker_stats(cluster.workers["decode-0"]).kv_blocks_used
            leases = store.stats().node.num_leases
            if used == 0 and leases == 0:
                return
            assert time.monotonic() < deadline, f"leak: decode-0 used={used} leases={leases}"
            time.sleep(0.1)
    finally:
        store.close()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_decode_worker_killed_mid_stream(cluster, client, whole, params):
    """The client's output equals the uninterrupted run: greedy, and seeded too (the resumed leg
    samples with seed_position_offset = tokens already produced)."""
    prompt = "Tell me a long story about a lighthouse keeper and the sea."
    ref = whole.generate([prompt], params)[0]
    victim = f"decode-mid-{'greedy' if params.greedy else 'seeded'}"
    _add_big_decode_worker(cluster, victim)
    before = _redispatches(cluster)
    ids: list[int] = []
    text: list[str] = []
    fin = None
    killed_at = None
    for c in client.generate(prompt, params):
        ids += c.token_ids
        text.append(c.text)
        fin = c.finish or fin
        if killed_at is None and len(ids) >= K:
            # the request streams through the big worker (placement prefers it)
            assert worker_stats(cluster.workers[victim]).num_running == 1
            cluster.kill(victim)
            killed_at = len(ids)
    assert killed_at is not None and killed_at < params.max_tokens  # it died mid-stream
    assert ids == ref.token_ids
    assert "".join(text) == ref.text
    assert fin is not None and fin.reason == "length" and fin.completion_tokens == params.max_tokens
    assert _redispatches(cluster) == before + 1
    _wait_baseline(cluster)


def test_decode_worker_killed_before_decoding(cluster, client, whole):
    prompt = "Write a short poem about autumn leaves."
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = whole.generate([prompt], params)[0]
    victim = "decode-pre"
    _add_big_decode_worker(cluster, victim)
    cluster.kill(victim)  # still registered: the router sends it the Decode, which fails at once
    before = _redispatches(cluster)
    prefills = worker_stats(cluster.workers["prefill-0"]).requests_finished_total
    got = client.complete(prompt, params)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    # the same KV went to decode-0 (re-leased): no second prefill
    assert worker_stats(cluster.workers["prefill-0"]).requests_finished_total == prefills + 1
    assert got.finish.reason == "length" and got.finish.completion_tokens == params.max_tokens
    assert _redispatches(cluster) == before + 1
    _wait_baseline(cluster)
    # decode-0 alone still serves
    again = client.complete(prompt, params)
    assert again.token_ids == ref.token_ids
    assert _redispatches(cluster) == before + 1
