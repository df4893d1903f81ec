"""Llumnix migration policies (router/policy/migration.py): virtual usage, freeness, load
balancing, de-fragmentation, priority headroom and drain plans (pure, no I/O)."""

from __future__ import annotations

import math

import pytest

from router.policy.migration import (
    DecodeLoad,
    MigrationConfig,
    MigrationReason,
    RunningRequest,
    balance,
    defragment,
    drain,
    freeness,
    pick_request,
    priority_headroom,
    protect_priority,
    virtual_usage,
)

CFG = MigrationConfig(balance_threshold=4.0, high_priority=-1, priority_headroom_blocks=10, max_decisions=4)


def _load(iid: str, total: int, reqs: list[tuple[str, int, int]], queued: int = 0, draining: bool = False):
    running = tuple(RunningRequest(r, b, p) for r, b, p in reqs)
    used = sum(b for _, b, _ in reqs)
    return DecodeLoad(iid, total, total - used, running, queued, draining)


def test_virtual_usage_counts_running_queued_and_priority_headroom():
    x = _load("a", 100, [("r1", 20, 0), ("hp", 10, -2)], queued=15)
    assert priority_headroom(x, CFG) == 10  # one high-priority request
    assert virtual_usage(x, CFG) == 30 + 15 + 10
    assert freeness(x, CFG) == (100 - 55) / 2
    idle = _load("b", 100, [])
    assert freeness(idle, CFG) == 100  # an empty batch counts as one slot
    d = _load("c", 100, [("r", 5, 0)], draining=True)
    assert virtual_usage(d, CFG) == math.inf and freeness(d, CFG) == -math.inf


def test_pick_request_prefers_least_important_then_shortest():
    rs = [RunningRequest("a", 5, 0), RunningRequest("b", 9, 2), RunningRequest("c", 3, 2)]
    assert pick_request(rs).request_id == "c"
    assert pick_request(rs, exclude=["c"]).request_id == "b"
    assert pick_request([]) is None


def test_balance_moves_from_most_to_least_loaded_past_the_threshold():
    hot = _load("hot", 100, [("h1", 30, 0), ("h2", 40, 0), ("h3", 20, 0)])
    cold = _load("cold", 100, [("c1", 10, 0)])
    out = balance([hot, cold], MigrationConfig(balance_threshold=4.0, max_decisions=1))
    assert len(out) == 1
    d = out[0]
    assert (d.source, d.destination, d.reason) == ("hot", "cold", MigrationReason.LOAD_BALANCE)
    assert d.request_id == "h3" and d.num_blocks == 20  # the cheapest to copy


def test_balance_does_nothing_under_the_threshold_or_when_nothing_fits():
    a = _load("a", 100, [("a1", 30, 0)])
    b = _load("b", 100, [("b1", 28, 0)])
    assert balance([a, b], CFG) == []
    big = _load("big", 100, [("x", 95, 0), ("y", 5, 0)])
    small = _load("small", 10, [])
    # y (5 blocks) goes; then x (95) fits nowhere
    out = balance([big, small], MigrationConfig(balance_threshold=1.0, max_decisions=4))
    assert [d.request_id for d in out] == ["y"]


def test_balance_ignores_draining_instances_and_respects_headroom():
    d = _load("d", 100, [], draining=True)
    hot = _load("hot", 100, [("h1", 45, 0), ("h2", 45, 0)])
    assert balance([d, hot], CFG) == []  # the only other instance is draining
    # the freest instance keeps 10 blocks of headroom for its high-priority request
    guarded = _load("g", 30, [("vip", 4, -5)])
    out = balance(
        [hot, guarded], MigrationConfig(balance_threshold=1.0, high_priority=-1, priority_headroom_blocks=10)
    )
    assert out == []  # 45 + 1 blocks do not fit the 16 left above the headroom


