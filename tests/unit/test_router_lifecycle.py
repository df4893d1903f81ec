"""The router's request lifecycle as a pure state machine (router.lifecycle.machine): every
transition, every invalid one, re-dispatch, cancellation in each state, migration, and the
exactly-once release of what a request holds. No I/O: events in, actions out, a fake clock."""

from __future__ import annotations

from collections import Counter

import pytest

from pdserve.errors import UnavailableError
from router.failover import LostPhase, LostWorker
from router.lifecycle import actions as A
from router.lifecycle import events as E
from router.lifecycle.machine import RequestLifecycle
from router.lifecycle.resources import (
    Ledger,
    OnceReleases,
    ReleaseError,
    Resource,
    ResourceKind,
)
from router.lifecycle.states import ALLOWED, InvalidTransition, Outcome, OutputMismatch, State, check_edge

RID = "r1"
ALL_EVENTS = (
    E.Placed("p0", "d0"),
    E.Prefilled("p0", 7, E.KVRef("lease-x"), False),
    E.Streamed("d0", 1, (8,)),
    E.Finished("d0"),
    E.Lost(LostWorker("d0", LostPhase.DECODE)),
    E.Relet(None),
    E.Cancelled(),
    E.Failed(RuntimeError("x")),
    E.MigrationRequested("d1"),
    E.MigrationCommitted("d1", 1, (7,)),
    E.MigrationAborted("no room"),
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def machine(
    local: bool = False, limit: int = 2, clock: Clock | None = None, stream: bool = False
) -> RequestLifecycle:
    return RequestLifecycle(
        RID,
        prefill_id=None if local else "p0",
        decode_id="d0",
        clock=clock or Clock(),
        max_redispatches=limit,
        kv_stream=stream,
    )


def kinds(acts: list[A.Action]) -> list[type]:
    return [type(a) for a in acts]


def released(acts: list[A.Action]) -> list[tuple[str, str]]:
    return [(a.resource.kind.value, a.resource.key) for a in acts if isinstance(a, A.Release)]


def delivered(acts: list[A.Action]) -> list[int]:
    return [t for a in acts if isinstance(a, A.Deliver) for t in a.tokens]


def to_prefilling(m: RequestLifecycle) -> list[A.Action]:
    return m.handle(E.Placed("p0", "d0"))


def to_handing_off(m: RequestLifecycle, lease: str = "lease-1") -> None:
    to_prefilling(m)
    m.handle(E.Prefilled("p0", 7, E.KVRef(lease), stop=False))


def to_decoding(m: RequestLifecycle, tokens: tuple[int, ...] = (8, 9)) -> None:
    to_handing_off(m)
    m.handle(E.Streamed("d0", 1, tokens))


def to_migrating(m: RequestLifecycle) -> None:
    to_decoding(m)
    m.handle(E.MigrationRequested("d1"))


ROUTES = {
    State.PLACED: lambda m: None,
    State.PREFILLING: to_prefilling,
    State.STREAMING: to_prefilling,  # (a machine with kv_stream)
    State.HANDING_OFF: to_handing_off,
    State.DECODING: to_decoding,
    State.MIGRATING: to_migrating,
}


def assert_nothing_held(m: RequestLifecycle) -> None:
    assert m.ledger.held() == [], m.ledger.held()
    # exactly once: every acquisition left by one release or one hand-over, no more
    assert Counter(m.ledger.acquired) == Counter(m.ledger.released + m.ledger.handed_over)


# ---------------------------------------------------------------------------- the happy paths
def test_disaggregated_request_walks_placed_prefilling_handing_off_decoding_finished() -> None:
    clock = Clock()
    m = machine(clock=clock)
    assert m.state is State.PLACED
    assert {r.kind for r in m.ledger.held()} == {ResourceKind.RESERVATION, ResourceKind.POLICY_SLOT}
    acts = m.handle(E.Placed("p0", "d0"))
    # the decode worker's slot is taken before the reservation is dropped, then the prefill runs
    assert kinds(acts) == [A.Acquire, A.Release, A.RunPrefill]
    assert acts[0].resource == Resource(ResourceKind.WORKER_SLOT, "d0")
    assert released(acts) == [("reservation", RID)]
    assert acts[2] == A.RunPrefill("p0", 0) and m.state is State.PREFILLING
    clock.t += 0.5
    acts = m.handle(E.Prefilled("p0", 7, E.KVRef("lease-1"), stop=False))
    assert acts == [A.Deliver(0, (7,)), A.RunDecode("d0", E.KVRef("lease-1"), 1)]
    assert m.state is State.HANDING_OFF and m.ledger.holds(Resource(ResourceKind.KV_LEASE, "lease-1"))
    clock.t += 0.25
    acts = m.handle(E.Streamed("d0", 1, (8, 9)))
    assert acts == [A.Deliver(1, (8, 9))] and m.state is State.DECODING
    # the decode worker pulled the KV and released the lease itself: handed over, not released here
    assert Resource(ResourceKind.KV_LEASE, "lease-1") in m.ledger.handed_over
    assert m.handle(E.Streamed("d0", 3, ())) == [A.Deliver(3, ())]  # a message with no token
    acts = m.handle(E.Finished("d0"))
    assert m.state is State.FINISHED and m.outcome is Outcome.FINISHED and m.terminal
    assert released(acts) == [("worker_slot", "d0"), ("policy_slot", RID)]
    assert all(a.outcome is Outcome.FINISHED for a in acts)
    assert m.output == [7, 8, 9]
    assert_nothing_held(m)
    assert [(t.src, t.dst) for t in m.history] == [
        (State.PLACED, State.PREFILLING),
        (State.PREFILLING, State.HANDING_OFF),
        (State.HANDING_OFF, State.DECODING),
        (State.DECODING, State.FINISHED),
    ]
    assert m.time_in(State.PREFILLING) == pytest.approx(0.5)
    assert m.time_in(State.HANDING_OFF) == pytest.approx(0.25)


def test_a_first_token_that_stops_finishes_from_prefilling_and_releases_the_lease() -> None:
    m = machine()
    to_prefilling(m)
    acts = m.handle(E.Prefilled("p0", 2, E.KVRef("lease-1"), stop=True))
    assert m.state is State.FINISHED and delivered(acts) == [2]
    assert released(acts) == [("kv_lease", "lease-1"), ("worker_slot", "d0"), ("policy_slot", RID)]
    (lease,) = [a for a in acts if isinstance(a, A.Release) and a.resource.kind is ResourceKind.KV_LEASE]
    assert lease.kv == E.KVRef("lease-1")
    assert_nothing_held(m)


def test_local_prefill_goes_straight_to_decoding() -> None:
    m = machine(local=True)
    acts = m.handle(E.Placed(None, "d0"))
    assert kinds(acts) == [A.Acquire, A.Release, A.RunLocalDecode] and m.state is State.DECODING
    assert acts[-1] == A.RunLocalDecode("d0", 0)
    assert delivered(m.handle(E.Streamed("d0", 0, (5, 6)))) == [5, 6]
    m.handle(E.Finished("d0"))
    assert m.output == [5, 6] and m.outcome is Outcome.FINISHED
    assert_nothing_held(m)


# ---------------------------------------------------------------------------- invalid transitions
VALID = {
    State.PLACED: {E.Placed, E.Relet, E.Cancelled, E.Failed},
    State.PREFILLING: {E.Prefilled, E.Lost, E.Cancelled, E.Failed},
    State.STREAMING: {E.Prefilled, E.Lost, E.Cancelled, E.Failed},
    State.HANDING_OFF: {E.Streamed, E.Lost, E.Cancelled, E.Failed},
    State.DECODING: {E.Streamed, E.Finished, E.Lost, E.Cancelled, E.Failed, E.MigrationRequested},
    State.MIGRATING: {
        E.Streamed,
        E.Finished,
        E.Lost,
        E.Cancelled,
        E.Failed,
        E.MigrationCommitted,
        E.MigrationAborted,
    },
    State.FINISHED: set(),
    State.FAILED: set(),
}


def _in(state: State) -> RequestLifecycle:
    m = machine(stream=state is State.STREAMING)
    if state is State.FINISHED:
        to_decoding(m)
        m.handle(E.Finished("d0"))
    elif state is State.FAILED:
        m.handle(E.Cancelled())
    else:
        ROUTES[state](m)
    assert m.state is state
    return m


@pytest.mark.parametrize("state", list(State))
def test_every_event_not_valid_in_a_state_raises_and_changes_nothing(state: State) -> None:
    for ev in ALL_EVENTS:
        m = _in(state)
        assert m.valid(type(ev)) == (type(ev) in VALID[state])
        if type(ev) in VALID[state]:
            continue
        before = (m.state, list(m.output), m.ledger.held(), len(m.history))
        with pytest.raises(
            InvalidTransition, match=f"{type(ev).__name__} is not valid in state {state.value}"
        ):
            m.handle(ev)
        assert (m.state, list(m.output), m.ledger.held(), len(m.history)) == before


def test_edges_outside_the_graph_are_refused() -> None:
    for src, dsts in ALLOWED.items():
        for dst in State:
            if dst in dsts:
                check_edge(RID, src, dst)
            else:
                with pytest.raises(InvalidTransition):
                    check_edge(RID, src, dst)
    assert ALLOWED[State.FINISHED] == ALLOWED[State.FAILED] == frozenset()


def test_events_from_the_wrong_worker_are_refused() -> None:
    m = machine()
    to_prefilling(m)
    with pytest.raises(InvalidTransition, match="from worker 'p9'"):
        m.handle(E.Prefilled("p9", 7, E.KVRef("l"), stop=False))
    with pytest.raises(InvalidTransition, match="a decode loss"):
        m.handle(E.Lost(LostWorker("p0", LostPhase.DECODE)))
    with pytest.raises(InvalidTransition, match="without KV"):
        m.handle(E.Prefilled("p0", 7, None, stop=False))
    to_handing_off(m := machine())
    with pytest.raises(InvalidTransition, match="from worker 'd1'"):
        m.handle(E.Streamed("d1", 1, (8,)))
    m = machine(local=True)
    with pytest.raises(InvalidTransition, match="local-prefill"):
        m.handle(E.Placed("p0", "d0"))
    m = machine()
    with pytest.raises(InvalidTransition, match="re-lease nobody asked for"):
        m.handle(E.Relet(None))
    with pytest.raises(InvalidTransition, match="without the prefill worker"):
        m.handle(E.Placed(None, "d0"))


# ---------------------------------------------------------------------------- token index dedupe
def test_tokens_already_delivered_are_dropped_and_a_gap_or_a_different_token_is_refused() -> None:
    m = machine()
    to_decoding(m, (8, 9))  # output 7, 8, 9
    acts = m.handle(E.Streamed("d0", 2, (9, 10, 11)))  # 9 again, then new
    assert acts == [A.Deliver(3, (10, 11), skip=1)] and m.output == [7, 8, 9, 10, 11]
    assert m.handle(E.Streamed("d0", 1, (8, 9))) == [A.Deliver(5, (), skip=2)]  # all repeats
    with pytest.raises(OutputMismatch, match="would be lost"):
        m.handle(E.Streamed("d0", 7, (13,)))  # index 5 and 6 missing
    with pytest.raises(OutputMismatch, match="differently"):
        m.handle(E.Streamed("d0", 4, (99, 12)))
    assert m.output == [7, 8, 9, 10, 11] and m.state is State.DECODING


# ---------------------------------------------------------------------------- re-dispatch
def test_prefill_lost_goes_back_to_placement_and_another_prefill_worker() -> None:
    m = machine()
    to_prefilling(m)
    acts = m.handle(E.Lost(LostWorker("p0", LostPhase.PREFILL, "Socket closed")))
    assert m.state is State.PLACED
    assert kinds(acts) == [A.DropWorker, A.Release, A.FindReplacement]
    assert released(acts) == [("worker_slot", "d0")]
    assert acts[-1] == A.FindReplacement(True, False, 0, frozenset({"p0"}))
    acts = m.handle(E.Placed("p1", "d0"))
    red = acts[0]
    assert isinstance(red, A.Redispatched) and red.lost.worker_id == "p0" and red.count == 1
    assert red.prefill_id == "p1" and not red.kv_reused
    assert kinds(acts)[1:] == [A.Acquire, A.RunPrefill]  # the reservation went with the first leg
    assert acts[-1] == A.RunPrefill("p1", 0)
    m.handle(E.Prefilled("p1", 7, E.KVRef("l2"), stop=False))
    m.handle(E.Streamed("d0", 1, (8,)))
    m.handle(E.Finished("d0"))
    assert m.output == [7, 8]
    assert_nothing_held(m)


def test_decode_lost_mid_stream_resumes_from_the_tokens_so_far_without_gap_or_duplicate() -> None:
    m = machine()
    to_decoding(m, (8, 9))  # 3 tokens delivered
    acts = m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE, "Socket closed")))
    assert kinds(acts) == [A.DropWorker, A.Release, A.FindReplacement]
    # the lease went with the first message: nothing to release or re-let, prefill again
    assert acts[-1] == A.FindReplacement(True, True, 3, frozenset({"d0"}))
    acts = m.handle(E.Placed("p0", "d1"))
    assert acts[-1] == A.RunPrefill("p0", 3)  # prompt + the 3 tokens so far
    # the resumed prefill samples output token 3; the new decode worker streams from 4
    assert delivered(m.handle(E.Prefilled("p0", 10, E.KVRef("l2"), stop=False))) == [10]
    assert delivered(m.handle(E.Streamed("d1", 4, (11, 12)))) == [11, 12]
    m.handle(E.Finished("d1"))
    assert m.output == [7, 8, 9, 10, 11, 12]
    assert_nothing_held(m)


