"""The cluster config's ``direct_streams`` key (pdserve up): parsed, validated, and carried to the
routers' RouterConfig and the decode workers' WorkerConfig (pdserve.ray_actors)."""

from __future__ import annotations

import pytest

from pdserve.cluster_config import ClusterConfig, PoolRole, from_dict, load
from pdserve.errors import InvalidRequestError
from pdserve.ray_actors import router_config, router_configs, worker_config
from pdserve.worker_base import Role

ROUTERS = ("127.0.0.1:1", "127.0.0.1:2")


def _worker(c: ClusterConfig, role: PoolRole):
    return worker_config(c, role, f"{role.value}-0", "127.0.0.1:9", "127.0.0.1", ROUTERS)


def test_direct_streams_default_on_for_routers_and_decode_workers():
    c = from_dict({"model": "/m", "routers": 2, "router": {"tenant_state": "local"}})
    assert c.direct_streams is True and c.direct_on is True
    assert router_config(c, 0).direct_streams and router_config(c, 1).direct_streams
    d = _worker(c, PoolRole.DECODE)
    assert d.role is Role.DECODE and d.direct_streams is True and d.direct_port == 0
    assert d.router_addresses == ROUTERS and d.model_path == "/m" and d.store_address == "127.0.0.1:9"
    p = _worker(c, PoolRole.PREFILL)  # prefill workers have no stream to serve
    assert p.role is Role.PREFILL and p.direct_streams is False
    assert d.engine == c.decode.engine_config() and p.engine == c.prefill.engine_config()


def test_direct_streams_false_relays_on_routers_and_workers():
    c = from_dict({"model": "/m", "direct_streams": False})
    assert c.direct_streams is False and c.direct_on is False
    assert router_config(c).direct_streams is False
    assert _worker(c, PoolRole.DECODE).direct_streams is False


def test_direct_streams_must_be_a_boolean():
    with pytest.raises(InvalidRequestError, match=r"direct_streams: expected true/false, got 'yes'"):
        from_dict({"model": "/m", "direct_streams": "yes"})


def test_several_models_relay_and_refuse_an_explicit_direct_streams():
    models = [{"model": "/models/A"}, {"model": "/models/B"}]
    c = from_dict({"models": models})
    assert c.direct_streams is True and c.direct_on is False  # the default: relayed
    cfgs = router_configs(c)
    assert [r.model_id for r in cfgs] == ["A", "B"] and not any(r.direct_streams for r in cfgs)
    for view in c.views():
        assert view.direct_on is False and _worker(view, PoolRole.DECODE).direct_streams is False
    assert from_dict({"models": models, "direct_streams": False}).direct_on is False
    with pytest.raises(
        InvalidRequestError, match=r"cluster config: direct_streams: a cluster of several models"
    ):
        from_dict({"models": models, "direct_streams": True})


def test_direct_streams_from_yaml(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text("model: /m\ndirect_streams: false\n")
    assert load(f).direct_on is False
    f.write_text("model: /m\ndirect_streams: true\n")
    assert load(f).direct_on is True
