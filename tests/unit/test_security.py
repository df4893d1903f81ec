"""Transport security (pdserve/security.py, pdserve/certs.py): `pdserve certs`, TLS and mTLS
handshakes, the cluster token on internal services, the plaintext-only-on-loopback rule, the flags,
and the /metrics bearer token. Real gRPC servers on 127.0.0.1 with fake servicers."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from pdserve.certs import PkiPaths, issue, make_ca, server_hosts, write_dev_pki
from pdserve.errors import InvalidRequestError
from pdserve.grpc_server import start_server
from pdserve.metrics import serve_metrics
from pdserve.security import (
    CLUSTER_SERVER_NAME,
    TOKEN_METADATA_KEY,
    AuthOutcome,
    SecurityConfig,
    SecurityConfigError,
    ServerAuthPolicy,
    TLSMode,
    add_security_args,
    bearer_ok,
    client_credentials,
    internal_channel,
    is_loopback,
    sdk_channel,
)
from pdserve.v1 import client_pb2, client_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = router_pb2.DESCRIPTOR.services_by_name["Registry"]
WORKER = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
KVPEER = worker_pb2.DESCRIPTOR.services_by_name["KVPeer"]
GENERATE = client_pb2.DESCRIPTOR.services_by_name["Generate"]
T = 10  # call timeout (s)


class FakeRegistry:
    def Heartbeat(self, req, ctx):
        return router_pb2.HeartbeatResponse(known=req.worker_id == "w")


class FakeWorker:
    def Stats(self, req, ctx):
        return worker_pb2.WorkerStats(worker_id="w0")

    def Decode(self, req, ctx):
        yield worker_pb2.DecodeResponse()


class FakePeer:
    def SpillKV(self, req, ctx):
        return worker_pb2.SpillKVResponse()


class FakeGenerate:
    def ListModels(self, req, ctx):
        return client_pb2.ListModelsResponse(models=[client_pb2.ModelInfo(id="m")])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PkiPaths:
    return write_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> PkiPaths:
    """A second, unrelated CA (and its certificates)."""
    return write_dev_pki(tmp_path_factory.mktemp("other"))


def tls_config(p: PkiPaths, *, token: bool = True, cert: str = "server", **kw) -> SecurityConfig:
    return SecurityConfig(
        tls=TLSMode.ON,
        ca_file=str(p.ca),
        cert_file=str(getattr(p, f"{cert}_cert")),
        key_file=str(getattr(p, f"{cert}_key")),
        cluster_token_file=str(p.cluster_token) if token else "",
        **kw,
    )


@pytest.fixture
def serve():
    servers: list[grpc.Server] = []

    def start(services, security, host="127.0.0.1") -> str:
        server, port, _ = start_server(services, host, 0, max_workers=4, name="t", security=security)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def heartbeat(ch: grpc.Channel) -> bool:
    with ch:
        return (
            router_pb2_grpc.RegistryStub(ch)
            .Heartbeat(router_pb2.HeartbeatRequest(worker_id="w"), timeout=T)
            .known
        )


def worker_stats(ch: grpc.Channel) -> str:
    with ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=T).worker_id


def rpc_code(fn, ch: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(ch)
    return ei.value.code()


def raw_tls(address: str, p: PkiPaths, cert: str | None = "client", token: str | None = None) -> grpc.Channel:
    """A TLS channel verifying ``p``'s CA (server name: the cluster name), with ``p``'s ``cert``
    client certificate (None: none) and ``token`` on every call (None: no token)."""
    creds = client_credentials(
        ca=str(p.ca),
        cert=str(getattr(p, f"{cert}_cert")) if cert else None,
        key=str(getattr(p, f"{cert}_key")) if cert else None,
    )
    ch = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)])
    return with_token(ch, token)


def with_token(ch: grpc.Channel, token: str | None) -> grpc.Channel:
    if token is None:
        return ch
    from pdserve.security import TokenClientInterceptor

    return grpc.intercept_channel(ch, TokenClientInterceptor(token))


# ---------------------------------------------------------------------------- pdserve certs
def test_pdserve_certs_writes_a_ca_and_cluster_and_client_certificates(tmp_path):
    out = tmp_path / "c"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "certs",
            "--out",
            str(out),
            "--host",
            "10.1.2.3",
            "--host",
            "r.example",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "--tls-ca" in r.stdout
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    srv = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    cli = x509.load_pem_x509_certificate((out / "client.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (srv, cli):
        assert leaf.issuer == ca.subject
        leaf.verify_directly_issued_by(ca)  # raises when the signature does not match
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", CLUSTER_SERVER_NAME, "r.example"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert set(cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH
    }
    for name in ("ca.key", "server.key", "client.key", "cluster-token", "metrics-token"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600, name
    assert len((out / "cluster-token").read_text().strip()) == 64
    # a second run refuses to overwrite
    r2 = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "certs", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r2.returncode == 2 and "--force" in r2.stderr


def test_issue_refuses_a_validity_that_ends_before_it_starts():
    ca = make_ca()
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(InvalidRequestError, match="before it starts"):
        issue(ca, "x", server_hosts(), not_before=now, not_after=now - dt.timedelta(days=1))


# ---------------------------------------------------------------------------- handshakes
def test_tls_server_and_client_with_the_cluster_ca_talk(pki, serve):
    cfg = tls_config(pki)
    addr = serve([(REGISTRY, FakeRegistry())], cfg)  # internal only: mTLS required
    assert heartbeat(internal_channel(addr, cfg)) is True
    # the SDK side of the client API: CA only, verified against the address (127.0.0.1 SAN)
    gen = serve([(GENERATE, FakeGenerate()), (REGISTRY, FakeRegistry())], cfg)
    with sdk_channel(gen, ca=str(pki.ca)) as ch:
        models = client_pb2_grpc.GenerateStub(ch).ListModels(client_pb2.ListModelsRequest(), timeout=T)
    assert [m.id for m in models.models] == ["m"]


def test_a_client_trusting_another_ca_is_refused(pki, other_pki, serve):
    addr = serve([(GENERATE, FakeGenerate()), (REGISTRY, FakeRegistry())], tls_config(pki))

    def list_models(ch):
        with ch:
            client_pb2_grpc.GenerateStub(ch).ListModels(client_pb2.ListModelsRequest(), timeout=T)

    assert rpc_code(list_models, sdk_channel(addr, ca=str(other_pki.ca))) == grpc.StatusCode.UNAVAILABLE
    # and a plaintext client gets nowhere on a TLS port
    assert rpc_code(list_models, grpc.insecure_channel(addr)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_from_another_ca_is_refused_by_an_mtls_service(pki, other_pki, serve):
    addr = serve([(WORKER, FakeWorker())], tls_config(pki))
    # trusts the right CA, but presents a certificate the cluster CA did not sign
    creds = client_credentials(ca=str(pki.ca), cert=str(other_pki.client_cert), key=str(other_pki.client_key))
    ch = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)])
    assert rpc_code(worker_stats, ch) == grpc.StatusCode.UNAVAILABLE


def _expired(p: PkiPaths, tmp_path: Path, *, server: bool) -> tuple[str, str]:
    """A certificate signed by ``p``'s CA whose validity ended yesterday: (cert, key) paths."""
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key(p.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(p.ca.read_bytes())
    from pdserve.certs import Issued

    now = dt.datetime.now(dt.UTC)
    leaf = issue(
        Issued(ca_cert, ca_key),  # type: ignore[arg-type]
        "expired",
        server_hosts(),
        server=server,
        client=True,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    cert, key = tmp_path / "expired.pem", tmp_path / "expired.key"
    cert.write_bytes(leaf.cert_pem())
    key.write_bytes(leaf.key_pem())
    return str(cert), str(key)


def test_an_expired_server_certificate_is_refused(pki, serve, tmp_path):
    cert, key = _expired(pki, tmp_path, server=True)
    cfg = SecurityConfig(tls=TLSMode.ON, ca_file=str(pki.ca), cert_file=cert, key_file=key)
    addr = serve([(WORKER, FakeWorker())], cfg)
    assert rpc_code(worker_stats, internal_channel(addr, tls_config(pki))) == grpc.StatusCode.UNAVAILABLE


def test_an_expired_client_certificate_is_refused(pki, serve, tmp_path):
    addr = serve([(WORKER, FakeWorker())], tls_config(pki))
    cert, key = _expired(pki, tmp_path, server=False)
    creds = client_credentials(ca=str(pki.ca), cert=cert, key=key)
    ch = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)])
    assert rpc_code(worker_stats, ch) == grpc.StatusCode.UNAVAILABLE


