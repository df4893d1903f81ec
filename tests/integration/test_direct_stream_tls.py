"""Direct token streams under TLS (issue #12): the SDK's connection to the decode worker uses the
client's TLS settings (the cluster CA), as its router channels do. One TLS cluster (TLS, mTLS and
the cluster token on every process, a dev CA; tiny model; router and decode worker with
``--direct-streams``) serves the module."""

from __future__ import annotations

import asyncio

import pytest

from bench.cluster_load import tiny_model
from engine.sampling_params import SamplingParams
from pdserve.client import AsyncClient
from pdserve.launcher import ClusterSpec, launch

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("tiny-direct-tls"))
    cl = launch(
        ClusterSpec(
            model_path=str(model),
            worker_kv_blocks=256,
            tls=True,
            worker_args=("--direct-streams",),
            router_args=("--direct-streams",),
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
    assert attached == {a for w, a in cluster.workers.items() if w.startswith("decode")}
