"""EngineConfig.offline_batch (issue #15 part 4): an offline throughput job over offloaded weights
runs with ``max_num_seqs`` set to the offload cost model's batch size; the batch it runs is the
one chosen, its output equals the resident model's, and contradictory settings are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.offload as offload_mod
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.offload import Bandwidths, fixed_nbytes, layer_nbytes, offline_batch_size
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulingPolicy
from engine.spec_decode import SpeculativeConfig
from tests import offload_models

NUM_LAYERS = 8
BASE = dict(num_kv_blocks=128, block_size=16, max_num_batched_tokens=256, linear="torch")
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    return offload_models.deep_llama(tmp_path_factory, NUM_LAYERS, 77)


def _prompts(n: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [
        torch.randint(3, 320, (int(k),), generator=g).tolist()
        for k in torch.randint(4, 30, (n,), generator=g)
    ]


def _slow_copies(model, offload_dir, tokens: int = 16, reps: int = 5) -> Bandwidths:
    """Fixed rates (copies far slower than compute): the chosen batch is > 1 and deterministic."""
    n = len(model.model.layers)
    return Bandwidths(host_bw=5e7, disk_bw=2.5e7, compute_s=tuple(4.8e-3 for _ in range(n)), tokens=tokens)


def test_offline_batch_is_applied_and_output_equals_resident(deep_llama, monkeypatch):
    ref = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    want = [o.token_ids for o in ref.generate(_prompts(), GREEDY)]
    lb = layer_nbytes(ref.runner.model.model.layers[0])
    fixed = fixed_nbytes(ref.runner.model)
    ref.close()
    monkeypatch.setattr(offload_mod, "measure_rates", _slow_copies)
    cfg = EngineConfig(**BASE, max_num_seqs=16, weight_memory_budget_bytes=fixed + 4 * lb, offline_batch=True)
    eng = LLMEngine.from_pretrained(deep_llama, cfg)
    try:
        ch = eng.offline_batch
        assert ch is not None
        assert ch == offline_batch_size(eng.weight_offload, max_batch=16)  # what the cost model picks
        assert 1 < ch.batch_size < 16
        assert eng.config.max_num_seqs == ch.batch_size
        assert eng.scheduler.config.max_num_seqs == ch.batch_size
        seen: list[int] = []
        schedule = eng.scheduler.schedule

        def spy():
            out = schedule()
            seen.append(len(out.scheduled))
            return out

        eng.scheduler.schedule = spy
        got = [o.token_ids for o in eng.generate(_prompts(), GREEDY)]
        assert got == want
        assert max(seen) == ch.batch_size  # the running batch reached the choice, never above it
    finally:
        eng.close()


def test_offline_batch_bounded_by_the_kv_pool(deep_llama, monkeypatch):
    monkeypatch.setattr(offload_mod, "measure_rates", _slow_copies)
    ref = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    lb = layer_nbytes(ref.runner.model.model.layers[0])
    fixed = fixed_nbytes(ref.runner.model)
    ref.close()
    cfg = EngineConfig(
        **{**BASE, "num_kv_blocks": 3},
        max_num_seqs=64,
        weight_memory_budget_bytes=fixed + 4 * lb,
        offline_batch=True,
    )
    eng = LLMEngine.from_pretrained(deep_llama, cfg)
    try:
        assert eng.offline_batch is not None and eng.offline_batch.batch_size <= 3
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(offline_batch=True), "set weight_memory_budget_bytes or device_memory_budget_bytes"),
        (
            dict(offline_batch=True, weight_memory_budget_bytes=1, scheduling_policy=SchedulingPolicy.MLFQ),
            "scheduling_policy 'mlfq'",
        ),
        (
            dict(offline_batch=True, weight_memory_budget_bytes=1, speculative=SpeculativeConfig()),
            "speculative",
        ),
        (dict(offline_batch=1), "offline_batch must be a bool"),
    ],
)
def test_contradictory_settings_are_refused_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_resident_engine_has_no_offline_batch(deep_llama):
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    try:
        assert eng.offline_batch is None
    finally:
        eng.close()