def test_decode_lost_before_a_token_re_lets_the_kv_for_another_decode_worker() -> None:
    m = machine()
    to_handing_off(m, "lease-1")
    acts = m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE)))
    assert kinds(acts) == [A.DropWorker, A.Release, A.ReletLease] and m.state is State.PLACED
    with pytest.raises(InvalidTransition, match="re-lease is pending"):
        m.handle(E.Placed("p0", "d1"))
    acts = m.handle(E.Relet(E.KVRef("relet-1")))
    assert acts == [A.FindReplacement(False, True, 1, frozenset({"d0"}))]
    assert Resource(ResourceKind.KV_LEASE, "lease-1") in m.ledger.handed_over  # the re-lease released it
    acts = m.handle(E.Placed("p0", "d1"))
    assert isinstance(acts[0], A.Redispatched) and acts[0].kv_reused
    assert acts[-1] == A.RunDecode("d1", E.KVRef("relet-1"), 1) and m.state is State.HANDING_OFF
    m.handle(E.Streamed("d1", 1, (8,)))
    m.handle(E.Finished("d1"))
    assert m.output == [7, 8]
    assert_nothing_held(m)


def test_decode_lost_before_a_token_with_the_blocks_gone_releases_and_prefills_again() -> None:
    m = machine()
    to_handing_off(m, "lease-1")
    m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE)))
    acts = m.handle(E.Relet(None))
    assert released(acts) == [("kv_lease", "lease-1")]
    assert acts[-1] == A.FindReplacement(True, True, 1, frozenset({"d0"}))
    assert m.handle(E.Placed("p0", "d1"))[-1] == A.RunPrefill("p0", 1)


