"""Which drafted tokens a verification step keeps (pure).

A verification step scores ``k + 1`` positions of one sequence: its last token and its ``k``
drafts. ``sampled[j]`` is the target's token at position ``j`` (sampled with the request's own
per-index rule, :mod:`engine.sampler`), i.e. the token the non-speculative engine would emit after
the drafts ``0..j-1``. Drafts are kept while they equal what the target sampled; the first
difference is replaced by the target's token, and when all ``k`` drafts are kept the target's
token after them comes free (the bonus token). So a step emits between 1 and ``k + 1`` tokens,
each exactly the non-speculative one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """``tokens``: what the step emits (1..k+1 ids); ``accepted``: how many of the ``drafted``
    drafts were kept."""

    tokens: tuple[int, ...]
    accepted: int
    drafted: int

    @property
    def rejected(self) -> int:
        """Drafts thrown away (their KV slots are free to be overwritten)."""
        return self.drafted - self.accepted


def verify(drafts: Sequence[int], sampled: Sequence[int], stop_ids: frozenset[int] = frozenset()) -> Verdict:
    """Keep ``drafts`` while they match ``sampled`` (``len(sampled) == len(drafts) + 1``).

    A kept token in ``stop_ids`` (end of sequence, a stop token) ends the step there: nothing
    after a stop is emitted, as the non-speculative engine would have stopped."""
    if len(sampled) != len(drafts) + 1:
        raise ValueError(
            f"verify needs one sampled token per draft plus one: {len(drafts)} drafts, {len(sampled)} sampled"
        )
    out: list[int] = []
    accepted = 0
    for d, s in zip(drafts, sampled, strict=False):
        out.append(s)
        if s != d or s in stop_ids:
            return Verdict(tuple(out), accepted + int(s == d), len(drafts))
        accepted += 1
    out.append(sampled[len(drafts)])
    return Verdict(tuple(out), accepted, len(drafts))
