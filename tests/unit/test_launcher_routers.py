"""The launcher's router supervisor policy and the router-count settings (pure parts)."""

from __future__ import annotations

import pytest

from pdserve.launcher import ClusterSpec, RestartBudget, router_name


def test_restart_budget_leaves_a_crash_looping_router_down() -> None:
    b = RestartBudget(limit=2, window_s=10.0)
    assert b.allow(0.0) and b.allow(1.0)
    assert not b.allow(2.0)  # a third restart within 10 s: refused
    assert b.allow(10.5)  # the first restart left the window
    assert not RestartBudget(limit=0, window_s=1.0).allow(0.0)  # limit 0: never restarted


def test_router_process_names() -> None:
    assert [router_name(i) for i in range(3)] == ["router", "router-1", "router-2"]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"num_routers": 0}, "num_routers"),
        ({"router_restart_limit": -1}, "router_restart_limit"),
        ({"router_restart_window_s": 0}, "router_restart_window_s"),
    ],
)
def test_cluster_spec_refuses_bad_router_settings(kw, field) -> None:
    with pytest.raises(ValueError, match=field):
        ClusterSpec(model_path="unused", **kw)
