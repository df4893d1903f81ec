"""router.policy.length_predictor solves its ridge system with np.linalg.solve's gufunc directly
(#12: once per routed request): the weights and every prediction are bit for bit those of
np.linalg.solve, the prequential score included."""

from __future__ import annotations

import math
import random

import numpy as np

from router.policy.length_predictor import LengthPredictor, LengthSample, _features, ridge_solve


def _reference_weights(lp: LengthPredictor) -> np.ndarray:
    reg = lp.config.ridge * np.eye(lp.DIM)
    reg[0, 0] = 1e-6
    return np.linalg.solve(lp._a + reg, lp._b)


def _reference_predict(w: np.ndarray | None, prior: int, prompt: int, max_tokens: int) -> int:
    guess = float(prior) if w is None else math.expm1(float(_features(prompt, max_tokens) @ w))
    if max_tokens > 0:
        guess = min(guess, float(max_tokens))
    return max(1, round(guess))


def test_ridge_solve_is_np_linalg_solve_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        x = rng.normal(size=(16, 4))
        a = x.T @ x + np.diag([1e-6, 1.0, 1.0, 1.0])
        b = rng.normal(size=4)
        assert np.array_equal(ridge_solve(a, b), np.linalg.solve(a, b))


def test_weights_predictions_and_online_score_match_np_linalg_solve() -> None:
    rnd = random.Random(3)
    lp = LengthPredictor()
    n = within = 0
    abs_err = 0
    for _ in range(400):
        p, m, out = rnd.randint(0, 5000), rnd.choice([0, 16, 32, 256, 4096]), rnd.randint(0, 4096)
        w = _reference_weights(lp) if lp.num_samples >= lp.config.min_samples else None
        ref = _reference_predict(w, lp.config.prior_tokens, p, m)
        assert lp.predict(p, m) == ref
        if w is not None:
            assert np.array_equal(lp._weights(), w)
        lp.observe(LengthSample(p, m, out))  # scored by the same prediction, then learnt
        n += 1
        abs_err += abs(ref - out)
        a = max(1, out)
        within += int(a / 2 <= ref <= 2 * a)
    acc = lp.online
    assert acc.n == n and acc.mae == abs_err / n and acc.within_2x == within / n
