"""What the engine speculates with (:class:`SpeculativeConfig`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SpecMethod(enum.Enum):
    """How drafts are made."""

    NGRAM = "ngram"  # prompt lookup: continue the latest earlier occurrence of the last n tokens
    DRAFT_MODEL = "draft_model"  # a small model of the same tokenizer proposes the drafts


class DraftAcceptance(enum.Enum):
    """How a sampled (temperature > 0) request keeps a draft model's drafts.

    ``COUPLED`` (default): the draft model samples each draft with the target's own per-index
    noise (:mod:`engine.sampler`'s exponential race, same seed and output index), and the target
    keeps a draft when its own sample at that index equals it. Every emitted token is the
    target's sample, so the output is the non-speculative output token for token (drafter-
    invariant speculative decoding: Daliri, Musco, Suresh 2024); a draft is kept with probability
    at least ``(1 - TV) / (1 + TV)`` for total variation ``TV`` between draft and target.

    ``REJECTION``: Leviathan et al. / Chen et al. speculative sampling: keep draft ``x ~ q`` with
    probability ``min(1, p(x) / q(x))``, else draw from ``norm(max(0, p - q))``. Every emitted
    token is distributed as the target's (the tests check it statistically); a draft is kept with
    probability ``1 - TV`` (the most any scheme can). Its uniforms and residual draws come from
    the request's seed and output index, so a seeded run repeats for the same draft model and
    ``num_speculative_tokens`` as long as its steps verify the same drafts; it is not the
    non-speculative run's output. Under memory pressure it need not repeat: a step drafts fewer
    tokens (or none) when free KV blocks, the draft pool or the token budget run short, and a
    preempted request's recompute samples its next token without drafts, so which positions are
    drafted, and the token drawn there (equally distributed), depends on the load.

    Greedy requests keep the drafts equal to the target's argmax under both (identical output)."""

    COUPLED = "coupled"
    REJECTION = "rejection"


@dataclass(frozen=True)
class SpeculativeConfig:
    """``num_speculative_tokens``: drafts per verification step (k; a step scores k + 1 positions).
    ``ngram_min`` / ``ngram_max``: the n-gram lengths prompt lookup tries, longest first.
    ``draft_model``: the draft model's folder (``SpecMethod.DRAFT_MODEL`` only; it must share the
    target's vocabulary and tokenizer, checked when the engine loads it). ``acceptance``: how a
    sampled request keeps draft-model drafts (:class:`DraftAcceptance`; prompt lookup's drafts
    are deterministic and always use the coupled rule, so only ``COUPLED`` is valid with it).
    Every invalid value raises ``ValueError`` naming the field."""

    method: SpecMethod = SpecMethod.NGRAM
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model: str | None = None
    acceptance: DraftAcceptance = DraftAcceptance.COUPLED

    def __post_init__(self) -> None:
        if not isinstance(self.method, SpecMethod):
            raise ValueError(f"method must be one of {[m.value for m in SpecMethod]}, got {self.method!r}")
        if not isinstance(self.acceptance, DraftAcceptance):
            raise ValueError(
                f"acceptance must be one of {[a.value for a in DraftAcceptance]}, got {self.acceptance!r}"
            )
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.method is SpecMethod.DRAFT_MODEL and not self.draft_model:
            raise ValueError("draft_model: set the draft model's folder for method draft_model")
        if self.method is SpecMethod.NGRAM and self.draft_model:
            raise ValueError("draft_model is only used with method draft_model (method is ngram)")
        if self.method is SpecMethod.NGRAM and self.acceptance is not DraftAcceptance.COUPLED:
            raise ValueError(
                "acceptance 'rejection' is only for method draft_model (prompt lookup's drafts are "
                "deterministic: the coupled rule keeps them exactly as often)"
            )
