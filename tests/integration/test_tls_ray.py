"""pdserve on Ray with the cluster config's ``security:`` section on (TLS, mutual TLS, the cluster
token): a 2-raylet ``ray.cluster_utils.Cluster`` on 127.0.0.1, ``pdserve up`` through the CLI with
``tls: on`` and a ``pdserve certs`` folder (on one machine every "node" sees the same files). Each
Ray node is its own simulated host, so KV blocks crossing nodes go over TLS gRPC. A client with
the CA and an API key gets the whole engine's output; one without a key is UNAUTHENTICATED (the
Ray router takes ``router.api_keys``); a plaintext client is refused; workers refuse a TLS client
without a cluster certificate."""

from __future__ import annotations

import json

import grpc
import pytest
import ray
import yaml

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.auth.keys import FileKeyStore, issue_key
from pdserve.certs import write_dev_pki
from pdserve.client import Client
from pdserve.errors import UnauthenticatedError
from pdserve.security import CLUSTER_SERVER_NAME, client_credentials
from pdserve.v1 import client_pb2, client_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.polling import wait_for
from tests.prompts import PROMPTS
from tests.ray_harness import run_cli, two_node_cluster

pytestmark = pytest.mark.slow
NS = "pdserve-tls-test"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def api_key(pki):
    key, _ = issue_key(FileKeyStore(str(pki.ca.parent / "api-keys.yaml"), create=True), "acme")
    return key


@pytest.fixture(scope="module")
def deployment(smollm_path, pki, api_key, tmp_path_factory):
    cfg = {
        "model": str(smollm_path),
        "host": "127.0.0.1",
        "namespace": NS,
        "prefill": {"count": 1, "num_cpus": 1, "kv_blocks": 128},
        "decode": {"count": 1, "num_cpus": 1, "kv_blocks": 128},
        "store": {"capacity_blocks": 256, "host_id_per_node": True},
        "router": {"api_keys": str(pki.ca.parent / "api-keys.yaml")},
        "security": {
            "tls": "on",
            "ca": str(pki.ca),
            "cert": str(pki.server_cert),
            "key": str(pki.server_key),
            "cluster_token_file": str(pki.cluster_token),
        },
        "startup_timeout_s": 300,
    }
    path = tmp_path_factory.mktemp("ray") / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with two_node_cluster(NS) as (c, env):
        r = run_cli(["up", "--config", str(path), "--address", c.address, "--json"], env)
        assert r.returncode == 0, r.stderr[-3000:]
        info = json.loads(r.stdout.strip().splitlines()[-1])
        try:
            # workers register over mTLS + token (the router verifies each by calling it back)
            router = ray.get_actor("pdserve-router", namespace=NS)
            wait_for(
                lambda: len(ray.get(router.workers.remote(), timeout=30)) == 2,
                120,
                "both workers registered with the router",
                interval_s=0.5,
            )
            yield info
        finally:
            from pdserve import ray_cluster

            if ray_cluster.controller(NS) is not None:
                ray_cluster.down(NS)


def test_a_tls_ray_cluster_serves_the_whole_engines_output(deployment, pki, api_key, smollm_path):
    with Client(deployment["router"], timeout=60, ca=str(pki.ca)) as c, pytest.raises(UnauthenticatedError):
        c.complete(PROMPTS[0], GREEDY)  # no API key
    whole = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256))
    try:
        want = whole.generate(PROMPTS[:3], GREEDY)
        with Client(deployment["router"], timeout=300, ca=str(pki.ca), api_key=api_key) as c:
            for prompt, ref in zip(PROMPTS[:3], want, strict=True):
                got = c.complete(prompt, GREEDY)
                assert got.token_ids == ref.token_ids and got.text == ref.text, prompt
    finally:
        whole.close()


def test_plaintext_and_certificate_less_clients_are_refused(deployment, pki):
    with grpc.insecure_channel(deployment["router"]) as ch, pytest.raises(grpc.RpcError) as ei:
        client_pb2_grpc.GenerateStub(ch).ListModels(client_pb2.ListModelsRequest(), timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    worker = next(a for a in deployment["workers"].values() if a)
    opts = [("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)]
    with (
        grpc.secure_channel(worker, client_credentials(ca=str(pki.ca)), options=opts) as ch,
        pytest.raises(grpc.RpcError) as ei,
    ):
        worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_direct_streams_under_mutual_tls_use_the_workers_own_direct_port(
    deployment, pki, api_key, smollm_path
):
    """``direct_streams`` (the default) under mutual TLS: the decode worker serves DirectStream on
    a port of its own (TLS, no client certificate), the router's redirect names it, and a client
    holding only the CA gets the same tokens direct as relayed (== the whole engine)."""
    from pdserve import ray_cluster
    from pdserve.proto_convert import sampling_to_proto

    (dec,) = ray_cluster.status(NS)["pools"]["decode"]
    assert dec["direct_streams"] is True and dec["direct"] and dec["direct"] != dec["address"], dec
    sampling = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    creds = client_credentials(ca=str(pki.ca))
    with grpc.secure_channel(deployment["router"], creds) as ch:
        req = client_pb2.GenerateRequest(
            prompt=PROMPTS[0], sampling=sampling_to_proto(sampling), direct_stream=True
        )
        call = client_pb2_grpc.GenerateStub(ch).Generate(
            req, timeout=120, metadata=(("authorization", f"Bearer {api_key}"),)
        )
        red = next(m for m in call if m.HasField("direct") or m.HasField("finish"))
        call.cancel()
    assert red.HasField("direct") and red.direct.address == dec["direct"], red
    whole = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256))
    try:
        (ref,) = whole.generate([PROMPTS[1]], sampling)
    finally:
        whole.close()
    with Client(deployment["router"], timeout=300, ca=str(pki.ca), api_key=api_key) as c:
        direct = c.complete(PROMPTS[1], sampling, direct=True)
        relayed = c.complete(PROMPTS[1], sampling, direct=False)
    assert direct.token_ids == relayed.token_ids == ref.token_ids
    assert direct.text == relayed.text == ref.text
