"""CUDA swap path: pinned host pool, copies on a side stream, the compute stream waits on them.

Skipped without a CUDA device (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.swap_space import HostKVCache

pytestmark = pytest.mark.gpu


def test_host_cache_is_pinned_and_round_trips_on_a_side_stream():
    dev = torch.device("cuda")
    cache = torch.randn(2, 2, 8, 16, 2, 16, device=dev)
    hc = HostKVCache(4, cache)
    assert hc.cache.is_pinned()
    want = cache[:, :, [1, 5, 6]].clone()
    hc.swap(cache, [(1, 0), (5, 3), (6, 1)], [])
    cache[:, :, [1, 5, 6]] = 0  # the compute stream waits on the copies: these writes come after
    hc.swap(cache, [], [(0, 2), (3, 4), (1, 7)])
    torch.cuda.synchronize()
    assert torch.equal(cache[:, :, [2, 4, 7]], want)
    hc.synchronize()
    t = hc.take_timings()
    assert len(t) == 2 and all(n > 0 and s > 0 for n, s in t)


def test_swap_resume_identical_on_cuda(tiny_models):
    path = tiny_models["llama"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (k,), generator=g).tolist() for k in (3, 17, 40, 64, 90, 130, 33, 8)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    roomy = LLMEngine.from_pretrained(path, EngineConfig(device="cuda", dtype="float32", num_kv_blocks=256))
    ref = [o.token_ids for o in roomy.generate(prompts, params)]
    eng = LLMEngine.from_pretrained(
        path,
        EngineConfig(device="cuda", dtype="float32", num_kv_blocks=20, swap_space_bytes=64 << 20),
    )
    outs = eng.generate(prompts, params)
    assert eng.stats().num_swap_outs > 0
    assert [o.token_ids for o in outs] == ref
    assert eng.kv.num_free_blocks == 20 and eng.kv.num_free_host_blocks == eng.kv.num_host_blocks
