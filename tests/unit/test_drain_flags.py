"""`pdserve drain --router ADDR` drains through the routers' Admin service and never reads the
Ray deployment's --address / --namespace: given together they are refused naming the flag
(before they were accepted and dropped)."""

from __future__ import annotations

import pytest

from pdserve import cli, drain_cli


@pytest.mark.parametrize("flags", [["--address", "ray://head:10001"], ["--namespace", "prod"]])
def test_ray_flags_with_router_are_refused(flags, capsys, monkeypatch) -> None:
    called: list[object] = []
    monkeypatch.setattr(drain_cli, "drain_via_routers", lambda *a, **k: called.append(a))
    a = cli.build_parser().parse_args(["drain", "decode-3", "--router", "127.0.0.1:1", *flags])
    assert drain_cli._cmd_drain(a) == 2
    assert f"pdserve drain: {flags[0]} names the Ray deployment" in capsys.readouterr().err
    assert not called  # refused before any connection


def test_router_alone_and_ray_flags_alone_still_run(monkeypatch) -> None:
    out = {"worker_id": "decode-3", "found": True, "drained": True, "inflight": 0, "reports": []}
    out["elapsed_s"] = 0.0
    seen: list[tuple] = []
    monkeypatch.setattr(drain_cli, "drain_via_routers", lambda r, w, t, **k: seen.append((r, w)) or out)
    a = cli.build_parser().parse_args(["drain", "decode-3", "--router", "127.0.0.1:1", "--tls", "off"])
    assert drain_cli._cmd_drain(a) == 0 and seen == [(["127.0.0.1:1"], "decode-3")]

    from pdserve import ray_cluster

    monkeypatch.setattr(ray_cluster, "connect", lambda addr, ns: seen.append((addr, ns)))
    monkeypatch.setattr(drain_cli, "drain", lambda w, ns, t: out)
    a = cli.build_parser().parse_args(["drain", "decode-3", "--address", "ray://h:1", "--namespace", "ns"])
    assert drain_cli._cmd_drain(a) == 0 and seen[-1] == ("ray://h:1", "ns")


@pytest.mark.parametrize("flags", [["--tls", "on"], ["--cluster-token-file", "/tmp/tok"], ["--mtls", "off"]])
def test_security_flags_without_router_are_refused(flags, capsys, monkeypatch) -> None:
    """Without --router the drain goes through Ray, which never reads the security flags (they
    configure the Admin channels to --router's routers): refused naming the flag, before Ray."""
    from pdserve import ray_cluster

    called: list[object] = []
    monkeypatch.setattr(ray_cluster, "connect", lambda *a: called.append(a))
    a = cli.build_parser().parse_args(["drain", "decode-3", *flags])
    assert drain_cli._cmd_drain(a) == 2
    assert (
        f"pdserve drain: {flags[0]} configures the channels to the routers of --router"
        in capsys.readouterr().err
    )
    assert not called
