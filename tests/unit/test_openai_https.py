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
from pdserve.security import SecurityConfigError, TLSMode, http_serves_tls

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


@pytest.mark.parametrize(
    ("mode", "cert", "host", "served", "refusal"),
    [
        (TLSMode.AUTO, "c.pem", "0.0.0.0", True, None),  # a certificate: HTTPS, on any address
        (TLSMode.ON, "c.pem", "127.0.0.1", True, None),
        (TLSMode.OFF, None, "127.0.0.1", False, None),  # plain HTTP: asked for, on loopback
        (TLSMode.OFF, None, "::1", False, None),
        (TLSMode.OFF, None, "0.0.0.0", None, "plain HTTP .*loopback addresses only"),
        (TLSMode.OFF, None, "10.1.2.3", None, "Give --tls-cert/--tls-key"),
        (TLSMode.OFF, "c.pem", "127.0.0.1", None, "--tls off but --tls-cert"),
        (TLSMode.AUTO, None, "127.0.0.1", None, "plain HTTP was not asked for.*--tls off"),
        (TLSMode.AUTO, None, "0.0.0.0", None, "plain HTTP: API keys and prompts"),
        (TLSMode.ON, None, "127.0.0.1", None, "--tls on needs --tls-cert and --tls-key"),
    ],
)
def test_plain_http_only_when_asked_for_and_only_on_loopback(mode, cert, host, served, refusal):
    key = "k.pem" if cert else None
    if refusal is None:
        assert http_serves_tls(mode, cert, key, host, "the OpenAI HTTP server") is served
    else:
        with pytest.raises(SecurityConfigError, match=refusal):
            http_serves_tls(mode, cert, key, host, "the OpenAI HTTP server")


def test_plain_http_on_loopback_needs_the_explicit_choice(monkeypatch):
    """Without PDSERVE_TLS (tests/conftest.py sets off) and without a certificate the server is
    refused even on 127.0.0.1; ``tls="off"`` (``--tls off``) serves plain HTTP there."""
    monkeypatch.delenv("PDSERVE_TLS", raising=False)
    with pytest.raises(SecurityConfigError, match="plain HTTP was not asked for"):
        OpenAIServer(ServerConfig(router="unused", port=0), _Router())
    monkeypatch.setenv("PDSERVE_TLS", "auto")
    with pytest.raises(SecurityConfigError, match="PDSERVE_TLS=off"):
        OpenAIServer(ServerConfig(router="unused", port=0), _Router())
    srv = OpenAIServer(ServerConfig(router="unused", port=0, tls="off"), _Router()).start()
    try:
        assert srv.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(srv.url + "/v1/models", timeout=10) as r:
            assert r.status == 200
    finally:
        srv.close()
    monkeypatch.setenv("PDSERVE_TLS", "off")  # the environment's choice, as for the gRPC ports
    assert ServerConfig(router="unused").tls is TLSMode.OFF
    assert ServerConfig(router="unused", tls_cert="c", tls_key="k").tls is TLSMode.ON  # given wins


def test_the_cli_refuses_plain_http_naming_the_flag(monkeypatch, capsys, tmp_path):
    from pdserve.openai_api.cli import main

    keys = tmp_path / "keys.yaml"
    issue_key(FileKeyStore(str(keys), create=True), "acme")

    monkeypatch.delenv("PDSERVE_TLS", raising=False)
    monkeypatch.delenv("PDSERVE_TLS_CERT", raising=False)
    monkeypatch.delenv("PDSERVE_TLS_KEY", raising=False)
    assert main(["--router", "127.0.0.1:1", "--port", "0"]) == 2
    assert "plain HTTP was not asked for" in capsys.readouterr().err
    off = ["--host", "0.0.0.0", "--tls", "off", "--api-keys", str(keys)]
    assert main(["--router", "127.0.0.1:1", "--port", "0", *off]) == 2
    err = capsys.readouterr().err
    assert "--tls-cert/--tls-key" in err and "'0.0.0.0'" in err


def test_the_cli_takes_the_cluster_certificate_from_the_environment(monkeypatch, pki):
    from pdserve.openai_api.cli import build_parser

    monkeypatch.setenv("PDSERVE_TLS", "on")
    monkeypatch.setenv("PDSERVE_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("PDSERVE_TLS_KEY", str(pki.server_key))
    a = build_parser().parse_args([])
    assert (a.tls, a.tls_cert, a.tls_key) == ("on", str(pki.server_cert), str(pki.server_key))


def test_the_launcher_passes_the_transport_on():
    from pathlib import Path

    from pdserve.certs import PkiPaths
    from pdserve.launcher import ClusterSpec, LocalCluster, openai_args

    cl = LocalCluster(ClusterSpec(model_path="m"), router_addresses=["127.0.0.1:1", "127.0.0.1:2"])
    plain = openai_args(cl, 0)
    assert plain[plain.index("--router") + 1] == "127.0.0.1:1,127.0.0.1:2"
    assert plain[-2:] == ["--tls", "off"] and plain[plain.index("--host") + 1] == "127.0.0.1"
    d = Path("/pki")
    cl.pki = PkiPaths(*(d / n for n in ("ca", "cak", "srv", "srvk", "cli", "clik", "tok", "mtok")))
    tls = openai_args(cl, 8443)
    i = tls.index("--tls")
    assert tls[i : i + 6] == ["--tls", "on", "--tls-cert", "/pki/srv", "--tls-key", "/pki/srvk"]
    assert tls[tls.index("--router-tls-ca") + 1] == "/pki/ca" and "off" not in tls


def test_nothing_is_left_for_the_garbage_collector():
    """Collect the refused handshakes' sockets here, under this module's warning filter (pytest
    turns a finalizer's warning into an error in whichever test runs when it is collected)."""
    gc.collect()
