"""The decode side of one goodput decision (:class:`DecodeSide`) and the candidate choice.

Pure arithmetic over a decode pool, no I/O: per decode instance the predicted TPOT after
admission, whether the prompt fits, Llumnix's freeness, and the TTFT of prefilling the prompt
there itself (conditional disaggregation); then :func:`first_least` / :func:`first_least_arr`
pick the candidate. Split out of :mod:`router.policy.goodput`, which decides with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from router.policy.estimate import TtftTable
from router.policy.latency import DecodeLatencyEstimator, decode_time_array, decode_time_each
from router.policy.types import InstanceRole, RequestInfo
from router.policy.view import InstanceView, PrefixHits, RoleColumns

if TYPE_CHECKING:
    from router.policy.goodput import GoodputConfig


def first_least(
    cand: list[int],
    fits: list[bool],
    longs: list[int] | None,
    tpots: list[float],
    freeness: Sequence[int],
    starts: Sequence[float] | None = None,
) -> int:
    """The first ``k`` of ``cand`` (non-empty) with the least key (-fits, longs, tpot, -freeness)
    (``longs`` aligned with ``cand``; None: all 0): what ``min(cand, key=...)`` returns, found
    one key component at a time (a pass each) instead of a tuple per candidate.

    ``starts`` (aligned with the pool like ``tpots``; None: not a key): seconds before the
    request can start on each instance, a key between ``longs`` and ``tpot``: (-fits, longs,
    start, tpot, -freeness). The goodput policy passes it for a LoRA adapter's request
    (:func:`adapter_starts`), whose candidates differ by tens of ms in when the adapter is
    ready and by fractions of a ms in TPOT."""
    lk = dict(zip(cand, longs, strict=True)) if longs is not None else None
    tp = [tpots[k] for k in cand]
    total = sum(tp) + (sum([starts[k] for k in cand]) if starts is not None else 0.0)
    if total != total:  # a NaN (or inf - inf): compare the tuples exactly as min() would
        if starts is not None:
            skeys = [(-int(fits[k]), lk[k] if lk else 0, starts[k], tpots[k], -freeness[k]) for k in cand]
            return cand[min(range(len(cand)), key=skeys.__getitem__)]
        keys = [(-int(fits[k]), lk[k] if lk else 0, tpots[k], -freeness[k]) for k in cand]
        return cand[min(range(len(cand)), key=keys.__getitem__)]
    s = cand
    fitting = [k for k in cand if fits[k]]
    if fitting and len(fitting) < len(cand):
        s = fitting
    if lk is not None:
        m = min([lk[k] for k in s])
        s = [k for k in s if lk[k] == m]
    if starts is not None:
        m = min([starts[k] for k in s])
        s = [k for k in s if starts[k] == m]
    if s is cand:
        m = min(tp)
        s = [k for k, t in zip(cand, tp, strict=True) if t == m]
    else:
        m = min([tpots[k] for k in s])
        s = [k for k in s if tpots[k] == m]
    if len(s) == 1:
        return s[0]
    m = max([freeness[k] for k in s])
    return next(k for k in s if freeness[k] == m)


def adapter_starts(
    pool: Sequence[InstanceView],
    adapter: str,
    local_ttft: Sequence[float | None],
    remote_ttft: float | None,
) -> list[float]:
    """Per decode instance of ``pool``, the earliest a request of LoRA ``adapter`` can run there
    (seconds; the :func:`first_least` ``starts`` key): its own prefill's predicted TTFT
    (``local_ttft``, which prices the adapter's readiness there, ``InstanceView.adapter_load_s``),
    or the remote prefill's (``remote_ttft``) followed by loading the adapter on the decode
    instance (the decode side pins it when the KV arrives), whichever is sooner; inf when the
    instance has neither option."""
    out: list[float] = []
    for inst, lt in zip(pool, local_ttft, strict=True):
        t = math.inf if lt is None else lt
        if remote_ttft is not None:
            r = remote_ttft + inst.adapter_load_s(adapter)
            if r < t:
                t = r
        out.append(t)
    return out


UNDECIDED = -2


def first_least_arr(cand: np.ndarray, tpots: np.ndarray, freeness: Sequence[int]) -> int:
    """:func:`first_least` over candidates that all fit, with no long requests to count: the
    first of the least TPOT, then of those the most free; -1 when ``cand`` is empty;
    :data:`UNDECIDED` when a TPOT is NaN (then :func:`first_least` decides, as ``min``
    compares)."""
    if not len(cand):
        return -1
    tp = tpots[cand]
    if np.isnan(tp).any():
        return UNDECIDED
    s = cand[tp == tp.min()].tolist()
    if len(s) == 1:
        return s[0]
    m = max([freeness[k] for k in s])
    return next(k for k in s if freeness[k] == m)


class _Minus:
    """``values[k] - offset`` on demand (a list nobody needs whole)."""

    __slots__ = ("values", "offset")

    def __init__(self, values: list[int], offset: int) -> None:
        self.values, self.offset = values, offset

    def __getitem__(self, k: int) -> int:
        return self.values[k] - self.offset

    def __len__(self) -> int:
        return len(self.values)


NUMPY_MIN_POOL = 64
"""Pools of at least this many instances are priced with numpy over their columns (below:
Python lists; both give the same values bit for bit)."""


class DecodeSide:
    """The decode instances' side of one goodput decision, as parallel lists in pool order:
    predicted TPOT after admission (``tpots``), room (``fits``, ``freeness``), and the TTFT of
    prefilling the prompt there itself (``local_ttft``; None: not allowed, conditional
    disaggregation) reusing ``local_reused`` cached blocks. Priced as numpy arrays over the
    pool's columns (:meth:`ClusterView.columns`: read once per view), in float64 elementwise
    arithmetic in the same order as the per-instance expressions, so every value is bit for bit
    what a loop over the instances computes (:func:`decode_time_array`,
    :meth:`TtftTable.queues_array`). ``pool`` is one role (decode, or mixed when there is no
    decode instance) of the view ``hits`` was made on, ``cols`` its columns."""

    __slots__ = ("tpots", "fits", "freeness", "local_ttft", "local_reused", "arrays")

    def __init__(
        self,
        cfg: GoodputConfig,
        model: DecodeLatencyEstimator,
        req: RequestInfo,
        pool: list[InstanceView],
        out: int,
        hits: PrefixHits,
        table: TtftTable,
        cols: RoleColumns | None,
    ) -> None:
        if cols is None:  # a small pool: per-call numpy overheads would dominate
            self.arrays = None
            self._lists(cfg, model, req, pool, out, hits, table)
            return
        p = req.num_prompt_tokens
        n = len(pool)
        sizes, totals, frees, batches = cols.block_size, cols.total_blocks, cols.free_blocks, cols.batch
        extra = p + out // 2
        used = cols.used
        if cols.one_block_size:  # the usual case: one need for all, freeness read for a few only
            bs0 = int(sizes[0])
            need = -(-(p + 1) // (bs0 if bs0 > 1 else 1))
            self.freeness: Sequence[int] = _Minus(cols.free_list, need)
            fits = frees >= need if need <= cols.min_total else (frees >= need) & (totals >= need)
            held = used * bs0
        else:
            needs = -(-(p + 1) // np.where(sizes > 1, sizes, 1))
            self.freeness = (frees - needs).tolist()
            fits = (frees >= needs) & (needs <= totals)
            held = used * sizes
        self.fits: list[bool] = fits.tolist()
        fits_arr = fits
        ctx = held + extra  # KV tokens after admission: held + the prompt + half the output
        # TPOT after admission: one more sequence, its prompt and half its output more context
        tpots_arr = decode_time_array(model, batches + 1, ctx)
        self.tpots: list[float] = tpots_arr.tolist()
        # (fits, tpots) as arrays (None on the list path): the pair search reads them
        self.arrays: tuple[np.ndarray, np.ndarray] | None = (fits_arr, tpots_arr)
        self.local_ttft: list[float | None] = [None] * n
        self.local_reused = [0] * n
        # who may prefill the prompt itself: a mixed instance always; a decode instance when at
        # most local_prefill_max_tokens tokens are uncached there (the pool is of one role)
        max_local = cfg.local_prefill_max_tokens
        decode_role = bool(pool) and pool[0].role is InstanceRole.DECODE
        if decode_role and not cfg.local_prefill:
            return
        by_id = hits.by_id
        if decode_role and p > max_local:  # only instances caching part of the prompt qualify
            ix = cols.index
            ks = np.array(sorted(ix[i] for i in by_id if i in ix), dtype=np.int64)
        else:
            ks = np.arange(n)
        if not len(ks):
            return
        hs = np.zeros(n, dtype=np.int64)
        if by_id:
            ix = cols.index
            for iid, h in by_id.items():
                k = ix.get(iid)
                if k is not None:
                    hs[k] = h
        sz = sizes[ks]
        caps = (p - 1) // sz
        hk = hs[ks]
        locs = np.where(caps > 0, np.minimum(hk, caps), 0)
        if decode_role:
            keep = p - locs * sz <= max_local
            ks, locs, sz = ks[keep], locs[keep], sz[keep]
            if not len(ks):
                return
        queues = table.pool_queues(cols)[0][ks]
        bk = batches[ks]
        busy = bk > 0
        # the co-scheduled decode step of the instance's own batch (0.0 when it has none)
        cot = np.zeros(len(ks))
        if busy.any():
            cot[busy] = decode_time_array(model, bk[busy], held[ks][busy])
        reused = locs * sz
        ru, rinv = np.unique(reused, return_inverse=True)
        pf = np.array([table.prefill(int(t)) for t in ru])[rinv]
        # table.ttft(queue, bs, local) = queue + fetch(0) + prefill(local x bs), plus cot
        ttfts = ((queues + 0.0) + pf) + cot
        if len(ks) == n:  # every instance may prefill (ks is 0..n-1 in order)
            self.local_ttft, self.local_reused = ttfts.tolist(), locs.tolist()
            return
        for k, lo, t in zip(ks.tolist(), locs.tolist(), ttfts.tolist(), strict=True):
            self.local_ttft[k] = t
            self.local_reused[k] = lo

    def _lists(
        self,
        cfg: GoodputConfig,
        model: DecodeLatencyEstimator,
        req: RequestInfo,
        pool: list[InstanceView],
        out: int,
        hits: PrefixHits,
        table: TtftTable,
    ) -> None:
        """The same values, priced with Python lists (a pass per term): faster below
        :data:`NUMPY_MIN_POOL` instances."""
        p = req.num_prompt_tokens
        n = len(pool)
        sizes = [i.block_size for i in pool]
        totals = [i.total_blocks for i in pool]
        frees = [i.free_blocks for i in pool]
        batches = [i.running_requests + i.queued_requests for i in pool]
        extra = p + out // 2
        bs0 = sizes[0] if sizes else 1
        self.freeness: Sequence[int]
        if sizes.count(bs0) == n:  # one block size (the usual case): fewer passes, same values
            need = -(-(p + 1) // (bs0 if bs0 > 1 else 1))
            self.freeness = _Minus(frees, need)  # free - need, read for a few instances only
            if need <= min(totals, default=0):
                self.fits = [f >= need for f in frees]
            else:
                self.fits = [f >= need and need <= t for f, t in zip(frees, totals, strict=True)]
            ctx = [(t - f) * bs0 + extra if t > f else extra for t, f in zip(totals, frees, strict=True)]
        else:
            needs = [-(-(p + 1) // (bs if bs > 1 else 1)) for bs in sizes]
            self.freeness = [f - nd for f, nd in zip(frees, needs, strict=True)]
            self.fits = [f >= nd and nd <= t for f, nd, t in zip(frees, needs, totals, strict=True)]
            ctx = [
                (t - f if t > f else 0) * bs + extra for t, f, bs in zip(totals, frees, sizes, strict=True)
            ]
        # TPOT after admission: one more sequence, its prompt and half its output more context
        self.tpots = decode_time_each(model, [b + 1 for b in batches], ctx)
        self.local_ttft: list[float | None] = [None] * n
        self.local_reused = [0] * n
        # who may prefill the prompt itself: a mixed instance always; a decode instance when at
        # most local_prefill_max_tokens tokens are uncached there (the pool is of one role)
        max_local = cfg.local_prefill_max_tokens
        decode_role = bool(pool) and pool[0].role is InstanceRole.DECODE
        if decode_role and not cfg.local_prefill:
            return
        by_id = hits.by_id
        if decode_role and p > max_local:  # only instances caching part of the prompt qualify
            ks = [k for k, i in enumerate(pool) if i.instance_id in by_id] if by_id else []
        else:
            ks = list(range(n))
        pm1 = p - 1
        hs = [by_id.get(pool[k].instance_id, 0) for k in ks] if by_id else [0] * len(ks)
        caps = [pm1 // sizes[k] for k in ks]
        locs = [(h if h < c else c) if c > 0 else 0 for h, c in zip(hs, caps, strict=True)]
        if decode_role:
            keep = [j for j, k in enumerate(ks) if p - locs[j] * sizes[k] <= max_local]
            ks, locs = [ks[j] for j in keep], [locs[j] for j in keep]
        if not ks:
            return
        queues = table.queues([pool[k] for k in ks])
        busy = [k for k in ks if batches[k]]
        held = [ctx[k] - extra for k in busy]  # KV tokens on the instance (used blocks x block size)
        cotenant = dict(zip(busy, decode_time_each(model, [batches[k] for k in busy], held), strict=True))
        reused = [lo * sizes[k] for k, lo in zip(ks, locs, strict=True)]
        pf = {t: table.prefill(t) for t in set(reused)}
        # table.ttft(queue, bs, local) = queue + fetch(0) + prefill(local x bs), plus the co-scheduled
        # decode step of the instance's own batch (0.0 when it has none)
        ttfts = [q + 0.0 + pf[r] + cotenant.get(k, 0.0) for q, r, k in zip(queues, reused, ks, strict=True)]
        if len(ks) == n:  # every instance may prefill (ks is 0..n-1 in order)
            self.local_ttft, self.local_reused = ttfts, locs  # type: ignore[assignment]
            return
        for k, lo, t in zip(ks, locs, ttfts, strict=True):
            self.local_ttft[k] = t
            self.local_reused[k] = lo
