"""The lifecycle driver (router.lifecycle.driver) over fake ports: worker legs, the cluster's
bookkeeping and a fake migrator. No gRPC, no model: a deterministic fake "model" (the next token
is a function of the whole sequence), legs that die or stall on cue, and checks that every output
token reaches the client once, in order, and every held resource is released exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from pdserve.errors import InternalError, UnavailableError
from router.failover import LostPhase, LostWorker
from router.lifecycle.actions import Redispatched, Release
from router.lifecycle.driver import LifecycleDriver
from router.lifecycle.events import KVRef, Placed
from router.lifecycle.machine import RequestLifecycle
from router.lifecycle.migrator import MigrationAbort, MigrationCommit, MigrationTicket, Migrator
from router.lifecycle.ports import Chunk, ClientGoneError, PrefillAnswer, WorkerLostError
from router.lifecycle.resources import Resource, ResourceKind
from router.lifecycle.states import InvalidTransition, LifecycleError, Outcome, State

PROMPT = [3, 1, 4, 1, 5]
MAX = 10


def next_token(seq: list[int]) -> int:
    return 100 + (sum((i + 1) * t for i, t in enumerate(seq)) * 7919) % 900


def reference(n: int = MAX) -> list[int]:
    seq, out = list(PROMPT), []
    for _ in range(n):
        out.append(next_token(seq))
        seq.append(out[-1])
    return out


class FakeLegs:
    """Workers running the fake model. ``die``: worker id -> tokens it streams before it is lost
    (prefill workers: 0 = lost before answering); ``gone_after``: a decode worker whose call fails
    under a departed client after that many tokens; ``pause``: a decode worker's delay between
    messages (so a migration can overtake it)."""

    def __init__(self, die: dict[str, int] | None = None, pause: dict[str, float] | None = None) -> None:
        self.die = dict(die or {})
        self.pause = pause or {}
        self.calls: list[tuple[str, str, int]] = []
        self.closed: list[str] = []
        self.gone_after: dict[str, int] = {}
        self.end_early: set[str] = set()

    async def prefill(self, worker_id: str, num_output: int) -> PrefillAnswer:
        self.calls.append(("prefill", worker_id, num_output))
        await asyncio.sleep(0)
        if self.die.get(worker_id) == 0:
            raise WorkerLostError(LostWorker(worker_id, LostPhase.PREFILL, "Socket closed"))
        tok = reference(num_output + 1)[-1]
        stop = num_output + 1 >= MAX
        return PrefillAnswer(tok, KVRef(f"lease-{len(self.calls)}"), stop, ("resp", (tok,)))

    def decode(self, worker_id: str, kv: KVRef, first_index: int) -> AsyncIterator[Chunk]:
        self.calls.append(("decode", worker_id, first_index))
        return self._stream(worker_id, first_index)

    def local_decode(self, worker_id: str, first_index: int) -> AsyncIterator[Chunk]:
        self.calls.append(("local", worker_id, first_index))
        return self._stream(worker_id, first_index)

    async def _stream(self, worker_id: str, index: int, sent: int = 0) -> AsyncIterator[Chunk]:
        ref = reference()
        try:
            while index < MAX:
                await asyncio.sleep(self.pause.get(worker_id, 0))
                if self.die.get(worker_id) == sent:
                    raise WorkerLostError(LostWorker(worker_id, LostPhase.DECODE, "Socket closed"))
                if self.gone_after.get(worker_id) == sent:
                    raise ClientGoneError("cancelled")
                if worker_id in self.end_early and sent == 1:
                    return
                yield Chunk(index, (ref[index],))
                index, sent = index + 1, sent + 1
        finally:
            self.closed.append(worker_id)

    def render(self, chunk: Chunk, skip: int) -> tuple[object, bool]:
        tokens = chunk.tokens[skip:]
        return ("resp", tokens), chunk.first_index + len(chunk.tokens) >= MAX

    def render_tokens(self, first_index: int, tokens: tuple[int, ...]) -> object:
        return ("resp", tokens)


class FakeCluster:
    def __init__(self, replacements: list[tuple[str | None, str | None]] | None = None, relet: bool = True):
        self.acquired: list[Resource] = []
        self.released: list[Release] = []
        self.leases_released: list[str] = []
        self.dropped: list[str] = []
        self.quarantined: list[str] = []
        self.redispatches: list[Redispatched] = []
        self.replacements = list(replacements or [])
        self.relet_ok = relet
        self.gone = False

    def acquire(self, resource: Resource) -> None:
        self.acquired.append(resource)

    def release(self, release: Release) -> None:
        self.released.append(release)

    async def release_lease(self, kv: KVRef) -> None:
        self.leases_released.append(kv.lease_id)

    def drop(self, worker_id: str) -> None:
        self.dropped.append(worker_id)

    def quarantine(self, lost: LostWorker) -> None:
        self.quarantined.append(lost.worker_id)

    async def relet(self, kv: KVRef) -> KVRef | None:
        if not self.relet_ok:
            return None
        self.leases_released.append(kv.lease_id)  # a re-lease releases the old lease itself
        return KVRef("relet-" + kv.lease_id)

    async def replace(self, prefill, decode, num_context_tokens, excluded):
        if not self.replacements:
            raise UnavailableError("no other worker is available")
        p, d = self.replacements.pop(0)
        return (p if prefill else None), (d if decode else None)

    def redispatched(self, r: Redispatched) -> None:
        self.redispatches.append(r)

    def client_gone(self) -> bool:
        return self.gone

    def check_released_once(self, m: RequestLifecycle) -> None:
        """Every slot acquired was released once; the reservation and the policy slot once."""
        slots = Counter(r.key for r in self.acquired)
        freed = Counter(r.resource.key for r in self.released if r.resource.kind is ResourceKind.WORKER_SLOT)
        assert slots == freed, (slots, freed)
        for kind in (ResourceKind.RESERVATION, ResourceKind.POLICY_SLOT):
            assert [r.resource.kind for r in self.released].count(kind) == 1, kind
        assert len(self.leases_released) == len(set(self.leases_released))
        assert m.ledger.held() == [] and m.terminal


class FakeMigrator(Migrator):
    """Commits (or aborts) when the test sets ``go``; the destination's KV covers ``covers``
    output tokens and its stream starts at ``stream_from`` (earlier: repeats to deduplicate)."""

    def __init__(self, legs: FakeLegs, covers: int, stream_from: int, abort: str | None = None) -> None:
        self.legs, self.covers, self.stream_from, self.abort_reason = legs, covers, stream_from, abort
        self.go = asyncio.Event()
        self.started: list[MigrationTicket] = []
        self.aborted: list[MigrationTicket] = []

    async def migrate(self, ticket: MigrationTicket) -> MigrationCommit | MigrationAbort:
        self.started.append(ticket)
        await self.go.wait()
        if self.abort_reason:
            return MigrationAbort(self.abort_reason)
        ref = reference()
        stream = self.legs._stream(ticket.destination, self.stream_from)
        return MigrationCommit(self.stream_from, stream, tuple(ref[: self.covers]))

    async def abort(self, ticket: MigrationTicket) -> None:
        self.aborted.append(ticket)


def lifecycle(local: bool = False, limit: int = 2) -> RequestLifecycle:
    return RequestLifecycle(
        "r1",
        prefill_id=None if local else "p0",
        decode_id="d0",
        clock=lambda: 0.0,
        max_redispatches=limit,
        prompt_tokens=len(PROMPT),
    )


async def collect(
    driver: LifecycleDriver, placed: Placed, leave_after: int | None = None, on=None
) -> list[int]:
    """The tokens the client got; ``leave_after``: it goes away after that many responses;
    ``on(n)``: called after the n-th response (to start a migration)."""
    out: list[int] = []
    async with contextlib.aclosing(driver.run(placed)) as responses:
        async for n, (_, tokens) in aenumerate(responses):
            out.extend(tokens)
            if on is not None:
                on(n + 1)
            if leave_after is not None and n + 1 >= leave_after:
                break
    return out


async def aenumerate(it):
    n = 0
    async for x in it:
        yield n, x
        n += 1


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- plain runs
def test_a_disaggregated_request_streams_the_reference_and_releases_everything_once() -> None:
    m, legs, cl = lifecycle(), FakeLegs(), FakeCluster()
    got = run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
    assert got == reference() and m.outcome is Outcome.FINISHED
    assert legs.calls == [("prefill", "p0", 0), ("decode", "d0", 1)]
    assert cl.leases_released == []  # the decode worker took the KV and released its lease
    cl.check_released_once(m)
    (policy,) = [r for r in cl.released if r.resource.kind is ResourceKind.POLICY_SLOT]
    assert policy.outcome is Outcome.FINISHED  # fed back, not dropped


def test_a_local_prefill_request_runs_on_its_decode_worker() -> None:
    m, legs, cl = lifecycle(local=True), FakeLegs(), FakeCluster()
    assert run(collect(LifecycleDriver(m, legs, cl), Placed(None, "d0"))) == reference()
    assert legs.calls == [("local", "d0", 0)]
    cl.check_released_once(m)


# ---------------------------------------------------------------------------- re-dispatch
@pytest.mark.parametrize("k", [0, 1, 4])
def test_decode_lost_after_k_tokens_resumes_with_no_gap_and_no_duplicate(k: int) -> None:
    m, legs, cl = lifecycle(), FakeLegs(die={"d0": k}), FakeCluster([("p0", "d1")])
    got = run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
    assert got == reference()
    assert cl.dropped == ["d0"] and len(cl.redispatches) == 1
    if k == 0:  # nothing streamed: the same KV under a fresh lease, no second prefill
        assert legs.calls[-1] == ("decode", "d1", 1) and cl.redispatches[0].kv_reused
        assert cl.leases_released == ["lease-1"]
    else:  # prompt + the 1 + k tokens so far are prefilled again
        assert ("prefill", "p0", 1 + k) in legs.calls and ("decode", "d1", 2 + k) in legs.calls
    assert "d0" in legs.closed
    cl.check_released_once(m)


def test_prefill_lost_goes_to_another_prefill_worker() -> None:
    m, legs, cl = lifecycle(), FakeLegs(die={"p0": 0}), FakeCluster([("p1", None)])
    assert run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0"))) == reference()
    assert legs.calls[:3] == [("prefill", "p0", 0), ("prefill", "p1", 0), ("decode", "d0", 1)]
    cl.check_released_once(m)


def test_no_replacement_fails_the_request_after_releasing_everything() -> None:
    m, legs, cl = lifecycle(), FakeLegs(die={"d0": 2}), FakeCluster([])
    with pytest.raises(UnavailableError, match="no other worker"):
        run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
    assert m.state is State.FAILED and m.outcome is Outcome.ERROR
    cl.check_released_once(m)


def test_the_redispatch_bound_fails_the_request_naming_the_lost_workers() -> None:
    m = lifecycle(limit=1)
    legs, cl = FakeLegs(die={"d0": 1, "d1": 1}), FakeCluster([("p0", "d1"), ("p0", "d2")])
    with pytest.raises(UnavailableError, match="d0.*d1"):
        run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
    cl.check_released_once(m)
    assert cl.leases_released == []  # each decode worker had taken its KV (and released its lease)


def test_a_lost_worker_after_the_client_left_is_not_redispatched() -> None:
    m, legs, cl = lifecycle(), FakeLegs(die={"d0": 2}), FakeCluster([("p0", "d1")])
    cl.gone = True
    got = run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
    assert got == reference(3) and m.outcome is Outcome.CANCELLED and not cl.redispatches
    cl.check_released_once(m)


# ---------------------------------------------------------------------------- cancellation
@pytest.mark.parametrize("leave_after", [1, 3])
def test_the_client_leaving_cancels_and_releases_once(leave_after: int) -> None:
    m, legs, cl = lifecycle(), FakeLegs(), FakeCluster()
    got = run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0"), leave_after=leave_after))
    assert got == reference(leave_after) and m.outcome is Outcome.CANCELLED
    if leave_after == 1:  # left after the first token: the KV was never taken, its lease released
        assert cl.leases_released == ["lease-1"]
    else:
        assert legs.closed == ["d0"] and cl.leases_released == []
    cl.check_released_once(m)


def test_a_call_failing_under_a_departed_client_is_a_cancellation() -> None:
    m, legs, cl = lifecycle(), FakeLegs(), FakeCluster()
    legs.gone_after["d0"] = 2
    got = run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
    assert got == reference(3) and m.outcome is Outcome.CANCELLED
    cl.check_released_once(m)


def test_a_task_cancelled_while_prefilling_releases_once() -> None:
    m, legs, cl = lifecycle(), FakeLegs(), FakeCluster()

    async def hang(worker_id: str, num_output: int) -> PrefillAnswer:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    legs.prefill = hang  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.ensure_future(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert m.outcome is Outcome.CANCELLED
    cl.check_released_once(m)


def test_a_stream_ending_without_a_finish_is_an_error_not_silence() -> None:
    m, legs, cl = lifecycle(), FakeLegs(), FakeCluster()
    legs.end_early.add("d0")
    with pytest.raises(InternalError, match="without finishing"):
        run(collect(LifecycleDriver(m, legs, cl), Placed("p0", "d0")))
    assert m.outcome is Outcome.ERROR
    cl.check_released_once(m)


# ---------------------------------------------------------------------------- migration
def _migrating(covers: int, stream_from: int, abort: str | None = None, at: int = 3):
    m = lifecycle()
    legs = FakeLegs(pause={"d0": 0.01})
    cl = FakeCluster()
    mig = FakeMigrator(legs, covers, stream_from, abort)
    driver = LifecycleDriver(m, legs, cl, mig)

    def on(n: int) -> None:
        if n == at:
            driver.migrate("d1")
        if n == at + 1:
            mig.go.set()

    return m, legs, cl, mig, driver, on


@pytest.mark.parametrize(
    ("covers", "stream_from"),
    # at the client's index, ahead of it (gap filled), behind, overlap, from the ticket's index
    # without the tokens (the decode workers' MigrateOut + ResumeStream)
    [(5, 5), (7, 7), (4, 4), (7, 5), (0, 3)],
)
def test_a_migration_switches_streams_with_no_gap_and_no_duplicate(covers: int, stream_from: int) -> None:
    m, legs, cl, mig, driver, on = _migrating(covers, stream_from)
    got = run(collect(driver, Placed("p0", "d0"), on=on))
    assert got == reference() and m.outcome is Outcome.FINISHED
    assert [t.from_index for t in mig.started] == [3]  # the client had 3 tokens when it started
    assert m.decode_id == "d1" and "d0" in legs.closed and mig.aborted == []
    assert [r.key for r in cl.acquired] == ["d0", "d1"]
    assert [(h.src, h.dst) for h in m.history][3:5] == [
        (State.DECODING, State.MIGRATING),
        (State.MIGRATING, State.DECODING),
    ]
    cl.check_released_once(m)


def test_an_aborted_migration_keeps_decoding_on_the_source() -> None:
    m, legs, cl, mig, driver, on = _migrating(5, 5, abort="destination out of blocks")
    got = run(collect(driver, Placed("p0", "d0"), on=on))
    assert got == reference() and m.decode_id == "d0" and [r.key for r in cl.acquired] == ["d0"]
    cl.check_released_once(m)


def test_the_source_finishing_mid_migration_aborts_it() -> None:
    m, legs, cl, mig, driver, on = _migrating(5, 5, at=7)
    mig.go = asyncio.Event()  # never committed

    def only_start(n: int) -> None:
        if n == 7:
            driver.migrate("d1")

    got = run(collect(driver, Placed("p0", "d0"), on=only_start))
    assert got == reference() and m.outcome is Outcome.FINISHED
    assert len(mig.aborted) == 1 and mig.aborted[0].destination == "d1"
    cl.check_released_once(m)


def test_the_client_cancelling_mid_migration_aborts_it() -> None:
    m, legs, cl, mig, driver, on = _migrating(5, 5)

    def only_start(n: int) -> None:
        if n == 3:
            driver.migrate("d1")

    got = run(collect(driver, Placed("p0", "d0"), leave_after=5, on=only_start))
    assert got == reference(5) and m.outcome is Outcome.CANCELLED
    assert len(mig.aborted) == 1
    cl.check_released_once(m)


def test_migration_needs_a_migrator_and_a_decoding_request() -> None:
    m, legs, cl = lifecycle(), FakeLegs(), FakeCluster()
    with pytest.raises(LifecycleError, match="needs a Migrator"):
        LifecycleDriver(m, legs, cl).migrate("d1")
    with pytest.raises(InvalidTransition, match="MigrationRequested is not valid in state placed"):
        LifecycleDriver(m, legs, cl, FakeMigrator(legs, 0, 0)).migrate("d1")


def test_a_source_ending_its_stream_for_the_switch_is_followed_by_the_destination() -> None:
    """The source stops (its stream ends without a finish) before the migration's result comes:
    the driver waits for the result instead of failing the request."""
    m, legs, cl, mig, driver, _ = _migrating(5, 5)
    real = legs._stream

    async def source_stops(worker_id: str, index: int, sent: int = 0) -> AsyncIterator[Chunk]:
        async for c in real(worker_id, index, sent):
            yield c
            if worker_id == "d0" and c.first_index == 4:  # 5 tokens out: stopped for the switch
                asyncio.get_running_loop().call_later(0.05, mig.go.set)
                return

    legs._stream = source_stops  # type: ignore[method-assign]

    def on(n: int) -> None:
        if n == 3:
            driver.migrate("d1")

    assert run(collect(driver, Placed("p0", "d0"), on=on)) == reference()
    assert m.decode_id == "d1" and m.outcome is Outcome.FINISHED
    cl.check_released_once(m)
