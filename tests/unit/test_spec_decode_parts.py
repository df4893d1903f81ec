"""Speculative decoding's pure parts (#17): prompt-lookup drafting and verification."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import SampleRequest, sample
from engine.sampling_params import SamplingParams
from engine.spec_decode import NgramProposer, SpecMethod, SpeculativeConfig, verify


def test_config_refuses_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeConfig(ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method=SpecMethod.DRAFT_MODEL)
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(draft_model="/m")
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="ngram")  # type: ignore[arg-type]


def test_ngram_continues_the_latest_earlier_occurrence_longest_n_first() -> None:
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, ngram_min=1, ngram_max=3))
    #        0  1  2  3  4  5  6  7  8  9
    toks = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    # the 3-gram (2, 6, 7) never occurred before; the 2-gram (6, 7) last occurred at 6: then 2, 6, 7
    assert p.propose(toks) == [2, 6, 7]
    assert p.propose(toks, max_tokens=2) == [2, 6]
    assert p.propose([1, 2, 3, 1, 2]) == [3, 1, 2]  # the 2-gram (1, 2) at 0
    assert p.propose([1, 2, 3, 4]) == []  # nothing repeats
    assert p.propose([4]) == [] and p.propose([]) == []
    # a match near the end drafts only what followed it (never past the current end)
    assert p.propose([9, 9]) == [9]
    assert p.propose(toks, max_tokens=0) == []


def test_verify_keeps_drafts_up_to_the_first_difference_and_the_bonus_token() -> None:
    v = verify([4, 5, 6], [4, 5, 6, 7])  # all kept, plus the bonus
    assert v.tokens == (4, 5, 6, 7) and v.accepted == 3 and v.rejected == 0
    v = verify([4, 5, 6], [4, 9, 6, 7])  # the second draft is wrong: the target's 9 replaces it
    assert v.tokens == (4, 9) and v.accepted == 1 and v.rejected == 2
    v = verify([4], [3, 8])
    assert v.tokens == (3,) and v.accepted == 0
    v = verify([], [3])  # no draft: an ordinary decode step
    assert v.tokens == (3,) and v.accepted == 0 and v.drafted == 0
    # a kept stop token ends the step: nothing after it
    v = verify([4, 2, 6], [4, 2, 6, 7], stop_ids=frozenset({2}))
    assert v.tokens == (4, 2) and v.accepted == 2
    with pytest.raises(ValueError, match="one sampled token per draft"):
        verify([1, 2], [1, 2])


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.9, seed=7)]
)
def test_verification_by_per_index_sampling_emits_the_non_speculative_tokens(params: SamplingParams) -> None:
    """The exactness argument on a toy 'model' whose next-token logits depend on the context:
    a non-speculative run samples one token per step; a speculative run drafts k tokens (some
    wrong), scores all k + 1 positions, samples each with its own output index and keeps the
    matching prefix. The two token streams are identical."""
    vocab, seed = 11, 1234

    def logits_after(ctx: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash(tuple(ctx)) & 0xFFFF_FFFF)
        return torch.randn(vocab, generator=g) * 3

    def draw(ctx: list[int], index: int) -> int:
        return sample(logits_after(ctx).unsqueeze(0), [SampleRequest(params, seed, index, None)])[0].token

    prompt, n_out = [1, 2, 3], 24
    plain = list(prompt)
    for i in range(n_out):
        plain.append(draw(plain, i))
    spec = list(prompt)
    rng = torch.Generator().manual_seed(0)
    while len(spec) - len(prompt) < n_out:
        i = len(spec) - len(prompt)
        k = min(3, n_out - i - 1)
        # drafts: the true continuation with a random error now and then
        drafts = []
        for j in range(k):
            truth = plain[len(spec) + j]
            drafts.append(truth if torch.rand(1, generator=rng).item() < 0.7 else (truth + 1) % vocab)
        sampled = [draw(spec + drafts[:j], i + j) for j in range(k + 1)]
        spec.extend(verify(drafts, sampled).tokens)
    assert spec[: len(plain)] == plain
