"""Tensor parallelism of the mixture-of-experts models (Mixtral, Qwen2-MoE with its shared expert
and a dense layer, Qwen3-MoE) and of Gemma 2, on CPU with gloo.

* In process: two shards' MoE blocks (each expert's intermediate columns split, the router
  replicated) produce partial sums that add up to the whole block's output, on 1 and 32 tokens.
* Real processes: a TP=2 engine (rank 0 here, a spawned follower) gives the TP=1 engine's greedy
  tokens, log-probs within float tolerance, with chunked prefill and prefix-cache hits (the TP=1
  engine is golden against transformers in tests/unit/test_models_families.py).

The tiny checkpoints are test_models_families' (same configs, same random weights).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.loader import load_model
from engine.models.moe import SparseMoE
from engine.models.tp_shard import shard_model
from tests.unit import test_models_families as fam

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return fam.make_models(tmp_path_factory.mktemp("tp_moe"), MOE)


@pytest.mark.parametrize("arch", MOE)
def test_moe_shards_add_up_to_the_whole_block(models, arch) -> None:
    whole = load_model(models[arch], torch.float32, torch.device("cpu"))
    tp = 2
    shards = [shard_model(copy.deepcopy(whole), r, tp, lambda t: None) for r in range(tp)]
    for s in shards:  # hooks off: the partial sums are added here
        for lyr in s.model.layers:
            lyr.mlp.all_reduce = None
    moe = whole.config.moe
    g = torch.Generator().manual_seed(4)
    for li in range(whole.config.num_hidden_layers):
        ref = whole.model.layers[li].mlp
        parts = [s.model.layers[li].mlp for s in shards]
        if isinstance(ref, SparseMoE):
            for p in parts:
                assert isinstance(p, SparseMoE) and p.grouped  # still one grouped matmul per projection
                assert p.w13t.shape == (moe.num_experts, 64, 2 * moe.intermediate_size // tp)
                assert p.w2t.shape == (moe.num_experts, moe.intermediate_size // tp, 64)
        for t in (1, 32):
            x = torch.randn(t, 64, generator=g)
            with torch.no_grad():
                got = sum(p(x) for p in parts)
                torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", MOE)
def test_tp2_engine_equals_tp1(models, arch) -> None:
    """Prompts of 5, 37 and 100 tokens in chunks of 16, then two prompts from prefix hits."""
    cfg = dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=40, long_prefill_token_threshold=16)
    one = LLMEngine.from_pretrained(models[arch], EngineConfig(**cfg))
    two = LLMEngine.from_pretrained(models[arch], EngineConfig(**cfg, tensor_parallel_size=2))
    try:
        assert two.runner.kv_cache.shape[4] == one.runner.kv_cache.shape[4] // 2
        first = fam._prompts((5, 37, 100), seed=1)
        second = [
            first[2][:64] + fam._prompts((11,), seed=2)[0],
            first[2][:96] + fam._prompts((3,), seed=3)[0],
        ]
        for prompts in (first, second):
            ref = one.generate(prompts, fam.GREEDY)
            got = two.generate(prompts, fam.GREEDY)
            for r, o in zip(ref, got, strict=True):
                assert o.token_ids == r.token_ids
                assert o.num_cached_tokens == r.num_cached_tokens
                for lr, lo in zip(r.logprobs, o.logprobs, strict=True):
                    assert lo.logprob == pytest.approx(lr.logprob, abs=1e-4)
        assert [o.num_cached_tokens for o in got] == [64, 96]
        assert two.kv.num_used_blocks == 0
    finally:
        two.close()
    assert all(not p.is_alive() for p in two.runner.followers)
