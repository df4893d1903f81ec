"""TTFT estimation for placement (Mooncake's Conductor): queue + prefill(uncached) + KV fetch.

Pure arithmetic over a :class:`~router.policy.protocols.LatencyEstimator` and instance views.
Assumptions, stated once: a queue of ``q`` prompt tokens drains in steps of ``token_budget``
tokens, each costing ``prefill_time([token_budget])`` (attention's growth with context inside
the queue is ignored); a pulled prefix costs ``transfer_time`` of its KV bytes and is not
overlapped with queueing (conservative).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router.policy.kv_stream import handoff_after_prefill
from router.policy.latency import prefill_time_each
from router.policy.protocols import LatencyEstimator
from router.policy.types import RequestInfo
from router.policy.view import InstanceView, RoleColumns


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

    def step_basis(self) -> tuple[float, dict[int, float], object]:
        """``(scale, memo, model)`` with ``step time(t) == scale * memo[t]`` bit for bit, where
        ``memo[t]`` is ``model.prefill_time([t])`` once filled (:class:`TtftTable` fills it; the
        memo lives as long as it stays valid). Here: the memo of :meth:`_step_time`, scale 1."""
        return 1.0, self._step, self.latency

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

    def handoff_time(self, num_prompt_tokens: int, reused_tokens: int = 0, chunk_tokens: int = 0) -> float:
        """The KV handoff left after the prefill: the whole KV's transfer, or with chunk-wise
        streaming (``chunk_tokens`` > 0, :mod:`prefill_worker.kv_stream`) what the overlap with
        the prefill leaves (:func:`router.policy.kv_stream.handoff_after_prefill`: the last
        chunk's transfer while the link keeps up)."""
        if chunk_tokens <= 0:
            return self.latency.transfer_time(num_prompt_tokens * self.latency.kv_bytes_per_token)
        return handoff_after_prefill(self.latency, num_prompt_tokens, reused_tokens, chunk_tokens).streamed_s

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

    Step times come from the estimator's memo (:meth:`TtftEstimator.step_basis`; missing ones
    priced in one latency-model call, :meth:`queues`), prefill times are keyed by reused tokens,
    fetch times by (blocks, block size). Each
    value is what the estimator computes, by the same expression, so :meth:`ttft` equals
    ``est.ttft`` bit for bit. Valid for one decision only: an online-corrected model changes
    between decisions.
    """

    __slots__ = ("est", "p", "_prefill", "_fetch", "_known", "adapter", "disk_blocks", "disk_block_s")

    @classmethod
    def of(cls, est: TtftEstimator, req: RequestInfo) -> TtftTable:
        """The table of request ``req``: its prompt, its adapter, its store prefix's disk part."""
        return cls(
            est, req.num_prompt_tokens, req.adapter, req.store_prefix_disk_blocks, req.store_disk_block_s
        )

    def __init__(
        self,
        est: TtftEstimator,
        num_prompt_tokens: int,
        adapter: str = "",
        disk_blocks: int = 0,
        disk_block_s: float = 0.0,
    ) -> None:
        self.est = est
        self.p = num_prompt_tokens
        self._prefill: dict[int, float] = {}
        self._fetch: dict[tuple[int, int], float] = {}
        self._known: tuple[object, list[float]] | None = None
        # the request's LoRA adapter ("" = base model): loading it on an instance delays the
        # start of its prefill there like a queue does (:meth:`queues` adds
        # ``InstanceView.adapter_load_s``); :meth:`pool_queues` (the columnar path) does not, so
        # a policy prices adapter requests through :meth:`queues`
        self.adapter = adapter
        # the KV store's prefix blocks on its disk tier, and one block's read there (seconds):
        # a fetch from the store reads them before sending (:meth:`store_fetch`)
        self.disk_blocks = disk_blocks
        self.disk_block_s = disk_block_s

    def store_fetch(self, num_blocks: int, block_size: int) -> float:
        """:meth:`fetch` of ``num_blocks`` from the KV store, plus reading the disk-tier blocks
        among them first (at most the store prefix's ``disk_blocks``: an upper bound when
        fewer than the whole prefix is fetched)."""
        t = self.fetch(num_blocks, block_size)
        if self.disk_blocks > 0 and self.disk_block_s > 0 and num_blocks > 0:
            t += min(num_blocks, self.disk_blocks) * self.disk_block_s
        return t

    def adapter_s(self, inst: InstanceView) -> float:
        """Seconds to load the request's adapter on ``inst`` before its prefill (0 for the base model)."""
        return inst.adapter_load_s(self.adapter) if self.adapter else 0.0

    def know_queues(self, insts: Sequence[InstanceView], queues: list[float]) -> None:
        """``queues`` is :meth:`queues` ``(insts)`` (priced elsewhere, e.g. by
        :meth:`queues_array`): a later call with this very sequence object returns it."""
        self._known = (insts, queues)

    def queues(self, insts: Sequence[InstanceView]) -> list[float]:
        """``[est.queue_time(i) for i in insts]``: full * step(budget) + (step(rem) if rem else
        0.0), 0.0 for an empty queue, every step time ``scale * memo[t]``
        (:meth:`TtftEstimator.step_basis`; the memo's missing entries priced in one model call),
        plus each instance's load of the request's adapter (:meth:`adapter_s`)."""
        base = self.base_queues(insts)
        if not self.adapter:
            return base
        return [q + self.adapter_s(i) for q, i in zip(base, insts, strict=True)]

    def base_queues(self, insts: Sequence[InstanceView]) -> list[float]:
        """:meth:`queues` without the adapter's load."""
        if not insts:
            return []
        known = self._known
        if known is not None and known[0] is insts:
            return known[1]
        qs = [i.queued_tokens for i in insts]
        budgets = [i.token_budget for i in insts]
        scale, memo, model = self.est.step_basis()
        b0 = budgets[0]
        if b0 >= 1 and budgets.count(b0) == len(budgets):  # one token budget (the usual case)
            rems = [q % b0 for q in qs]
            try:
                return _queues_one_budget(qs, rems, b0, scale, memo)
            except KeyError:  # step sizes not priced yet: price them all at once, once
                _fill(memo, model, {*rems, b0})
                return _queues_one_budget(qs, rems, b0, scale, memo)
        budgets = [b if b > 1 else 1 for b in budgets]
        rems = [q % b for q, b in zip(qs, budgets, strict=True)]
        _fill(memo, model, {*rems, *budgets})
        return [
            0.0 if q <= 0 else (q // b) * (scale * memo[b]) + (scale * memo[r] if r else 0.0)
            for q, b, r in zip(qs, budgets, rems, strict=True)
        ]

    def pool_queues(self, cols: RoleColumns) -> tuple[np.ndarray, list[float]]:
        """:meth:`queues` of the pool ``cols`` was read from (array and list), bit for bit (the
        same step times and expression per item), for a base-model request (ValueError for an
        adapter's: its load times are per request, priced by :meth:`queues`). Kept on ``cols`` for this step basis (scale
        and model, :meth:`TtftEstimator.step_basis`): rows of a patched ``cols`` are re-priced
        one by one, a new basis prices the pool at once (arrays)."""
        if self.adapter:
            raise ValueError("pool_queues prices base-model requests only: use queues() for an adapter's")
        scale, memo, model = self.est.step_basis()
        got = cols.queue_cache
        if got is not None and got[0] == scale and got[1] is model and got[2] is memo:
            arr, lst, stale = got[3], got[4], got[5]
            if stale:
                qs, bs = cols.queued_tokens, cols.token_budget
                for k in stale:
                    q, b = int(qs[k]), int(bs[k])
                    b = b if b > 1 else 1
                    r = q % b
                    _fill(memo, model, {b, r})
                    v = 0.0 if q <= 0 else (q // b) * (scale * memo[b]) + (scale * memo[r] if r else 0.0)
                    arr[k] = v
                    lst[k] = v
                cols.queue_cache = (scale, model, memo, arr, lst, ())
            return arr, lst
        arr = self._queues_array(cols.queued_tokens, cols.token_budget, scale, memo, model)
        lst = arr.tolist()
        cols.queue_cache = (scale, model, memo, arr, lst, ())
        return arr, lst

    @staticmethod
    def _queues_array(
        qs: np.ndarray, budgets: np.ndarray, scale: float, memo: dict[int, float], model: object
    ) -> np.ndarray:
        if not len(qs):
            return np.zeros(0)
        b = np.where(budgets > 1, budgets, 1)
        rems = qs % b
        ru, rinv = np.unique(rems, return_inverse=True)
        b0 = int(b[0])
        one = bool((b == b0).all())
        bu = [b0] if one else [int(t) for t in np.unique(b)]
        _fill(memo, model, {*ru.tolist(), *bu})
        full = (qs // b).astype(np.float64)
        if one:
            step_b: np.ndarray | float = scale * memo[b0]
        else:
            bu_arr, binv = np.unique(b, return_inverse=True)
            step_b = np.array([scale * memo[int(t)] for t in bu_arr])[binv]
        step_r = np.array([scale * memo[t] if t else 0.0 for t in ru.tolist()])[rinv]
        return np.where(qs <= 0, 0.0, full * step_b + step_r)

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
        """``est.ttft(inst, p, reused_blocks, fetched_blocks)`` given ``queue_s = est.queue_time(inst)``."""
        return queue_s + self.fetch(fetched_blocks, block_size) + self.prefill(reused_blocks * block_size)


def _queues_one_budget(
    qs: list[int], rems: list[int], budget: int, scale: float, memo: dict[int, float]
) -> list[float]:
    """Queue times for one token budget; ``KeyError`` when a step size is not in ``memo``."""
    s0 = scale * memo[budget]
    return [
        0.0 if q <= 0 else (q // budget) * s0 + (scale * memo[r] if r else 0.0)
        for q, r in zip(qs, rems, strict=True)
    ]


def _fill(memo: dict[int, float], model: object, tokens: set[int]) -> None:
    """``memo[t] = model.prefill_time([t])`` for every ``t > 0`` of ``tokens`` not in it yet."""
    missing = [t for t in tokens if t > 0 and t not in memo]
    if missing:
        memo.update(zip(missing, prefill_time_each(model, missing), strict=True))
