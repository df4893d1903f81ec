"""The goodput policy's "policy feedback" log line, at most once per interval (#12: the router's
per-request CPU; the line was 3% of the router's CPU at 32 tokens per request, logged for every
finished request).

The line is a summary of the policy's learnt state (correction factors, their sample counts, the
length predictor's accuracy), not an event of one request, so one line per ``interval_s``
carries the same information: the first offer is logged at once; an offer within ``interval_s``
of the last line is held, and the held state is logged when the interval ends (a timer on the
running event loop), with the values at that time and the request id of the latest request it
includes. So the state after the last request of a burst always reaches the log, at most
``interval_s`` late. Off an event loop (no running loop) every offer is logged at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from pdserve.tracing import current_request_id, log_event
from router.policy import GoodputAwarePolicy, Phase

FEEDBACK_LOG_INTERVAL_S = 1.0

log = logging.getLogger("router.service")  # the router's log records keep their logger name


def log_feedback(policy: GoodputAwarePolicy, request_id: str | None) -> None:
    """One "policy feedback" line: ``policy``'s state now, naming ``request_id``."""
    c, acc = policy.corrected, policy.lengths.online
    log_event(
        log,
        "policy feedback",
        request_id=request_id,
        ttft_factor=round(c.factor(Phase.TTFT), 4),
        tpot_factor=round(c.factor(Phase.TPOT), 4),
        ttft_samples=c.samples(Phase.TTFT),
        tpot_samples=c.samples(Phase.TPOT),
        length_samples=policy.lengths.num_samples,
        length_mae=round(acc.mae, 2) if acc.n else None,
        length_within_2x=round(acc.within_2x, 3) if acc.n else None,
    )


class FeedbackLog:
    """Rate-limits :func:`log_feedback` (module doc). ``interval_s`` > 0 (ValueError otherwise);
    ``clock``: monotonic seconds."""

    def __init__(
        self, interval_s: float = FEEDBACK_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._last = -math.inf  # when the last line was logged
        self._held: tuple[GoodputAwarePolicy, str | None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def offer(self, policy: GoodputAwarePolicy) -> None:
        """A request finished and ``policy`` learnt from it (the request id bound now is named)."""
        rid = current_request_id() or None
        now = self._clock()
        wait = self._last + self.interval_s - now
        if wait <= 0 and self._timer is None:
            self._emit(policy, rid)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to hold it on: at once
            self._emit(policy, rid)
            return
        self._held = (policy, rid)
        if self._timer is None:
            self._timer = loop.call_later(max(wait, 0.0), self._flush)

    def _flush(self) -> None:
        self._timer = None
        held, self._held = self._held, None
        if held is not None:
            self._emit(*held)

    def _emit(self, policy: GoodputAwarePolicy, rid: str | None) -> None:
        self._last = self._clock()
        log_feedback(policy, rid)

    def close(self) -> None:
        """Log a held line now and cancel the timer (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
        self._flush()
