"""``pdserve up`` with the direct KV handoff (``kv_transfer: {kind: dist, backend: gloo}``) on a
2-node ``ray.cluster_utils.Cluster`` (two raylets on 127.0.0.1, token auth on).

1 prefill + 2 decode workers form one gloo process group (ranks 0, 1, 2) across the two Ray nodes;
the prefill worker is itself tensor parallel (``tp: 3``: two follower processes of its actor), and
the router places with the goodput policy.
The tests run in order on that one deployment: every output equals the whole engine's and the KV
moved over the group (no store put, a push per request); a killed decode worker leaves the group
usable for the others; a decode worker added by ``scale`` (not in the group) gets direct handles
spilled to the prefill worker's store; a restarted prefill worker (not in the group either)
publishes to its store, which the grouped decode worker reads; a dead tensor-parallel rank makes
its worker exit and Ray restart it whole; a config the cluster can never hold is refused at once;
``down`` ends it all.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import ray

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.cluster_config import from_dict
from tests.prompts import PROMPTS as BASE
from tests.ray_harness import only_decode, two_node_cluster

pytestmark = pytest.mark.slow

NS = "pdserve-dist-test"
PROMPTS = BASE + [f"Question: {p} Answer:" for p in BASE]  # 32 distinct prompts
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def deployment(smollm_path):
    from pdserve import ray_cluster

    config = from_dict(
        {
            "model": str(smollm_path),
            "host": "127.0.0.1",
            "security": {"tls": "off"},  # plaintext on loopback: asked for explicitly
            "namespace": NS,
            # the prefill worker is itself split over 3 processes (tensor parallel, gloo)
            "prefill": {"count": 1, "num_cpus": 1, "kv_blocks": 256, "tp": 3},
            "decode": {"count": 2, "num_cpus": 1, "kv_blocks": 256},
            "store": {"capacity_blocks": 512, "host_id_per_node": True},
            # goodput placement (no SLO on these requests: it refuses none); every prompt through
            # the prefill worker, so that each request makes one handoff
            "router": {
                "heartbeat_timeout_s": 2.0,
                "heartbeat_interval_s": 0.25,
                "policy": "goodput",
                "local_prefill_max_tokens": 0,
            },
            "kv_transfer": {"kind": "dist", "backend": "gloo", "timeout_s": 120},
            "max_restarts": 2,
            "drain_quiet_s": 0.5,
            "startup_timeout_s": 300,
        }
    )
    with two_node_cluster(NS):
        info = ray_cluster.up(config)
        try:
            yield info
        finally:
            if ray_cluster.controller(NS) is not None:
                ray_cluster.down(NS)


@pytest.fixture(scope="module")
def client(deployment):
    with Client(deployment["router"], timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def whole(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512))


def _status() -> dict[str, Any]:
    from pdserve import ray_cluster

    return ray_cluster.status(NS)


def _workers() -> dict[str, dict[str, Any]]:
    st = _status()
    return {w["worker_id"]: w for w in st["pools"]["prefill"] + st["pools"]["decode"] if w["alive"]}


def _stores_in() -> int:
    return sum(s["blocks_in"] for s in _status()["stores"] if s["alive"])


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _restarted(worker_id: str, old_pid: int) -> Callable[[], bool]:
    """Whether ``worker_id``'s actor runs in a new process and the router routes to its new address."""

    def check() -> bool:
        try:
            info = ray.get(ray.get_actor(f"pdserve-{worker_id}", namespace=NS).info.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
        routed = {w["worker_id"]: w for w in ray.get(_router().workers.remote(), timeout=30)}
        return info["pid"] != old_pid and routed.get(worker_id, {}).get("address") == info["address"]

    return check


def _router() -> Any:
    return ray.get_actor("pdserve-router", namespace=NS)


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def _only_decode(worker_id: str):
    return only_decode(NS, worker_id)


def test_up_forms_one_process_group_across_nodes(deployment):
    _wait(
        lambda: all(w["kv_transfer"]["ready"] for w in _workers().values()),
        f"the process group did not form: {[w['kv_transfer'] for w in _workers().values()]}",
    )
    ws = _workers()
    ranks = {wid: w["kv_transfer"]["rank"] for wid, w in ws.items()}
    assert ranks == {"prefill-0": 0, "decode-0": 1, "decode-1": 2}
    assert all(w["kv_transfer"]["world_size"] == 3 for w in ws.values())
    assert len({w["node_id"] for w in ws.values()}) == 2  # the group spans both Ray nodes
    assert ray.get(_router().info.remote(), timeout=30)["policy"] == "goodput"
    pre = ws["prefill-0"]
    assert pre["tp"] == 3 and len(pre["tp_followers"]) == 2  # its own tensor-parallel ranks
    assert all(psutil.pid_exists(p) for p in pre["tp_followers"])
    assert all(w["tp"] == 1 and w["tp_followers"] == [] for wid, w in ws.items() if wid != "prefill-0")
    from pdserve.ray_cli import format_status

    assert "dist rank 0/3 ready tp 3" in format_status(_status())


def test_concurrent_requests_equal_whole_engine_and_move_kv_directly(deployment, client, whole):
    prompts = PROMPTS[:16]
    in_before = _stores_in()
    ref = whole.generate(prompts, GREEDY)
    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda p: client.complete(p, GREEDY), prompts))
    for p, r, g in zip(prompts, ref, got, strict=True):
        assert g.token_ids == r.token_ids, p
    ws = _workers()
    pushes = ws["prefill-0"]["kv_transfer"]["pushes"]
    pulls = {wid: ws[wid]["kv_transfer"]["direct_pulls"] for wid in ("decode-0", "decode-1")}
    assert pushes == len(prompts) == sum(pulls.values()), (pushes, pulls)
    assert all(n > 0 for n in pulls.values()), pulls  # both decode ranks received over the group
    assert ws["prefill-0"]["kv_transfer"]["store_fallbacks"] == 0
    assert _stores_in() == in_before  # nothing went through a store


