"""Skip-join in the real engine (#15 part 2): a request enters the MLFQ level of its prompt's
prefill time as the engine predicts it from its own measured prefill steps
(``RateEstimator.predict_prefill_seconds``, wired into the scheduler as ``prefill_time``).

test_mlfq.py checks the scheduler with a given ``prefill_time``; this checks the engine gives it
its measured one (a scheduler without it puts every request on level 0)."""

from __future__ import annotations

import pytest

from engine import mlfq
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulingPolicy

PARAMS = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(tiny_models):
    cfg = EngineConfig(
        num_kv_blocks=64,
        max_num_batched_tokens=512,
        scheduling_policy=SchedulingPolicy.MLFQ,
        mlfq_base_prefill_s=0.05,
        mlfq_num_levels=4,
    )
    eng = LLMEngine.from_pretrained(tiny_models["llama"], cfg)
    try:
        yield eng
    finally:
        eng.close()


def _level(eng: LLMEngine, rid: str, n: int) -> int:
    eng.add_request(rid, [3 + i % 300 for i in range(n)], PARAMS)
    return eng.scheduler.requests[rid].mlfq_level


def test_levels_follow_the_engines_measured_prefill_time(engine) -> None:
    eng = engine
    # nothing measured yet: every prompt is predicted free and joins the top level
    assert eng.rates.predict_prefill_seconds(200) == 0.0
    assert _level(eng, "cold", 200) == 0
    # the engine's prefill steps as measured: 1 ms per prompt token, no fixed cost
    for n in (16, 64, 256, 32, 128):
        eng.rates.observe_prefill(n, n * 1e-3)
    want = {"short": (10, 0), "mid": (90, 1), "long": (200, 2), "huge": (500, 3)}
    for rid, (n, level) in want.items():
        pred = eng.rates.predict_prefill_seconds(n)
        assert pred == pytest.approx(n * 1e-3, rel=1e-6)
        assert mlfq.skip_join_level(pred, 0.05, 4) == level
        assert _level(eng, rid, n) == level, rid


def test_a_real_run_measures_the_prefill_steps_the_levels_come_from(engine) -> None:
    eng = engine
    eng.generate([list(range(3, 40)), list(range(3, 200))], PARAMS)
    assert eng.rates.prefill_tokens_per_s is not None and eng.rates.prefill_tokens_per_s > 0
    pred = eng.rates.predict_prefill_seconds(300)
    assert pred > 0
    assert _level(eng, "after", 300) == mlfq.skip_join_level(pred, 0.05, 4)
