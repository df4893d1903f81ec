"""Prompt-lookup drafting (n-gram speculation): propose the tokens that followed the latest
earlier occurrence of the sequence's last ``n`` tokens, longest ``n`` first.

Code, summaries and edits repeat their prompt: the continuation of a repeated n-gram is a good
guess that costs no model. Pure: a function of the token ids only.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.spec_decode.config import SpeculativeConfig


class NgramProposer:
    """Drafts from the sequence's own history (prompt + output so far)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.ngram_min, config.ngram_max

    def propose(self, tokens: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Up to ``min(k, max_tokens)`` drafted ids continuing ``tokens`` (empty: no match).

        For ``n`` from ``max_n`` down to ``min_n``: the latest start ``i < len - n`` with
        ``tokens[i:i+n] == tokens[-n:]``; the draft is what followed it (up to k tokens, and never
        past the current end: a match near the end yields a shorter draft)."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        t = list(tokens)
        size = len(t)
        if k <= 0 or size < 2:
            return []
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            tail = t[size - n :]
            first = tail[0]
            # latest earlier occurrence: scan starts right to left (i + n <= size - 1)
            for i in range(size - n - 1, -1, -1):
                if t[i] == first and t[i : i + n] == tail:
                    return t[i + n : i + n + k]
        return []
