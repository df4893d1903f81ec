"""The states of one request's lifecycle in the router, and the transitions allowed between them
(pure: no gRPC, no threads, no clock).

::

    PLACED ──► PREFILLING ──► HANDING_OFF ──► DECODING ⇄ MIGRATING
      ▲  │          │              │             │  │        │
      │  └──────────┼──────────────┼─────────────┘  │        │   (local prefill: PLACED → DECODING)
      │             ▼              ▼                ▼        ▼
      └──── re-dispatch ◄──────────┴────────────────┴────────┘   (a worker lost: back to placement)
                    FINISHED / FAILED (terminal, from every live state)

* ``PLACED``: the request has its workers (the first placement, or a re-dispatch's replacement
  being chosen) and the next leg has not started.
* ``PREFILLING``: a prefill worker computes the prompt (resumed: prompt + output so far).
* ``STREAMING``: chunk-wise KV streaming (:mod:`router.lifecycle.stream_legs`): the prefill
  worker computes the prompt and streams its KV chunk by chunk while the decode worker, whose
  Decode started at the same time, assembles it; it ends in ``HANDING_OFF`` when the prefill
  answers (the decode worker then holds or finishes the whole verified KV), or back in
  ``PLACED`` when either worker is lost (a streamed handoff cannot be re-leased: re-prefill).
* ``HANDING_OFF``: a decode worker was handed the KV; it has not streamed a message yet (the
  router holds the KV lease until then).
* ``DECODING``: a decode worker streams tokens (also a local-prefill leg, which computes the
  prompt itself).
* ``MIGRATING``: the source decode worker keeps streaming while its KV is copied to a
  destination; it ends back in ``DECODING`` (on the destination once committed, on the source
  when aborted), or terminal when the request finishes or is cancelled meanwhile.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hash, not Enum's hash(name) in Python (#12)
    PLACED = "placed"
    PREFILLING = "prefilling"
    STREAMING = "streaming"  # prefilling while the decode worker assembles the streamed KV
    HANDING_OFF = "handing_off"
    DECODING = "decoding"
    MIGRATING = "migrating"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.FINISHED, State.FAILED})

# Every edge of the lifecycle. An edge not listed is a bug in whoever asked for it.
ALLOWED: dict[State, frozenset[State]] = {
    State.PLACED: frozenset(
        {State.PREFILLING, State.STREAMING, State.HANDING_OFF, State.DECODING, State.FAILED}
    ),
    State.PREFILLING: frozenset({State.HANDING_OFF, State.FINISHED, State.PLACED, State.FAILED}),
    State.STREAMING: frozenset({State.HANDING_OFF, State.FINISHED, State.PLACED, State.FAILED}),
    State.HANDING_OFF: frozenset({State.DECODING, State.PLACED, State.FAILED}),
    State.DECODING: frozenset({State.MIGRATING, State.FINISHED, State.PLACED, State.FAILED}),
    State.MIGRATING: frozenset({State.DECODING, State.FINISHED, State.PLACED, State.FAILED}),
    State.FINISHED: frozenset(),
    State.FAILED: frozenset(),
}


class Outcome(enum.Enum):
    """How a terminal request ended."""

    FINISHED = "finished"  # its last token was delivered
    CANCELLED = "cancelled"  # the client went away (or its deadline passed)
    ERROR = "error"  # a failure no re-dispatch could cure, or the re-dispatch bound


class LifecycleError(RuntimeError):
    """A request's lifecycle was driven against its contract (a bug, never a user error)."""


class InvalidTransition(LifecycleError):
    """An event that is not valid in the request's current state (or an edge not in
    :data:`ALLOWED`). Never ignored: the driver fails the request with it."""

    def __init__(self, request_id: str, state: State, what: str) -> None:
        valid = ", ".join(s.value for s in sorted(ALLOWED[state], key=lambda s: s.value)) or "none"
        super().__init__(
            f"request {request_id}: {what} is not valid in state {state.value} "
            f"(transitions from there: {valid})"
        )
        self.request_id = request_id
        self.state = state


class OutputMismatch(LifecycleError):
    """Tokens that overlap the output already delivered differ from it, or leave a gap after it:
    relaying them would be silently wrong output."""


def check_edge(request_id: str, src: State, dst: State) -> None:
    """Raise :class:`InvalidTransition` unless ``src → dst`` is an edge of the lifecycle."""
    if dst not in ALLOWED[src]:
        raise InvalidTransition(request_id, src, f"moving to {dst.value}")
