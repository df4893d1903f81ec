"""Direct token streams under TLS (issue #12): the SDK's connection to the decode worker uses the
client's TLS settings (the cluster CA), as its router channels do. One TLS cluster (TLS, mTLS and
the cluster token on every process, a dev CA; tiny model; direct streams by default) serves the
module. Under mutual TLS the decode worker serves DirectStream on a port of its own (no client
certificate; tickets authorise) while its worker port still requires a cluster client
certificate: a client without one cannot reach its internal services."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster_load import tiny_model
from engine.sampling_params import SamplingParams
from pdserve.client import AsyncClient, Client
from pdserve.launcher import ClusterSpec, launch
from pdserve.security import CLUSTER_SERVER_NAME

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("tiny-direct-tls"))
    cl = launch(
        ClusterSpec(
            model_path=str(model),
            worker_kv_blocks=256,
            tls=True,
        )
    )
    yield cl
    cl.stop()


async def _tokens(c: AsyncClient, direct: bool) -> list[int]:
    return [t async for ch in c.generate([5, 6, 7, 8], PARAMS, direct=direct) for t in ch.token_ids]


def test_direct_stream_over_tls_equals_relay(cluster) -> None:
    assert cluster.pki is not None

    async def scenario():
        async with AsyncClient(cluster.router_address, timeout=60, ca=str(cluster.pki.ca)) as c:
            direct = await _tokens(c, True)
            attached = set(c._direct_mux._conns)  # the decode workers it streamed from (TLS channels)
            return direct, await _tokens(c, False), attached

    direct, relay, attached = asyncio.run(scenario())
    assert len(direct) == PARAMS.max_tokens and direct == relay
    # the decode worker's own DirectStream port, not its (mutual TLS) worker port
    assert attached == set(cluster.direct_addresses.values())
    assert set(cluster.direct_addresses) == {w for w in cluster.workers if w.startswith("decode")}
    assert not attached & set(cluster.workers.values())


def test_sync_client_direct_over_tls(cluster) -> None:
    assert cluster.pki is not None
    with Client(cluster.router_address, timeout=60, ca=str(cluster.pki.ca)) as c:
        direct = [t for ch in c.generate([5, 6, 7, 8], PARAMS) for t in ch.token_ids]
        relay = [t for ch in c.generate([5, 6, 7, 8], PARAMS, direct=False) for t in ch.token_ids]
        attached = set(c._direct_mux._conns)
    assert len(direct) == PARAMS.max_tokens and direct == relay
    assert attached and attached <= set(cluster.direct_addresses.values())


def test_worker_port_still_requires_a_client_certificate(cluster) -> None:
    """A client with the CA but no cluster certificate reaches DirectStream's port (tickets
    decide there) but not the decode worker's port (its handshake requires a certificate)."""
    assert cluster.pki is not None
    ca = cluster.pki.ca.read_bytes()
    opts = [("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)]
    wid = next(w for w in cluster.workers if w.startswith("decode"))

    def check(address: str) -> grpc.StatusCode | None:
        ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=opts)
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return None
        except grpc.RpcError as e:
            return e.code()
        finally:
            ch.close()

    assert check(cluster.direct_addresses[wid]) is None
    assert check(cluster.workers[wid]) is grpc.StatusCode.UNAVAILABLE  # the handshake fails
