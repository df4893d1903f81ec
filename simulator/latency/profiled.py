"""Latency from a locally measured profile (:mod:`simulator.profile`), fitted by least squares.

A mixed step is the prefill fit plus the decode fit without its intercept (one launch per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from simulator.latency.base import LatencyModel
from simulator.profile import Profile, ProfileFit, fit, load


class ProfiledLatencyModel(LatencyModel):
    def __init__(self, profile: Profile | str | Path, *, kv_bytes_per_token: int | None = None, **kw) -> None:
        self.profile = profile if isinstance(profile, Profile) else load(profile)
        kvb = kv_bytes_per_token or self.profile.kv_bytes_per_token
        if not kvb:
            raise ValueError("the profile has no kv_bytes_per_token; pass kv_bytes_per_token=")
        super().__init__(kv_bytes_per_token=kvb, **kw)
        self.fit: ProfileFit = fit(self.profile)

    def step_time(
        self,
        prefill_tokens: Sequence[int],
        prefill_contexts: Sequence[int],
        num_decodes: int,
        decode_context: int,
    ) -> float:
        t = 0.0
        if prefill_tokens:
            t = self.fit.prefill_time(prefill_tokens, prefill_contexts)
        if num_decodes:
            a, b, c = self.fit.decode
            t += b * decode_context + c * num_decodes + (0.0 if prefill_tokens else a)
        return t
