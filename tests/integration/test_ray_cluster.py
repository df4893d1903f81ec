"""pdserve on Ray: a 2-node ``ray.cluster_utils.Cluster`` (two raylets on 127.0.0.1) with token auth on.

``pdserve up`` (the CLI, as its own driver process) starts 1 prefill + 2 decode workers (CPU, one
placement group each), a router and one KV store per Ray node. Each Ray node is its own simulated
host (``store.host_id_per_node``), so KV blocks crossing nodes go through the gRPC transport and
same-node pulls through shared memory. The tests run in order on that one deployment: outputs
equal the whole engine's, a SIGKILLed worker is restarted and registers again, a killed decode
actor is dropped by the router within the heartbeat timeout, the pools scale both ways without
dropping a streaming request, ``status`` works through the CLI, ``down`` ends only what ``up``
started.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
import yaml

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import PdserveError
from pdserve.ray_cli import format_status
from tests.prompts import PROMPTS as PROMPTS_16
from tests.ray_harness import only_decode, two_node_cluster
from tests.ray_harness import run_cli as _cli

pytestmark = pytest.mark.slow

NS = "pdserve-test"
HEARTBEAT_TIMEOUT_S = 2.0

BASE = PROMPTS_16
PROMPTS = BASE + [f"Question: {p} Answer:" for p in BASE]  # 32 distinct prompts
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    """Two raylets on 127.0.0.1 with token auth; this test process joins as a driver."""
    with two_node_cluster(NS) as c_env:
        yield c_env


@pytest.fixture(scope="module")
def adapter(smollm_path, tmp_path_factory) -> Path:
    """A LoRA adapter every worker serves (the config's ``lora`` section; a shared path on the
    two simulated nodes, as a real cluster would mount it)."""
    from tests.lora_adapters import make_adapter

    out = tmp_path_factory.mktemp("lora") / "sql"
    return make_adapter(smollm_path, out, r=8, alpha=16, targets=["q_proj", "v_proj"], seed=5)


@pytest.fixture(scope="module")
def config_file(smollm_path, adapter, tmp_path_factory) -> Path:
    cfg = {
        "model": str(smollm_path),
        "host": "127.0.0.1",
        "security": {"tls": "off"},  # plaintext on loopback: asked for explicitly
        "namespace": NS,
        "prefill": {"count": 1, "num_cpus": 1, "kv_blocks": 256},
        "decode": {"count": 2, "num_cpus": 1, "kv_blocks": 256},
        "store": {"capacity_blocks": 512, "host_id_per_node": True},
        # the memory index: each router keeps its own tenant state (asked for explicitly)
        "router": {
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            "heartbeat_interval_s": 0.25,
            "tenant_state": "local",
            # every request handed off (goodput, the default, may prefill a short prompt on its
            # decode worker: no KV moves, and the transport checks below see nothing)
            "policy": "least_loaded",
        },
        "routers": 2,  # no single router: every worker registers with both, the client takes both
        "max_restarts": 2,
        "drain_quiet_s": 0.5,
        "startup_timeout_s": 300,
        "lora": {"adapters": {"sql": str(adapter)}, "max_loras": 2},
    }
    p = tmp_path_factory.mktemp("ray") / "cluster.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def deployment(cluster, config_file):
    """``pdserve up`` through the CLI (its own driver process); ``pdserve down`` at the end."""
    c, env = cluster
    r = _cli(["up", "--config", str(config_file), "--address", c.address, "--json"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    yield info
    from pdserve import ray_cluster

    if ray_cluster.controller(NS) is not None:
        ray_cluster.down(NS)


@pytest.fixture(scope="module")
def client(deployment):
    with Client(deployment["routers"], timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def whole(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512))


def _router_workers() -> list[dict]:
    return ray.get(ray.get_actor("pdserve-router", namespace=NS).workers.remote(), timeout=30)


def _status() -> dict:
    from pdserve import ray_cluster

    return ray_cluster.status(NS)


def test_up_places_one_store_per_node_and_pools(deployment):
    st = _status()
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {s["node_id"] for s in st["stores"]} == nodes and len(nodes) == 2
    assert len({s["host_id"] for s in st["stores"]}) == 2  # simulated hosts
    assert [w["worker_id"] for w in st["pools"]["prefill"]] == ["prefill-0"]
    assert [w["worker_id"] for w in st["pools"]["decode"]] == ["decode-0", "decode-1"]
    for w in st["pools"]["prefill"] + st["pools"]["decode"]:
        assert w["alive"] and w["address"].startswith("127.0.0.1:")
        store = next(s for s in st["stores"] if s["node_id"] == w["node_id"])
        assert w["store"] == store["address"] and w["host_id"] == store["host_id"]
    assert {w["worker_id"] for w in st["routed"]} == {"prefill-0", "decode-0", "decode-1"}
    # two router actors, each with every worker registered
    assert [r["name"] for r in st["routers"]] == ["pdserve-router", "pdserve-router-1"]
    assert all(r["alive"] and r["workers"] == 3 for r in st["routers"]), st["routers"]
    assert deployment["routers"] == [r["address"] for r in st["routers"]]
    # each worker holds its own placement group bundle of 1 CPU: 3 of the 4 CPUs are taken
    assert ray.available_resources().get("CPU", 0) == pytest.approx(1.0)


def test_status_gives_every_process_as_a_scrape_target(deployment, tmp_path):
    import json
    import urllib.request

    from pdserve.metrics import write_file_sd
    from pdserve.ray_cli import scrape_targets

    targets = scrape_targets(_status())
    assert sorted(t.process for t in targets)[:5] == [
        "decode-0",
        "decode-1",
        "prefill-0",
        "router",
        "router-1",
    ]
    assert sum(t.component.value == "kv_store" for t in targets) == 2
    groups = json.loads(write_file_sd(tmp_path / "sd.json", targets).read_text())
    assert len(groups) == len(targets) == 7
    for t in targets:  # each really serves Prometheus text
        body = urllib.request.urlopen(f"http://{t.address}/metrics", timeout=10).read().decode()
        assert "pdserve_" in body, t


def _router():
    return ray.get_actor("pdserve-router", namespace=NS)


def _only_decode(worker_id: str):
    return only_decode(NS, worker_id)


def test_32_concurrent_requests_equal_whole_engine_and_cross_nodes(deployment, client, whole):
    ref = whole.generate(PROMPTS, GREEDY)
    with cf.ThreadPoolExecutor(32) as ex:
        got = list(ex.map(lambda p: client.complete(p, GREEDY), PROMPTS))
    for p, r, g in zip(PROMPTS, ref, got, strict=True):
        assert g.token_ids == r.token_ids, p
        assert g.text == r.text
    # then a handoff to each decode worker in turn: the prefill node's store serves the one on the
    # other node over gRPC and (when one shares its node) the local one from shared memory
    st = _status()
    pre = st["pools"]["prefill"][0]
    stores = {s["node_id"]: s for s in st["stores"]}
    # 2 CPUs per node: the 3 one-CPU workers cannot share one node
    assert {w["node_id"] for w in st["pools"]["decode"]} - {pre["node_id"]}
    for w in st["pools"]["decode"]:
        before = stores[pre["node_id"]]
        with _only_decode(w["worker_id"]):
            g = client.complete(PROMPTS[0], GREEDY)
        assert g.token_ids == ref[0].token_ids
        after = next(s for s in _status()["stores"] if s["node_id"] == pre["node_id"])
        grpc_out = after["blocks_out_grpc"] - before["blocks_out_grpc"]
        shm_out = after["blocks_out_shm"] - before["blocks_out_shm"]
        if w["node_id"] == pre["node_id"]:
            assert shm_out > 0 and grpc_out == 0, (w["worker_id"], after)
        else:
            assert grpc_out > 0 and shm_out == 0, (w["worker_id"], after)
        stores[pre["node_id"]] = after
    assert all(w["kv_shm_fallbacks"] == 0 for w in _status()["pools"]["decode"])


def test_direct_streams_from_each_decode_worker_equal_relayed_and_whole_engine(deployment, client, whole):
    """``direct_streams`` (the config's default): each router redirects a request offering a
    direct stream to its decode worker (DirectStream served on the worker's port: no mutual TLS
    here), and the client's tokens equal the relayed request's and the whole engine's."""
    import grpc

    from pdserve.proto_convert import sampling_to_proto
    from pdserve.v1 import client_pb2, client_pb2_grpc

    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = whole.generate(PROMPTS[:2], sampling)
    decode = {w["worker_id"]: w for w in _status()["pools"]["decode"]}
    for wid, w in decode.items():
        with _only_decode(wid):
            for router in deployment["routers"]:  # every router serves direct streams
                with grpc.insecure_channel(router) as ch:
                    req = client_pb2.GenerateRequest(
                        prompt=PROMPTS[0], sampling=sampling_to_proto(sampling), direct_stream=True
                    )
                    call = client_pb2_grpc.GenerateStub(ch).Generate(req, timeout=120)
                    red = next(m for m in call if m.HasField("direct") or m.HasField("finish"))
                    call.cancel()
                assert red.HasField("direct"), red
                assert red.direct.worker_id == wid and red.direct.address == w["address"]
                assert red.direct.ticket and not red.direct.lost
            direct = client.complete(PROMPTS[1], sampling, direct=True)
            relayed = client.complete(PROMPTS[1], sampling, direct=False)
        assert direct.token_ids == relayed.token_ids == ref[1].token_ids, wid
        assert direct.text == relayed.text == ref[1].text


def test_lora_adapter_from_the_config_is_listed_and_served_exactly(deployment, client, smollm_path, adapter):
    """``lora.adapters`` reaches every worker: the router lists the adapter and a disaggregated
    request naming it equals the engine whole with the same adapter (and differs from the base)."""
    from engine.lora import AdapterSpec, LoRAConfig

    assert list(client.list_adapters().values()) == [["sql"]]
    prompt = PROMPTS[0]
    got = client.complete(prompt, GREEDY, adapter="sql").token_ids
    eng = LLMEngine.from_pretrained(
        smollm_path, EngineConfig(num_kv_blocks=128), lora=LoRAConfig((AdapterSpec("sql", str(adapter)),))
    )
    try:
        rid = eng.add_request(None, eng.tokenizer.encode(prompt), GREEDY, adapter_id="sql")
        want: list[int] = []
        while eng.has_unfinished():
            for o in eng.step():
                if o.request_id == rid:
                    want = list(o.token_ids)
    finally:
        eng.close()
    assert got == want
    assert got != client.complete(prompt, GREEDY).token_ids  # the adapter was really applied


def test_sigkilled_worker_restarts_and_registers_again(deployment, client, whole):
    st = _status()
    old = st["pools"]["prefill"][0]
    os.kill(old["pid"], signal.SIGKILL)  # a crash: Ray restarts the actor (max_restarts)
    deadline = time.monotonic() + 300
    new = None
    while time.monotonic() < deadline:
        try:
            new = ray.get(ray.get_actor("pdserve-prefill-0", namespace=NS).info.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            new = None
        if new and new["pid"] != old["pid"]:
            routed = {w["worker_id"]: w for w in _router_workers()}
            if routed.get("prefill-0", {}).get("address") == new["address"]:
                break
        time.sleep(0.5)
    else:
        raise AssertionError(f"prefill-0 was not restarted and re-registered: {new}")
    assert new["worker_id"] == "prefill-0"
    ref = whole.generate(PROMPTS[:4], GREEDY)
    for p, r in zip(PROMPTS[:4], ref, strict=True):
        assert client.complete(p, GREEDY).token_ids == r.token_ids


def test_killed_decode_actor_is_dropped_and_new_requests_succeed(deployment, client, whole):
    long = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)

    def run(p):
        try:
            return client.complete(p, long)
        except PdserveError as e:
            return e

    def decode_running(wid: str) -> int:
        return next(w["num_running"] for w in _status()["pools"]["decode"] if w["worker_id"] == wid)

    with cf.ThreadPoolExecutor(8) as ex:
        with _only_decode("decode-1"):  # half the requests run on the worker about to die
            futs = [ex.submit(run, p) for p in PROMPTS[:4]]
            deadline = time.monotonic() + 120
            while not decode_running("decode-1"):
                assert time.monotonic() < deadline, "no request reached decode-1"
                time.sleep(0.05)
        futs += [ex.submit(run, p) for p in PROMPTS[4:8]]
        victim = ray.get_actor("pdserve-decode-1", namespace=NS)
        ray.kill(victim, no_restart=True)
        t_kill = time.monotonic()
        while "decode-1" in {w["worker_id"] for w in _router_workers()}:
            time.sleep(0.05)
        dropped_after = time.monotonic() - t_kill
        results = [f.result(timeout=300) for f in futs]
    assert dropped_after <= HEARTBEAT_TIMEOUT_S + 1.0, dropped_after
    ref = whole.generate(PROMPTS[:8], long)
    for p, r, g in zip(PROMPTS[:8], ref, results, strict=True):
        if not isinstance(g, Exception):  # requests on the killed worker may fail; others are exact
            assert g.token_ids == r.token_ids, p
    assert sum(not isinstance(g, Exception) for g in results) >= 1
    # new requests all land on the surviving decode worker and succeed
    with cf.ThreadPoolExecutor(8) as ex:
        fresh = list(ex.map(lambda p: client.complete(p, GREEDY), PROMPTS[8:16]))
    for r, g in zip(whole.generate(PROMPTS[8:16], GREEDY), fresh, strict=True):
        assert g.token_ids == r.token_ids
    st = _status()
    dead = [w for w in st["pools"]["decode"] if w["worker_id"] == "decode-1"]
    assert dead and not dead[0]["alive"]


def test_scale_up_then_down_drains_streaming_requests(deployment, client, whole):
    from pdserve import ray_cluster

    out = ray_cluster.scale(prefill=2, decode=2, namespace=NS)
    assert out["counts"] == {"prefill": 2, "decode": 2}
    assert sorted(out["added"]) == ["decode-2", "prefill-1"]  # decode-1 (dead) was pruned
    assert {w["worker_id"] for w in _router_workers()} == {"prefill-0", "prefill-1", "decode-0", "decode-2"}

    # 96 tokens (not 48): the streams must still run on decode-2 when scale-down's drain starts
    # (busy_at_drain > 0), after a status poll and the controller's Ray round trips, which take
    # seconds on a loaded host while SmolLM2 decodes 48 tokens in ~1-1.5 s there
    long = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    prompts = PROMPTS[16:20]
    ref = whole.generate(prompts, long)
    with _only_decode("decode-2"):  # the streams run on the worker that scale-down removes
        streams = [client.generate(p, long) for p in prompts]
        its = [iter(s) for s in streams]
        firsts = [next(it) for it in its]  # every request is streaming
    deadline = time.monotonic() + 60
    while sum(w["num_running"] for w in _status()["pools"]["decode"]) < len(prompts):
        assert time.monotonic() < deadline, "streams did not all reach decode"
        time.sleep(0.05)
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(ray_cluster.scale, 1, 1, NS)
        got = []
        for first, it in zip(firsts, its, strict=True):
            ids = list(first.token_ids)
            for ch in it:
                ids.extend(ch.token_ids)
            got.append(ids)
        res = fut.result(timeout=300)
    for r, g in zip(ref, got, strict=True):
        assert g == r.token_ids  # no streaming request was dropped by the scale-down
    removed = {r["worker_id"]: r for r in res["removed"]}
    assert set(removed) == {"prefill-1", "decode-2"}  # newest first
    assert removed["decode-2"]["drained"]
    assert removed["decode-2"]["busy_at_drain"] > 0, "decode-2 held no request when drained"
    assert res["counts"] == {"prefill": 1, "decode": 1}
    assert {w["worker_id"] for w in _router_workers()} == {"prefill-0", "decode-0"}
    assert client.complete(PROMPTS[0], GREEDY).token_ids == whole.generate([PROMPTS[0]], GREEDY)[0].token_ids


def test_cli_status_joins_with_token_and_rejects_without(cluster, deployment):
    c, env = cluster
    r = _cli(["status", "--address", c.address, "--namespace", NS, "--json"], env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads(r.stdout)
    assert [w["worker_id"] for w in st["pools"]["prefill"] if w["alive"]] == ["prefill-0"]
    assert st["router"] == deployment["router"]
    table = format_status(st)
    assert "prefill pool: 1 worker(s)" in table and "kv store nodes: 2" in table
    assert "decode-0" in table and "decode-1" not in table  # the dead one was pruned by scale
    # a driver with another token is refused, with a message saying how to join
    r = _cli(
        ["status", "--address", c.address, "--namespace", NS],
        {**env, "RAY_AUTH_TOKEN": "0" * 32, "RAY_NUM_REDIS_GET_RETRIES": "2"},
        120,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "refused this driver's token" in r.stderr and "RAY_AUTH_TOKEN" in r.stderr


def test_sigkilled_router_restarts_and_workers_follow_it_to_its_new_port(deployment, whole):
    old = ray.get(_router().info.remote(), timeout=30)
    live = {w["worker_id"] for w in _router_workers()}
    os.kill(old["pid"], signal.SIGKILL)  # the router actor crashes; Ray restarts it on a new port
    deadline = time.monotonic() + 300
    new, routed = None, set()
    while time.monotonic() < deadline:
        try:
            new = ray.get(_router().info.remote(), timeout=30)
            routed = {w["worker_id"] for w in _router_workers()}
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            new = None
        if new and new["pid"] != old["pid"] and routed == live:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"router not restarted or workers not re-registered: {new} {routed} != {live}")
    assert new["address"] != old["address"]  # port 0: the workers had to rediscover it
    assert _status()["router"] == new["address"]
    ref = whole.generate(PROMPTS[:2], GREEDY)
    with Client(new["address"], timeout=300) as c:
        for p, r in zip(PROMPTS[:2], ref, strict=True):
            assert c.complete(p, GREEDY).token_ids == r.token_ids


def test_sigkilled_store_restarts_and_workers_follow_it_to_its_new_port(deployment, whole):
    from pdserve.ray_actors import store_actor_name

    pre = _status()["pools"]["prefill"][0]
    store = ray.get_actor(store_actor_name(pre["node_id"]), namespace=NS)
    old = ray.get(store.info.remote(), timeout=30)
    os.kill(old["pid"], signal.SIGKILL)  # the store actor crashes; Ray restarts it, empty, on a new port
    deadline = time.monotonic() + 300
    new = None
    while time.monotonic() < deadline:
        try:
            new = ray.get(store.info.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            new = None
        if new and new["pid"] != old["pid"]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"store on {pre['node_id']} was not restarted: {new}")
    assert new["address"] != old["address"]
    ref = whole.generate(PROMPTS[:2], GREEDY)
    router = ray.get(_router().info.remote(), timeout=30)["address"]
    with Client(router, timeout=300) as c:  # the prefill worker publishes to the restarted node
        for p, r in zip(PROMPTS[:2], ref, strict=True):
            assert c.complete(p, GREEDY).token_ids == r.token_ids
    info = ray.get(ray.get_actor(f"pdserve-{pre['worker_id']}", namespace=NS).info.remote(), timeout=30)
    assert info["store"] == new["address"]


def test_down_stops_only_what_up_started(deployment):
    from pdserve import ray_cluster

    @ray.remote(num_cpus=0)
    class Bystander:
        def ping(self) -> str:
            return "ok"

    by = Bystander.options(name="bystander", namespace=NS).remote()
    assert ray.get(by.ping.remote(), timeout=60) == "ok"
    out = ray_cluster.down(NS)
    assert out["workers"] == 2 and out["stores"] == 2 and out["routers"] == 2
    assert ray_cluster.controller(NS) is None
    deadline = time.monotonic() + 30
    while True:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NS}
        if names == {"bystander"}:
            break
        assert time.monotonic() < deadline, names
        time.sleep(0.2)
    assert ray.get(by.ping.remote(), timeout=60) == "ok"
    while ray.available_resources().get("CPU", 0) < 4:  # placement groups removed
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
    with pytest.raises(PdserveError, match="not up"):
        ray_cluster.status(NS)
    ray.kill(by)