def test_kv_gone_before_the_pull_prefills_again_for_the_same_decode_worker() -> None:
    m = machine()
    to_handing_off(m, "lease-1")
    acts = m.handle(E.Lost(LostWorker("d0", LostPhase.KV, "blocks not stored")))
    assert kinds(acts) == [A.Release, A.Release, A.FindReplacement]  # no worker dropped
    assert released(acts) == [("worker_slot", "d0"), ("kv_lease", "lease-1")]
    assert acts[-1] == A.FindReplacement(True, False, 1, frozenset())  # a KV loss excludes nobody
    assert m.handle(E.Placed("p0", "d0"))[-1] == A.RunPrefill("p0", 1)


def test_a_stalled_worker_is_quarantined_not_dropped() -> None:
    m = machine()
    to_decoding(m)
    lost = LostWorker("d0", LostPhase.DECODE, "no progress", stalled=True)
    acts = m.handle(E.Lost(lost))
    assert acts[0] == A.QuarantineWorker(lost) and not any(isinstance(a, A.DropWorker) for a in acts)
    assert acts[-1].excluded == frozenset()  # it may serve the request again once restored


def test_redispatches_are_bounded_then_the_request_fails_naming_the_lost_workers() -> None:
    m = machine(limit=1)
    to_decoding(m)
    m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE)))
    m.handle(E.Placed("p0", "d1"))
    m.handle(E.Prefilled("p0", 10, E.KVRef("l2"), stop=False))
    acts = m.handle(E.Lost(LostWorker("d1", LostPhase.DECODE)))
    (fail,) = [a for a in acts if isinstance(a, A.Fail)]
    assert isinstance(fail.error, UnavailableError) and "d0" in str(fail.error) and "d1" in str(fail.error)
    assert m.state is State.FAILED and m.outcome is Outcome.ERROR
    assert ("kv_lease", "l2") in released(acts)  # the handed-off KV nobody took
    assert_nothing_held(m)


