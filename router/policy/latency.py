"""Latency predictions for goodput-aware placement: a linear seed model and its online correction.

:class:`LinearLatency` is the default seed (DistServe's functional forms, linear parts only)::

    prefill(tokens, contexts) = p0 + p1 * sum(tokens) + p2 * sum(tokens * contexts)
    decode(batch, context)    = d0 + d1 * batch + d2 * context
    transfer(nbytes)          = t0 + nbytes / bandwidth

:meth:`LinearLatency.from_model` seeds it from any model with ``prefill_time``/``decode_time``
(e.g. the simulator's profiled model) by sampling it. :class:`OnlineCorrectedLatency` wraps any
:class:`DecodeLatencyEstimator` and scales its predictions by EWMAs of measured/predicted ratios
fed from finished requests: one for the TTFT side (prefill + transfer), one for the TPOT side.
:func:`prefill_time_each`/:func:`decode_time_each` price many one-request steps in one call
(placement prices every instance of a cluster per decision): a model's own ``*_each`` method
when it has one (these models do; it must equal the per-item calls bit for bit), else a call
per item. Pure: no I/O.
"""

from __future__ import annotations

import enum
import math
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DecodeLatencyEstimator(Protocol):
    """:class:`~router.policy.protocols.LatencyEstimator` plus decode steps (``LatencyModel`` fits)."""

    kv_bytes_per_token: int

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float: ...

    def decode_time(self, batch_size: int, total_context: int) -> float: ...

    def transfer_time(self, nbytes: float) -> float: ...


