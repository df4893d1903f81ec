"""A worker's start-up step-time profile (issue #19): pure fitting, measured once then cached,
re-measured when the engine version changes."""

from __future__ import annotations

import json

import pytest

from engine import profile
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.profile_fit import DecodeSample, PrefillSample, StepModel, fit_step_model


def test_fit_recovers_linear_coefficients() -> None:
    pre = [PrefillSample(t, 0.02 + 0.001 * t) for t in (16, 64, 256)]
    dec = [DecodeSample(b, c, 0.01 + 0.002 * b + 1e-5 * c) for b, c in ((1, 20), (4, 80), (4, 600), (8, 200))]
    m = fit_step_model(pre, dec)
    assert m.prefill_base_s == pytest.approx(0.02) and m.prefill_per_token_s == pytest.approx(0.001)
    assert m.decode_base_s == pytest.approx(0.01)
    assert m.decode_per_seq_s == pytest.approx(0.002)
    assert m.decode_per_ctx_token_s == pytest.approx(1e-5)
    assert StepModel.from_dict(m.to_dict()) == m


def test_fit_never_yields_a_negative_coefficient() -> None:
    # a steep prefill line through the origin would need a negative base: it is 0, slope refitted
    pre = [PrefillSample(32, 1.35), PrefillSample(128, 2.8), PrefillSample(384, 23.0)]
    dec = [DecodeSample(1, 16, 0.5), DecodeSample(4, 64, 0.4)]  # noise: larger batch faster
    m = fit_step_model(pre, dec)
    assert m.prefill_base_s == 0.0 and m.prefill_per_token_s > 0
    assert all(v >= 0 for v in m.to_dict().values())
    assert m.decode_time(4, 64) > 0


def test_fit_refuses_too_few_points() -> None:
    with pytest.raises(ValueError, match="token counts"):
        fit_step_model([PrefillSample(16, 0.1)], [DecodeSample(1, 1, 0.1), DecodeSample(2, 2, 0.1)])
    with pytest.raises(ValueError, match="batch sizes"):
        fit_step_model([PrefillSample(16, 0.1), PrefillSample(32, 0.2)], [DecodeSample(1, 1, 0.1)])
    with pytest.raises(ValueError, match="positive"):
        fit_step_model(
            [PrefillSample(16, 0.0), PrefillSample(32, 0.2)],
            [DecodeSample(1, 1, 0.1), DecodeSample(2, 2, 0.1)],
        )
    with pytest.raises(ValueError, match="unknown"):
        StepModel.from_dict({"prefill_base_s": 1.0, "bogus": 2.0})


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=128))
    yield e
    e.close()


