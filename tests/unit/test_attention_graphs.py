"""Decode graphs' bucketing and padding (engine.attention_graphs), on CPU.

The bucket and padding rules are pure; ``GraphMode.EAGER`` runs the very static, padded buffers a
CUDA graph would replay, without capturing: its output must equal plain eager decoding (greedy
tokens identical, log-probs within 1e-3), which proves the padding inert. Capture and replay
themselves need CUDA (tests/gpu/test_attention_cuda.py). ``cuda_graph=True`` is refused on CPU.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention_graphs import (
    DecodeBatch,
    GraphMode,
    batch_buckets,
    bucket_for,
    pad_decode,
    width_bucket,
)
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from pdserve.errors import FailedPreconditionError


def test_batch_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(4) == (1, 2, 4)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert batch_buckets(64) == (1, 2, 4, *range(8, 65, 8))
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_bucket_for():
    b = batch_buckets(20)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 8, 9, 17, 20)] == [1, 2, 4, 8, 8, 16, 20, 20]
    assert bucket_for(21, b) is None
    with pytest.raises(ValueError, match="at least one row"):
        bucket_for(0, b)


def test_width_bucket():
    assert [width_bucket(w, 100) for w in (1, 2, 3, 5, 64, 65, 100)] == [1, 2, 4, 8, 64, 100, 100]
    with pytest.raises(ValueError, match="outside"):
        width_bucket(101, 100)


def test_pad_decode():
    batch = DecodeBatch(
        ids=[7, 8], pos=[5, 12], slots=[13, 44], tables=[[3, 1], [9, 11, 10]], lens=[6, 13], starts=[0, 4]
    )
    p = pad_decode(batch, bucket=4, width=4, windows=[8], scratch_block=20, block_size=4)
    assert p.n == 2
    assert p.ids == [7, 8, 0, 0] and p.pos == [5, 12, 0, 0]
    assert p.slots == [13, 44, 80, 80]  # padding writes to the scratch block's slot 0
    assert p.tables == [[3, 1, 20, 20], [9, 11, 10, 20], [20] * 4, [20] * 4]
    assert p.lens == [6, 13, 1, 1] and p.starts == [0, 4, 0, 0]
    assert p.lo == {None: [0, 4, 0, 0], 8: [0, 5, 0, 0]}
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode(batch, 1, 4, [], 20, 4)
    with pytest.raises(ValueError, match="wider"):
        pad_decode(batch, 2, 2, [], 20, 4)


def test_cuda_graph_refused_on_cpu(tiny_models):
    with pytest.raises(ValueError, match="cuda_graph=True needs device='cuda'"):
        EngineConfig(cuda_graph=True, attention_backend="torch_paged")
    eng = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=16))
    with pytest.raises(FailedPreconditionError, match="cuda_graph needs a CUDA device"):
        ModelRunner(
            eng.runner.model,
            eng.kv,
            torch.float32,
            torch.device("cpu"),
            attention_backend="torch_paged",
            cuda_graph=True,
        )
    with pytest.raises(FailedPreconditionError, match="need attention_backend='torch_paged'"):
        eng.runner.enable_decode_graphs(GraphMode.EAGER, 4, 8)


@pytest.mark.parametrize("arch", ["llama", "mistral_swa", "qwen2_swa"])
def test_padded_static_decode_equals_eager(tiny_models, arch):
    """5 prompts: batch bucket 8 (3 padding rows); then as requests finish, buckets 4, 2, 1;
    widths grow through several power-of-two buckets. Max batch 4 + 5 prompts: the first steps
    do not fit and run eagerly."""
    cfg = EngineConfig(num_kv_blocks=160, block_size=4, attention_backend="torch_paged")
    ref = LLMEngine.from_pretrained(tiny_models[arch], cfg)
    for max_batch in (8, 4):
        eng = LLMEngine.from_pretrained(tiny_models[arch], cfg)
        eng.runner.enable_decode_graphs(GraphMode.EAGER, max_batch, -(-eng.max_model_len // 4))
        graphs = eng.runner.graphs
        assert graphs is not None
        prompts = [list(range(3, 3 + n)) for n in (4, 9, 30, 45, 61)]
        params = [  # different lengths: the batch shrinks as requests finish
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1)
            for n in (24, 6, 14, 18, 9)
        ]
        outs = eng.generate(prompts, params)
        refs = ref.generate(prompts, params)
        assert graphs.replays > 0
        assert len({b for b, _ in graphs._entries}) >= 2  # several batch buckets were used
        for o, r in zip(outs, refs, strict=True):
            assert o.token_ids == r.token_ids
            lo = torch.tensor([t.logprob for t in o.logprobs])
            lr = torch.tensor([t.logprob for t in r.logprobs])
            torch.testing.assert_close(lo, lr, atol=1e-3, rtol=0)
        assert eng.kv.num_free_blocks == 160  # the scratch block is not the manager's
