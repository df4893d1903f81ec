"""`pdserve serve --tls on --openai-port N` end to end: the launcher starts the OpenAI HTTP server
with the cluster's certificate (HTTPS, verified with the dev CA `pdserve certs` makes) and a TLS
channel to the router; plain HTTP to that port gets no HTTP answer. Tiny random-weight model."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from bench.concurrency import tiny_model
from pdserve.launcher import ClusterSpec, launch


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("tiny-openai-tls"))
    cl = launch(
        ClusterSpec(
            model_path=str(model),
            worker_kv_blocks=256,
            store_capacity_blocks=512,
            tls=True,
            openai_port=0,
            supervise_routers=False,
        )
    )
    yield cl
    cl.stop()


def test_the_launched_openai_server_serves_https_with_the_cluster_ca(cluster):
    assert cluster.pki is not None and cluster.openai_url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca))
    body = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(
        cluster.openai_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=120) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        pytest.fail(f"HTTP {e.code}: {e.read()!r}")
    assert r.status == 200 and out["usage"]["completion_tokens"] == 4  # through the TLS router channel
    u = urlsplit(cluster.openai_url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as raw:
        raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(64)
        except (ConnectionError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/")  # no plain HTTP on the HTTPS port
