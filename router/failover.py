"""Re-dispatch bookkeeping of the router (pure: no gRPC, no I/O).

When a worker call fails with UNAVAILABLE the worker is presumed dead and the router re-dispatches
the request (DESIGN "request lifecycle" step 5):

* a prefill worker lost before its response: the same prefill goes to another prefill worker;
* a decode worker lost before it streamed a token: the same KV handle (re-leased in the store)
  goes to another decode worker;
* a decode worker lost after ``k`` tokens were relayed: the prompt plus the ``k`` generated tokens
  is prefilled again (:func:`resume_limits` shrinks ``max_tokens``/``min_tokens`` by ``k``) and
  decoding continues on another decode worker; only new tokens reach the client. The extended
  prefill's first token is output token ``k`` (the next one), so greedy output equals the
  uninterrupted run token for token. Seeded sampling draws output position ``i`` from
  ``mix(seed, i)``; the resumed leg's sampling carries ``seed_position_offset = k`` so its
  positions continue at ``k`` and the draw is the uninterrupted run's (the ``k`` tokens are in its
  prompt, so a repetition penalty sees the same history too).

A worker that does not fail but stops making progress (its call misses its progress deadline,
:mod:`router.progress`) is a lost worker too (``LostWorker.stalled``): the router cancels its
call and re-dispatches the same way, and quarantines the worker (:mod:`router.quarantine`)
instead of dropping it from the registry. A stalled worker is not excluded from the request for
good: once it answers a health probe it may serve the request again (a slow worker is not a
dead one; with one worker of a kind, the request waits briefly for it).

:class:`Redispatches` bounds the re-dispatches of one request (``RouterConfig.max_redispatches``)
and names the lost workers in the final UNAVAILABLE error.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.errors import UnavailableError


class LostPhase(enum.Enum):
    """Where a request was when its worker was lost (the ``phase`` label of the metric)."""

    PREFILL = "prefill"
    DECODE = "decode"
    # the handed-off KV was gone before the decode worker pulled it (blocks evicted, lease or
    # direct-transfer outbox entry expired): that worker is fine; the request is prefilled again
    KV = "kv"


@dataclass(frozen=True)
class LostWorker:
    worker_id: str
    phase: LostPhase
    detail: str = ""  # the failed call's status details (or the stall's description)
    stalled: bool = False  # it missed its progress deadline (hung, not dead): quarantined

    def describe(self) -> str:
        d = f": {self.detail}" if self.detail else ""
        if self.phase is LostPhase.KV:
            return f"KV handed to decode worker {self.worker_id} was gone{d}"
        how = " (stalled)" if self.stalled else ""
        return f"{self.phase.value} worker {self.worker_id}{how}{d}"


@dataclass
class Redispatches:
    """Workers lost by one request, and whether it may be re-dispatched once more.

    Contract: :meth:`record` is called once per lost worker; it returns normally while the number
    of lost workers is at most ``limit`` (each such loss is one re-dispatch) and raises
    :class:`UnavailableError` naming every lost worker once it exceeds ``limit``.
    """

    request_id: str
    limit: int
    lost: list[LostWorker] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")

    @property
    def count(self) -> int:
        """Re-dispatches granted so far."""
        return min(len(self.lost), self.limit)

    @property
    def excluded(self) -> frozenset[str]:
        """Ids of the workers this request lost: never placed on again (a lost KV handoff
        excludes no worker; a stalled worker is kept out by its quarantine instead, and may serve
        the request again once it answers a probe)."""
        return frozenset(w.worker_id for w in self.lost if w.phase is not LostPhase.KV and not w.stalled)

    def record(self, lost: LostWorker) -> None:
        self.lost.append(lost)
        if len(self.lost) > self.limit:
            raise self.exhausted(f"it was re-dispatched {self.limit} times (the limit)")

    def exhausted(self, why: str) -> UnavailableError:
        """The error ending the request: ``why`` and every lost worker named."""
        names = "; ".join(w.describe() for w in self.lost) or "none"
        return UnavailableError(
            f"request {self.request_id} failed: {why}; workers lost: {names}; retry shortly"
        )


def resume_limits(max_tokens: int, min_tokens: int, produced: int) -> tuple[int, int]:
    """``(max_tokens, min_tokens)`` of the leg that continues a request after ``produced`` output
    tokens (they become part of its prompt). Requires ``0 <= produced < max_tokens`` (a request
    that produced ``max_tokens`` is finished)."""
    if not 0 <= produced < max_tokens:
        raise ValueError(f"cannot resume after {produced} of {max_tokens} tokens")
    return max_tokens - produced, max(0, min_tokens - produced)


class TokenStop(enum.Enum):
    STOP = "stop"  # a stop token / EOS
    LENGTH = "length"


def check_stop(
    token: int,
    num_output: int,
    *,
    max_tokens: int,
    min_tokens: int,
    stop_token_ids: tuple[int, ...] | frozenset[int],
    eos_token_ids: set[int] | frozenset[int],
    ignore_eos: bool,
) -> TokenStop | None:
    """Whether output token ``token`` (the ``num_output``-th, counting it) ends the request; the
    engine's rule (``engine.scheduler.Scheduler.check_stop``): stop tokens and EOS count once at
    least ``min_tokens`` tokens are out, and win over the length limit."""
    stop_token = (not ignore_eos and token in eos_token_ids) or token in stop_token_ids
    if stop_token and num_output >= min_tokens:
        return TokenStop.STOP
    if num_output >= max_tokens:
        return TokenStop.LENGTH
    return None
