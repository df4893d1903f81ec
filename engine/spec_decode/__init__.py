"""Speculative decoding (#17): cheap drafts verified by one forward pass of the target model.

Pure parts, no torch: :mod:`engine.spec_decode.config` (what to speculate with),
:mod:`engine.spec_decode.ngram` (prompt-lookup drafting), :mod:`engine.spec_decode.verify`
(which drafted tokens a verification step keeps).

Exactness: the engine's sampler draws the token at output index ``i`` from the logits row, the
request's parameters, its seed and ``i`` only (:mod:`engine.sampler`). Verification samples the
target's token at every drafted position with that same rule and keeps the drafts up to the
first position where the sampled token differs, plus that sampled token. A drafted position's
logits are the non-speculative step's logits at that index (the context is the same tokens), so
the output is the non-speculative output token for token, for greedy and seeded sampling alike
(and distribution-exact for any draft, since every kept token is a draw from the target).

Draft model (:mod:`engine.spec_decode.draft_model`): a small model of the same vocabulary drafts
with its own KV cache, sampling each draft with the target's per-index rule and noise (so the
rule above applies unchanged: output identical to non-speculative decoding), or, with
``DraftAcceptance.REJECTION``, verified by speculative rejection sampling
(:mod:`engine.spec_decode.rejection`: the target's distribution, higher acceptance, not the
non-speculative tokens). Those two modules use torch; the modules above do not.
"""

from engine.spec_decode.config import DraftAcceptance, SpecMethod, SpeculativeConfig
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.verify import Verdict, verify

__all__ = ["DraftAcceptance", "NgramProposer", "SpecMethod", "SpeculativeConfig", "Verdict", "verify"]
