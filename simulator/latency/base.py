"""The one latency-model interface of the simulator (and the router's ``LatencyEstimator``).

A *step* is one forward pass of an instance over a batch: prefill chunks (``tokens[i]`` new
tokens of request ``i`` on top of ``contexts[i]`` tokens already in its KV cache) and decodes
(one token each; ``decode_context`` = sum of their context lengths). All times are seconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class LatencyModel(ABC):
    """Step latency of one instance, plus KV transfer between instances.

    Contract: times are > 0 for a non-empty step and non-decreasing in every argument;
    ``step_time`` with no decodes equals ``prefill_time``, with no prefill ``decode_time``.
    ``transfer_time(nbytes) = transfer_latency_s + nbytes / transfer_bandwidth``.
    """

    def __init__(
        self, *, kv_bytes_per_token: int, transfer_bandwidth: float = 25e9, transfer_latency_s: float = 5e-4
    ) -> None:
        if kv_bytes_per_token <= 0 or transfer_bandwidth <= 0 or transfer_latency_s < 0:
            raise ValueError("kv_bytes_per_token and transfer_bandwidth must be > 0, latency >= 0")
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self.transfer_bandwidth = float(transfer_bandwidth)
        self.transfer_latency_s = float(transfer_latency_s)

    @abstractmethod
    def step_time(
        self,
        prefill_tokens: Sequence[int],
        prefill_contexts: Sequence[int],
        num_decodes: int,
        decode_context: int,
    ) -> float:
        """Seconds for one step mixing prefill chunks and ``num_decodes`` decodes."""

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float:
        """Seconds for one prefill-only step (``contexts`` default to 0)."""
        return self.step_time(tokens, contexts if contexts is not None else [0] * len(tokens), 0, 0)

    def decode_time(self, batch_size: int, total_context: int) -> float:
        """Seconds for one decode-only step of ``batch_size`` requests with ``total_context`` KV tokens."""
        return self.step_time((), (), batch_size, total_context)

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` between instances (P->D KV handoff, remote prefix fetch)."""
        if nbytes <= 0:
            return 0.0
        return self.transfer_latency_s + nbytes / self.transfer_bandwidth

    def kv_transfer_time(self, num_tokens: int) -> float:
        return self.transfer_time(num_tokens * self.kv_bytes_per_token)
