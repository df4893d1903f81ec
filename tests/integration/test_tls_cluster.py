"""The embedded cluster with TLS on (ClusterSpec.tls: a dev CA made by the launcher): every process
serves TLS, workers and the store require client certificates signed by the cluster CA, the
router's Registry requires the cluster token, and a client with the CA gets a generation end to
end (real processes on loopback, the real SmolLM2-135M model)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from pdserve.client import Client
from pdserve.launcher import ClusterSpec, launch
from pdserve.security import CLUSTER_SERVER_NAME, client_credentials
from pdserve.v1 import client_pb2, client_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

T = 30


@pytest.fixture(scope="module")
def cluster(smollm_path):
    cl = launch(
        ClusterSpec(model_path=str(smollm_path), worker_kv_blocks=256, store_capacity_blocks=512, tls=True)
    )
    yield cl
    tmp = cl._tmp
    cl.stop()
    assert not Path(tmp).exists()  # the dev PKI made for the cluster is removed with it


def test_a_tls_cluster_serves_a_request_end_to_end(cluster):
    assert cluster.pki is not None and cluster.security is not None and cluster.security.tls_on
    with Client(cluster.router_address, timeout=120, ca=str(cluster.pki.ca)) as c:
        out = c.complete("The capital of France is", max_tokens=8, temperature=0.0, ignore_eos=True)
    assert len(out.token_ids) == 8 and out.text
    assert out.finish.completion_tokens == 8


def test_a_plaintext_client_cannot_talk_to_the_router(cluster):
    with grpc.insecure_channel(cluster.router_address) as ch, pytest.raises(grpc.RpcError) as ei:
        client_pb2_grpc.GenerateStub(ch).ListModels(client_pb2.ListModelsRequest(), timeout=T)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_workers_require_a_cluster_client_certificate(cluster):
    p = cluster.pki
    opts = [("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)]
    addr = cluster.workers["decode-0"]
    no_cert = client_credentials(ca=str(p.ca))
    with grpc.secure_channel(addr, no_cert, options=opts) as ch, pytest.raises(grpc.RpcError) as ei:
        worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=T)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE  # refused at the handshake
    creds = client_credentials(ca=str(p.ca), cert=str(p.client_cert), key=str(p.client_key))
    with grpc.secure_channel(addr, creds, options=opts) as ch:
        assert (
            worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=T).worker_id == "decode-0"
        )


def test_the_router_registry_requires_the_cluster_token(cluster):
    with grpc.secure_channel(cluster.router_address, client_credentials(ca=str(cluster.pki.ca))) as ch:
        stub = router_pb2_grpc.RegistryStub(ch)
        for md in ((), (("x-pdserve-cluster-token", "wrong"),)):
            with pytest.raises(grpc.RpcError) as ei:
                stub.Heartbeat(router_pb2.HeartbeatRequest(worker_id="intruder"), timeout=T, metadata=md)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = cluster.pki.cluster_token.read_text().strip()
        r = stub.Heartbeat(
            router_pb2.HeartbeatRequest(worker_id="intruder"),
            timeout=T,
            metadata=(("x-pdserve-cluster-token", token),),
        )
        assert r.known is False  # authenticated; the registry simply does not know this worker
