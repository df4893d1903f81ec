"""A minimal discrete-event loop with a simulated clock.

Events run in time order; events at the same time run in the order they were scheduled (FIFO).
The loop is the simulator's :class:`router.policy.Clock`: ``now()`` is the time of the event
being run. Callbacks may schedule more events; scheduling in the past is an error.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any


class EventLoop:
    def __init__(self, start: float = 0.0) -> None:
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0
        self._now = start
        self._stopped = False
        self.num_events = 0

    def now(self) -> float:
        return self._now

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at simulated time ``t`` (>= now)."""
        if t < self._now:
            raise ValueError(f"cannot schedule at {t} before now ({self._now})")
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self._now + dt, fn, *args)

    def stop(self) -> None:
        """Stop after the current event."""
        self._stopped = True

    @property
    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float = math.inf) -> int:
        """Run events with time <= ``until`` (or until :meth:`stop`); returns how many ran."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        self._stopped = False
        while heap and not self._stopped:
            if heap[0][0] > until:
                break
            t, _, fn, args = pop(heap)
            self._now = t
            fn(*args)
            n += 1
        self.num_events += n
        if not heap and until != math.inf and until > self._now:
            self._now = until
        return n
