"""Direct token streams by default (issue #12): every entry point's default and its off switch, and
where a decode worker serves DirectStream (its own port exactly when its worker port requires
cluster client certificates: mutual TLS)."""

from __future__ import annotations

import pytest

from pdserve.certs import write_dev_pki
from pdserve.security import SecurityConfig, TLSMode
from router.policy import GoodputConfig


def test_router_default_is_on_for_one_model_and_relays_several() -> None:
    from router.__main__ import _configs, build_parser

    ap = build_parser()

    def direct(*argv: str) -> list[bool]:
        return [c.direct_streams for c in _configs(ap.parse_args(list(argv)), GoodputConfig())]

    assert direct("--model", "/m/one") == [True]
    assert direct("--model", "/m/one", "--direct-streams") == [True]
    assert direct("--model", "/m/one", "--no-direct-streams") == [False]
    assert direct("--model", "/m/one", "--model", "/m/two") == [False, False]  # relayed, not refused
    assert direct("--model", "/m/one", "--model", "/m/two", "--no-direct-streams") == [False, False]
    with pytest.raises(ValueError, match="--direct-streams is not supported"):
        direct("--model", "/m/one", "--model", "/m/two", "--direct-streams")


def test_worker_openai_and_serve_defaults() -> None:
    from pdserve.cli import build_parser as pdserve_parser
    from pdserve.openai_api.cli import build_parser as openai_parser
    from pdserve.worker_base import Role
    from pdserve.worker_main import build_parser as worker_parser

    wp = worker_parser(Role.DECODE)
    base = ["--model", "/m", "--store", "h:1", "--worker-id", "decode-0"]
    a = wp.parse_args(base)
    assert (a.direct_streams, a.direct_port) == (True, 0)
    a = wp.parse_args([*base, "--no-direct-streams", "--direct-port", "7001"])
    assert (a.direct_streams, a.direct_port) == (False, 7001)
    op = openai_parser()
    assert op.parse_args(["--router", "h:1"]).direct_streams is True
    assert op.parse_args(["--router", "h:1", "--no-direct-streams"]).direct_streams is False
    sp = pdserve_parser()
    assert sp.parse_args(["serve"]).direct_streams is True
    assert sp.parse_args(["serve", "--no-direct-streams"]).direct_streams is False


def test_clients_offer_direct_streams_by_default() -> None:
    from pdserve.client import AsyncClient, Client

    with Client("127.0.0.1:1") as c:
        assert c.direct
        assert c.generate([1, 2], max_tokens=1, direct=False) is not None  # lazily: no RPC yet
    with Client("127.0.0.1:1", direct=False) as c:
        assert not c.direct
    import inspect

    assert inspect.signature(AsyncClient).parameters["direct"].default is True


def test_direct_stream_gets_its_own_port_exactly_under_mutual_tls(tmp_path) -> None:
    from decode_worker.direct import needs_own_port

    p = write_dev_pki(tmp_path)

    def tls(**kw) -> SecurityConfig:
        return SecurityConfig(
            tls=TLSMode.ON, ca_file=str(p.ca), cert_file=str(p.server_cert), key_file=str(p.server_key), **kw
        )

    assert needs_own_port(tls())  # mTLS, no token: the case that refused to start before
    assert needs_own_port(tls(cluster_token_file=str(p.cluster_token)))  # mTLS + token
    assert not needs_own_port(tls(mtls=False, cluster_token_file=str(p.cluster_token)))
    assert not needs_own_port(SecurityConfig(tls=TLSMode.OFF))  # loopback development
