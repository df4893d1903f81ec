"""The launcher's router supervisor policy and the router-count settings (pure parts)."""

from __future__ import annotations

import pytest

from pdserve.launcher import ClusterSpec, LocalCluster, RestartBudget, _spawn, router_name
from tests.polling import wait_for


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


def _fake_router_cluster(script: str, limit: int = 2) -> LocalCluster:
    """A LocalCluster whose only process is a "router" running ``script`` (it prints a ready line
    with its address, as python -m router does), supervised."""
    spec = ClusterSpec(model_path="unused", router_restart_limit=limit, router_restart_window_s=60.0)
    cl = LocalCluster(spec)
    address = "127.0.0.1:1"
    cl.router_addresses, cl.control_addresses = [address], [address]
    cl.router_address = cl.control_address = address
    args = ["-c", f"import json, time; print(json.dumps({{'address': {address!r}}}), flush=True); {script}"]
    _spawn(cl, "router", args, 60)
    cl.supervise(poll_s=0.05)
    return cl


def test_supervisor_restarts_an_exited_router() -> None:
    cl = _fake_router_cluster("time.sleep(60)")
    try:
        first = cl.procs["router"].pid
        cl.procs["router"].kill()
        wait_for(lambda: len(cl.router_restarts) == 1, 60, "the router restarted")
        name, _, status = cl.router_restarts[0]
        assert name == "router" and status != 0
        assert cl.procs["router"].pid != first and cl.procs["router"].poll() is None
        assert "--port" in cl.argv["router"]  # started on the port it had
        assert cl.dead() == []
    finally:
        cl.stop()


def test_supervisor_leaves_a_crash_looping_router_down() -> None:
    cl = _fake_router_cluster("time.sleep(0.3); raise SystemExit(3)", limit=2)
    try:
        wait_for(lambda: "router" in cl.dead(), 60, "the router given up on")
        assert len(cl.router_restarts) == 2  # the budget: 2 restarts in the window, then no more
        assert all(status == 3 for _, _, status in cl.router_restarts)
    finally:
        cl.stop()
