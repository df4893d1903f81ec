"""What the engine speculates with (:class:`SpeculativeConfig`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SpecMethod(enum.Enum):
    """How drafts are made."""

    NGRAM = "ngram"  # prompt lookup: continue the latest earlier occurrence of the last n tokens
    DRAFT_MODEL = "draft_model"  # a small model of the same tokenizer proposes the drafts


@dataclass(frozen=True)
class SpeculativeConfig:
    """``num_speculative_tokens``: drafts per verification step (k; a step scores k + 1 positions).
    ``ngram_min`` / ``ngram_max``: the n-gram lengths prompt lookup tries, longest first.
    ``draft_model``: the draft model's folder (``SpecMethod.DRAFT_MODEL`` only; it must share the
    target's tokenizer). Every invalid value raises ``ValueError`` naming the field."""

    method: SpecMethod = SpecMethod.NGRAM
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, SpecMethod):
            raise ValueError(f"method must be one of {[m.value for m in SpecMethod]}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.method is SpecMethod.DRAFT_MODEL and not self.draft_model:
            raise ValueError("draft_model: set the draft model's folder for method draft_model")
        if self.method is SpecMethod.NGRAM and self.draft_model:
            raise ValueError("draft_model is only used with method draft_model (method is ngram)")
