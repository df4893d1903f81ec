"""The OpenAI HTTP server over HTTPS: served with a ``pdserve certs`` certificate, refused in plain
HTTP off loopback (keys and prompts would cross the network in clear text), half a key pair or a
bad file refused by name. The router is a fake that reports NOT_SERVING (``/health`` then answers
503: the point here is the transport, not the cluster)."""

from __future__ import annotations

import gc
import json
import socket
import ssl
import urllib.error
import urllib.request

import pytest

from pdserve.auth.keys import FileKeyStore, issue_key
from pdserve.certs import write_dev_pki
from pdserve.client import ServingStatus
from pdserve.errors import InvalidRequestError
from pdserve.openai_api.server import OpenAIServer, ServerConfig

# A refused TLS handshake leaves an SSLSocket whose finalizer emits a ResourceWarning
# ("unclosed <ssl.SSLSocket [closed]>") although its descriptor is closed; not yet traced to its
# source (see the closing note of 2026-12-05). Ignored here, and collected within this module
# (the last test) so that it cannot surface in whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


class _Router:
    """The slice of the asyncio router client the server calls in these tests."""

    async def health(self) -> ServingStatus:
        return ServingStatus.NOT_SERVING

    async def list_models(self) -> list[str]:
        return ["m"]

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_dev_pki(tmp_path_factory.mktemp("pki"))


def test_https_serves_with_the_cluster_certificate_and_plain_http_gets_nothing(pki):
    cfg = ServerConfig(router="unused", port=0, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    srv = OpenAIServer(cfg, _Router()).start()
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with urllib.request.urlopen(srv.url + "/v1/models", context=ctx, timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == "m"
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(srv.url + "/health", context=ctx, timeout=10)
        assert ei.value.code == 503  # an HTTP answer over TLS (the fake router is NOT_SERVING)
        # plain HTTP to the HTTPS port gets no HTTP answer
        with socket.create_connection((srv.host, srv.port), timeout=10) as raw:
            raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = raw.recv(64)
            except (ConnectionError, TimeoutError):
                answer = b""
            assert not answer.startswith(b"HTTP/")
        # a client that does not trust the CA is refused at the handshake; the server lives on
        with (
            socket.create_connection((srv.host, srv.port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            pass
        with urllib.request.urlopen(srv.url + "/v1/models", context=ctx, timeout=10) as r:
            assert r.status == 200
    finally:
        srv.close()


def test_plain_http_off_loopback_and_half_a_key_pair_are_refused(pki, tmp_path):
    keys = tmp_path / "keys.yaml"
    issue_key(FileKeyStore(str(keys), create=True), "acme")
    with pytest.raises(InvalidRequestError, match="plain HTTP: API keys and prompts"):
        OpenAIServer(ServerConfig(router="unused", host="0.0.0.0", port=0, api_keys=str(keys)), _Router())
    with pytest.raises(InvalidRequestError, match="both --tls-cert and --tls-key"):
        OpenAIServer(ServerConfig(router="unused", port=0, tls_cert=str(pki.server_cert)), _Router())
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(InvalidRequestError, match="cannot load --tls-cert/--tls-key"):
        OpenAIServer(ServerConfig(router="unused", port=0, tls_cert=str(bad), tls_key=str(bad)), _Router())


def test_nothing_is_left_for_the_garbage_collector():
    """Collect the refused handshakes' sockets here, under this module's warning filter (pytest
    turns a finalizer's warning into an error in whichever test runs when it is collected)."""
    gc.collect()