def test_an_mtls_internal_service_refuses_a_client_without_certificate(pki, serve):
    addr = serve([(WORKER, FakeWorker()), (KVPEER, FakePeer())], tls_config(pki))
    cluster_token = pki.cluster_token.read_text().strip()
    # TLS with the right CA but no client certificate: the handshake fails, token or not
    assert rpc_code(worker_stats, raw_tls(addr, pki, cert=None)) == grpc.StatusCode.UNAVAILABLE
    assert (
        rpc_code(worker_stats, raw_tls(addr, pki, cert=None, token=cluster_token))
        == grpc.StatusCode.UNAVAILABLE
    )
    # a cluster client certificate is a cluster identity: no token needed
    assert worker_stats(raw_tls(addr, pki, cert="client")) == "w0"


# ---------------------------------------------------------------------------- the cluster token
@pytest.mark.parametrize("tls", [False, True], ids=["loopback-plaintext", "tls-no-mtls"])
def test_internal_services_require_the_cluster_token(pki, serve, tls):
    """Registry, Worker (unary and streaming) and KVPeer answer UNAUTHENTICATED without the token
    or with a wrong one, and serve with it; the client API (Generate) needs no token."""
    token = pki.cluster_token.read_text().strip()
    if tls:
        cfg = tls_config(pki, mtls=False)
        client = SecurityConfig(
            tls=TLSMode.ON, ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
        )

        def chan(addr, tok):
            return with_token(internal_channel(addr, client), tok)
    else:
        cfg = SecurityConfig(tls=TLSMode.OFF, cluster_token=token)

        def chan(addr, tok):
            return with_token(grpc.insecure_channel(addr), tok)

    router = serve([(GENERATE, FakeGenerate()), (REGISTRY, FakeRegistry())], cfg)
    worker = serve([(WORKER, FakeWorker()), (KVPEER, FakePeer())], cfg)

    def decode(ch):
        with ch:
            return list(worker_pb2_grpc.WorkerStub(ch).Decode(worker_pb2.DecodeRequest(), timeout=T))

    def spill(ch):
        with ch:
            return worker_pb2_grpc.KVPeerStub(ch).SpillKV(worker_pb2.SpillKVRequest(), timeout=T)

    for fn, addr in ((heartbeat, router), (worker_stats, worker), (decode, worker), (spill, worker)):
        for tok in (None, "not-the-token"):
            with pytest.raises(grpc.RpcError) as ei:
                fn(chan(addr, tok))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, (fn.__name__, tok)
            assert TOKEN_METADATA_KEY in ei.value.details()
        fn(chan(addr, token))  # the right token passes
    # the process's own internal channel sends the token by itself
    assert (
        heartbeat(
            internal_channel(
                router,
                cfg
                if not tls
                else SecurityConfig(
                    tls=TLSMode.ON,
                    ca_file=str(pki.ca),
                    cert_file=str(pki.client_cert),
                    key_file=str(pki.client_key),
                    cluster_token=token,
                ),
            )
        )
        is True
    )
    with chan(router, None) as ch:  # Generate is not internal
        assert client_pb2_grpc.GenerateStub(ch).ListModels(client_pb2.ListModelsRequest(), timeout=T).models
    with chan(worker, None) as ch:  # health checking stays open (probes carry no token)
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=T)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_server_auth_policy_is_pure_and_constant_time_compared():
    assert ServerAuthPolicy().check(None) is AuthOutcome.ALLOW  # loopback development
    p = ServerAuthPolicy(token="s3cret")
    assert p.check(None) is AuthOutcome.MISSING_TOKEN
    assert p.check("") is AuthOutcome.MISSING_TOKEN
    assert p.check("s3cre") is AuthOutcome.WRONG_TOKEN
    assert p.check("s3cret") is AuthOutcome.ALLOW
    assert ServerAuthPolicy(token="s3cret", peers_verified=True).check(None) is AuthOutcome.ALLOW
    assert "s3cret" not in repr(p) and "s3cret" not in repr(SecurityConfig(cluster_token="s3cret"))


