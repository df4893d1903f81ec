"""Fetch-or-recompute decision for a cached prefix held remotely (Mooncake Conductor's rule).

A prefill worker that finds a longer prefix of its prompt in the KV store than in its own cache may
pull those blocks or simply compute them again. Pulling pays off only when it is faster::

    fetch_s     = call_latency_s + nbytes / bandwidth_bytes_per_s
    recompute_s = tokens / prefill_tokens_per_s
    fetch  iff  fetch_s < recompute_s

This is the same rule as the router's goodput policy (``router.policy.goodput``): there the plan
with a fetched prefix is chosen only when ``transfer_time(kv bytes)`` plus the prefill of the rest
beats the prefill without it, i.e. when the transfer costs less than computing the fetched tokens.

:class:`PrefixFetchPolicy` holds the three rates as EWMAs, seeded from :class:`PrefixFetchConfig`
and fed by the worker's own measurements: per-call latency from store round trips, bandwidth from
its pulls, prefill throughput from its engine while busy. Pure arithmetic: no clock, no I/O, no
torch; thread-safe (request threads of one worker share one instance).
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass


class FetchMode(enum.Enum):
    """How a worker treats a remote cached prefix."""

    AUTO = "auto"  # fetch only when predicted faster than recomputing
    ALWAYS = "always"  # always fetch (the pre-policy behaviour)
    NEVER = "never"  # always recompute (store prefixes unused by this worker)


class PrefixDecision(enum.Enum):
    FETCH = "fetch"
    RECOMPUTE = "recompute"


@dataclass(frozen=True)
class PrefixFetchConfig:
    """Seeds and knobs of :class:`PrefixFetchPolicy`.

    Seeds are a conservative guess for SmolLM2-135M on one CPU thread pulling through shared
    memory on the same host; the EWMAs replace them after a few requests. ``alpha`` is the EWMA
    weight of one new sample; samples shorter than ``min_sample_s`` are ignored (timer noise), and
    prefill samples of fewer than ``min_sample_tokens`` tokens too (per-step overhead dominates
    them, so they would understate the marginal cost of a token).
    """

    mode: FetchMode = FetchMode.AUTO
    bandwidth_bytes_per_s: float = 1e9
    call_latency_s: float = 2e-3
    prefill_tokens_per_s: float = 1000.0
    alpha: float = 0.2
    min_sample_s: float = 1e-4
    min_sample_tokens: int = 64

    def __post_init__(self) -> None:
        if not (self.bandwidth_bytes_per_s > 0 and self.prefill_tokens_per_s > 0):
            raise ValueError("bandwidth_bytes_per_s and prefill_tokens_per_s must be > 0")
        if not (self.call_latency_s >= 0 and self.min_sample_s >= 0 and self.min_sample_tokens >= 0):
            raise ValueError("call_latency_s, min_sample_s and min_sample_tokens must be >= 0")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")


@dataclass(frozen=True)
class PrefixEstimate:
    """One decision with the predictions behind it."""

    decision: PrefixDecision
    fetch_s: float
    recompute_s: float


def predict_fetch_s(nbytes: float, bandwidth_bytes_per_s: float, call_latency_s: float) -> float:
    """Seconds to pull ``nbytes`` of KV: one call's latency + bytes / bandwidth (0 for nothing)."""
    if nbytes <= 0:
        return 0.0
    return call_latency_s + nbytes / bandwidth_bytes_per_s


def predict_recompute_s(tokens: int, prefill_tokens_per_s: float) -> float:
    """Seconds to prefill ``tokens`` more prompt tokens at the measured throughput."""
    return max(0, tokens) / prefill_tokens_per_s


def should_fetch(fetch_s: float, recompute_s: float) -> bool:
    """The rule: fetch only when strictly faster than recomputing (ties recompute: no I/O)."""
    return fetch_s < recompute_s


def decide(
    tokens: int,
    nbytes: float,
    *,
    bandwidth_bytes_per_s: float,
    call_latency_s: float,
    prefill_tokens_per_s: float,
    mode: FetchMode = FetchMode.AUTO,
) -> PrefixEstimate:
    """Fetch or recompute ``tokens`` prompt tokens whose KV (``nbytes``) is held remotely.

    ``mode`` ALWAYS/NEVER forces the answer; predictions are filled in either way. Nothing to
    fetch (``tokens <= 0``) is RECOMPUTE with both predictions 0.
    """
    f = predict_fetch_s(nbytes, bandwidth_bytes_per_s, call_latency_s)
    r = predict_recompute_s(tokens, prefill_tokens_per_s)
    if tokens <= 0:
        return PrefixEstimate(PrefixDecision.RECOMPUTE, 0.0, 0.0)
    if mode is FetchMode.ALWAYS:
        d = PrefixDecision.FETCH
    elif mode is FetchMode.NEVER:
        d = PrefixDecision.RECOMPUTE
    else:
        d = PrefixDecision.FETCH if should_fetch(f, r) else PrefixDecision.RECOMPUTE
    return PrefixEstimate(d, f, r)


class PrefixFetchPolicy:
    """:func:`decide` over EWMAs of the worker's own measurements (see the module docstring).

    ``observe_call``: one store round trip (per-call latency). ``observe_fetch``: one pull of
    ``nbytes`` that took ``seconds`` in all; its bandwidth sample excludes the current latency
    estimate (at least half the time is attributed to bytes, so a slow call cannot make bandwidth
    look infinite). ``observe_prefill``: the engine computed ``tokens`` prompt tokens in ``seconds``
    of busy time. Non-finite, non-positive or too-short samples are ignored (return False).
    ``counts`` tallies decisions.
    """

    def __init__(self, config: PrefixFetchConfig | None = None) -> None:
        self.config = config or PrefixFetchConfig()
        c = self.config
        self._bw = c.bandwidth_bytes_per_s
        self._lat = c.call_latency_s
        self._tps = c.prefill_tokens_per_s
        self.counts: dict[PrefixDecision, int] = {d: 0 for d in PrefixDecision}
        self._lock = threading.Lock()

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self._bw

    @property
    def call_latency_s(self) -> float:
        return self._lat

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._tps

    def decide(self, tokens: int, nbytes: float) -> PrefixEstimate:
        """Decide for ``tokens`` remote prefix tokens of ``nbytes`` and count the decision."""
        with self._lock:
            est = decide(
                tokens,
                nbytes,
                bandwidth_bytes_per_s=self._bw,
                call_latency_s=self._lat,
                prefill_tokens_per_s=self._tps,
                mode=self.config.mode,
            )
            if tokens > 0:
                self.counts[est.decision] += 1
            return est

    def _ok(self, seconds: float) -> bool:
        return math.isfinite(seconds) and seconds >= max(self.config.min_sample_s, 1e-12)

    def _ewma(self, old: float, sample: float) -> float:
        return old + self.config.alpha * (sample - old)

    def observe_call(self, seconds: float) -> bool:
        if not self._ok(seconds):
            return False
        with self._lock:
            self._lat = self._ewma(self._lat, seconds)
        return True

    def observe_fetch(self, nbytes: float, seconds: float) -> bool:
        if not (self._ok(seconds) and nbytes > 0 and math.isfinite(nbytes)):
            return False
        with self._lock:
            byte_s = max(seconds - self._lat, seconds / 2)
            self._bw = self._ewma(self._bw, nbytes / byte_s)
        return True

    def observe_prefill(self, tokens: int, seconds: float) -> bool:
        if not (self._ok(seconds) and tokens > 0 and tokens >= self.config.min_sample_tokens):
            return False
        with self._lock:
            self._tps = self._ewma(self._tps, tokens / seconds)
        return True
