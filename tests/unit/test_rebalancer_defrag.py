"""The rebalancer's de-fragmentation trigger (router/rebalancer.py over
router.policy.migration.defragment, Llumnix): a request handed to a decode worker that has not
started decoding for ``defrag_wait_s`` and that no decode worker's free blocks can hold gets room
made on the worker it waits at, by migrating that worker's smallest requests to workers with room.
Pure decision first, then a rebalancing pass over a fake servicer with a fake clock."""

from __future__ import annotations

import concurrent.futures
from types import SimpleNamespace

import pytest

from router.lifecycle.machine import Transition
from router.lifecycle.states import State
from router.policy.migration import DecodeLoad, MigrationConfig, MigrationReason, RunningRequest, defragment
from router.rebalancer import (
    RebalanceConfig,
    Rebalancer,
    WaitingRequest,
    defrag_targets,
    plan,
    waiting_requests,
)
from router.registry import WorkerKind

NO_BALANCE = MigrationConfig(balance_threshold=1e9, max_decisions=8)


def _load(
    wid: str, total: int, free: int, reqs: tuple[tuple[str, int], ...] = (), draining=False
) -> DecodeLoad:
    return DecodeLoad(wid, total, free, tuple(RunningRequest(r, b) for r, b in reqs), draining=draining)


def _cluster() -> list[DecodeLoad]:
    # nobody can hold 40 blocks; "a" can once r2 (15) and r1 (20) moved out (10 + 35 = 45)
    return [
        _load("a", 100, 10, (("r1", 20), ("r2", 15), ("r3", 55))),
        _load("b", 100, 25, (("s1", 75),)),
        _load("c", 100, 28, (("t1", 72),)),
    ]


def test_defrag_targets_only_requests_no_worker_can_hold_after_the_wait() -> None:
    loads = _cluster()
    big = WaitingRequest("big", "a", 40, since=10.0)
    small = WaitingRequest("small", "a", 20, since=10.0)  # fits on c: not de-fragmentation's
    gone = WaitingRequest("elsewhere", "z", 40, since=0.0)  # at a worker not in the loads
    assert defrag_targets(loads, [big, small, gone], now=11.0, wait_s=2.0) == []  # not waited enough
    assert defrag_targets(loads, [big, small, gone], now=12.0, wait_s=2.0) == [big]
    draining = [*loads[:2], _load("c", 100, 60, draining=True)]  # a draining worker's room does not count
    assert defrag_targets(draining, [WaitingRequest("x", "a", 40, 0.0)], 5.0, 2.0)


def test_plan_makes_room_on_the_worker_the_request_waits_at() -> None:
    loads = _cluster()
    big = WaitingRequest("big", "a", 40, since=0.0)
    ds = plan(loads, NO_BALANCE, busy=(), slots=4, defrag=[big])
    assert [(d.request_id, d.source, d.reason) for d in ds] == [
        ("r2", "a", MigrationReason.DEFRAGMENT),
        ("r1", "a", MigrationReason.DEFRAGMENT),
    ]
    assert {d.destination for d in ds} <= {"b", "c"}
    # the moves' blocks fit their destinations, and free 10 + 15 + 20 >= 40 on "a"
    assert 10 + sum(d.num_blocks for d in ds) >= 40
    # a request being moved already is not picked; slots bound the decisions
    assert all(d.request_id != "r2" for d in plan(loads, NO_BALANCE, busy={"r2"}, slots=4, defrag=[big]))
    assert len(plan(loads, NO_BALANCE, busy=(), slots=1, defrag=[big])) == 1
    # the target is the waiting request's worker, not the one closest to fitting it
    assert all(d.source == "a" for d in defragment(loads, 40, NO_BALANCE, target="a"))
    assert defragment(loads, 40, NO_BALANCE, target="b") == []  # s1 (75) fits nowhere: no half plan


# ---------------------------------------------------------------------------- a pass, fakes
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _worker(wid: str, total: int, used: int) -> SimpleNamespace:
    return SimpleNamespace(
        worker_id=wid,
        kind=WorkerKind.DECODE,
        draining=False,
        adapters=(),
        load=SimpleNamespace(kv_blocks_total=total, kv_blocks_used=used, block_size=16),
    )


def _driver(state: State, wid: str, tokens: int, entered: float = 0.0) -> SimpleNamespace:
    hist = [Transition(entered, State.PREFILLING, state, "Prefilled")]
    return SimpleNamespace(
        state=state,
        m=SimpleNamespace(decode_id=wid, history=hist),
        legs=SimpleNamespace(
            run=SimpleNamespace(ids=list(range(tokens)), out_ids=[]),
            req=SimpleNamespace(priority=0, adapter=""),
        ),
    )


class _Svc:
    """What the rebalancer reads and calls of a GenerateServicer."""

    def __init__(self) -> None:
        workers = {
            w.worker_id: w for w in (_worker("a", 100, 90), _worker("b", 100, 75), _worker("c", 100, 72))
        }
        self.registry = SimpleNamespace(alive=lambda kind, model: list(workers.values()), get=workers.get)
        self.config = SimpleNamespace(model_id="m")
        self.migrator = object()
        self.migrations = SimpleNamespace(in_flight=lambda: set())
        self.started: list[tuple[str, str, MigrationReason]] = []
        self._drivers = {
            "r1": _driver(State.DECODING, "a", 20 * 16),
            "r2": _driver(State.DECODING, "a", 15 * 16),
            "r3": _driver(State.DECODING, "a", 55 * 16),
            "s1": _driver(State.DECODING, "b", 75 * 16),
            "t1": _driver(State.DECODING, "c", 72 * 16),
            "big": _driver(State.HANDING_OFF, "a", 40 * 16 - 1, entered=100.0),  # + its next token: 40 blocks
        }

    def running(self) -> dict:
        return dict(self._drivers)

    def migrate(self, rid: str, dest: str, reason: MigrationReason):
        self.started.append((rid, dest, reason))
        return concurrent.futures.Future()  # the outcome: not awaited by a pass


def test_a_rebalancing_pass_defragments_after_the_wait_on_a_fake_clock() -> None:
    svc, clock = _Svc(), _Clock()
    (w,) = waiting_requests(svc)  # type: ignore[arg-type]
    assert (w.request_id, w.instance_id, w.need_blocks, w.since) == ("big", "a", 40, 100.0)
    reb = Rebalancer(
        svc, RebalanceConfig(max_concurrent=4, policy=NO_BALANCE, defrag_wait_s=2.0), clock=clock
    )  # type: ignore[arg-type]
    clock.t = 101.0
    assert reb.tick() == [] and svc.started == []  # waited 1 s of 2: maybe only pulling its KV
    clock.t = 102.5
    moved = reb.tick()
    assert [(d.request_id, d.reason) for d in moved] == [
        ("r2", MigrationReason.DEFRAGMENT),
        ("r1", MigrationReason.DEFRAGMENT),
    ]
    assert [s[0] for s in svc.started] == ["r2", "r1"] and all(s[1] in ("b", "c") for s in svc.started)
    # off: no de-fragmentation at all
    svc2 = _Svc()
    off = Rebalancer(
        svc2, RebalanceConfig(max_concurrent=4, policy=NO_BALANCE, defrag_wait_s=None), clock=clock
    )  # type: ignore[arg-type]
    assert off.tick() == [] and svc2.started == []
    with pytest.raises(ValueError, match="defrag_wait_s"):
        RebalanceConfig(defrag_wait_s=-1.0)
