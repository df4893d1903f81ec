"""Output-length predictor: learns from observed requests, reports its accuracy honestly."""

from __future__ import annotations

import math
import random

import pytest

from router.policy import LengthPredictor, LengthPredictorConfig, LengthSample


def workload(n: int, seed: int) -> list[LengthSample]:
    """Output ~ 0.5 * max_tokens for short prompts, ~ 0.1 * max_tokens for long ones, +-20% noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.choice([rng.randint(10, 60), rng.randint(800, 1500)])
        cap = rng.choice([64, 256, 1024])
        frac = 0.5 if prompt < 100 else 0.1
        out.append(LengthSample(prompt, cap, max(1, round(cap * frac * rng.uniform(0.8, 1.2)))))
    return out


def test_prior_before_enough_samples_clamped_to_cap() -> None:
    p = LengthPredictor(LengthPredictorConfig(prior_tokens=100, min_samples=4))
    assert p.predict(50) == 100
    assert p.predict(50, max_tokens=16) == 16
    assert math.isnan(p.accuracy([]).mae)


def test_learns_from_observations_and_beats_the_prior_on_held_out() -> None:
    train, test = workload(400, seed=1), workload(200, seed=2)
    prior = LengthPredictor()
    before = prior.accuracy(test)
    p = LengthPredictor()
    p.fit(train)
    after = p.accuracy(test)
    assert after.n == 200 and p.num_samples == 400
    assert after.mae < 0.5 * before.mae
    assert after.within_2x >= 0.9 > before.within_2x
    # short prompts are predicted to run longer than long prompts under the same cap
    assert p.predict(30, 1024) > 3 * p.predict(1200, 1024)
    for s in test:
        assert 1 <= p.predict(s.prompt_tokens, s.max_tokens) <= s.max_tokens


def test_online_accuracy_is_prequential() -> None:
    p = LengthPredictor(LengthPredictorConfig(prior_tokens=500, min_samples=8))
    samples = [LengthSample(100, 0, 20)] * 50
    p.fit(samples)
    online = p.online
    assert online.n == 50
    # the first 8 were scored against the prior (|500 - 20|), the rest against a near-exact model
    assert online.mae == pytest.approx(8 * 480 / 50, rel=0.05)
    assert online.within_2x == pytest.approx(42 / 50)
    assert p.predict(100) == 20


def test_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        LengthPredictor().observe(LengthSample(-1, 0, 3))
