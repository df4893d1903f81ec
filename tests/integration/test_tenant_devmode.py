"""Dev mode (no key store, loopback only) over the real embedded cluster: tenants are the
request's ``tenant`` field / HTTP ``user``, so the prefix cache does not cross users even here
(the reproduced HTTP bug of issue #13); edge input limits answer 400 / INVALID_ARGUMENT, never 500."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pdserve.client import Client
from pdserve.errors import InvalidRequestError
from pdserve.launcher import ClusterSpec, launch
from pdserve.openai_api.server import OpenAIServer, ServerConfig

LONG = " ".join(f"Entry {i}: a stitch in time saves nine, they said." for i in range(16))


@pytest.fixture(scope="module")
def cluster(smollm_path: Path):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=512,
            store_capacity_blocks=1024,
            startup_timeout_s=600,
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def http(cluster):
    srv = OpenAIServer(ServerConfig(router=cluster.router_address, port=0, request_timeout_s=60)).start()
    yield srv
    srv.close()


def post_raw(srv: OpenAIServer, raw: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(
        srv.url + "/v1/chat/completions", raw, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_http_users_do_not_share_the_prefix_cache(http) -> None:
    body = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2}
    hits = []
    for user in ("alice", "alice", "bob", ""):
        status, r = post_raw(http, json.dumps({**body, "user": user}).encode())
        assert status == 200
        hits.append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert hits[0] == 0 and hits[1] > 64 and hits[2] == 0 and hits[3] == 0


def test_grpc_tenant_field_partitions_in_dev_mode(cluster) -> None:
    prompt = "grpc dev " + LONG
    with Client(cluster.router_address, timeout=60) as c:
        got = [
            c.complete(prompt, max_tokens=1, tenant=t).finish.cached_prompt_tokens for t in ("a", "a", "b")
        ]
    assert got[0] == 0 and got[1] > 64 and got[2] == 0


def test_edge_limits_are_400_not_500(http, cluster) -> None:
    raw = b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}], "max_tokens": 1}'
    status, err = post_raw(http, raw)
    assert status == 400 and "surrogate" in err["error"]["message"]
    status, err = post_raw(http, b'{"messages": [{"role": "user", "content": "x"}], "user": "\\udfff"}')
    assert status == 400
    with Client(cluster.router_address, timeout=60) as c:
        with pytest.raises(InvalidRequestError, match="role"):
            c.complete([{"role": "wizard", "content": "hi"}], max_tokens=1)
        with pytest.raises(InvalidRequestError, match="empty"):
            c.complete([{"role": "user", "content": ""}], max_tokens=1)
        with pytest.raises(InvalidRequestError, match="request_id"):
            c.complete("hi", max_tokens=1, request_id="x" * 500)
