"""KV offloading's disk tier and packed staging buffers (#15 part 4, engine.kv_offload): the
offloaded layers beyond ``kv_host_budget_bytes`` keep their KV in a disk-backed pool (a
memory-mapped, unlinked file under ``kv_offload_dir``) with the same layer-ahead prefetch; the
staging buffers hold the blocks a step can use (``max_num_seqs`` x ``max_model_len``), not a
whole layer's pool, so offloading ``k`` layers saves ``k`` pools less two small buffers. Greedy
tokens and log-probs equal the resident engine's in every case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_offload import install, staging_bound
from engine.llm_engine import LLMEngine
from engine.offload_policy import kv_device_bytes, kv_placement
from engine.sampling_params import SamplingParams
from tests import offload_models
from tests.tiny_models import COMMON

NUM_LAYERS = 8
BLOCKS = 64
BS = 16
HEAD_DIM = COMMON["hidden_size"] // COMMON["num_attention_heads"]
BLOCK = 2 * BS * COMMON["num_key_value_heads"] * HEAD_DIM * 4  # one block of one layer, fp32
LAYER_KV = BLOCKS * BLOCK
SEQS, MAX_LEN = 4, 128
STAGING = SEQS * (MAX_LEN // BS) + 1  # staging_bound: 33 of the 64 blocks
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
BASE = dict(
    num_kv_blocks=BLOCKS,
    block_size=BS,
    max_num_batched_tokens=96,
    max_num_seqs=SEQS,
    max_model_len=MAX_LEN,
    linear="torch",  # KV offloading runs the unfused forward; the reference takes it too
)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    return offload_models.deep_llama(tmp_path_factory, NUM_LAYERS, 2468)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(13)
    shared = torch.randint(3, 320, (20,), generator=g).tolist()
    out = []
    for i, k in enumerate((5, 40, 30, 17, 33, 9)):
        p = torch.randint(3, 320, (k,), generator=g).tolist()
        out.append(shared + p if i % 2 else p)
    return out


@pytest.fixture(scope="module")
def resident(deep_llama):
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    out = offload_models.run(eng, _prompts(), GREEDY), offload_models.run(eng, _prompts()[:3], GREEDY)
    eng.close()
    return out


def test_staging_bound():
    assert staging_bound(BLOCKS, BS, SEQS, MAX_LEN) == STAGING == 33
    assert staging_bound(BLOCKS, BS, 64, MAX_LEN) == BLOCKS  # never over the pool
    assert staging_bound(1000, 16, 2, 100, lookahead=4) == 2 * 7 + 1


def test_packed_staging_saves_more_and_output_equals_resident(deep_llama, resident):
    want, want2 = resident
    k = 4
    budget = kv_device_bytes(NUM_LAYERS, LAYER_KV, STAGING * BLOCK, k)
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE, kv_memory_budget_bytes=budget))
    try:
        kvo = eng.kv_offload
        assert kvo is not None
        p = kvo.placement
        assert len(p.offloaded) == k and p.staging == STAGING and kvo.capacity == STAGING
        assert kvo.nbytes == p.device_bytes == budget  # what the device really holds
        saved = NUM_LAYERS * LAYER_KV - kvo.nbytes
        assert saved == k * LAYER_KV - 2 * STAGING * BLOCK
        assert saved > (k - 2) * LAYER_KV  # whole-pool buffers saved k - 2 layers (here: 2.97)
        assert offload_models.run(eng, _prompts(), GREEDY) == want
        assert offload_models.run(eng, _prompts()[:3], GREEDY) == want2  # prefix-cache hits
        st = kvo.snapshot()
        assert st.staging_overflows == 0 and st.read_bytes > 0 and st.write_bytes > 0
        # a read moves only the step's blocks, never more than the buffer holds
        assert st.read_bytes <= st.reads * STAGING * BLOCK
    finally:
        eng.close()


@pytest.mark.parametrize(("offloaded", "host_layers"), [(6, 2), (8, 0)], ids=["host+disk", "all-disk"])
def test_disk_tier_output_equals_resident(deep_llama, resident, tmp_path, offloaded, host_layers):
    want, want2 = resident
    budget = kv_device_bytes(NUM_LAYERS, LAYER_KV, STAGING * BLOCK, offloaded)
    cfg = EngineConfig(
        **BASE,
        kv_memory_budget_bytes=budget,
        kv_host_budget_bytes=host_layers * LAYER_KV,
        kv_offload_dir=str(tmp_path),
    )
    eng = LLMEngine.from_pretrained(deep_llama, cfg)
    try:
        kvo = eng.kv_offload
        assert kvo is not None
        p = kvo.placement
        assert len(p.offloaded) == offloaded and len(p.disk) == offloaded - host_layers
        assert p.host_bytes == host_layers * LAYER_KV and p.disk_bytes == len(p.disk) * LAYER_KV
        assert os.listdir(tmp_path) == []  # the pool's file is unlinked (the mapping keeps it)
        assert offload_models.run(eng, _prompts(), GREEDY) == want
        assert offload_models.run(eng, _prompts()[:3], GREEDY) == want2
        assert kvo.snapshot().read_bytes > 0
        # whole-block gathers / scatters (swap, export / import) read and write the disk pool
        src = torch.randn(2, NUM_LAYERS, 2, BS, COMMON["num_key_value_heads"], HEAD_DIM)
        eng.runner.import_blocks([60, 61], src)
        assert torch.equal(eng.runner.export_blocks([60, 61]), src)
        d = p.disk[0]
        assert torch.equal(kvo.host_kv[p.offloaded.index(d)][:, 61], src[1, d])
    finally:
        eng.close()


def test_a_step_over_the_staging_bound_grows_the_buffers(deep_llama, resident):
    """A placement whose staging buffers are too small for a step (a bound that did not hold):
    the buffers grow, counted, and the output is still the resident one."""
    want, _ = resident
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    try:
        eng.kv_offload = install(
            eng.runner, eng.kv, kv_placement(NUM_LAYERS, BLOCKS, BLOCK, (2, 5, 7), staging_blocks=2)
        )
        assert eng.kv_offload.capacity == 2
        assert offload_models.run(eng, _prompts(), GREEDY) == want
        assert eng.kv_offload.snapshot().staging_overflows > 0 and eng.kv_offload.capacity > 2
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(kv_host_budget_bytes=1), "need KV offloading"),
        (dict(kv_offload_dir="/tmp"), "need KV offloading"),
        (dict(kv_memory_budget_bytes=10, kv_host_budget_bytes=-1), "kv_host_budget_bytes must be"),
    ],
)
def test_kv_tier_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)