def test_a_lost_worker_when_the_client_is_gone_ends_the_request_without_re_dispatch() -> None:
    m = machine()
    to_handing_off(m, "lease-1")
    acts = m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE), client_gone=True))
    assert m.state is State.FAILED and m.outcome is Outcome.CANCELLED
    assert not any(isinstance(a, (A.FindReplacement, A.ReletLease, A.Fail)) for a in acts)
    assert set(released(acts)) == {("worker_slot", "d0"), ("kv_lease", "lease-1"), ("policy_slot", RID)}
    assert_nothing_held(m)


def test_a_local_request_lost_mid_stream_resumes_locally_elsewhere() -> None:
    m = machine(local=True)
    m.handle(E.Placed(None, "d0"))
    m.handle(E.Streamed("d0", 0, (5, 6)))
    acts = m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE)))
    assert acts[-1] == A.FindReplacement(False, True, 2, frozenset({"d0"}))
    assert m.handle(E.Placed(None, "d1"))[-1] == A.RunLocalDecode("d1", 2)


# ---------------------------------------------------------------------------- cancel / fail
@pytest.mark.parametrize(
    "state", [State.PLACED, State.PREFILLING, State.HANDING_OFF, State.DECODING, State.MIGRATING]
)
@pytest.mark.parametrize("event", [E.Cancelled(), E.Failed(RuntimeError("store down"))])
def test_cancel_or_failure_in_every_live_state_releases_everything_once(state: State, event) -> None:
    m = machine()
    ROUTES[state](m)
    held = set(m.ledger.held())
    acts = m.handle(event)
    assert m.state is State.FAILED
    assert m.outcome is (Outcome.CANCELLED if isinstance(event, E.Cancelled) else Outcome.ERROR)
    rel = {a.resource for a in acts if isinstance(a, A.Release)}
    migration = Resource(ResourceKind.MIGRATION, "d1")
    assert rel == held - {migration}  # the migration is freed by aborting it
    if state is State.MIGRATING:
        assert A.AbortMigration("d0", "d1") in acts
    if state is State.HANDING_OFF:  # nobody took the KV: its lease is released here
        assert Resource(ResourceKind.KV_LEASE, "lease-1") in rel
    if state is State.PLACED:  # never started: the reservation is dropped too
        assert Resource(ResourceKind.RESERVATION, RID) in rel
    assert_nothing_held(m)
    with pytest.raises(InvalidTransition):  # terminal: a second end is a bug, not a no-op
        m.handle(E.Cancelled())


