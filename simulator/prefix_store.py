"""Host-memory KV pool of one instance (Mooncake's DRAM cache), by prefix.

The pool keeps prompt prefixes an instance computed, at the granularity of ``stride`` KV blocks
(a *host block*, e.g. 512 tokens = 32 blocks of 16): a host block is identified by the chained
key of its last KV block, so equal keys mean equal prefixes up to there. Capacity is in host
blocks, LRU-evicted; ``capacity=None`` is unlimited (hit-ratio studies).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.block_hash import BlockHash


class PrefixStore:
    def __init__(self, stride: int, capacity: int | None = None) -> None:
        if stride < 1 or (capacity is not None and capacity < 1):
            raise ValueError("stride must be >= 1 and capacity >= 1 (or None for unlimited)")
        self.stride = stride
        self.capacity = capacity
        self._lru: OrderedDict[BlockHash, None] | None = OrderedDict() if capacity is not None else None
        self._set: set[BlockHash] = set()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._set)

    def add(self, hashes: Sequence[BlockHash]) -> None:
        """Store every whole host block of the prefix ``hashes`` (KV-block keys)."""
        s = self.stride
        lru = self._lru
        for i in range(s - 1, len(hashes), s):
            h = hashes[i]
            if lru is None:
                self._set.add(h)
                continue
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            self._set.add(h)
            if len(lru) > self.capacity:  # type: ignore[operator]
                old, _ = lru.popitem(last=False)
                self._set.discard(old)
                self.evictions += 1

    def prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        """Leading KV blocks of ``hashes`` held (a multiple of ``stride``); refreshes their LRU age."""
        s = self.stride
        n = 0
        st = self._set
        for i in range(s - 1, len(hashes), s):
            if hashes[i] not in st:
                break
            n = i + 1
        if n and self._lru is not None:
            for i in range(s - 1, n, s):
                self._lru.move_to_end(hashes[i])
        return n

    def contains_prefix(self, hashes: Sequence[BlockHash]) -> int:
        """Like :meth:`prefix_blocks` without touching LRU ages (for lookups by the router)."""
        s = self.stride
        n = 0
        st = self._set
        for i in range(s - 1, len(hashes), s):
            if hashes[i] not in st:
                break
            n = i + 1
        return n
