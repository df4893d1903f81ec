"""Both deployments hand the router the cluster's shared (Redis) KV index, and only that one.

* Ray: :func:`pdserve.ray_actors.router_config` (what :class:`~pdserve.ray_actors.RouterActor`
  serves with) sets ``RouterConfig.index_url`` from ``index: {kind: redis, url: ...}``; the memory
  index (private to each store node) leaves it None. No Ray is started: the bind host is a
  literal address.
* Processes: :func:`pdserve.launcher.router_index_args` gives ``python -m router`` the store
  nodes' ``--index URL`` for a Redis URL and nothing for ``"memory"`` (the launched router's use
  of it is tested end to end in tests/integration/test_router_redis_index.py).
"""

from __future__ import annotations

import pytest

from pdserve.cluster_config import IndexKind, from_dict
from pdserve.launcher import router_index_args
from pdserve.ray_actors import router_config

URL = "redis://10.0.0.7:6379/2?prefix=prod:"


def test_ray_router_gets_the_redis_index_url() -> None:
    c = from_dict(
        {
            "model": "/models/SmolLM2-135M",
            "host": "127.0.0.1",
            "router": {"port": 50051, "heartbeat_timeout_s": 5, "heartbeat_interval_s": 0.25},
            "index": {"kind": "redis", "url": URL},
        }
    )
    assert c.index.kind is IndexKind.REDIS
    cfg = router_config(c)
    assert cfg.index_url == URL
    # the rest of the router's settings still come from the cluster config
    assert (cfg.model_path, cfg.model_id) == ("/models/SmolLM2-135M", "SmolLM2-135M")
    assert (cfg.host, cfg.port) == ("127.0.0.1", 50051)
    assert (cfg.heartbeat_timeout_s, cfg.heartbeat_interval_s) == (5.0, 0.25)


def test_ray_router_without_shared_index_asks_the_store() -> None:
    c = from_dict({"model": "/m", "host": "127.0.0.1"})
    assert c.index.kind is IndexKind.MEMORY
    assert router_config(c).index_url is None


@pytest.mark.parametrize(
    ("index_url", "args"),
    [
        (URL, ["--index", URL]),
        ("redis://127.0.0.1:6379/0", ["--index", "redis://127.0.0.1:6379/0"]),
        ("memory", []),
    ],
)
def test_launched_router_gets_the_store_index_unless_memory(index_url: str, args: list[str]) -> None:
    assert router_index_args(index_url) == args


def test_ray_router_takes_its_placement_settings_from_the_config() -> None:
    from router.policy.placement import PolicyKind

    c = from_dict(
        {
            "model": "/m",
            "host": "127.0.0.1",
            "router": {
                "policy": "goodput",
                "shared_cores": 16,
                "max_redispatches": 5,
                "latency_profile": "/p.json",
                "slo_margin": 0.2,
                "tenant_max_inflight": 8,
                "local_prefill_max_tokens": 0,
            },
        }
    )
    cfg = router_config(c)
    assert cfg.policy is PolicyKind.GOODPUT and cfg.goodput.shared_cores == 16
    g = cfg.goodput
    assert (g.slo_margin, g.tenant_max_inflight, g.local_prefill) == (0.2, 8, False)
    assert (cfg.max_redispatches, cfg.latency_profile) == (5, "/p.json")
    default = router_config(from_dict({"model": "/m", "host": "127.0.0.1"}))
    assert (
        default.policy is PolicyKind.GOODPUT and default.goodput.shared_cores is None
    )  # #19: goodput by default
    assert default.latency_profile is None and default.max_redispatches == 2
    assert default.goodput.local_prefill and default.goodput.tenant_max_inflight is None
    with pytest.raises(ValueError, match=r"router\.slo_margin: must be in \[0, 1\)"):
        from_dict({"model": "/m", "router": {"slo_margin": 1.0}})
    with pytest.raises(ValueError, match=r"router\.policy: 'fastest' is not one of"):
        from_dict({"model": "/m", "router": {"policy": "fastest"}})
    with pytest.raises(ValueError, match=r"router\.shared_cores: must be >= 0"):
        from_dict({"model": "/m", "router": {"shared_cores": -1}})
