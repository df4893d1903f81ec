"""Swap-or-recompute on preemption, and the rates it decides by (vLLM, FastServe). Pure.

A preempted request either drops its KV and recomputes it later from its tokens
(:attr:`PreemptionMode.RECOMPUTE`, the engine's only mode when no host pool is configured), or
has its device blocks copied to the host block pool and back before it runs again
(:attr:`PreemptionMode.SWAP`). :func:`choose_preemption_mode` picks, per request, the cheaper of

* swap: ``2 * blocks_to_copy * block_nbytes / swap_bytes_per_s`` (out now, in later), and
* recompute: ``tokens_to_recompute / recompute_tokens_per_s``,

and falls back to recompute when the host pool cannot take the blocks. :class:`RateEstimator`
keeps the rates: an exponentially weighted mean of measured copies and prefill steps
(the engine measures the copy bandwidth once at start and both rates online).

Disk tier (cold KV on disk, ``EngineConfig.swap_disk_bytes``): when the host pool is short, the
host blocks of the coldest swapped-out requests (last in queue order) may spill to a local-disk
segment file to make room (:func:`plan_spill`); the swap then also costs those blocks' write now
and read later at the measured disk bandwidth (``SwapRates.disk_bytes_per_s``):
``2 * copy_bytes / swap_bytes_per_s + 2 * spill_bytes / disk_bytes_per_s`` against the recompute.
Without a measured disk bandwidth nothing spills. :func:`disk_budget_tokens` is the disk traffic's
share of a step's token budget, as :func:`swap_budget_tokens` is the copies'.

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
    ``recompute_tokens_per_s``: prefill throughput; ``disk_bytes_per_s``: host<->disk tier
    bandwidth (one direction; None: no disk tier or not measured yet). All must be > 0.
    ``recompute_estimated``: the recompute rate is the decode steps' stand-in, no measured
    prefill (:class:`RateEstimator`); it then decides only between the host pool and a recompute,
    never a spill to disk (on an accelerator the stand-in can understate a prefill's rate 10-100x,
    and a spill's disk traffic is priced against it)."""

    swap_bytes_per_s: float
    recompute_tokens_per_s: float
    disk_bytes_per_s: float | None = None
    recompute_estimated: bool = False

    def __post_init__(self) -> None:
        d = self.disk_bytes_per_s
        if d is not None and not (d > 0 and math.isfinite(d)):
            raise ValueError(f"disk_bytes_per_s must be a positive number or None, got {d}")
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

    def disk_seconds(self, num_bytes: int) -> float:
        """One-way disk transfer time of ``num_bytes`` (inf when no disk bandwidth is known)."""
        if num_bytes <= 0:
            return 0.0
        return num_bytes / self.disk_bytes_per_s if self.disk_bytes_per_s else math.inf


@dataclass(frozen=True)
class SwapDecision:
    """What :func:`choose_preemption_mode` chose and the two costs it compared (seconds)."""

    mode: PreemptionMode
    swap_s: float
    recompute_s: float
    spill_blocks: int = 0  # host blocks of colder swapped-out requests spilled to disk for room


def choose_preemption_mode(
    *,
    blocks_to_copy: int,
    block_nbytes: int,
    tokens_to_recompute: int,
    host_free_blocks: int,
    rates: SwapRates | None,
    spill_blocks: int | None = 0,
) -> SwapDecision:
    """Swap or recompute one preempted request.

    ``blocks_to_copy``: the request's device blocks that would move to the host (blocks shared
    with other requests stay on device and are not counted); ``tokens_to_recompute``: the tokens
    whose KV a recompute would compute again. ``spill_blocks``: when the host pool is short, the
    host blocks of colder swapped-out requests that would spill to the disk tier to make room
    (:func:`plan_spill`; None: the disk tier cannot make room). Recompute when the host pool lacks
    room and no spill makes it (or the recompute rate is only the stand-in:
    ``SwapRates.recompute_estimated``), or no rates are known yet; swap when copying out and back in (plus
    the spill's disk write and later read) is strictly faster than recomputing. A request with
    nothing to copy (every block shared) swaps: keeping its references costs nothing.
    """
    if blocks_to_copy < 0 or tokens_to_recompute < 0 or host_free_blocks < 0 or block_nbytes < 1:
        raise ValueError("block counts, token counts must be >= 0 and block_nbytes >= 1")
    if spill_blocks is not None and spill_blocks < 0:
        raise ValueError(f"spill_blocks must be >= 0 or None, got {spill_blocks}")
    if rates is None:
        return SwapDecision(PreemptionMode.RECOMPUTE, math.inf, math.nan)
    recompute_s = rates.recompute_seconds(tokens_to_recompute)
    swap_s = 2 * rates.swap_seconds(blocks_to_copy * block_nbytes)
    if blocks_to_copy > host_free_blocks:
        if (
            spill_blocks is None
            or host_free_blocks + spill_blocks < blocks_to_copy
            or rates.recompute_estimated
        ):
            return SwapDecision(PreemptionMode.RECOMPUTE, swap_s, recompute_s)
        swap_s += 2 * rates.disk_seconds(spill_blocks * block_nbytes)
        mode = PreemptionMode.SWAP if swap_s < recompute_s else PreemptionMode.RECOMPUTE
        return SwapDecision(mode, swap_s, recompute_s, spill_blocks if mode is PreemptionMode.SWAP else 0)
    if blocks_to_copy == 0 or swap_s < recompute_s:
        return SwapDecision(PreemptionMode.SWAP, swap_s, recompute_s)
    return SwapDecision(PreemptionMode.RECOMPUTE, swap_s, recompute_s)


