"""CUDA path of the engine's disk KV tier: spilled host blocks are pinned memory the side stream
copied into (synchronized before the disk write), and promotions refill pinned host slots after
the step's swap-ins read them. Skipped without a CUDA device (tests/conftest.py).

Written without a CUDA machine at hand: not run yet (the CPU tests cover the same code path)."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

BLOCK_NBYTES = 2 * 2 * 16 * 2 * 16 * 4  # the tiny Llama's fp32 KV block


def test_disk_tier_resume_identical_on_cuda(tiny_models, tmp_path):
    path = tiny_models["llama"]
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(10, 40, (16,), generator=g).tolist()
    prompts = [torch.randint(3, 320, (k,), generator=g).tolist() for k in lens]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = LLMEngine.from_pretrained(path, EngineConfig(device="cuda", dtype="float32", num_kv_blocks=256))
    ref = [o.token_ids for o in roomy.generate(prompts, params)]
    eng = LLMEngine.from_pretrained(
        path,
        EngineConfig(
            device="cuda",
            dtype="float32",
            num_kv_blocks=12,
            swap_space_bytes=6 * BLOCK_NBYTES,
            swap_disk_bytes=256 * BLOCK_NBYTES,
            swap_disk_dir=str(tmp_path),
        ),
    )
    assert eng.runner.host_cache is not None and eng.runner.host_cache.cache.is_pinned()
    outs = eng.generate(prompts, params)
    st = eng.stats()
    assert st.disk_spills > 0 and st.disk_promotions > 0 and st.disk_corrupt_blocks == 0
    assert [o.token_ids for o in outs] == ref
    assert eng.kv.num_free_blocks == 12 and eng.kv.num_free_disk_blocks == eng.kv.num_disk_blocks
