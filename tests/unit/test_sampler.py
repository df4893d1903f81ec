"""Sampler semantics and determinism."""

from __future__ import annotations

import torch

from engine.sampler import SampleRequest, _filter, apply_repetition_penalty, mix_seed, sample
from engine.sampling_params import SamplingParams


def _sr(seed=1, idx=0, **kw) -> SampleRequest:
    return SampleRequest(SamplingParams(**kw), seed, idx, None)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert [r.token for r in sample(logits, [_sr(temperature=0), _sr(temperature=0)])] == [1, 0]


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = _filter(logits, SamplingParams(top_k=2))
    assert p[2] == 0 and p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    p = _filter(logits, SamplingParams(top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    assert (p > 0).tolist() == [True, True, False, False]
    p = _filter(logits, SamplingParams(top_p=0.81))
    assert (p > 0).tolist() == [True, True, True, False]
    p = _filter(logits, SamplingParams(min_p=0.5))  # keep p >= 0.25
    assert (p > 0).tolist() == [True, True, False, False]


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seeded_sampling_is_deterministic_and_matches_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    toks = [sample(logits, [_sr(seed=5, idx=i)])[0].token for i in range(3000)]
    again = [sample(logits, [_sr(seed=5, idx=i)])[0].token for i in range(3000)]
    assert toks == again
    freq = torch.bincount(torch.tensor(toks), minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_row_result_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    reqs = [_sr(seed=s, idx=3, temperature=0.8, top_p=0.95) for s in range(4)]
    batch = [r.token for r in sample(logits, reqs)]
    alone = [sample(logits[i : i + 1], [reqs[i]])[0].token for i in range(4)]
    assert batch == alone


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    r = sample(logits, [_sr(temperature=0, logprobs=2)])[0]
    lp = torch.log_softmax(logits[0], -1)
    assert r.token == 2 and abs(r.logprob - lp[2].item()) < 1e-6
    assert [t for t, _ in r.top_logprobs] == [2, 1]


def test_mix_seed_spreads():
    assert len({mix_seed(1, i) for i in range(1000)}) == 1000
    assert mix_seed(1, 0) != mix_seed(2, 0)