def plan_spill(
    need: int, candidates: list[tuple[str, int]], disk_free_blocks: int
) -> tuple[list[str], int] | None:
    """Which swapped-out requests spill their host blocks to disk to free ``need`` host slots.

    ``candidates``: ``(request id, spillable host blocks)``, coldest first (the caller orders
    them: last in queue order first). Takes whole requests, coldest first, until ``need`` blocks
    are freed, skipping one whose blocks would not fit the disk's ``disk_free_blocks`` any more.
    Returns ``(request ids, blocks spilled)``, ``([], 0)`` for ``need <= 0``, or None when the
    candidates or the disk cannot free ``need`` blocks (then nothing spills)."""
    if need <= 0:
        return [], 0
    chosen: list[str] = []
    got = 0
    for rid, n in candidates:
        if n <= 0 or n > disk_free_blocks - got:
            continue
        chosen.append(rid)
        got += n
        if got >= need:
            return chosen, got
    return None


def swap_budget_tokens(num_blocks: int, block_nbytes: int, rates: SwapRates | None) -> int:
    """Token budget displaced by copying ``num_blocks`` blocks one way: the copy time in prefill
    tokens at the measured rate, rounded up (0 for no blocks; at least 1 otherwise)."""
    if num_blocks <= 0:
        return 0
    if rates is None:
        return 1
    t = rates.swap_seconds(num_blocks * block_nbytes) * rates.recompute_tokens_per_s
    return max(1, math.ceil(t))


def disk_budget_tokens(num_blocks: int, block_nbytes: int, rates: SwapRates | None) -> int:
    """Token budget displaced by moving ``num_blocks`` blocks between host and disk one way (the
    disk time in prefill tokens at the measured rate, rounded up; 0 for no blocks; at least 1
    otherwise, and 1 while no disk bandwidth is known)."""
    if num_blocks <= 0:
        return 0
    if rates is None or rates.disk_bytes_per_s is None:
        return 1
    t = rates.disk_seconds(num_blocks * block_nbytes) * rates.recompute_tokens_per_s
    return max(1, math.ceil(t))