def test_defragment_frees_room_for_a_request_no_instance_holds():
    a = _load("a", 64, [("a1", 20, 0), ("a2", 8, 1), ("a3", 6, 1)])  # 30 free
    b = _load("b", 64, [("b1", 30, 0)])  # 34 free
    c = _load("c", 64, [("c1", 20, 0)])  # 44 free
    need = 50
    plan = defragment([a, b, c], need, CFG)
    assert plan and all(d.reason is MigrationReason.DEFRAGMENT for d in plan)
    src = {d.source for d in plan}
    assert len(src) == 1
    (s,) = src
    freed = {x.instance_id: x for x in (a, b, c)}[s].free_blocks + sum(d.num_blocks for d in plan)
    assert freed >= need
    assert len(plan) == 1 and plan[0].request_id == "c1" and s == "c"  # one move suffices on c
    # already fits somewhere: nothing to do; cannot be freed anywhere: nothing half done
    assert defragment([a, b, c], 40, CFG) == []
    assert defragment([a, b, c], 65, CFG) == []


def test_protect_priority_moves_low_priority_requests_out():
    crowded = _load("x", 40, [("vip", 10, -3), ("lo1", 12, 2), ("lo2", 15, 1)])  # 3 free < 10 headroom
    roomy = _load("y", 100, [("z", 10, 0)])
    out = protect_priority([crowded, roomy], CFG)
    assert [(d.request_id, d.source, d.destination) for d in out] == [("lo1", "x", "y")]
    assert out[0].reason is MigrationReason.PRIORITY
    fine = _load("x", 40, [("vip", 10, -3)])
    assert protect_priority([fine, roomy], CFG) == []


def test_drain_plans_every_request_that_fits_elsewhere():
    gone = _load("old", 100, [("r1", 30, 0), ("r2", 10, 1), ("r3", 50, -2)], draining=True)
    a = _load("a", 100, [("a1", 40, 0)])  # 60 free
    b = _load("b", 100, [("b1", 50, 0)])  # 50 free
    out = drain([gone, a, b], "old", CFG)
    assert all(d.reason is MigrationReason.DRAIN and d.source == "old" for d in out)
    # r3 (most important, 50 blocks) to a; then r1 (30) to b; r2 (10) to whichever fits
    assert [(d.request_id, d.destination) for d in out][:2] == [("r3", "a"), ("r1", "b")]
    assert {d.request_id for d in out} == {"r1", "r2", "r3"}
    # with less room the last one fits nowhere now: left out, not forced
    tight = _load("b", 100, [("b1", 60, 0)])  # 40 free: r1 leaves 10, r2 needs 11
    assert {d.request_id for d in drain([gone, a, tight], "old", CFG)} == {"r1", "r3"}
    with pytest.raises(KeyError):
        drain([a], "old", CFG)


def test_config_and_load_validation():
    with pytest.raises(ValueError):
        MigrationConfig(balance_threshold=-1)
    with pytest.raises(ValueError):
        MigrationConfig(max_decisions=0)
    with pytest.raises(ValueError):
        DecodeLoad("a", 10, 11)


def test_a_lora_request_moves_only_to_an_instance_serving_its_adapter():
    """Every policy keeps a LoRA request to destinations that serve its adapter (a base-model
    request may go anywhere); balance picks another request rather than stopping."""
    from dataclasses import replace

    src = DecodeLoad(
        "a",
        100,
        40,
        (RunningRequest("lora", 10, 0, "sql"), RunningRequest("base", 20, 0), RunningRequest("x", 30, 0)),
        adapters=frozenset({"sql"}),
    )
    no_sql = DecodeLoad("b", 100, 100)
    with_sql = DecodeLoad("c", 100, 90, adapters=frozenset({"sql"}))
    # balance: "lora" is the least important and smallest, but b cannot run it: "base" moves
    moves = balance([src, no_sql], CFG)
    assert moves and moves[0].request_id == "base" and moves[0].destination == "b"
    assert all(m.request_id != "lora" for m in moves)
    # drain: "lora" goes to c (serves sql); the others wherever is freest as the plan fills
    plan = {m.request_id: m.destination for m in drain([src, no_sql, with_sql], "a", CFG)}
    assert plan["lora"] == "c" and set(plan) == {"lora", "base", "x"}
    # nowhere serves it: left out (it finishes in place)
    plan = {m.request_id for m in drain([src, no_sql], "a", CFG)}
    assert "lora" not in plan and "base" in plan
    assert replace(with_sql, free_blocks=5).adapters == frozenset({"sql"})