def test_the_ledger_refuses_double_acquire_and_double_release() -> None:
    led = Ledger()
    r = Resource(ResourceKind.KV_LEASE, "l")
    led.acquire(r)
    with pytest.raises(ReleaseError, match="acquired twice"):
        led.acquire(r)
    led.release(r)
    with pytest.raises(ReleaseError, match="released but not held"):
        led.release(r)
    with pytest.raises(ReleaseError, match="handed over but not held"):
        led.hand_over(r)


def test_once_releases_run_each_callback_exactly_once_even_when_one_fails() -> None:
    calls: list[str] = []
    rel = OnceReleases()

    def boom() -> None:
        calls.append("slot")
        raise RuntimeError("quota backend down")

    rel.hold(Resource(ResourceKind.TENANT_SLOT, "r"), boom)
    rel.hold(Resource(ResourceKind.STREAM_DEADLINE, "r"), lambda: calls.append("deadline"))
    with pytest.raises(ReleaseError):
        rel.hold(Resource(ResourceKind.STREAM_DEADLINE, "r"), lambda: None)
    with pytest.raises(RuntimeError, match="quota"):
        rel.release_all()
    rel.release_all()  # nothing left: no second call
    assert calls == ["deadline", "slot"]  # newest first, each once
    assert [r.kind for r in rel.released] == [ResourceKind.STREAM_DEADLINE, ResourceKind.TENANT_SLOT]