@dataclass(frozen=True)
class LinearLatency:
    """The seed model (see module docstring). Defaults: roughly SmolLM2-135M on 1-2 CPU cores as the
    live router sees it (request overheads included); online correction absorbs the rest."""

    kv_bytes_per_token: int = 18432
    prefill_base_s: float = 5e-2
    prefill_per_token_s: float = 3e-4
    prefill_per_token_ctx_s: float = 1e-8
    decode_base_s: float = 4e-2
    decode_per_seq_s: float = 2e-3
    decode_per_ctx_token_s: float = 2e-7
    transfer_latency_s: float = 1e-3
    transfer_bandwidth: float = 1e9

    def __post_init__(self) -> None:
        coeffs = (
            self.prefill_base_s,
            self.prefill_per_token_s,
            self.prefill_per_token_ctx_s,
            self.decode_base_s,
            self.decode_per_seq_s,
            self.decode_per_ctx_token_s,
            self.transfer_latency_s,
        )
        if any(c < 0 for c in coeffs) or self.transfer_bandwidth <= 0 or self.kv_bytes_per_token <= 0:
            raise ValueError("latency coefficients must be >= 0 and bandwidth, kv bytes > 0")

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float:
        if not tokens:
            return 0.0
        ctx = contexts if contexts is not None else [0] * len(tokens)
        return (
            self.prefill_base_s
            + self.prefill_per_token_s * sum(tokens)
            + self.prefill_per_token_ctx_s * sum(t * c for t, c in zip(tokens, ctx, strict=True))
        )

    def decode_time(self, batch_size: int, total_context: int) -> float:
        if batch_size <= 0:
            return 0.0
        return (
            self.decode_base_s
            + self.decode_per_seq_s * batch_size
            + self.decode_per_ctx_token_s * total_context
        )

    def prefill_time_each(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> list[float]:
        """``[prefill_time([t], [c]) for t, c in zip(tokens, contexts)]`` (one request per step),
        bit for bit, without a call per item."""
        b, k, kc = self.prefill_base_s, self.prefill_per_token_s, self.prefill_per_token_ctx_s
        if contexts is None:
            return [b + k * t + kc * 0 for t in tokens]
        return [b + k * t + kc * (t * c) for t, c in zip(tokens, contexts, strict=True)]

    def decode_time_each(self, batch_sizes: Sequence[int], contexts: Sequence[int]) -> list[float]:
        """``[decode_time(b, c) for b, c in zip(batch_sizes, contexts)]``, bit for bit."""
        d0, d1, d2 = self.decode_base_s, self.decode_per_seq_s, self.decode_per_ctx_token_s
        return [0.0 if n <= 0 else d0 + d1 * n + d2 * c for n, c in zip(batch_sizes, contexts, strict=True)]

    def transfer_time(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return self.transfer_latency_s + nbytes / self.transfer_bandwidth

    @classmethod
    def from_model(cls, model: DecodeLatencyEstimator, *, token_budget: int = 2048) -> LinearLatency:
        """Seed from a richer model (e.g. ``simulator.latency.ProfiledLatencyModel``) by sampling it:
        prefill slope over ``[1, token_budget]`` new tokens, decode slopes over batch and context."""
        n = max(2, token_budget)
        p1, pn = model.prefill_time([1]), model.prefill_time([n])
        per_tok = max(0.0, (pn - p1) / (n - 1))
        pc = model.prefill_time([1], [n])
        per_ctx = max(0.0, pc - p1) / n
        d1, db, dc = model.decode_time(1, 0), model.decode_time(33, 0), model.decode_time(1, 32768)
        per_seq = max(0.0, (db - d1) / 32)
        per_ctx_tok = max(0.0, (dc - d1) / 32768)
        t_small, t_big = model.transfer_time(1.0), model.transfer_time(1e9 + 1.0)
        bw = 1e9 / (t_big - t_small) if t_big > t_small else 1e12
        return cls(
            kv_bytes_per_token=int(model.kv_bytes_per_token),
            prefill_base_s=max(0.0, p1 - per_tok),
            prefill_per_token_s=per_tok,
            prefill_per_token_ctx_s=per_ctx,
            decode_base_s=max(0.0, d1 - per_seq),
            decode_per_seq_s=per_seq,
            decode_per_ctx_token_s=per_ctx_tok,
            transfer_latency_s=max(0.0, t_small),
            transfer_bandwidth=bw,
        )


class Phase(enum.Enum):
    """Which side of a request a correction applies to."""

    __hash__ = object.__hash__  # members are singletons: identity hash, not Enum's hash(name) in Python (#12)
    TTFT = "ttft"  # queueing + prefill + prefix fetch
    TPOT = "tpot"  # decode steps


@dataclass(frozen=True)
class CorrectionConfig:
    """EWMA weight of a new sample, the clamp on one sample's measured/predicted ratio, and the
    upper quantile of the prediction error an admission check looks at (``quantile``: 0.9 = the
    90th percentile), tracked in steps of ``quantile_step`` (log units per sample) and used once
    ``min_spread_samples`` samples were seen (:meth:`OnlineCorrectedLatency.spread`)."""

    alpha: float = 0.2
    min_ratio: float = 0.05
    max_ratio: float = 20.0
    quantile: float = 0.9
    quantile_step: float = 0.1
    min_spread_samples: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1 or not 0 < self.min_ratio <= 1 <= self.max_ratio:
            raise ValueError("need 0 < alpha <= 1 and 0 < min_ratio <= 1 <= max_ratio")
        if not 0 < self.quantile < 1 or self.quantile_step <= 0 or self.min_spread_samples < 1:
            raise ValueError("need 0 < quantile < 1, quantile_step > 0 and min_spread_samples >= 1")


class OnlineCorrectedLatency:
    """A latency model whose predictions are multiplied by learnt correction factors.

    ``prefill_time``/``transfer_time`` are scaled by the TTFT factor, ``decode_time`` by the TPOT
    factor; both start at 1 and are set by the median of the first samples (calibration).
    :meth:`observe` then folds in one measured/base-predicted ratio (clamped)
    with an EWMA of its logarithm (a geometric mean: errors are multiplicative, and a few requests
    caught in a burst, 10x late, must not multiply every later prediction by several times), and
    moves the tracked upper quantile of the log error (:meth:`spread`).
    Thread-safe (the router observes from many request threads).
    """

    def __init__(self, base: DecodeLatencyEstimator, config: CorrectionConfig | None = None) -> None:
        self.base = base
        self.config = config or CorrectionConfig()
        self.kv_bytes_per_token = base.kv_bytes_per_token
        self._factor = {p: 1.0 for p in Phase}
        # the tracked ``quantile`` of the log error around the factor, >= 0 (see spread())
        self._upper = {p: 0.0 for p in Phase}
        self._samples = {p: 0 for p in Phase}
        self._first: dict[Phase, list[float]] = {p: [] for p in Phase}  # calibration log ratios
        self._anchor = {p: (0.0, 0.0) for p in Phase}  # (log factor, quantile) after the last sample
        self._lock = threading.Lock()

    def factor(self, phase: Phase) -> float:
        return self._factor[phase]

    def spread(self, phase: Phase) -> float:
        """Multiplier from the corrected (mean) prediction to its ``quantile`` upper quantile,
        ``exp(u)`` with ``u`` the tracked ``quantile`` of the log error ``log(measured /
        corrected prediction)``, at least 1; 1 until ``min_spread_samples`` samples. An admission
        check on ``prediction * spread`` keeps that share of admitted requests within the SLO.

        ``u`` is tracked by stochastic approximation (the online quantile estimator): a sample
        above it raises it by ``quantile_step * quantile``, one at or below lowers it by
        ``quantile_step * (1 - quantile)``, so it settles where that share of errors lies above.
        One sample moves it by a bounded step however far off it is: a single outlier (a request
        caught behind a host stall, a cold first handoff) widens it by ``exp(0.09)`` at most, not
        by its squared size (an EWMA of squared errors made one 2.4x-slow request halve the TTFT
        admission limit of every later request, issue #19). Faster-than-predicted samples only
        ever lower it (a model that over-predicts short prompts does not make admission stricter);
        it never goes below 0 (the check never looks below the corrected mean). The first
        ``min_spread_samples`` samples only calibrate the factor: their errors are mostly the
        factor's own convergence from 1 (a profile 25% slow made the old spread 1.26 after the
        bench's warm-up, every later limit 21% stricter), not the model's spread."""
        c = self.config
        if self._samples[phase] < c.min_spread_samples:
            return 1.0
        return math.exp(self._upper[phase])

    def relax(self, phase: Phase, weight: float) -> None:
        """Set ``phase``'s log factor and tracked error quantile to ``weight`` (in [0, 1]) times
        their values after its last sample (the model's own prediction at 0): a correction no
        sample has confirmed for a while fades. The next sample goes on from the relaxed values."""
        w = min(1.0, max(0.0, weight))
        with self._lock:
            log_f, u = self._anchor[phase]
            self._factor[phase] = math.exp(log_f * w)
            self._upper[phase] = u * w

    def upper_log_error(self, phase: Phase) -> float:
        """The tracked upper quantile of the log error (``log(spread)`` once enough samples)."""
        return self._upper[phase]

    def samples(self, phase: Phase) -> int:
        """How many measurements have corrected ``phase`` so far."""
        return self._samples[phase]

    def observe(self, phase: Phase, base_predicted_s: float, measured_s: float) -> bool:
        """Fold in one sample: ``base_predicted_s`` is the *uncorrected* model's prediction.

        The sample's own factor ``measured / base_predicted`` (clamped to the config's ratio
        bounds) moves the log of the phase's factor by ``alpha`` towards its log, once the phase
        is calibrated: its first ``min_spread_samples`` samples set the factor to their median
        (geometric), so a model 2x off is corrected by the warm-up's few samples (an EWMA from 1
        was still 1.2x off after the bench's 8), and one outlier among them is ignored. Returns
        False (and learns nothing) for non-positive or non-finite values.
        """
        if not (
            base_predicted_s > 0
            and measured_s > 0
            and math.isfinite(base_predicted_s)
            and math.isfinite(measured_s)
        ):
            return False
        c = self.config
        f = min(c.max_ratio, max(c.min_ratio, measured_s / base_predicted_s))
        with self._lock:
            log_f = math.log(self._factor[phase])
            err = math.log(f) - log_f  # this sample's log error against the current correction
            first = self._first[phase]
            if len(first) < c.min_spread_samples:  # calibration: the median of the samples so far
                first.append(math.log(f))
                self._factor[phase] = math.exp(statistics.median(first))
            else:
                u = self._upper[phase]
                if err > u:
                    u += c.quantile_step * c.quantile
                else:
                    u -= c.quantile_step * (1 - c.quantile)
                self._upper[phase] = u if u > 0 else 0.0
                self._factor[phase] = math.exp(log_f + c.alpha * err)
            self._samples[phase] += 1
            self._anchor[phase] = (math.log(self._factor[phase]), self._upper[phase])
        return True

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float:
        return self._factor[Phase.TTFT] * self.base.prefill_time(tokens, contexts)

    def transfer_time(self, nbytes: float) -> float:
        return self._factor[Phase.TTFT] * self.base.transfer_time(nbytes)

    def decode_time(self, batch_size: int, total_context: int) -> float:
        return self._factor[Phase.TPOT] * self.base.decode_time(batch_size, total_context)

    def prefill_time_each(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> list[float]:
        """:func:`prefill_time_each` of the base model, corrected (equal to per-item calls)."""
        f = self._factor[Phase.TTFT]
        return [f * t for t in prefill_time_each(self.base, tokens, contexts)]

    def decode_time_each(self, batch_sizes: Sequence[int], contexts: Sequence[int]) -> list[float]:
        """:func:`decode_time_each` of the base model, corrected (equal to per-item calls)."""
        f = self._factor[Phase.TPOT]
        return [f * t for t in decode_time_each(self.base, batch_sizes, contexts)]


class WithDecode:
    """Completes a prefill-only :class:`~router.policy.protocols.LatencyEstimator` with the decode
    side of another model (default: :class:`LinearLatency`'s seed coefficients)."""

    def __init__(self, prefill: object, decode: DecodeLatencyEstimator | None = None) -> None:
        self.prefill = prefill
        self.decode = decode or LinearLatency()
        self.kv_bytes_per_token = int(prefill.kv_bytes_per_token)  # type: ignore[attr-defined]

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float:
        return self.prefill.prefill_time(tokens, contexts)  # type: ignore[attr-defined]

    def transfer_time(self, nbytes: float) -> float:
        return self.prefill.transfer_time(nbytes)  # type: ignore[attr-defined]

    def decode_time(self, batch_size: int, total_context: int) -> float:
        return self.decode.decode_time(batch_size, total_context)

    def prefill_time_each(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> list[float]:
        return prefill_time_each(self.prefill, tokens, contexts)

    def decode_time_each(self, batch_sizes: Sequence[int], contexts: Sequence[int]) -> list[float]:
        return decode_time_each(self.decode, batch_sizes, contexts)


def prefill_time_each(
    model: object, tokens: Sequence[int], contexts: Sequence[int] | None = None
) -> list[float]:
    """``model.prefill_time([t], [c])`` for each ``t`` (and ``c``; None: no context): the model's
    own ``prefill_time_each`` when it has one (it must equal the per-item calls), else a call per
    item. Placement prices every instance's queue in one call per decision through this."""
    each = getattr(model, "prefill_time_each", None)
    if each is not None:
        return each(tokens, contexts)
    one = model.prefill_time  # type: ignore[attr-defined]
    if contexts is None:
        return [one([t]) for t in tokens]
    return [one([t], [c]) for t, c in zip(tokens, contexts, strict=True)]


def decode_time_each(model: object, batch_sizes: Sequence[int], contexts: Sequence[int]) -> list[float]:
    """``model.decode_time(b, c)`` for each pair: the model's ``decode_time_each`` when it has one,
    else a call per item."""
    each = getattr(model, "decode_time_each", None)
    if each is not None:
        return each(batch_sizes, contexts)
    one = model.decode_time  # type: ignore[attr-defined]
    return [one(b, c) for b, c in zip(batch_sizes, contexts, strict=True)]


def decode_time_array(model: object, batch_sizes: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """:func:`decode_time_each` over numpy arrays, bit for bit (float64 elementwise arithmetic in
    the same order as the per-item expression): vectorised for :class:`LinearLatency` and an
    :class:`OnlineCorrectedLatency` of one, else the per-item values in an array. Placement
    prices a whole decode pool per decision through this."""
    if isinstance(model, OnlineCorrectedLatency):
        base = model.base
        if isinstance(base, LinearLatency):
            return model.factor(Phase.TPOT) * _linear_decode(base, batch_sizes, contexts)
    elif isinstance(model, LinearLatency):
        return _linear_decode(model, batch_sizes, contexts)
    return np.array(decode_time_each(model, batch_sizes.tolist(), contexts.tolist()), dtype=np.float64)


def _linear_decode(m: LinearLatency, n: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``0.0 if n <= 0 else d0 + d1 * n + d2 * c`` per item."""
    t = (
        m.decode_base_s
        + m.decode_per_seq_s * n.astype(np.float64)
        + m.decode_per_ctx_token_s * c.astype(np.float64)
    )
    return np.where(n <= 0, 0.0, t)