class RateEstimator:
    """Exponentially weighted means of the measured swap bandwidth and prefill throughput, and
    an affine model of a prefill step's time (:meth:`predict_prefill_seconds`).

    ``alpha`` is the weight of a new sample. :attr:`rates` is None until the bandwidth and a
    compute rate have a sample each (the engine seeds the bandwidth at start). The recompute rate
    is the measured prefill throughput; until a prefill step was measured, the throughput of
    decode-only steps (:meth:`observe_decode`) stands in. A disaggregated decode worker adopts
    its requests' KV from the prefill side and never prefills until it recomputes, so without
    the stand-in its first preemptions would always recompute, whatever its host pool. The
    stand-in overstates a prefill's cost per token (a decode step computes one token per request
    per pass over the weights, a prefill many), which leans the first choices towards the swap
    the operator configured a host pool for; the first measured prefill replaces it. Rates from
    the stand-in are marked (``SwapRates.recompute_estimated``): they never price a spill to disk.

    The throughput (tokens over step seconds) is no model of one prompt's prefill time: a step
    has a fixed cost (launches, the batch's decodes, Python) that a small model or a short
    prompt does not amortise, so ``n / throughput`` overstates long prompts by the ratio of the
    fixed cost to the per-token one (live, tiny CPU model: 45 ms predicted for a 128-token
    prompt whose step takes 4.6 ms, as a 1-token one takes 2.7 ms). ``fit_alpha`` is the decay
    per sample of the least-squares fit ``seconds = a + b * tokens`` over the prefill steps.
    """

    # the fit needs this spread of prompt sizes (coefficient of variation of the tokens) before
    # its slope is trusted; until then the throughput predicts
    MIN_FIT_CV = 0.1

    def __init__(self, alpha: float = 0.2, fit_alpha: float = 0.02) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0 < fit_alpha <= 1:
            raise ValueError(f"fit_alpha must be in (0, 1], got {fit_alpha}")
        self.alpha = alpha
        self.fit_alpha = fit_alpha
        self._bw: float | None = None
        self._tps: float | None = None
        self._decode_tps: float | None = None  # decode-only steps: the stand-in recompute rate
        self._disk: float | None = None
        # exponentially decayed sums of 1, tokens, seconds, tokens^2, tokens*seconds (every
        # sample weighs the same until the decay tells: the first, often slow, step does not
        # dominate the fit)
        self._fit: tuple[float, float, float, float, float] | None = None

    @staticmethod
    def _mix(old: float | None, new: float, alpha: float) -> float:
        return new if old is None else (1 - alpha) * old + alpha * new

    def observe_copy(self, num_bytes: int, seconds: float) -> None:
        """A device<->host copy of ``num_bytes`` took ``seconds`` (ignored when either is 0)."""
        if num_bytes > 0 and seconds > 0:
            self._bw = self._mix(self._bw, num_bytes / seconds, self.alpha)

    def observe_disk(self, num_bytes: int, seconds: float) -> None:
        """A host<->disk transfer of ``num_bytes`` took ``seconds`` (ignored when either is 0)."""
        if num_bytes > 0 and seconds > 0:
            self._disk = self._mix(self._disk, num_bytes / seconds, self.alpha)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """A step computing ``num_tokens`` prompt tokens took ``seconds`` (ignored when either is 0)."""
        if num_tokens > 0 and seconds > 0:
            self._tps = self._mix(self._tps, num_tokens / seconds, self.alpha)
            x, y = float(num_tokens), seconds
            keep = 1 - self.fit_alpha
            w, sx, sy, sxx, sxy = self._fit or (0.0, 0.0, 0.0, 0.0, 0.0)
            self._fit = (keep * w + 1, keep * sx + x, keep * sy + y, keep * sxx + x * x, keep * sxy + x * y)

    def observe_decode(self, num_tokens: int, seconds: float) -> None:
        """A decode-only step computing ``num_tokens`` tokens took ``seconds`` (ignored when either
        is 0): the recompute rate's stand-in until a prefill step is measured (class doc)."""
        if num_tokens > 0 and seconds > 0:
            self._decode_tps = self._mix(self._decode_tps, num_tokens / seconds, self.alpha)

    def observe_step(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        """A step's compute (its time less synchronous copies): its prefill throughput when it
        prefilled, else a decode-only step's token rate (:meth:`observe_decode`). The engine
        (``LLMEngine._observe_step``) and the simulator (``SimInstance``) both feed it here."""
        if prefill_tokens > 0:
            self.observe_prefill(prefill_tokens, seconds)
        elif decode_tokens > 0:
            self.observe_decode(decode_tokens, seconds)

    def predict_prefill_seconds(self, num_tokens: int) -> float:
        """Predicted time of a step prefilling a ``num_tokens`` prompt: ``a + b * num_tokens``
        fitted over the measured prefill steps (``a, b >= 0``; through the origin when the free
        fit's intercept is negative); ``num_tokens`` over the throughput while the steps seen
        had too little spread in size to fit a slope; 0 before any prefill step."""
        if num_tokens <= 0 or self._fit is None or self._tps is None:
            return 0.0
        w, sx, sy, sxx, sxy = self._fit
        mx, my, mxx, mxy = sx / w, sy / w, sxx / w, sxy / w
        var = mxx - mx * mx
        if var <= (self.MIN_FIT_CV * mx) ** 2:
            return num_tokens / self._tps
        b = max(0.0, (mxy - mx * my) / var)
        a = my - b * mx
        if a < 0:
            a, b = 0.0, mxy / mxx
        return a + b * num_tokens

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self._tps

    @property
    def swap_bytes_per_s(self) -> float | None:
        return self._bw

    @property
    def disk_bytes_per_s(self) -> float | None:
        return self._disk

    @property
    def rates(self) -> SwapRates | None:
        """The swap-or-recompute rates: the prefill throughput, else the decode stand-in (class
        doc); None while the bandwidth or both compute rates are unknown."""
        tps = self._tps if self._tps is not None else self._decode_tps
        if self._bw is None or tps is None:
            return None
        return SwapRates(self._bw, tps, self._disk, recompute_estimated=self._tps is None)

    def with_rates(self, rates: SwapRates) -> RateEstimator:
        """A copy seeded with fixed rates (tests, benchmarks)."""
        out = RateEstimator(self.alpha)
        out._bw, out._tps = rates.swap_bytes_per_s, rates.recompute_tokens_per_s
        out._disk = rates.disk_bytes_per_s
        out._fit = self._fit
        return out


__all__ = [
    "PreemptionMode",
    "RateEstimator",
    "SwapDecision",
    "SwapRates",
    "choose_preemption_mode",
    "disk_budget_tokens",
    "plan_spill",
    "swap_budget_tokens",
]
