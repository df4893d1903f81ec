"""The cyclic garbage collector of a serving process (issue #12: the cluster's cost per request).

A router or worker imports torch, numpy, grpc and the model's code at start-up: some 190,000
objects that live as long as the process. CPython's collector walks every one of them on each full
(generation 2) collection, and a process under load triggers one every few seconds: each
request's objects outlive a young collection or two and are promoted, and once the promoted
objects reach a quarter of the old generation a full collection runs. Measured on the router of
``bench/serving_efficiency.py`` (tiny model, 32 tokens per request, 64 streams): about 3% of its
CPU per request, in pauses of 100-250 ms during which its event loop serves nothing.

:func:`settle_heap`, called once when start-up is over, moves what start-up left into the
permanent generation (``gc.freeze``), so that full collections walk only what was made since, and
raises the young generation's threshold so that fewer short-lived objects are promoted at all.
The collector stays on: cycles made after start-up are collected as before.
"""

from __future__ import annotations

import gc

DEFAULT_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def settle_heap(young_threshold: int = DEFAULT_YOUNG_THRESHOLD) -> None:
    """Call once, from a serving process's main, when start-up is over (modules, model and
    tokenizer loaded, servers started): collect what start-up left as garbage, freeze every
    object that survived (they are never scanned again, and never freed: they live as long as
    the process), and raise the young generation's threshold to ``young_threshold`` (kept when
    it is higher already; the older generations' thresholds are unchanged). Not for library
    code or tests: it changes the whole process's collector."""
    if young_threshold < 1:
        raise ValueError(f"young_threshold must be >= 1, got {young_threshold}")
    gc.collect()
    gc.freeze()
    t0, t1, t2 = gc.get_threshold()
    gc.set_threshold(max(t0, young_threshold), t1, t2)
