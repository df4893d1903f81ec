"""Injected seams of placement: a clock and a latency estimator (structural protocols)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (wall clock in the router, simulated time in the simulator)."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def now(self) -> float:
        return time.monotonic()


class ManualClock:
    """A fake clock for tests: time moves only when told."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError("time does not go backwards")
        self._t += dt

    def set(self, t: float) -> None:
        if t < self._t:
            raise ValueError("time does not go backwards")
        self._t = t


@runtime_checkable
class LatencyEstimator(Protocol):
    """The part of a latency model placement needs (``simulator.latency`` models satisfy it).

    ``prefill_time(tokens, contexts)``: seconds for one step prefilling ``tokens[i]`` new tokens of
    request ``i`` on top of ``contexts[i]`` tokens already in its KV cache (``None``: no context).
    ``transfer_time(nbytes)``: seconds to move ``nbytes`` of KV between instances.
    ``kv_bytes_per_token``: KV bytes of one token over all layers (whole model, all GPUs).
    """

    kv_bytes_per_token: int

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float: ...

    def transfer_time(self, nbytes: float) -> float: ...