def test_killed_decode_worker_leaves_the_group_usable(deployment, client, whole):
    ray.kill(ray.get_actor("pdserve-decode-1", namespace=NS), no_restart=True)
    _wait(
        lambda: "decode-1" not in {w["worker_id"] for w in ray.get(_router().workers.remote(), timeout=30)},
        "the router kept decode-1",
        30,
    )
    before = _workers()["decode-0"]["kv_transfer"]["direct_pulls"]
    prompts = PROMPTS[16:20]
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: client.complete(p, GREEDY), prompts))
    for r, g in zip(whole.generate(prompts, GREEDY), got, strict=True):
        assert g.token_ids == r.token_ids
    assert _workers()["decode-0"]["kv_transfer"]["direct_pulls"] == before + len(prompts)


def test_decode_worker_added_by_scale_gets_direct_handles_spilled_to_the_store(deployment, client, whole):
    from pdserve import ray_cluster

    out = ray_cluster.scale(decode=2, namespace=NS)
    assert out["added"] == ["decode-2"]
    new = _workers()["decode-2"]
    assert new["kv_transfer"]["rank"] == -1  # the group's membership is fixed
    in_before = _stores_in()
    served_before = _workers()["prefill-0"]["kv_transfer"]["spills_served"]
    prompts = PROMPTS[20:23]
    with _only_decode("decode-2"):
        got = [client.complete(p, GREEDY) for p in prompts]
    for r, g in zip(whole.generate(prompts, GREEDY), got, strict=True):
        assert g.token_ids == r.token_ids
    ws = _workers()
    assert ws["decode-2"]["kv_transfer"]["spilled_pulls"] == len(prompts)
    assert ws["prefill-0"]["kv_transfer"]["spills_served"] == served_before + len(prompts)
    assert _stores_in() > in_before  # the spilled KV went through the prefill node's store
    st = {s["node_id"]: s for s in _status()["stores"]}
    assert all(s["num_leases"] == 0 for s in st.values())  # every spill lease was released


def test_restarted_prefill_worker_publishes_to_its_store(deployment, client, whole):
    old = _workers()["prefill-0"]
    os.kill(old["pid"], signal.SIGKILL)  # Ray restarts it; a restart does not rejoin the group

    _wait(_restarted("prefill-0", old["pid"]), "prefill-0 was not restarted and re-registered")
    new = _workers()["prefill-0"]
    assert new["kv_transfer"]["rank"] == -1
    # the killed worker's tensor-parallel followers exited with it; the restart has its own
    _wait(lambda: not any(_running(p) for p in old["tp_followers"]), "followers outlived their worker", 30)
    assert len(new["tp_followers"]) == 2 and all(_running(p) for p in new["tp_followers"])
    in_before = _stores_in()
    pulls_before = _workers()["decode-0"]["kv_transfer"]["direct_pulls"]
    prompts = PROMPTS[23:26]
    with _only_decode("decode-0"):  # the grouped decode worker reads store handles as before
        got = [client.complete(p, GREEDY) for p in prompts]
    for r, g in zip(whole.generate(prompts, GREEDY), got, strict=True):
        assert g.token_ids == r.token_ids
    assert _stores_in() > in_before
    assert _workers()["decode-0"]["kv_transfer"]["direct_pulls"] == pulls_before


def test_a_dead_tensor_parallel_rank_restarts_its_worker(deployment, client, whole):
    old = _workers()["prefill-0"]
    os.kill(old["tp_followers"][1], signal.SIGKILL)  # rank 2 of the prefill worker dies

    _wait(
        _restarted("prefill-0", old["pid"]),
        "prefill-0 did not exit and come back after its tensor-parallel rank died",
    )
    _wait(
        lambda: not any(_running(p) for p in old["tp_followers"]), "the old ranks outlived their worker", 30
    )
    new = _workers()["prefill-0"]
    assert len(new["tp_followers"]) == 2 and all(_running(p) for p in new["tp_followers"])
    prompts = PROMPTS[26:28]
    got = [client.complete(p, GREEDY) for p in prompts]
    for r, g in zip(whole.generate(prompts, GREEDY), got, strict=True):
        assert g.token_ids == r.token_ids


def test_up_refuses_at_once_what_the_ray_cluster_can_never_hold(deployment, smollm_path):
    from pdserve import ray_cluster
    from pdserve.errors import InvalidRequestError

    gpu = from_dict(
        {
            "model": str(smollm_path),
            "host": "127.0.0.1",
            "security": {"tls": "off"},  # plaintext on loopback: asked for explicitly
            "namespace": "pdserve-gpu-test",
            "decode": {"count": 1, "device": "cuda", "tp": 2},
        }
    )
    t0 = time.monotonic()
    with pytest.raises(
        InvalidRequestError, match=r"needs 2 GPU \(decode: 1 x 2 GPU \(tp 2\)\) but the Ray cluster has 0"
    ):
        ray_cluster.up(gpu)
    assert time.monotonic() - t0 < 60  # not after startup_timeout_s
    assert ray_cluster.controller("pdserve-gpu-test") is None


def test_down_ends_the_deployment(deployment):
    from pdserve import ray_cluster

    out = ray_cluster.down(NS)
    assert out["workers"] == 3 and out["stores"] == 2
    assert ray_cluster.controller(NS) is None
