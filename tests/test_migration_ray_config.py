"""The Ray cluster config's ``router.migration_transport`` key (``pdserve up``): parsed,
validated (``dist`` needs the workers' process group, ``kv_transfer.kind: dist``; unknown values
and keys refused naming them) and carried to each router's RouterConfig, the in-process
counterpart of ``python -m router --migration-transport``."""

from __future__ import annotations

import pytest

from pdserve.cluster_config import MigrationTransportKind, from_dict, load
from pdserve.errors import InvalidRequestError
from pdserve.ray_actors import router_config, router_configs
from router.migration_client import MigrationTransport

BASE = {"model": "/m", "host": "127.0.0.1"}


def test_default_is_grpc_on_every_router():
    c = from_dict({**BASE, "routers": 2, "router": {"tenant_state": "local"}})
    assert c.router.migration_transport is MigrationTransportKind.GRPC
    assert [router_config(c, i).migration_transport for i in range(2)] == [MigrationTransport.GRPC] * 2


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("grpc", MigrationTransport.GRPC),
        ("STORE", MigrationTransport.STORE),
        ("dist", MigrationTransport.DIST),
    ],
)
def test_the_key_reaches_the_routers(value, want):
    raw = {**BASE, "router": {"migration_transport": value}, "kv_transfer": {"kind": "dist"}}
    c = from_dict(raw)
    assert c.router.migration_transport is MigrationTransportKind(value.lower())
    assert router_config(c).migration_transport is want
    assert [r.migration_transport for r in router_configs(c)] == [want]


def test_every_kind_names_a_router_transport():
    assert {MigrationTransport.parse(k.value) for k in MigrationTransportKind} == set(MigrationTransport)


def test_dist_without_the_workers_process_group_is_refused():
    with pytest.raises(
        InvalidRequestError, match=r"router\.migration_transport: dist .*kv_transfer: \{kind: dist\}"
    ):
        from_dict({**BASE, "router": {"migration_transport": "dist"}})


def test_an_unknown_transport_is_refused_naming_the_choices():
    with pytest.raises(
        InvalidRequestError,
        match=r"router\.migration_transport: 'nccl' is not one of \['grpc', 'store', 'dist'\]",
    ):
        from_dict({**BASE, "router": {"migration_transport": "nccl"}})


def test_unknown_router_keys_stay_refused():
    with pytest.raises(InvalidRequestError, match=r"router: unknown key\(s\) \['migration'\]"):
        from_dict({**BASE, "router": {"migration": "dist"}})


def test_from_a_yaml_file(tmp_path):
    p = tmp_path / "cluster.yaml"
    p.write_text(
        "model: /m\nhost: 127.0.0.1\nrouter: {migration_transport: dist}\nkv_transfer: {kind: dist, backend: gloo}\n"
    )
    c = load(p)
    assert router_config(c).migration_transport is MigrationTransport.DIST