# ---------------------------------------------------------------------------- migration
class FakeMigrator:
    """Plays the decode workers' migration: the destination's KV covers ``covers`` output tokens."""

    def __init__(self, m: RequestLifecycle) -> None:
        self.m = m
        self.started: list[A.StartMigration] = []
        self.aborted: list[A.AbortMigration] = []

    def feed(self, acts: list[A.Action]) -> list[A.Action]:
        for a in acts:
            if isinstance(a, A.StartMigration):
                self.started.append(a)
            if isinstance(a, A.AbortMigration):
                self.aborted.append(a)
        return acts

    def commit(self, outputs: tuple[int, ...]) -> list[A.Action]:
        return self.feed(
            self.m.handle(E.MigrationCommitted(self.started[-1].destination, len(outputs), outputs))
        )


def test_migration_commits_on_the_destination_with_no_gap_and_no_duplicate() -> None:
    clock = Clock()
    m = machine(clock=clock)
    to_decoding(m, (8, 9))  # 7 8 9
    mig = FakeMigrator(m)
    mig.feed(m.handle(E.MigrationRequested("d1")))
    assert m.state is State.MIGRATING and mig.started == [A.StartMigration("d0", "d1", 3)]
    # the source keeps decoding meanwhile
    assert delivered(m.handle(E.Streamed("d0", 3, (10,)))) == [10]
    clock.t += 0.02
    # the source stopped after 12 tokens... it produced 11 and 12 that its stream had not brought:
    acts = mig.commit((7, 8, 9, 10, 11, 12))
    assert kinds(acts) == [A.CloseStream, A.Release, A.Deliver, A.Acquire]
    assert acts[0] == A.CloseStream("d0") and released(acts) == [("worker_slot", "d0")]
    assert acts[2] == A.Deliver(4, (11, 12)) and acts[3].resource == Resource(ResourceKind.WORKER_SLOT, "d1")
    assert m.state is State.DECODING and m.decode_id == "d1"
    with pytest.raises(InvalidTransition):  # the source's stream is closed
        m.handle(E.Streamed("d0", 6, (13,)))
    # the destination streams from the index it resumes at
    assert delivered(m.handle(E.Streamed("d1", 6, (13,)))) == [13]
    m.handle(E.Finished("d1"))
    assert m.output == [7, 8, 9, 10, 11, 12, 13]
    assert m.time_in(State.MIGRATING) == pytest.approx(0.02)
    assert_nothing_held(m)


def test_migration_destination_behind_the_client_is_deduplicated_by_index() -> None:
    m = machine()
    to_decoding(m, (8, 9, 10))  # 4 delivered
    mig = FakeMigrator(m)
    mig.feed(m.handle(E.MigrationRequested("d1")))
    acts = mig.commit((7, 8))  # the destination's KV covers 2 tokens: it will stream 9, 10 again
    assert not delivered(acts)
    assert m.handle(E.Streamed("d1", 2, (9, 10, 11))) == [A.Deliver(4, (11,), skip=2)]
    with pytest.raises(OutputMismatch):
        m.handle(E.Streamed("d1", 3, (99,)))


def test_migration_resumed_from_the_tickets_index_replays_and_dedupes_without_tokens() -> None:
    """The decode workers' RPCs: MigrateOut says MIGRATED, ResumeStream replays from the index
    the migration started at; the router holds the tokens, the destination's repeats are dropped."""
    m = machine()
    to_decoding(m, (8, 9))  # 3 delivered
    mig = FakeMigrator(m)
    mig.feed(m.handle(E.MigrationRequested("d1")))
    m.handle(E.Streamed("d0", 3, (10,)))  # 4 delivered while copying
    acts = mig.feed(m.handle(E.MigrationCommitted("d1", mig.started[0].from_index)))
    assert not delivered(acts) and m.decode_id == "d1"
    assert m.handle(E.Streamed("d1", 3, (10, 11))) == [A.Deliver(4, (11,), skip=1)]
    assert m.output == [7, 8, 9, 10, 11]


