"""Refuse at the router a request that no decode worker's KV pool could hold (pure policy over the
registry; #12, "exact or refused").

A decode worker refuses to adopt a request whose prompt plus ``max_tokens`` would outgrow its KV
pool even alone (:meth:`engine.scheduler.Scheduler.check_fits`). Found only there, the request has
already been prefilled, and a streamed one has had its first token before the error. The router
refuses it first, with the same arithmetic (:class:`engine.kv_fit.PoolShape`) over the pool shapes
its decode workers report (``WorkerStats``: ``kv_blocks_total``, ``kv_layout.block_size``,
``max_model_len``, ``sliding_window``): a request is refused (INVALID_ARGUMENT, naming its blocks
and the largest pool) only when every registered decode worker of the model reports a pool it does
not fit. A worker that reports no shape (``max_model_len`` 0: an older worker) might hold anything,
so with one in the cluster nothing is refused here (the worker still checks).

The distinct shapes are summarised when the set of workers changes (a registry listener), so a
request costs one check per distinct shape (one, in a uniform cluster), not one per worker. In a
cluster whose decode pools differ, the placement is narrowed to the decode workers that could hold
the request (:meth:`PoolFit.holders`), so it is not sent to a small pool that would refuse it
while a larger one could serve it; so are prefill workers whose pools differ (the prompt alone),
as long as one that holds the prompt remains (else the chosen one refuses it itself, at once).
"""

from __future__ import annotations

import threading

from engine.kv_fit import PoolShape
from pdserve.errors import InvalidRequestError
from router.registry import Registry, WorkerEntry, WorkerKind


def shape_of(w: WorkerEntry) -> PoolShape | None:
    """The pool shape ``w`` reported, or None when it reported none."""
    ld = w.load
    if not (ld.max_model_len and ld.kv_blocks_total and ld.block_size):
        return None
    return PoolShape(ld.kv_blocks_total, ld.block_size, ld.max_model_len, ld.sliding_window or None)


def adopts_group(w: WorkerEntry, prompt_tokens: int, candidates: int) -> bool:
    """Whether decode worker ``w``'s pool could adopt a parallel-sampling group of ``candidates``
    choices over a ``prompt_tokens``-token prompt handed off by a prefill worker
    (:meth:`engine.kv_fit.PoolShape.adopts_group`); True when ``w`` reported no shape (it checks
    itself). One that cannot refuses the handoff (INVALID_ARGUMENT) after the prefill was spent,
    while it may still run the group whole: the router places such a group there with a local
    prefill (:meth:`router.lifecycle.placing.Placer.place`)."""
    s = shape_of(w)
    return s is None or s.adopts_group(prompt_tokens, candidates)


def check_fits(shapes: tuple[PoolShape, ...] | None, prompt_tokens: int, max_tokens: int) -> None:
    """InvalidRequestError when ``shapes`` is a non-empty tuple and the request fits none of them.
    ``shapes`` None: some worker's shape is unknown (nothing refused); empty: no decode worker
    (the placement says so, not this check)."""
    if not shapes or any(s.fits(prompt_tokens, max_tokens) for s in shapes):
        return
    big = max(shapes, key=lambda s: s.num_blocks * s.block_size)
    if not any(s.prompt_fits(prompt_tokens) for s in shapes):
        raise InvalidRequestError(
            f"prompt of {prompt_tokens} tokens needs more KV blocks than any decode worker has "
            f"(largest: {big.num_blocks} x {big.block_size} tokens)"
        )
    need = min(s.peak_blocks(prompt_tokens, max_tokens) for s in shapes)
    raise InvalidRequestError(
        f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} needs {need} KV blocks, more than "
        f"any decode worker has (largest: {big.num_blocks} x {big.block_size} tokens): lower max_tokens"
    )


class PoolFit:
    """:func:`check_fits` against the ``kind`` workers (decode: the whole request; prefill: the
    prompt, which is all a prefill worker holds) of ``model`` in ``registry``, their shapes
    summarised once per change of the set of workers (listener) instead of per request."""

    def __init__(self, registry: Registry, model: str, kind: WorkerKind = WorkerKind.DECODE) -> None:
        self._registry = registry
        self._model = model
        self._kind = kind
        self._lock = threading.Lock()
        self._shapes: tuple[PoolShape, ...] | None = None
        self._stale = True
        registry.add_listener(self._invalidate)

    def _invalidate(self) -> None:
        with self._lock:
            self._stale = True

    def shapes(self) -> tuple[PoolShape, ...] | None:
        """The distinct pool shapes of the registered ``kind`` workers (None: one is unknown)."""
        with self._lock:
            if not self._stale:
                return self._shapes
            self._stale = False  # a change while summarising marks it stale again
        found = [shape_of(w) for w in self._registry.registered(self._kind, self._model)]
        shapes = None if any(s is None for s in found) else tuple(dict.fromkeys(found))
        with self._lock:
            self._shapes = shapes
        return shapes

    def _fits(self, s: PoolShape, prompt_tokens: int, max_tokens: int) -> bool:
        if self._kind is WorkerKind.PREFILL:
            return s.prompt_fits(prompt_tokens)
        return s.fits(prompt_tokens, max_tokens)

    def holders(self, prompt_tokens: int, max_tokens: int) -> set[str] | None:
        """The ``kind`` workers whose pools could hold the request, when the registered pools
        differ (a mixed cluster); None when every pool is alike (or one is unknown): nothing to
        narrow. O(workers of the kind) only when they differ."""
        shapes = self.shapes()
        if shapes is None or len(shapes) < 2:
            return None
        return {
            w.worker_id
            for w in self._registry.registered(self._kind, self._model)
            if (s := shape_of(w)) is None or self._fits(s, prompt_tokens, max_tokens)
        }

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises InvalidRequestError when no decode worker could hold the request (see module).
        Decode pools only: a prefill worker refuses a prompt beyond its pool itself before any
        compute, and a short prompt may be prefilled on a decode worker instead."""
        assert self._kind is WorkerKind.DECODE, "check() judges decode pools"
        check_fits(self.shapes(), prompt_tokens, max_tokens)
