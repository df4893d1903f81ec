"""Swap-or-recompute on preemption, and the rates it decides by (vLLM, FastServe). Pure.

A preempted request either drops its KV and recomputes it later from its tokens
(:attr:`PreemptionMode.RECOMPUTE`, the engine's only mode when no host pool is configured), or
has its device blocks copied to the host block pool and back before it runs again
(:attr:`PreemptionMode.SWAP`). :func:`choose_preemption_mode` picks, per request, the cheaper of

* swap: ``2 * blocks_to_copy * block_nbytes / swap_bytes_per_s`` (out now, in later), and
* recompute: ``tokens_to_recompute / recompute_tokens_per_s``,

and falls back to recompute when the host pool cannot take the blocks. :class:`RateEstimator`
keeps the two rates: an exponentially weighted mean of measured copies and prefill steps
(the engine measures the copy bandwidth once at start and both rates online).

:func:`swap_budget_tokens` converts a step's swap traffic into the token budget it displaces
(the time the copies take, expressed in prefill tokens at the measured rate): the scheduler
charges it to the step's ``max_num_batched_tokens``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class PreemptionMode(enum.Enum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


@dataclass(frozen=True)
class SwapRates:
    """Measured rates. ``swap_bytes_per_s``: device<->host copy bandwidth (one direction);
    ``recompute_tokens_per_s``: prefill throughput. Both must be > 0."""

    swap_bytes_per_s: float
    recompute_tokens_per_s: float

    def __post_init__(self) -> None:
        if not (self.swap_bytes_per_s > 0 and math.isfinite(self.swap_bytes_per_s)):
            raise ValueError(f"swap_bytes_per_s must be a positive number, got {self.swap_bytes_per_s}")
        if not (self.recompute_tokens_per_s > 0 and math.isfinite(self.recompute_tokens_per_s)):
            raise ValueError(
                f"recompute_tokens_per_s must be a positive number, got {self.recompute_tokens_per_s}"
            )

    def swap_seconds(self, num_bytes: int) -> float:
        return num_bytes / self.swap_bytes_per_s

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens / self.recompute_tokens_per_s


@dataclass(frozen=True)
class SwapDecision:
    """What :func:`choose_preemption_mode` chose and the two costs it compared (seconds)."""

    mode: PreemptionMode
    swap_s: float
    recompute_s: float


def choose_preemption_mode(
    *,
    blocks_to_copy: int,
    block_nbytes: int,
    tokens_to_recompute: int,
    host_free_blocks: int,
    rates: SwapRates | None,
) -> SwapDecision:
    """Swap or recompute one preempted request.

    ``blocks_to_copy``: the request's device blocks that would move to the host (blocks shared
    with other requests stay on device and are not counted); ``tokens_to_recompute``: the tokens
    whose KV a recompute would compute again. Recompute when the host pool lacks room
    (``blocks_to_copy > host_free_blocks``) or no rates are known yet; swap when copying out and
    back in is strictly faster than recomputing. A request with nothing to copy (every block
    shared) swaps: keeping its references costs nothing.
    """
    if blocks_to_copy < 0 or tokens_to_recompute < 0 or host_free_blocks < 0 or block_nbytes < 1:
        raise ValueError("block counts, token counts must be >= 0 and block_nbytes >= 1")
    if rates is None:
        return SwapDecision(PreemptionMode.RECOMPUTE, math.inf, math.nan)
    recompute_s = rates.recompute_seconds(tokens_to_recompute)
    swap_s = 2 * rates.swap_seconds(blocks_to_copy * block_nbytes)
    if blocks_to_copy > host_free_blocks:
        return SwapDecision(PreemptionMode.RECOMPUTE, swap_s, recompute_s)
    if blocks_to_copy == 0 or swap_s < recompute_s:
        return SwapDecision(PreemptionMode.SWAP, swap_s, recompute_s)
    return SwapDecision(PreemptionMode.RECOMPUTE, swap_s, recompute_s)


def swap_budget_tokens(num_blocks: int, block_nbytes: int, rates: SwapRates | None) -> int:
    """Token budget displaced by copying ``num_blocks`` blocks one way: the copy time in prefill
    tokens at the measured rate, rounded up (0 for no blocks; at least 1 otherwise)."""
    if num_blocks <= 0:
        return 0
    if rates is None:
        return 1
    t = rates.swap_seconds(num_blocks * block_nbytes) * rates.recompute_tokens_per_s
    return max(1, math.ceil(t))


class RateEstimator:
    """Exponentially weighted means of the measured swap bandwidth and prefill throughput.

    ``alpha`` is the weight of a new sample. :attr:`rates` is None until both rates have at least
    one sample (the engine seeds the bandwidth at start, the prefill rate after its first prefill
    step; a request is preempted only after it was prefilled, so the rates exist by then).
    """

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._bw: float | None = None
        self._tps: float | None = None

    @staticmethod
    def _mix(old: float | None, new: float, alpha: float) -> float:
        return new if old is None else (1 - alpha) * old + alpha * new

    def observe_copy(self, num_bytes: int, seconds: float) -> None:
        """A device<->host copy of ``num_bytes`` took ``seconds`` (ignored when either is 0)."""
        if num_bytes > 0 and seconds > 0:
            self._bw = self._mix(self._bw, num_bytes / seconds, self.alpha)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """A step computing ``num_tokens`` prompt tokens took ``seconds`` (ignored when either is 0)."""
        if num_tokens > 0 and seconds > 0:
            self._tps = self._mix(self._tps, num_tokens / seconds, self.alpha)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self._tps

    @property
    def swap_bytes_per_s(self) -> float | None:
        return self._bw

    @property
    def rates(self) -> SwapRates | None:
        if self._bw is None or self._tps is None:
            return None
        return SwapRates(self._bw, self._tps)

    def with_rates(self, rates: SwapRates) -> RateEstimator:
        """A copy seeded with fixed rates (tests, benchmarks)."""
        out = RateEstimator(self.alpha)
        out._bw, out._tps = rates.swap_bytes_per_s, rates.recompute_tokens_per_s
        return out


__all__ = [
    "PreemptionMode",
    "RateEstimator",
    "SwapDecision",
    "SwapRates",
    "choose_preemption_mode",
    "swap_budget_tokens",
]
