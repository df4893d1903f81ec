"""Output-length predictor: online ridge regression on prompt features, learnt from finished requests.

Features of a request: ``[1, log1p(prompt tokens), log1p(max_tokens), [max_tokens known]]``;
target ``log1p(output tokens)`` (lengths are heavy-tailed: a log target makes errors relative).
The normal equations are accumulated online (``A += x x^T``, ``b += x y``) and solved with a
ridge term on demand, so learning is O(d^2) per observation and needs no stored history.
Before ``min_samples`` observations the predictor answers a prior: ``min(max_tokens, prior)``.
Predictions are clamped to ``[1, max_tokens]`` (``max_tokens`` 0: unknown, no upper clamp).

Accuracy is reported two ways: :meth:`accuracy` on held-out observations, and
:attr:`online` prequentially (each observation is scored with the prediction made *before* it
was learnt). Pure: numpy only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

try:  # the gufunc np.linalg.solve calls for a vector right-hand side (same LAPACK gesv)
    from numpy.linalg import _umath_linalg

    _SOLVE1 = getattr(_umath_linalg, "solve1", None)
except ImportError:  # pragma: no cover - a numpy without it: np.linalg.solve
    _SOLVE1 = None


def ridge_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.linalg.solve(a, b)`` for a float64 symmetric positive definite ``a`` (the ridge
    system: the caller's guarantee) and vector ``b``, bit for bit, without the wrapper's
    per-call checks and error-state context (most of its ~12 us at d=4, called once per
    routed request, #12): its gufunc directly, or ``np.linalg.solve`` where numpy has none."""
    if _SOLVE1 is None:  # pragma: no cover
        return np.linalg.solve(a, b)
    w = _SOLVE1(a, b, signature="dd->d")
    if not np.isfinite(w).all():  # numerically singular after all: np.linalg.solve's own error
        return np.linalg.solve(a, b)
    return w


@dataclass(frozen=True)
class LengthSample:
    """One finished request: its prompt length, its cap (0: none) and what it produced."""

    prompt_tokens: int
    max_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthAccuracy:
    """``mae``: mean |predicted - actual| tokens; ``within_2x``: share with actual/2 <= pred <= 2*actual."""

    n: int
    mae: float
    within_2x: float


@dataclass(frozen=True)
class LengthPredictorConfig:
    prior_tokens: int = 128  # the guess before ``min_samples`` observations
    min_samples: int = 8
    ridge: float = 1.0


def _features(prompt_tokens: int, max_tokens: int) -> np.ndarray:
    known = 1.0 if max_tokens > 0 else 0.0
    return np.array([1.0, math.log1p(max(0, prompt_tokens)), math.log1p(max(0, max_tokens)), known])


def _clamp(guess: float, max_tokens: int) -> int:
    """A predicted length as tokens: at most ``max_tokens`` when that is > 0, at least 1."""
    if max_tokens > 0:
        guess = min(guess, float(max_tokens))
    return max(1, round(guess))


class _Scorer:
    def __init__(self) -> None:
        self.n = 0
        self.abs_err = 0.0
        self.within = 0

    def add(self, predicted: int, actual: int) -> None:
        self.n += 1
        self.abs_err += abs(predicted - actual)
        a = max(1, actual)
        self.within += int(a / 2 <= predicted <= 2 * a)

    def result(self) -> LengthAccuracy:
        if self.n == 0:
            return LengthAccuracy(0, math.nan, math.nan)
        return LengthAccuracy(self.n, self.abs_err / self.n, self.within / self.n)


class LengthPredictor:
    """Predicts how many tokens a request will generate (see module docstring). Thread-safe."""

    DIM = 4

    def __init__(self, config: LengthPredictorConfig | None = None) -> None:
        self.config = config or LengthPredictorConfig()
        self._a = np.zeros((self.DIM, self.DIM))
        # the ridge term, made once (the solve adds it to the normal matrix)
        self._reg = self.config.ridge * np.eye(self.DIM)
        self._reg[0, 0] = 1e-6  # do not shrink the intercept
        self._b = np.zeros(self.DIM)
        self._w: np.ndarray | None = None
        self._n = 0
        self._online = _Scorer()
        self._lock = threading.Lock()

    @property
    def num_samples(self) -> int:
        return self._n

    @property
    def online(self) -> LengthAccuracy:
        """Prequential accuracy: every observation scored by the prediction made before learning it."""
        return self._online.result()

    def predict(self, prompt_tokens: int, max_tokens: int = 0) -> int:
        """Predicted output tokens (>= 1; <= ``max_tokens`` when that is > 0)."""
        w = self._weights()
        if w is None:
            guess = float(self.config.prior_tokens)
        else:
            guess = math.expm1(float(_features(prompt_tokens, max_tokens) @ w))
        return _clamp(guess, max_tokens)

    def observe(self, sample: LengthSample) -> None:
        """Learn one finished request (scored first, for :attr:`online`)."""
        if sample.output_tokens < 0 or sample.prompt_tokens < 0:
            raise ValueError("token counts must be >= 0")
        x = _features(sample.prompt_tokens, sample.max_tokens)
        w = self._weights()  # the prediction made before learning it (as predict's, one feature row)
        guess = float(self.config.prior_tokens) if w is None else math.expm1(float(x @ w))
        pred = _clamp(guess, sample.max_tokens)
        y = math.log1p(sample.output_tokens)
        with self._lock:
            self._online.add(pred, sample.output_tokens)
            self._a += x[:, None] * x  # np.outer's products, without its Python wrapper (#12)
            self._b += x * y
            self._n += 1
            self._w = None

    def fit(self, samples: Iterable[LengthSample]) -> None:
        for s in samples:
            self.observe(s)

    def accuracy(self, held_out: Iterable[LengthSample]) -> LengthAccuracy:
        """MAE and within-2x share of the current model on ``held_out`` (not learnt from)."""
        sc = _Scorer()
        for s in held_out:
            sc.add(self.predict(s.prompt_tokens, s.max_tokens), s.output_tokens)
        return sc.result()

    def _weights(self) -> np.ndarray | None:
        with self._lock:
            if self._n < self.config.min_samples:
                return None
            if self._w is None:
                m = self._a + self._reg
                # ridge > 0: A (a sum of x x^T, its [0, 0] the sample count) plus the ridge term
                # is positive definite, so the bare solve never meets a singular system
                self._w = ridge_solve(m, self._b) if self.config.ridge > 0 else np.linalg.solve(m, self._b)
            return self._w
