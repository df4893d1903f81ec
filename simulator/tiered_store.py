"""A two-tier KV prefix pool (Mooncake: DRAM in front of SSD), as the store node implements it
(kv_store/store.py + kv_store/disk_tier.py), for hit-ratio and TTFT studies. Pure.

Model (per block of ``stride`` KV blocks, keyed like :class:`simulator.prefix_store.PrefixStore`):

* DRAM is an LRU of ``dram_capacity`` blocks. A block evicted from DRAM is *demoted* to disk
  (when there is a disk tier); a block already on disk is not written again, only refreshed.
* Disk is an LRU of ``disk_capacity`` blocks (None: unlimited; 0: no disk tier). The node evicts
  whole segments, oldest first; per-block LRU is the model's approximation of that.
* A hit on disk *promotes* the block to DRAM (it keeps its disk copy, as the node does), which
  may demote another DRAM block.
* :meth:`TieredPrefixStore.lookup` returns the leading run of held blocks and, for each, its
  tier at lookup time; it then touches them (DRAM hits refreshed, disk hits promoted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_hash import BlockHash


@dataclass(frozen=True)
class TierHit:
    """A lookup's leading run: ``dram`` blocks found in DRAM and ``disk`` found only on disk
    (in chain order, ``tiers`` says which: True = DRAM)."""

    tiers: tuple[bool, ...]

    @property
    def blocks(self) -> int:
        return len(self.tiers)

    @property
    def dram(self) -> int:
        return sum(self.tiers)

    @property
    def disk(self) -> int:
        return len(self.tiers) - self.dram

    @property
    def dram_run(self) -> int:
        """Leading blocks all in DRAM (what a node without the disk tier's copies would serve)."""
        n = 0
        for t in self.tiers:
            if not t:
                break
            n += 1
        return n


class TieredPrefixStore:
    """DRAM LRU + disk LRU of prefix blocks (see the module docstring)."""

    def __init__(self, dram_capacity: int, disk_capacity: int | None = 0, stride: int = 1) -> None:
        if dram_capacity < 1 or stride < 1 or (disk_capacity is not None and disk_capacity < 0):
            raise ValueError("dram_capacity and stride must be >= 1, disk_capacity >= 0 (or None: unlimited)")
        self.dram_capacity = dram_capacity
        self.disk_capacity = disk_capacity
        self.stride = stride
        self._dram: OrderedDict[BlockHash, None] = OrderedDict()
        self._disk: OrderedDict[BlockHash, None] = OrderedDict()
        self.promotions = self.demotions = self.dram_evictions = self.disk_evictions = 0

    @property
    def has_disk(self) -> bool:
        return self.disk_capacity is None or self.disk_capacity > 0

    def _keys(self, hashes: Sequence[BlockHash]) -> list[BlockHash]:
        s = self.stride
        return [hashes[i] for i in range(s - 1, len(hashes), s)]

    def _to_disk(self, h: BlockHash) -> None:
        if not self.has_disk:
            return
        if h in self._disk:
            self._disk.move_to_end(h)
            return
        self._disk[h] = None
        self.demotions += 1
        if self.disk_capacity is not None and len(self._disk) > self.disk_capacity:
            self._disk.popitem(last=False)
            self.disk_evictions += 1

    def _to_dram(self, h: BlockHash) -> None:
        if h in self._dram:
            self._dram.move_to_end(h)
            return
        self._dram[h] = None
        if len(self._dram) > self.dram_capacity:
            old, _ = self._dram.popitem(last=False)
            self.dram_evictions += 1
            self._to_disk(old)

    def peek(self, hashes: Sequence[BlockHash]) -> TierHit:
        """Leading held blocks of the prefix ``hashes`` (KV-block keys) and their tiers, touching
        nothing."""
        tiers: list[bool] = []
        for h in self._keys(hashes):
            if h in self._dram:
                tiers.append(True)
            elif h in self._disk:
                tiers.append(False)
            else:
                break
        return TierHit(tuple(tiers))

    def lookup(self, hashes: Sequence[BlockHash]) -> TierHit:
        """:meth:`peek`, then refresh the blocks found (disk hits are promoted)."""
        hit = self.peek(hashes)
        tiers = hit.tiers
        run = self._keys(hashes)[: len(tiers)]
        for h, in_dram in zip(run, tiers, strict=True):
            if not in_dram:  # refresh the disk copies first: promoting may demote and evict
                self.promotions += 1
                self._disk.move_to_end(h)
        for h in run:
            self._to_dram(h)
        return hit

    def contains_prefix(self, hashes: Sequence[BlockHash]) -> int:
        """Leading KV blocks of ``hashes`` held in either tier (a multiple of ``stride``), without
        touching anything (for the router's lookups; :class:`PrefixStore`'s interface)."""
        n = 0
        s = self.stride
        for i in range(s - 1, len(hashes), s):
            h = hashes[i]
            if h not in self._dram and h not in self._disk:
                break
            n = i + 1
        return n

    def add(self, hashes: Sequence[BlockHash]) -> None:
        """Store every whole block of the prefix ``hashes`` in DRAM (most recently used)."""
        for h in self._keys(hashes):
            self._to_dram(h)

    def __len__(self) -> int:
        return len(self._dram.keys() | self._disk.keys())
