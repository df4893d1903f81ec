"""A cheap deadline for the repeated waits of one asyncio task (the router's token path, #12).

A relayed stream waits twice per message: for the decode worker's next message (its progress
deadline) and for the client to take the last one (the write stall). ``asyncio.timeout`` around
each wait schedules and cancels a timer per message, a measurable share of the router's CPU per
token. :class:`LazyDeadline` instead keeps one timer per stream that fires about once per bound:
starting a wait stores its deadline (a float); the timer, when it fires, cancels the task only
if a wait is still running past its deadline, else re-arms itself for the current wait. The
outcome is ``asyncio.timeout``'s: the wait is cancelled at its deadline (a timer late by the
loop's own lag at most) and the caller turns that cancellation into a timeout; a cancellation
from elsewhere passes through untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LazyDeadline:
    """Deadlines of the successive waits of the task that creates it (call from inside it).

    Protocol: :meth:`start` before a wait (``bound_s`` seconds from now; None: unbounded), then
    :meth:`expired` with the wait's exception (None when it returned) once it is over: True when
    the deadline cancelled it (the caller raises its timeout instead of the CancelledError).
    :meth:`close` when the task is done with it (drops the timer).

    ``spare``: asked when a wait reaches its deadline; True gives the wait another bound (counted
    from then) instead of cancelling it (e.g. the worker it waits on is busy, not hung)."""

    __slots__ = ("_bound", "_cancelling", "_due", "_fired", "_handle", "_loop", "_spare", "_task")

    def __init__(self, spare: Callable[[], bool] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("LazyDeadline needs a running task")
        self._task = task
        self._handle: asyncio.TimerHandle | None = None
        self._due: float | None = None  # the current wait's deadline (loop time); None: none
        self._fired = False
        self._cancelling = 0
        self._bound = 0.0
        self._spare = spare

    def start(self, bound_s: float | None) -> None:
        """A wait of at most ``bound_s`` seconds begins (None: no deadline)."""
        if bound_s is None:
            self._due = None
            return
        due = self._loop.time() + bound_s
        self._due, self._bound = due, bound_s
        self._cancelling = self._task.cancelling()
        h = self._handle
        if h is None or h.when() > due:  # no timer, or one that would fire too late for this wait
            if h is not None:
                h.cancel()
            self._handle = self._loop.call_at(due, self._check)

    def expired(self, exc: BaseException | None) -> bool:
        """The wait is over (``exc``: what it raised, None if it returned): True when it was
        cancelled by its deadline (and only by it: a cancellation from elsewhere stays)."""
        self._due = None
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling and isinstance(exc, asyncio.CancelledError)

    def close(self) -> None:
        self._due = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        due = self._due
        if due is None:  # not waiting: the next start arms a timer
            return
        now = self._loop.time()
        if now >= due and self._spare is not None and self._spare():
            due = self._due = now + self._bound  # spared: another bound from now
        if now >= due:
            self._fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)
