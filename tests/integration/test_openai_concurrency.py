"""The OpenAI HTTP front end under concurrency, over a real embedded cluster on loopback.

One cluster (store, router, 1 prefill + 1 decode worker processes; the tiny random-weight Llama of
:mod:`tests.tiny_models` with SmolLM2's tokenizer) and one :class:`OpenAIServer` serve the module.
200 streamed ``/v1/completions`` requests are opened at once, each on its own connection, from an
asyncio client in this process: every one answers 200 with its 4 tokens and ``[DONE]``, and this
process never holds more than a bounded number of threads while they run (the server has one
event-loop thread, not one per connection). A second server is given two router addresses, the
first of them dead: every request still succeeds (the SDK client fails over before the first
token) and ``/health`` answers 200.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import pytest

from bench.concurrency import tiny_model
from bench.openai_http import http_wave
from pdserve.launcher import ClusterSpec, free_port, launch
from pdserve.openai_api.server import OpenAIServer, ServerConfig

STREAMS = 200
MAX_TOKENS = 4
THREAD_BOUND = 50  # the whole test process: pytest, grpc's pollers, the server's one loop thread


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("tiny-openai"))
    cl = launch(ClusterSpec(model_path=str(model), num_prefill=1, num_decode=1, worker_kv_blocks=2048))
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def server(cluster):
    srv = OpenAIServer(ServerConfig(router=cluster.router_address, port=0, request_timeout_s=120)).start()
    yield srv
    srv.close()


def test_200_concurrent_http_streams_succeed_on_bounded_threads(server) -> None:
    before = threading.active_count()
    outs, _, most = asyncio.run(http_wave(server.host, server.port, STREAMS, MAX_TOKENS, 8, timeout_s=120))
    bad = [o for o in outs if not o.ok or o.tokens != MAX_TOKENS]
    assert not bad, f"{len(bad)} of {STREAMS} failed, e.g. {bad[0]}"
    assert all(o.ttft_s is not None for o in outs)
    assert most < THREAD_BOUND, f"{most} threads during {STREAMS} streams (before: {before})"


def test_several_routers_one_dead(cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    cfg = ServerConfig(router=f"{dead},{cluster.router_address}", port=0, request_timeout_s=60)
    with OpenAIServer(cfg).start() as srv:
        assert srv.config.routers == (dead, cluster.router_address)
        outs, _, _ = asyncio.run(http_wave(srv.host, srv.port, 6, MAX_TOKENS, 8, timeout_s=60))
        assert all(o.ok and o.tokens == MAX_TOKENS for o in outs), outs
        with urllib.request.urlopen(srv.url + "/health", timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["router"] == f"{dead},{cluster.router_address}"