class _Counting:
    """Wraps :func:`engine.profile.measure` (the real one), counting calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = profile.measure

    def __call__(self, eng):
        self.calls += 1
        return self.real(eng)


def test_profile_measured_once_then_read_from_cache(engine, tiny_models, tmp_path, monkeypatch) -> None:
    counting = _Counting()
    monkeypatch.setattr(profile, "measure", counting)
    first = profile.load_or_measure(engine, tiny_models["llama"], tmp_path)
    assert not first.cached and counting.calls == 1
    assert first.model.prefill_time(256) > 0 and first.model.decode_time(4, 64) > 0
    assert not engine.has_unfinished()  # the measurement leaves the engine idle
    saved = json.loads(first.path.read_text())
    assert saved["key"]["engine_profile_version"] == profile.ENGINE_PROFILE_VERSION
    assert 2 <= len(saved["samples"]["prefill"]) <= len(profile.PREFILL_TOKENS)
    second = profile.load_or_measure(engine, tiny_models["llama"], tmp_path)
    assert second.cached and counting.calls == 1  # read, not measured again
    assert second.model == first.model and second.path == first.path


def test_changed_engine_version_remeasures(engine, tiny_models, tmp_path, monkeypatch) -> None:
    counting = _Counting()
    monkeypatch.setattr(profile, "measure", counting)
    a = profile.load_or_measure(engine, tiny_models["llama"], tmp_path)
    monkeypatch.setattr(profile, "ENGINE_PROFILE_VERSION", profile.ENGINE_PROFILE_VERSION + "-next")
    b = profile.load_or_measure(engine, tiny_models["llama"], tmp_path)
    assert not b.cached and counting.calls == 2 and b.path != a.path
    assert b.key.engine_profile_version.endswith("-next")
    # another model (its config hash differs) is another key, too
    other = profile.profile_key(engine, tiny_models["qwen2"])
    assert other.digest() != b.key.digest()


def test_the_attention_backend_the_engine_resolved_is_part_of_the_key(engine, tiny_models) -> None:
    """A backend named in EngineConfig (not only PDSERVE_ATTENTION) changes step times: another key."""
    gather = LLMEngine.from_pretrained(
        tiny_models["llama"], EngineConfig(num_kv_blocks=128, attention_backend="gather")
    )
    try:
        a = profile.profile_key(engine, tiny_models["llama"])
        g = profile.profile_key(gather, tiny_models["llama"])
        assert f"attention={gather.runner.decode_backend.value}" in g.dtype
        assert (a.digest() != g.digest()) == (
            engine.runner.decode_backend is not gather.runner.decode_backend
        )
    finally:
        gather.close()


def test_a_corrupt_or_foreign_cache_file_is_measured_over(engine, tiny_models, tmp_path, monkeypatch) -> None:
    key = profile.profile_key(engine, tiny_models["llama"])
    (tmp_path / f"{key.digest()}.json").write_text("{not json")
    monkeypatch.setattr(
        profile,
        "measure",
        lambda e: (
            [PrefillSample(8, 0.1), PrefillSample(64, 0.3)],
            [DecodeSample(1, 8, 0.05), DecodeSample(4, 32, 0.08)],
        ),
    )
    got = profile.load_or_measure(engine, tiny_models["llama"], tmp_path)
    assert not got.cached and got.model.prefill_per_token_s == pytest.approx(0.2 / 56)
    assert profile.read_cached(key, tmp_path) == got.model


def test_a_spent_budget_still_measures_the_required_points(engine) -> None:
    pre, dec = profile.measure(engine, budget_s=0.0)
    # one round, two points (the long one capped below the tiny model's 512 positions)
    assert [s.tokens for s in pre] == list(profile.prefill_grid(engine.max_model_len)[:2])
    assert pre[1].tokens == min(512, engine.max_model_len - 16)
    assert [s.batch for s in dec] == [b for b, _ in profile.DECODE_GRID[:2]]
    assert fit_step_model(pre, dec).prefill_per_token_s >= 0
    assert not engine.has_unfinished()


def test_startup_profile_switch(monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_STARTUP_PROFILE", "off")
    assert not profile.enabled()
    monkeypatch.setenv("PDSERVE_STARTUP_PROFILE", "maybe")
    with pytest.raises(ValueError, match="PDSERVE_STARTUP_PROFILE"):
        profile.enabled()


def test_worker_state_load_profiles_its_engine_then_reports_it(tiny_models, tmp_path, monkeypatch) -> None:
    """A worker's start-up: measured before its engine loop runs (the loop would take the
    measurement's outputs), then sent in RegisterRequest.profile."""
    from pdserve.worker_base import Role, WorkerConfig, WorkerState, profile_proto

    monkeypatch.setenv("PDSERVE_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("PDSERVE_STARTUP_PROFILE", "on")
    cfg = WorkerConfig(
        "w0", Role.DECODE, str(tiny_models["llama"]), "", engine=EngineConfig(num_kv_blocks=128)
    )
    state = WorkerState.load(cfg)
    try:
        assert state.profile is not None and not state.profile.cached
        msg = profile_proto(state.profile)
        assert msg.key == state.profile.key.digest()
        assert msg.decode_base_s == state.profile.model.decode_base_s
        assert state.profile.path.is_file()
    finally:
        state.close()


def test_the_prefill_grid_reaches_long_prompts_within_the_model_length() -> None:
    """The linear fit must see prompts as long as the ones served (up to 512 tokens), capped below
    the model's length, without duplicates."""
    assert profile.prefill_grid(2048) == (16, 512, 128, 256, 64)
    assert profile.prefill_grid(512) == (16, 496, 128, 256, 64)
    assert profile.prefill_grid(100) == (16, 84, 64)
    assert profile.prefill_grid(10) == (1,)


def test_a_cpu_step_is_timed_by_the_cpu_it_used_not_its_wait_for_a_core(monkeypatch) -> None:
    """On a busy host a step waits for a core: wall time grows, CPU time does not. A CPU timer
    takes CPU time per engine thread when it is less (a profile measured under load 9-13 on 2
    cores was 5-7x slow, and cached); any other device keeps wall time."""
    clock = {"wall": 100.0, "cpu": 10.0}
    monkeypatch.setattr(profile.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(profile.time, "process_time", lambda: clock["cpu"])
    cpu, gpu = profile.StepTimer(2), profile.StepTimer(None)
    t_cpu, t_gpu = cpu.start(), gpu.start()
    clock["wall"] += 3.0  # 3 s of wall time, 2 s of CPU on each of 2 threads: 1 s of waiting
    clock["cpu"] += 4.0
    assert cpu.elapsed(t_cpu) == pytest.approx(2.0)
    assert gpu.elapsed(t_gpu) == pytest.approx(3.0)
    t = cpu.start()
    clock["wall"] += 1.0  # more CPU than wall per thread (other threads of the process): wall
    clock["cpu"] += 5.0
    assert cpu.elapsed(t) == pytest.approx(1.0)


def test_the_grids_fit_a_small_kv_pool() -> None:
    """A pool of 16 blocks x 16 tokens (``pdserve serve --kv-blocks 16``) holds no 496-token prompt
    and no batch of four 104-token sequences: the points shrink to what it holds."""
    assert profile.prefill_grid(512, 256) == (16, 240, 128, 64)
    assert profile.decode_grid(1 << 30, 16, 512) == profile.DECODE_GRID
    # batch 4 may use 4 blocks (64 tokens) per sequence: 56-token prompts plus 8 decoded tokens
    assert profile.decode_grid(16, 16, 512) == ((1, 16), (4, 16), (1, 192), (4, 56))
    assert profile.decode_grid(3, 16, 512) == ((1, 16), (1, 40))  # no batch of 4 fits


def test_a_worker_with_a_small_kv_pool_measures_its_profile(tiny_models, tmp_path) -> None:
    """Found on a fresh machine: `pdserve serve --kv-blocks 16` failed to start ("cannot load
    model: prompt of 496 tokens needs more KV blocks than this engine has (16 x 16 tokens)"): the
    start-up profile's grid ignored the pool. Now it measures within it, and its cache key says so."""
    small = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=16, block_size=16))
    pre, dec = profile.measure(small, budget_s=0.0)
    assert [s.tokens for s in pre] == [16, 240]
    assert [s.batch for s in dec] == [1, 4]
    assert fit_step_model(pre, dec).prefill_per_token_s >= 0 and not small.has_unfinished()
    big = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=128, block_size=16))
    k_small, k_big = (
        profile.profile_key(small, tiny_models["llama"]),
        profile.profile_key(big, tiny_models["llama"]),
    )
    assert k_small != k_big and "|grids=" in k_small.dtype and "|grids=" not in k_big.dtype
    tiny = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=3, block_size=16))
    with pytest.raises(ValueError, match=r"KV pool \(3 blocks of 16 tokens\) is too small .*--kv-blocks"):
        profile.measure(tiny)
