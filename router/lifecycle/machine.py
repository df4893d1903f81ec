"""One request's lifecycle as a pure state machine (no gRPC, no threads, no wall clock: the clock
is injected; see :mod:`router.lifecycle.states` for the graph).

:meth:`RequestLifecycle.handle` takes an event (:mod:`router.lifecycle.events`), moves the
request along one edge (or a few: a decode worker's first message moves it from HANDING_OFF to
DECODING and maybe on), and returns the actions (:mod:`router.lifecycle.actions`) its driver
executes in order. An event that is not valid in the current state raises
:class:`~router.lifecycle.states.InvalidTransition` and changes nothing.

Contracts:

* Output: every output token is delivered exactly once, in order (:class:`Deliver`). A decode
  message is placed by its first token's index: tokens already delivered are dropped (after a
  check that they are the same tokens: different ones raise
  :class:`~router.lifecycle.states.OutputMismatch`, as does a gap).
* Resources (:mod:`router.lifecycle.resources`): the placement reservation and the policy slot
  are held from the start; a decode worker's slot for each leg; the KV lease from a prefill's
  answer until the decode worker streams (it pulled the KV and released the lease) or the lease
  is released here. Entering FINISHED or FAILED releases everything still held, once.
* Re-dispatch (:mod:`router.failover`): a lost worker sends the request back to PLACED with the
  tokens so far (bounded by ``max_redispatches``, then FAILED naming the lost workers); a decode
  worker lost before it streamed a token hands the same KV on under a fresh lease (:class:`ReletLease`).
* Chunk-wise KV streaming (``kv_stream``; :mod:`router.lifecycle.stream_legs`): a placement
  that needs a prefill goes to STREAMING (:class:`RunStreamed`: Prefill and Decode at once, the
  decode worker assembling the KV as the prefill streams it); the prefill's answer (no KV handle:
  it went by the stream) moves it to HANDING_OFF, and the decode worker's messages on as usual.
  A worker lost in STREAMING (the prefill worker, or the decode worker whose going away cancelled
  the stream) sends the request back to PLACED to be prefilled again: a streamed handoff holds no
  lease and cannot be re-let, and no KV lease is ever held for it.
* Migration: DECODING → MIGRATING → DECODING on the destination (committed: its stream continues
  the output at the index the destination resumes at) or on the source (aborted); the source
  finishing, being lost, or the client leaving meanwhile aborts the migration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from router.failover import LostPhase, Redispatches
from router.lifecycle import actions as A
from router.lifecycle import events as E
from router.lifecycle.resources import Ledger, Resource, ResourceKind
from router.lifecycle.states import InvalidTransition, Outcome, OutputMismatch, State, check_edge


@dataclass(frozen=True)
class Transition:
    """One edge taken: when (the injected clock), from, to, on which event."""

    at: float
    src: State
    dst: State
    event: str


class RequestLifecycle:
    """The lifecycle of request ``request_id`` (``client_id``: the id its errors name), placed on
    ``prefill_id`` (None: local prefill on the decode worker) and ``decode_id``, with a prompt of
    ``prompt_tokens`` tokens."""

    def __init__(
        self,
        request_id: str,
        *,
        prefill_id: str | None,
        decode_id: str,
        clock: Callable[[], float],
        max_redispatches: int,
        client_id: str | None = None,
        prompt_tokens: int = 0,
        kv_stream: bool = False,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens  # (a re-dispatch's context: prompt + output so far)
        self.clock = clock
        self.state = State.PLACED
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.local = prefill_id is None
        self.kv_stream = kv_stream and not self.local  # prefills stream their KV (STREAMING)
        self.prefill_id = prefill_id
        self.decode_id = decode_id
        self.output: list[int] = []  # output tokens delivered to the client, in order
        self.kv: E.KVRef | None = None  # the KV a decode worker takes over (non-local)
        self.leg_start = 0  # output tokens delivered before the current decode leg
        self.budget = Redispatches(client_id or request_id, max_redispatches)
        self.ledger = Ledger()
        self.history: list[Transition] = []
        self.migration_to: str | None = None
        self._lost: E.Lost | None = None  # the loss a re-dispatch in PLACED answers
        self._awaiting_relet = False
        self._kv_reused = False
        self._started = False
        self._leg_worker: str | None = None  # the decode worker whose slot the current leg holds
        self.ledger.acquire(Resource(ResourceKind.RESERVATION, request_id))
        self.ledger.acquire(Resource(ResourceKind.POLICY_SLOT, request_id))

    # ------------------------------------------------------------------ api
    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def valid(self, event_type: type) -> bool:
        """Whether an event of ``event_type`` is valid in the current state."""
        return (self.state, event_type) in _HANDLERS

    def handle(self, event: E.Event) -> list[A.Action]:
        """Apply ``event``; the actions to execute, in order. Raises InvalidTransition (nothing
        changed) when ``event`` is not valid now, OutputMismatch for inconsistent tokens."""
        name = _HANDLERS.get((self.state, type(event)))
        if name is None:
            raise InvalidTransition(self.request_id, self.state, f"event {type(event).__name__}")
        return getattr(self, name)(event)

    def time_in(self, state: State) -> float:
        """Total time spent in ``state`` so far (by the injected clock)."""
        total, entered = 0.0, None
        for t in self.history:
            if t.dst is state and t.src is not state:
                entered = t.at
            elif t.src is state and t.dst is not state and entered is not None:
                total += t.at - entered
                entered = None
        if entered is not None:
            total += self.clock() - entered
        return total

    # ------------------------------------------------------------------ internals
    def _move(self, dst: State, event: object) -> None:
        check_edge(self.request_id, self.state, dst)
        self.history.append(Transition(self.clock(), self.state, dst, type(event).__name__))
        self.state = dst

    def _res(self, kind: ResourceKind, key: str) -> Resource:
        return Resource(kind, key)

    def _release(self, r: Resource, out: list[A.Action]) -> None:
        self.ledger.release(r)
        kv = self.kv if r.kind is ResourceKind.KV_LEASE and self.kv is not None else None
        out.append(A.Release(r, kv=kv))

    def _release_lease(self, out: list[A.Action]) -> None:
        if self.kv is not None and self.kv.lease_id:
            r = self._res(ResourceKind.KV_LEASE, self.kv.lease_id)
            if self.ledger.holds(r):
                self._release(r, out)

    def _end_leg(self, out: list[A.Action]) -> None:
        if self._leg_worker is not None:
            self._release(self._res(ResourceKind.WORKER_SLOT, self._leg_worker), out)
            self._leg_worker = None

    def _begin_leg(self, worker_id: str, out: list[A.Action]) -> None:
        r = self._res(ResourceKind.WORKER_SLOT, worker_id)
        self.ledger.acquire(r)
        self._leg_worker = worker_id
        out.append(A.Acquire(r))

    def _terminal(self, dst: State, outcome: Outcome, event: object, out: list[A.Action]) -> list[A.Action]:
        """Enter FINISHED/FAILED: abort a migration, release everything held (newest first)."""
        if self.state is State.MIGRATING and self.migration_to is not None:
            out.append(A.AbortMigration(self.decode_id, self.migration_to))
            self.ledger.hand_over(self._res(ResourceKind.MIGRATION, self.migration_to))
            self.migration_to = None
        self._move(dst, event)
        self.outcome = outcome
        for r in self.ledger.drain():
            kv = self.kv if r.kind is ResourceKind.KV_LEASE else None
            out.append(A.Release(r, kv=kv, outcome=outcome))
        self._leg_worker = None
        return out

    def _check_worker(self, worker_id: str, expected: str | None, what: str) -> None:
        if worker_id != expected:
            raise InvalidTransition(
                self.request_id,
                self.state,
                f"{what} from worker {worker_id!r} (the request is on {expected!r})",
            )

    # ------------------------------------------------------------------ handlers
    def _placed(self, ev: E.Placed) -> list[A.Action]:
        if self._awaiting_relet:
            raise InvalidTransition(self.request_id, self.state, "placement while a re-lease is pending")
        if self.local and ev.prefill_id is not None:
            raise InvalidTransition(
                self.request_id, self.state, "a prefill worker for a local-prefill request"
            )
        if not self.local and ev.prefill_id is None and self.kv is None:
            raise InvalidTransition(
                self.request_id, self.state, "placement without the prefill worker it needs"
            )
        out: list[A.Action] = []
        if self._lost is not None:
            out.append(
                A.Redispatched(
                    self._lost.lost,
                    self.budget.count,
                    len(self.output),
                    self._kv_reused,
                    ev.prefill_id if not self.local else None,
                    ev.decode_id,
                )
            )
            self._lost = None
        self.prefill_id = ev.prefill_id if ev.prefill_id is not None else self.prefill_id
        self.decode_id = ev.decode_id
        self._begin_leg(ev.decode_id, out)
        if not self._started:  # the first leg's own accounting replaces the placement's reservation
            self._started = True
            self._release(self._res(ResourceKind.RESERVATION, self.request_id), out)
        n = len(self.output)
        if self.local:
            self._move(State.DECODING, ev)
            self.leg_start = n
            out.append(A.RunLocalDecode(ev.decode_id, n))
        elif self.kv is not None:  # re-let KV: the same handoff, another decode worker
            self._move(State.HANDING_OFF, ev)
            self.leg_start = n
            out.append(A.RunDecode(ev.decode_id, self.kv, n))
        elif self.kv_stream:  # Prefill and Decode at once, the KV streamed between them
            assert self.prefill_id is not None
            self._move(State.STREAMING, ev)
            self.leg_start = n
            out.append(A.RunStreamed(self.prefill_id, ev.decode_id, n))
        else:
            assert self.prefill_id is not None
            self._move(State.PREFILLING, ev)
            out.append(A.RunPrefill(self.prefill_id, n))
        return out

    def _stream_prefilled(self, ev: E.Prefilled) -> list[A.Action]:
        """The streamed prefill answered: its token is delivered; the decode worker (already
        running) holds the KV or is assembling its last chunks: HANDING_OFF. No KV lease: the
        stream's chunks are the decode worker's to release."""
        self._check_worker(ev.worker_id, self.prefill_id, "a prefill answer")
        if ev.kv is not None:
            raise InvalidTransition(
                self.request_id, self.state, "a KV handle from a streamed prefill (its KV goes by the stream)"
            )
        out: list[A.Action] = [A.Deliver(len(self.output), (ev.token,))]
        self.output.append(ev.token)
        if ev.stop:  # the driver's streamed leg cancels the decode call as it ends
            return self._terminal(State.FINISHED, Outcome.FINISHED, ev, out)
        self._move(State.HANDING_OFF, ev)
        self.leg_start = len(self.output)
        return out

    def _prefilled(self, ev: E.Prefilled) -> list[A.Action]:
        self._check_worker(ev.worker_id, self.prefill_id, "a prefill answer")
        if ev.kv is None and not ev.stop:
            raise InvalidTransition(self.request_id, self.state, "a prefill answer without KV to hand off")
        out: list[A.Action] = []
        idx = len(self.output)
        self.output.append(ev.token)
        self.kv = ev.kv
        if ev.kv is not None and ev.kv.lease_id:
            self.ledger.acquire(self._res(ResourceKind.KV_LEASE, ev.kv.lease_id))
        out.append(A.Deliver(idx, (ev.token,)))
        if ev.stop:
            return self._terminal(State.FINISHED, Outcome.FINISHED, ev, out)
        assert ev.kv is not None
        self._move(State.HANDING_OFF, ev)
        self.leg_start = len(self.output)
        out.append(A.RunDecode(self.decode_id, ev.kv, len(self.output)))
        return out

    def _streamed(self, ev: E.Streamed) -> list[A.Action]:
        self._check_worker(ev.worker_id, self.decode_id, "a decode message")
        n = len(self.output)
        if ev.first_index > n:
            raise OutputMismatch(
                f"request {self.request_id}: decode worker {ev.worker_id} sent tokens from index "
                f"{ev.first_index} but only {n} were delivered: tokens {n}..{ev.first_index - 1} would be lost"
            )
        skip = min(n - ev.first_index, len(ev.tokens))
        if tuple(self.output[ev.first_index : ev.first_index + skip]) != ev.tokens[:skip]:
            raise OutputMismatch(
                f"request {self.request_id}: decode worker {ev.worker_id} resent output tokens "
                f"{ev.first_index}..{ev.first_index + skip - 1} differently from those delivered"
            )
        out: list[A.Action] = []
        if self.state is State.HANDING_OFF:
            # the decode worker pulled the KV and released its lease before its first message
            if self.kv is not None and self.kv.lease_id:
                r = self._res(ResourceKind.KV_LEASE, self.kv.lease_id)
                if self.ledger.holds(r):
                    self.ledger.hand_over(r)
            self._move(State.DECODING, ev)
        new = ev.tokens[skip:]
        self.output.extend(new)
        out.append(A.Deliver(n, new, skip=skip))
        return out

    def _finished(self, ev: E.Finished) -> list[A.Action]:
        self._check_worker(ev.worker_id, self.decode_id, "a finish")
        return self._terminal(State.FINISHED, Outcome.FINISHED, ev, [])

    def _lost_worker(self, ev: E.Lost) -> list[A.Action]:
        lost = ev.lost
        on_prefill = self.state is State.PREFILLING or (
            self.state is State.STREAMING and lost.phase is LostPhase.PREFILL
        )
        expected = self.prefill_id if on_prefill else self.decode_id
        self._check_worker(lost.worker_id, expected, f"a loss ({lost.phase.value})")
        want_phase = {
            State.PREFILLING: (LostPhase.PREFILL,),
            # streaming: the prefill worker lost, or the decode worker (its stream cancelled)
            State.STREAMING: (LostPhase.PREFILL, LostPhase.DECODE, LostPhase.KV),
            State.HANDING_OFF: (LostPhase.DECODE, LostPhase.KV),
            State.DECODING: (LostPhase.DECODE, LostPhase.KV),
            State.MIGRATING: (LostPhase.DECODE,),
        }[self.state]
        if lost.phase not in want_phase:
            raise InvalidTransition(self.request_id, self.state, f"a {lost.phase.value} loss")
        if lost.phase is LostPhase.KV and len(self.output) != self.leg_start:
            raise InvalidTransition(self.request_id, self.state, "a KV loss after the leg streamed tokens")
        out: list[A.Action] = []
        if lost.stalled:
            out.append(A.QuarantineWorker(lost))
        elif lost.phase is not LostPhase.KV:  # a worker whose KV handoff was gone is alive
            out.append(A.DropWorker(lost.worker_id))
        if self.state is State.MIGRATING and self.migration_to is not None:
            out.append(A.AbortMigration(self.decode_id, self.migration_to))
            self.ledger.hand_over(self._res(ResourceKind.MIGRATION, self.migration_to))
            self.migration_to = None
        self._end_leg(out)
        if ev.client_gone:  # nobody waits: nothing is re-dispatched
            return self._terminal(State.FAILED, Outcome.CANCELLED, ev, out)
        try:
            self.budget.record(lost)
        except Exception as e:  # noqa: BLE001 - the bound: the request fails naming the lost workers
            self.error = e
            out.append(A.Fail(e))
            return self._terminal(State.FAILED, Outcome.ERROR, ev, out)
        reuse = lost.phase is LostPhase.DECODE and len(self.output) == self.leg_start and self.kv is not None
        self._lost = ev
        self._kv_reused = False
        self._move(State.PLACED, ev)
        if lost.phase is LostPhase.KV and self.kv is not None:
            self._release_lease(out)
            self.kv = None  # prefill prompt + tokens so far again, same decode worker
        elif lost.phase is LostPhase.DECODE and self.kv is not None:
            if reuse:
                self._awaiting_relet = True
                out.append(A.ReletLease(self.kv))
                return out
            self._release_lease(out)
            self.kv = None
        out.append(self._find_replacement())
        return out

    def _find_replacement(self) -> A.FindReplacement:
        assert self._lost is not None
        phase = self._lost.lost.phase
        need_prefill = phase is LostPhase.PREFILL or (not self.local and self.kv is None)
        return A.FindReplacement(
            prefill=need_prefill,
            decode=phase is LostPhase.DECODE,
            num_context_tokens=self.prompt_tokens + len(self.output),
            excluded=self.budget.excluded,
        )

    def _relet(self, ev: E.Relet) -> list[A.Action]:
        if not self._awaiting_relet:
            raise InvalidTransition(self.request_id, self.state, "a re-lease nobody asked for")
        self._awaiting_relet = False
        out: list[A.Action] = []
        if ev.kv is None:
            self._release_lease(out)
            self.kv = None
        else:
            old = self.kv
            if old is not None and old.lease_id:
                r = self._res(ResourceKind.KV_LEASE, old.lease_id)
                if self.ledger.holds(r):
                    self.ledger.hand_over(r)  # the re-lease released it
            self.kv = ev.kv
            if ev.kv.lease_id:
                self.ledger.acquire(self._res(ResourceKind.KV_LEASE, ev.kv.lease_id))
            self._kv_reused = True
        out.append(self._find_replacement())
        return out

    def _cancelled(self, ev: E.Cancelled) -> list[A.Action]:
        return self._terminal(State.FAILED, Outcome.CANCELLED, ev, [])

    def _failed(self, ev: E.Failed) -> list[A.Action]:
        self.error = ev.error
        self._awaiting_relet = False
        return self._terminal(State.FAILED, Outcome.ERROR, ev, [])

    # ------------------------------------------------------------------ migration
    def _migration_requested(self, ev: E.MigrationRequested) -> list[A.Action]:
        if ev.destination == self.decode_id:
            raise InvalidTransition(self.request_id, self.state, "a migration to the worker it runs on")
        self.ledger.acquire(self._res(ResourceKind.MIGRATION, ev.destination))
        self.migration_to = ev.destination
        self._move(State.MIGRATING, ev)
        return [A.StartMigration(self.decode_id, ev.destination, len(self.output))]

    def _migration_committed(self, ev: E.MigrationCommitted) -> list[A.Action]:
        self._check_worker(ev.destination, self.migration_to, "a migration commit")
        n, m = len(self.output), len(ev.outputs)
        common = min(n, m)
        if tuple(self.output[:common]) != ev.outputs[:common]:
            raise OutputMismatch(
                f"request {self.request_id}: the migration destination {ev.destination} holds an "
                "output that differs from the one delivered"
            )
        known = max(n, m)
        if ev.first_index > known:
            raise OutputMismatch(
                f"request {self.request_id}: the migration destination {ev.destination} streams from "
                f"token {ev.first_index} but only {known} are known: tokens {known}..{ev.first_index - 1} "
                "would be lost"
            )
        out: list[A.Action] = []
        source = self.decode_id
        out.append(A.CloseStream(source))
        self.ledger.hand_over(self._res(ResourceKind.MIGRATION, ev.destination))
        self.migration_to = None
        self._end_leg(out)
        gap = ev.outputs[n:]
        if gap:  # tokens the destination holds that the source's stream had not brought yet
            self.output.extend(gap)
            out.append(A.Deliver(n, tuple(gap)))
        self.decode_id = ev.destination
        self._begin_leg(ev.destination, out)
        self.kv = None  # the handoff was consumed; a later loss resumes from the output
        self.leg_start = len(self.output)
        self._move(State.DECODING, ev)
        return out

    def _migration_aborted(self, ev: E.MigrationAborted) -> list[A.Action]:
        assert self.migration_to is not None
        self.ledger.hand_over(self._res(ResourceKind.MIGRATION, self.migration_to))
        self.migration_to = None
        self._move(State.DECODING, ev)
        return []


def _handler_table() -> dict[tuple[State, type], str]:
    """(state, event type) -> the name of the :class:`RequestLifecycle` method that handles it
    (built once for the class, not per request: #12, the router's cost per request)."""
    table: dict[tuple[State, type], str] = {}

    def on(state: State, event: type, name: str) -> None:
        table[(state, event)] = name

    on(State.PLACED, E.Placed, "_placed")
    on(State.PLACED, E.Relet, "_relet")
    on(State.PREFILLING, E.Prefilled, "_prefilled")
    on(State.STREAMING, E.Prefilled, "_stream_prefilled")
    for st in (State.HANDING_OFF, State.DECODING, State.MIGRATING):
        on(st, E.Streamed, "_streamed")
    for st in (State.DECODING, State.MIGRATING):
        on(st, E.Finished, "_finished")
    for st in (State.PREFILLING, State.STREAMING, State.HANDING_OFF, State.DECODING, State.MIGRATING):
        on(st, E.Lost, "_lost_worker")
    for st in (
        State.PLACED,
        State.PREFILLING,
        State.STREAMING,
        State.HANDING_OFF,
        State.DECODING,
        State.MIGRATING,
    ):
        on(st, E.Cancelled, "_cancelled")
        on(st, E.Failed, "_failed")
    on(State.DECODING, E.MigrationRequested, "_migration_requested")
    on(State.MIGRATING, E.MigrationCommitted, "_migration_committed")
    on(State.MIGRATING, E.MigrationAborted, "_migration_aborted")
    return table


_HANDLERS = _handler_table()
if _missing := sorted({n for n in _HANDLERS.values() if not callable(getattr(RequestLifecycle, n, None))}):
    raise ImportError(f"RequestLifecycle has no handler method(s) {_missing}")
