"""``routers`` in the Ray cluster config: several router actors (README, "Several routers")."""

from __future__ import annotations

import re

import pytest

from pdserve.cluster_config import capacity_shortfall, from_dict, router_tenant_state_url
from pdserve.errors import InvalidRequestError
from pdserve.ray_actors import router_actor_name, router_config


def test_routers_default_one_and_parse() -> None:
    assert from_dict({"model": "/m"}).routers == 1
    assert from_dict({"model": "/m", "routers": 3, "router": {"tenant_state": "local"}}).routers == 3


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({"routers": 0}, "routers: must be >= 1, got 0"),
        ({"routers": "2"}, "routers: expected an integer"),
        ({"routers": 2.0}, "routers: expected an integer"),
        ({"routers": 3, "router": {"port": 65534}}, "routers: 3 routers from router.port 65534"),
    ],
)
def test_bad_router_counts_are_refused_naming_the_key(raw, why) -> None:
    with pytest.raises(InvalidRequestError, match=why):
        from_dict({"model": "/m", **raw})


def test_router_i_listens_on_port_plus_i_and_has_its_own_actor_name() -> None:
    c = from_dict(
        {"model": "/m", "host": "127.0.0.1", "routers": 2, "router": {"port": 50051, "tenant_state": "local"}}
    )
    assert [router_config(c, i).port for i in range(2)] == [50051, 50052]
    assert router_config(from_dict({"model": "/m", "host": "127.0.0.1"}), 1).port == 0  # any free port
    assert [router_actor_name(i) for i in range(3)] == [
        "pdserve-router",
        "pdserve-router-1",
        "pdserve-router-2",
    ]


def test_capacity_counts_every_router() -> None:
    c = from_dict(
        {
            "model": "/m",
            "routers": 3,
            "router": {"num_cpus": 1, "tenant_state": "local"},
            "prefill": {"count": 0},
            "decode": {"count": 0},
        }
    )
    why = capacity_shortfall(c, {"CPU": 2.0}, 1)
    assert why is not None and "routers: 3 CPU" in why
    assert capacity_shortfall(c, {"CPU": 3.0}, 1) is None


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        ({}, "router.tenant_state: with 2 routers each keeping its own tenant state"),
        ({"router": {"tenant_state": "sometimes"}}, "router.tenant_state must be auto, local or a redis://"),
        (
            {
                "index": {"kind": "redis", "url": "redis://127.0.0.1:6379/0"},
                "router": {"tenant_max_inflight": 4},
            },
            "router.tenant_max_inflight: is counted by each of the 2 routers alone",
        ),
    ],
)
def test_several_routers_share_tenant_state_or_say_local(extra: dict, msg: str) -> None:
    """Several routers keep tenant quotas and request ids in Redis (the index's by default); per-router
    state must be asked for (router.tenant_state: local), and goodput's per-router quota is refused."""
    with pytest.raises(InvalidRequestError, match=re.escape(msg)):
        from_dict({"model": "/m", "routers": 2, **extra})


def test_tenant_state_choices() -> None:
    redis = {"kind": "redis", "url": "redis://127.0.0.1:6379/0"}
    assert router_tenant_state_url(from_dict({"model": "/m"})) == ""  # one router: its memory
    assert router_tenant_state_url(from_dict({"model": "/m", "routers": 2, "index": redis})) == redis["url"]
    local = from_dict(
        {"model": "/m", "routers": 2, "router": {"tenant_state": "local", "tenant_max_inflight": 4}}
    )
    assert router_tenant_state_url(local) == ""
    url = "redis://10.0.0.9:6380/2"
    assert (
        router_tenant_state_url(from_dict({"model": "/m", "routers": 3, "router": {"tenant_state": url}}))
        == url
    )


def test_router_cli_refuses_per_router_goodput_quota_beside_shared_state_before_starting_it(capsys) -> None:
    """``python -m router``: shared tenant state (several routers, a Redis URL) with goodput's
    per-router --tenant-max-inflight is refused before the shared state starts (the Redis named
    here is unreachable: had it been opened, the error would name it instead)."""
    import argparse

    from router.__main__ import _shared_tenant_state, build_parser

    ap = build_parser()
    a = ap.parse_args(
        [
            "--model",
            "/m",
            "--cluster-routers",
            "2",
            "--tenant-state",
            "redis://127.0.0.1:1/0",
            "--tenant-max-inflight",
            "3",
        ]
    )
    assert isinstance(a, argparse.Namespace)
    with pytest.raises(SystemExit):
        _shared_tenant_state(ap, a)
    assert "--tenant-max-inflight is counted by each of the 2 routers alone" in capsys.readouterr().err