# ---------------------------------------------------------------------------- refusals at start
@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_plaintext_server_refuses_a_non_loopback_address(serve, host):
    with pytest.raises(SecurityConfigError, match="pdserve certs") as ei:
        serve([(WORKER, FakeWorker())], SecurityConfig(tls=TLSMode.OFF), host=host)
    assert "--tls on" in str(ei.value) and "127.0.0.1" in str(ei.value)


def test_the_kv_store_refuses_a_plaintext_non_loopback_address():
    from kv_store.layout import KVLayout
    from kv_store.service import serve as serve_store
    from kv_store.store import StoreConfig

    cfg = StoreConfig(
        node_id="n",
        layout=KVLayout("m", 1, 1, 4, "float32", 4),
        capacity_blocks=2,
        host="0.0.0.0",
        use_shm=False,
    )
    with pytest.raises(SecurityConfigError, match="only loopback"):
        serve_store(cfg, security=SecurityConfig(tls=TLSMode.OFF))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_auto_without_certificates_is_never_plaintext(serve, host):
    """``--tls auto`` (the default) without certificates: servers (loopback too) and internal
    channels refuse, saying both ways out; no child gets a silent ``--tls off``."""
    undecided = SecurityConfig()
    for call in (
        lambda: serve([(WORKER, FakeWorker())], undecided, host=host),
        lambda: internal_channel(f"{host}:1", undecided),
        undecided.to_args,
    ):
        with pytest.raises(SecurityConfigError, match="plaintext was not asked for") as ei:
            call()
        assert "pdserve certs" in str(ei.value) and "--tls off" in str(ei.value)
    assert SecurityConfig.from_env({"PDSERVE_TLS": "off"}).to_args() == ["--tls", "off"]


