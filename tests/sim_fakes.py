"""A fake latency model for simulator tests: linear in prefill tokens and decodes, deterministic."""

from __future__ import annotations

from collections.abc import Sequence

from simulator.latency.base import LatencyModel


class LinearLatency(LatencyModel):
    """``base + per_prefill_token * sum(prefill tokens) + per_decode * num_decodes`` seconds a step
    (defaults: 10 ms + 1 ms per prefill token + 0.1 ms per decode), with the KV size and transfer
    figures the base class takes."""

    def __init__(
        self,
        kv_bytes_per_token: int = 1000,
        *,
        base: float = 0.01,
        per_prefill_token: float = 1e-3,
        per_decode: float = 1e-4,
        **transfer: float,
    ) -> None:
        super().__init__(kv_bytes_per_token=kv_bytes_per_token, **transfer)
        self.base, self.per_prefill_token, self.per_decode = base, per_prefill_token, per_decode

    def step_time(
        self,
        prefill_tokens: Sequence[int],
        prefill_contexts: Sequence[int],
        num_decodes: int,
        decode_context: int,
    ) -> float:
        return self.base + self.per_prefill_token * sum(prefill_tokens) + self.per_decode * num_decodes