def test_migration_streaming_past_the_known_tokens_is_refused() -> None:
    m = machine()
    to_decoding(m)  # 3 delivered
    m.handle(E.MigrationRequested("d1"))
    with pytest.raises(OutputMismatch, match="tokens 3..4 would be lost"):
        m.handle(E.MigrationCommitted("d1", 5))
    assert m.state is State.MIGRATING and m.decode_id == "d0"


def test_migration_with_a_diverging_destination_is_refused() -> None:
    m = machine()
    to_decoding(m)
    FakeMigrator(m).feed(m.handle(E.MigrationRequested("d1")))
    with pytest.raises(OutputMismatch, match="differs"):
        m.handle(E.MigrationCommitted("d1", 2, (7, 99)))
    with pytest.raises(InvalidTransition, match="from worker 'd2'"):
        m.handle(E.MigrationCommitted("d2", 2, (7, 8)))
    assert m.state is State.MIGRATING


def test_migration_aborted_keeps_decoding_on_the_source() -> None:
    m = machine()
    to_decoding(m)
    m.handle(E.MigrationRequested("d1"))
    assert m.handle(E.MigrationAborted("destination out of blocks")) == []
    assert m.state is State.DECODING and m.decode_id == "d0" and m.migration_to is None
    assert delivered(m.handle(E.Streamed("d0", 3, (10,)))) == [10]
    m.handle(E.Finished("d0"))
    assert_nothing_held(m)
    with pytest.raises(InvalidTransition, match="worker it runs on"):
        n = machine()
        to_decoding(n)
        n.handle(E.MigrationRequested("d0"))


def test_source_finishing_mid_migration_aborts_it() -> None:
    m = machine()
    to_decoding(m)
    mig = FakeMigrator(m)
    mig.feed(m.handle(E.MigrationRequested("d1")))
    m.handle(E.Streamed("d0", 3, (10,)))
    acts = mig.feed(m.handle(E.Finished("d0")))
    assert mig.aborted == [A.AbortMigration("d0", "d1")] and m.outcome is Outcome.FINISHED
    assert released(acts) == [("worker_slot", "d0"), ("policy_slot", RID)]
    assert_nothing_held(m)


def test_client_cancelling_mid_migration_aborts_it() -> None:
    m = machine()
    to_decoding(m)
    mig = FakeMigrator(m)
    mig.feed(m.handle(E.MigrationRequested("d1")))
    mig.feed(m.handle(E.Cancelled()))
    assert mig.aborted == [A.AbortMigration("d0", "d1")] and m.outcome is Outcome.CANCELLED
    assert_nothing_held(m)


def test_source_lost_mid_migration_aborts_it_and_re_dispatches() -> None:
    m = machine()
    to_decoding(m)
    mig = FakeMigrator(m)
    mig.feed(m.handle(E.MigrationRequested("d1")))
    acts = mig.feed(m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE))))
    assert mig.aborted == [A.AbortMigration("d0", "d1")] and m.state is State.PLACED
    assert acts[-1] == A.FindReplacement(True, True, 3, frozenset({"d0"}))
    with pytest.raises(InvalidTransition):  # a KV loss cannot happen mid-migration
        n = machine()
        to_migrating(n)
        n.handle(E.Lost(LostWorker("d0", LostPhase.KV)))


def test_a_migrated_request_lost_on_its_destination_resumes_from_its_output() -> None:
    m = machine()
    to_decoding(m)
    FakeMigrator(m).feed(m.handle(E.MigrationRequested("d1")))
    m.handle(E.MigrationCommitted("d1", 3, (7, 8, 9)))
    acts = m.handle(E.Lost(LostWorker("d1", LostPhase.DECODE)))
    assert acts[-1] == A.FindReplacement(True, True, 3, frozenset({"d1"}))  # no KV to re-let
    assert {r.kind for r in m.ledger.held()} == {ResourceKind.POLICY_SLOT}  # until it ends