def test_a_process_without_a_tls_choice_exits_with_the_fix():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_TLS")}
    r = subprocess.run(
        [sys.executable, "-m", "router", "--model", "/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2, r.stderr
    assert "plaintext was not asked for" in r.stderr and "--tls off" in r.stderr


def test_a_process_asked_to_bind_off_loopback_without_tls_exits_with_the_fix():
    r = subprocess.run(
        [sys.executable, "-m", "router", "--model", "/nonexistent", "--host", "0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2
    assert "refusing to serve plaintext gRPC on '0.0.0.0'" in r.stderr and "pdserve certs" in r.stderr


def test_tls_on_the_router_port_without_a_token_refuses_to_start(pki, serve):
    """The router's port also serves clients, so it cannot require client certificates: its
    Registry would be open without the token."""
    with pytest.raises(SecurityConfigError, match="cluster-token-file"):
        serve([(GENERATE, FakeGenerate()), (REGISTRY, FakeRegistry())], tls_config(pki, token=False))
    # an internal-only server is protected by mTLS alone; with mTLS off it needs the token too
    serve([(WORKER, FakeWorker())], tls_config(pki, token=False))
    with pytest.raises(SecurityConfigError, match="--mtls is off"):
        serve([(WORKER, FakeWorker())], tls_config(pki, token=False, mtls=False))


# ---------------------------------------------------------------------------- configuration
def test_tls_settings_that_cannot_be_honoured_name_the_flag(pki, tmp_path):
    with pytest.raises(SecurityConfigError, match="--tls-ca, --tls-cert, --tls-key"):
        SecurityConfig(tls=TLSMode.ON)
    with pytest.raises(SecurityConfigError, match="--tls off but --tls-cert"):
        SecurityConfig(tls=TLSMode.OFF, cert_file=str(pki.server_cert))
    with pytest.raises(SecurityConfigError, match="--tls-key"):
        SecurityConfig(ca_file=str(pki.ca), cert_file=str(pki.server_cert))
    with pytest.raises(SecurityConfigError, match="cannot read the private key"):
        SecurityConfig(ca_file=str(pki.ca), cert_file=str(pki.server_cert), key_file=str(tmp_path / "nope"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecurityConfigError, match="is empty"):
        SecurityConfig(cluster_token_file=str(tmp_path / "empty"))
    with pytest.raises(SecurityConfigError, match="must be one of"):
        SecurityConfig(tls="maybe")  # type: ignore[arg-type]
    assert SecurityConfig().tls_on is False and SecurityConfig().undecided
    assert not SecurityConfig(tls=TLSMode.OFF).undecided
    assert SecurityConfig(
        ca_file=str(pki.ca), cert_file=str(pki.server_cert), key_file=str(pki.server_key)
    ).tls_on


def test_flags_environment_and_child_arguments_agree(pki):
    env = {
        "PDSERVE_TLS_CA": str(pki.ca),
        "PDSERVE_TLS_CERT": str(pki.server_cert),
        "PDSERVE_TLS_KEY": str(pki.server_key),
        "PDSERVE_CLUSTER_TOKEN": "tok",
    }
    from_env = SecurityConfig.from_env(env)
    assert from_env.tls_on and from_env.cluster_token == "tok"
    ap = argparse.ArgumentParser()
    add_security_args(ap, env={})
    a = ap.parse_args(
        [
            "--tls",
            "on",
            "--tls-ca",
            str(pki.ca),
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--cluster-token-file",
            str(pki.cluster_token),
            "--mtls",
            "off",
        ]
    )
    cfg = SecurityConfig.from_args(a, env={})
    assert cfg.tls_on and not cfg.mtls and cfg.cluster_token == pki.cluster_token.read_text().strip()
    again = SecurityConfig.from_args(ap.parse_args(cfg.to_args()), env={})
    assert again == cfg
    assert "tok" not in " ".join(
        SecurityConfig(tls=TLSMode.OFF, cluster_token="tok").to_args()
    )  # never on a command line
    # every flag's help shows its default
    for action in ap._actions:
        if action.option_strings and action.dest != "help":
            assert "%(default)" in (action.help or ""), action.option_strings


def test_is_loopback():
    for h in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"):
        assert is_loopback(h), h
    for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
        assert not is_loopback(h), h


# ---------------------------------------------------------------------------- /metrics token
def test_metrics_endpoint_requires_the_bearer_token_when_one_is_set():
    reg = CollectorRegistry()
    Counter("pdserve_test_total", "test", registry=reg).inc()
    port = serve_metrics(0, registry=reg, token="m-token")
    url = f"http://127.0.0.1:{port}/metrics"
    for header in (None, "Bearer wrong", "Basic m-token"):
        req = urllib.request.Request(url, headers={"Authorization": header} if header else {})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=5)
        assert ei.value.code == 401
        ei.value.close()
    req = urllib.request.Request(url, headers={"Authorization": "Bearer m-token"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert "pdserve_test_total 1.0" in r.read().decode()
    assert bearer_ok("bearer m-token", "m-token") and not bearer_ok("Bearer ", "") and not bearer_ok("", "x")


# ---------------------------------------------------------------------------- Ray cluster config
def test_a_cluster_config_off_loopback_needs_tls_and_a_token(pki):
    from pdserve.cluster_config import check_security, from_dict

    with pytest.raises(InvalidRequestError, match=r"security\.ca: TLS is on .*pdserve certs"):
        check_security(from_dict({"model": "/m"}))  # host: node, no security section
    with pytest.raises(InvalidRequestError, match=r"security\.tls: off, but host binds"):
        check_security(from_dict({"model": "/m", "host": "10.0.0.5", "security": {"tls": False}}))
    partial = {"ca": str(pki.ca), "cert": str(pki.server_cert), "key": str(pki.server_key)}
    with pytest.raises(InvalidRequestError, match=r"security\.cluster_token_file"):
        check_security(from_dict({"model": "/m", "security": partial}))
    # loopback without certificates: plaintext only when asked for (`tls: off`; Ray tests run so)
    with pytest.raises(InvalidRequestError, match=r"security\.tls: auto, but no certificates.*tls: off"):
        check_security(from_dict({"model": "/m", "host": "127.0.0.1"}))
    local = check_security(from_dict({"model": "/m", "host": "127.0.0.1", "security": {"tls": "off"}}))
    assert not local.security.security_config(local.host).tls_on
    sec = {**partial, "cluster_token_file": str(pki.cluster_token)}
    with pytest.raises(
        InvalidRequestError, match=r"router\.api_keys: not set, but host binds .*pdserve keys"
    ):
        check_security(from_dict({"model": "/m", "security": sec}))  # TLS alone: anyone may still call
    full = from_dict(
        {"model": "/m", "security": sec, "router": {"api_keys": "/etc/pdserve-tls/api-keys.yaml"}}
    )
    cfg = check_security(full).security.security_config(full.host)  # what each actor installs
    assert cfg.tls_on and cfg.mtls and cfg.cluster_token == pki.cluster_token.read_text().strip()
    with pytest.raises(InvalidRequestError, match=r"security\.mtls: expected true/false"):
        from_dict({"model": "/m", "security": {"mtls": "yes"}})


def test_the_sdk_clients_connect_over_tls_with_the_ca_and_refuse_contradictions(pki, other_pki, serve):
    import asyncio

    from pdserve.client import AsyncClient, Client, ServingStatus
    from pdserve.errors import UnavailableError

    addr = serve([(GENERATE, FakeGenerate()), (REGISTRY, FakeRegistry())], tls_config(pki))
    with Client(addr, timeout=T, ca=str(pki.ca)) as c:
        assert c.list_models() == ["m"]
    with Client(addr, timeout=T, ca=str(other_pki.ca)) as c, pytest.raises(UnavailableError):
        c.list_models()

    async def async_health() -> ServingStatus:
        async with AsyncClient(addr, timeout=T, ca=pki.ca.read_bytes()) as c:
            return await c.health()

    assert asyncio.run(async_health()) is ServingStatus.SERVING
    with pytest.raises(SecurityConfigError, match="tls=False but ca"):
        Client(addr, tls=False, ca=str(pki.ca))
    with pytest.raises(SecurityConfigError, match="both cert and key"):
        Client(addr, ca=str(pki.ca), cert=str(pki.client_cert))
