"""TTFT estimation for placement (Mooncake's Conductor): queue + prefill(uncached) + KV fetch.

Pure arithmetic over a :class:`~router.policy.protocols.LatencyEstimator` and instance views.
Assumptions, stated once: a queue of ``q`` prompt tokens drains in steps of ``token_budget``
tokens, each costing ``prefill_time([token_budget])`` (attention's growth with context inside
the queue is ignored); a pulled prefix costs ``transfer_time`` of its KV bytes and is not
overlapped with queueing (conservative).
"""

from __future__ import annotations

from router.policy.protocols import LatencyEstimator
from router.policy.view import InstanceView


def usable_prefix_blocks(hit_blocks: int, num_prompt_tokens: int, block_size: int) -> int:
    """Cached blocks a prompt can reuse: at least one token is always computed (its logits)."""
    return max(0, min(hit_blocks, (num_prompt_tokens - 1) // block_size))


class TtftEstimator:
    """Predicts TTFT of a request on an instance; memoises the per-budget step time."""

    def __init__(self, latency: LatencyEstimator) -> None:
        self.latency = latency
        self._step: dict[int, float] = {}

    def _step_time(self, tokens: int) -> float:
        t = self._step.get(tokens)
        if t is None:
            t = self._step[tokens] = self.latency.prefill_time([tokens])
        return t

    def queue_time(self, inst: InstanceView) -> float:
        """Seconds until a new prompt on ``inst`` would start prefilling."""
        q = inst.queued_tokens
        if q <= 0:
            return 0.0
        b = max(1, inst.token_budget)
        full, rem = divmod(q, b)
        return full * self._step_time(b) + (self._step_time(rem) if rem else 0.0)

    def prefill_time(self, num_prompt_tokens: int, reused_tokens: int) -> float:
        new = max(1, num_prompt_tokens - reused_tokens)
        return self.latency.prefill_time([new], [reused_tokens])

    def fetch_time(self, num_blocks: int, block_size: int) -> float:
        if num_blocks <= 0:
            return 0.0
        return self.latency.transfer_time(num_blocks * block_size * self.latency.kv_bytes_per_token)

    def ttft(
        self, inst: InstanceView, num_prompt_tokens: int, reused_blocks: int, fetched_blocks: int = 0
    ) -> float:
        """TTFT on ``inst`` reusing ``reused_blocks`` leading blocks, ``fetched_blocks`` of them pulled."""
        bs = inst.block_size
        return (
            self.queue_time(inst)
            + self.fetch_time(fetched_blocks, bs)
            + self.prefill_time(num_prompt_tokens, reused_blocks * bs)
        )


class TtftTable:
    """One decision's memo of a :class:`TtftEstimator`'s terms for a prompt of ``num_prompt_tokens``.

    Queue times are keyed by (queued tokens, token budget), prefill times by reused tokens, fetch
    times by (blocks, block size): instances in the same state cost one latency-model call per
    decision. Each value is the estimator's own, so :meth:`ttft` equals ``est.ttft`` exactly
    (the same terms added in the same order). Valid for one decision only: an online-corrected
    model changes between decisions.
    """

    __slots__ = ("est", "p", "_queue", "_prefill", "_fetch")

    def __init__(self, est: TtftEstimator, num_prompt_tokens: int) -> None:
        self.est = est
        self.p = num_prompt_tokens
        self._queue: dict[tuple[int, int], float] = {}
        self._prefill: dict[int, float] = {}
        self._fetch: dict[tuple[int, int], float] = {}

    def queue(self, inst: InstanceView) -> float:
        """``est.queue_time(inst)``."""
        q = inst.queued_tokens
        if q <= 0:
            return 0.0
        key = (q, inst.token_budget)
        t = self._queue.get(key)
        if t is None:
            t = self._queue[key] = self.est.queue_time(inst)
        return t

    def prefill(self, reused_tokens: int) -> float:
        """``est.prefill_time(num_prompt_tokens, reused_tokens)``."""
        t = self._prefill.get(reused_tokens)
        if t is None:
            t = self._prefill[reused_tokens] = self.est.prefill_time(self.p, reused_tokens)
        return t

    def fetch(self, num_blocks: int, block_size: int) -> float:
        """``est.fetch_time(num_blocks, block_size)``."""
        if num_blocks <= 0:
            return 0.0
        key = (num_blocks, block_size)
        t = self._fetch.get(key)
        if t is None:
            t = self._fetch[key] = self.est.fetch_time(num_blocks, block_size)
        return t

    def ttft(self, queue_s: float, block_size: int, reused_blocks: int, fetched_blocks: int = 0) -> float:
        """``est.ttft(inst, p, reused_blocks, fetched_blocks)`` given ``queue_s = queue(inst)``."""
        return queue_s + self.fetch(fetched_blocks, block_size) + self.prefill(reused_blocks * block_size)
