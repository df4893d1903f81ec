"""When is a worker call stalled (pure: no gRPC, no I/O, clock values passed in).

A worker that is alive to the kernel (its TCP connection open) but makes no progress (SIGSTOPped,
an engine wedged in a step, a deadlock) never fails its call: the router would wait forever. So
the router bounds how long it waits on a worker:

* Prefill: the whole call must answer within :meth:`ProgressConfig.prefill_deadline_s`:
  ``max(prefill_floor_s, ttft_factor x predicted TTFT)`` plus ``prefill_s_per_token`` for every
  prompt token queued at the worker ahead of and including this one (so a burst or a long prompt
  is not taken for a stall when no latency model predicts it).
* Decode stream: the first message must arrive within ``first_message_s`` (the decode worker
  pulls the KV and admits the request first; a local prefill runs the whole prompt), plus the same
  per-token allowance as a prefill; every later message within :meth:`ProgressWatch.gap_s`:
  ``max(floor_s, tpot_factor x predicted TPOT x tokens per message)`` (a worker that streams
  several tokens per message waits for them: the largest count seen so far is used).

The time counted is only time spent *waiting on the worker*: while the relay waits for a slow
client to take a response (flow control) it does not read the worker's stream, so the clock of
:class:`ProgressWatch` starts again each time the relay asks for the next message.

A call that misses its deadline is cancelled and handled as a lost worker
(:mod:`router.failover`), and the worker is quarantined (:mod:`router.quarantine`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StallPhase(enum.Enum):
    """What the router was waiting for when a call stalled."""

    PREFILL = "prefill"  # a Prefill call's answer
    FIRST_MESSAGE = "first_message"  # a Decode stream's first message (KV pull, admission)
    STREAM = "stream"  # the next message of a streaming Decode


@dataclass(frozen=True)
class ProgressConfig:
    """Progress deadlines of worker calls (seconds). ``enabled`` False: no deadline (the call
    waits as long as the client does)."""

    floor_s: float = 5.0  # a decode stream's next message, at least
    tpot_factor: float = 20.0  # k: next message within k x predicted TPOT (when above the floor)
    # a decode stream's first message: above a decode worker's admission wait for free blocks
    # (its ``admission_timeout_s``, 30 s by default: backpressure, not a stall) plus the KV pull
    first_message_s: float = 35.0
    prefill_floor_s: float = 15.0  # a Prefill answer, at least
    ttft_factor: float = 5.0  # a Prefill answer within this x predicted TTFT (when above the floor)
    prefill_s_per_token: float = 0.005  # allowance per prompt token queued at the worker
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("floor_s", "tpot_factor", "first_message_s", "prefill_floor_s", "ttft_factor"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"progress {name} must be > 0, got {v}")
        if self.prefill_s_per_token < 0:
            raise ValueError(f"progress prefill_s_per_token must be >= 0, got {self.prefill_s_per_token}")

    def prefill_deadline_s(self, predicted_ttft_s: float | None, queued_tokens: int) -> float | None:
        """Seconds a Prefill call may take before it is stalled (None: disabled).
        ``predicted_ttft_s``: the policy's estimate (None or <= 0: unknown); ``queued_tokens``:
        prompt tokens outstanding at the worker, this request's included."""
        if not self.enabled:
            return None
        base = self.prefill_floor_s
        if predicted_ttft_s is not None and predicted_ttft_s > 0:
            base = max(base, self.ttft_factor * predicted_ttft_s)
        return base + self.prefill_s_per_token * max(0, queued_tokens)

    def first_message_deadline_s(self, queued_tokens: int = 0) -> float | None:
        """Seconds a Decode stream's first message may take (None: disabled); ``queued_tokens``:
        prompt tokens the decode worker prefills itself (a local prefill) and queued there."""
        if not self.enabled:
            return None
        return self.first_message_s + self.prefill_s_per_token * max(0, queued_tokens)

    def gap_s(self, predicted_tpot_s: float | None, tokens_per_message: int) -> float | None:
        """Seconds between two messages of a Decode stream before it is stalled (None:
        disabled)."""
        if not self.enabled:
            return None
        if predicted_tpot_s is None or predicted_tpot_s <= 0:
            return self.floor_s
        return max(self.floor_s, self.tpot_factor * predicted_tpot_s * max(1, tokens_per_message))


class ProgressWatch:
    """The progress deadline of one Decode stream.

    Protocol: :meth:`waiting` when the relay starts waiting for the next message (returns the
    seconds it may wait, None = unbounded); :meth:`received` with the message's token count when
    it arrives. :meth:`phase` says what was awaited (the stall's description);
    :meth:`stalled` whether a wait that began at ``since`` is over its bound at ``now``.
    """

    def __init__(
        self,
        config: ProgressConfig,
        predicted_tpot_s: float | None = None,
        *,
        first_message_tokens: int = 0,
    ) -> None:
        self.config = config
        self.predicted_tpot_s = predicted_tpot_s
        self.first_message_tokens = first_message_tokens
        self.messages = 0
        self.max_tokens_per_message = 1
        self.wait_started: float | None = None

    @property
    def phase(self) -> StallPhase:
        return StallPhase.FIRST_MESSAGE if self.messages == 0 else StallPhase.STREAM

    def bound_s(self) -> float | None:
        """Seconds the current wait may last (None: unbounded)."""
        if self.messages == 0:
            return self.config.first_message_deadline_s(self.first_message_tokens)
        return self.config.gap_s(self.predicted_tpot_s, self.max_tokens_per_message)

    def waiting(self, now: float) -> float | None:
        """The relay starts waiting for a message at ``now``; returns the seconds it may wait."""
        self.wait_started = now
        return self.bound_s()

    def received(self, n_tokens: int) -> None:
        """A message with ``n_tokens`` tokens arrived (ends the current wait)."""
        self.messages += 1
        self.max_tokens_per_message = max(self.max_tokens_per_message, n_tokens)
        self.wait_started = None

    def stalled(self, now: float) -> bool:
        """Whether the current wait (if any) has lasted longer than its bound at ``now``."""
        bound = self.bound_s()
        return self.wait_started is not None and bound is not None and now - self.wait_started > bound

    def describe(self, waited_s: float) -> str:
        """The stall, for logs and the lost worker's detail."""
        what = "its first message" if self.messages == 0 else f"a message after {self.messages}"
        return f"no progress: waited {waited_s:.1f}s for {what} (bound {self.bound_s() or 0:.1f}s)"
