"""The cluster's KV store in the simulator (Mooncake's pool: a DRAM arena with an SSD tier behind
it, issue #15 part 3), as the router sees and prices it.

* Prefill-capable instances publish each prompt's full blocks (engine block keys) when its first
  token is out, as prefill workers put their KV into the store.
* On arrival the store's leading run of the prompt's blocks, and how many of those are only on
  disk, go into ``RequestInfo.store_prefix_blocks`` / ``store_prefix_disk_blocks``, with one
  block's disk read time (``store_disk_block_s``: block bytes over ``disk_gb_s``, what a store
  node's measured read bandwidth gives the live router), so the router's policies price a fetch
  from the store with their own :meth:`router.policy.estimate.TtftTable.store_fetch`.
* A placement fetching from the store (``Placement.fetch_from == STORE_SOURCE``) delays the
  request by that same function's time for the blocks it pulls, counting the disk blocks actually
  in the pulled range; the pulled blocks are then touched (disk hits promoted to DRAM).

The tiers are :class:`simulator.tiered_store.TieredPrefixStore` (DRAM LRU, demotion to a disk
LRU, promotion on a hit), one store block per engine block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_hash import BlockHash
from router.policy.estimate import TtftEstimator, TtftTable
from router.policy.protocols import LatencyEstimator
from simulator.tiered_store import TieredPrefixStore, TierHit


@dataclass(frozen=True)
class SimKVStoreConfig:
    """The store's DRAM and disk capacity in engine KV blocks (``disk_blocks`` 0: no SSD tier,
    None: unlimited) and its disk read bandwidth in GB/s (1e9 bytes/s; the live router uses each
    node's measured one). Refused (ValueError naming the field): ``dram_blocks`` < 1, a negative
    ``disk_blocks``, a bandwidth <= 0."""

    dram_blocks: int
    disk_blocks: int | None = 0
    disk_gb_s: float = 3.0

    def __post_init__(self) -> None:
        if self.dram_blocks < 1:
            raise ValueError(f"dram_blocks must be >= 1, got {self.dram_blocks}")
        if self.disk_blocks is not None and self.disk_blocks < 0:
            raise ValueError(
                f"disk_blocks must be >= 0 (0: no disk tier) or None (unlimited), got {self.disk_blocks}"
            )
        if not (math.isfinite(self.disk_gb_s) and self.disk_gb_s > 0):
            raise ValueError(f"disk_gb_s must be > 0, got {self.disk_gb_s}")


@dataclass
class SimKVStoreStats:
    fetches: int = 0  # placements that pulled a prefix from the store
    fetched_blocks: int = 0
    disk_blocks_read: int = 0  # of those, blocks read from the disk tier first
    fetch_s: float = 0.0  # time the fetches delayed their requests


class SimKVStore:
    """The store of one simulation (see the module docstring)."""

    def __init__(self, cfg: SimKVStoreConfig, block_bytes: int) -> None:
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
        self.cfg = cfg
        self.tiers = TieredPrefixStore(cfg.dram_blocks, cfg.disk_blocks, 1)
        self.disk_block_s = block_bytes / (cfg.disk_gb_s * 1e9) if self.tiers.has_disk else 0.0
        self.stats = SimKVStoreStats()

    def prefix(self, hashes: Sequence[BlockHash]) -> TierHit:
        """The leading run of ``hashes`` the store holds and each block's tier (touching nothing)."""
        return self.tiers.peek(hashes)

    def publish(self, hashes: Sequence[BlockHash]) -> None:
        """A prefill put these blocks (most recently used; may demote others to disk)."""
        self.tiers.add(hashes)

    def fetch_s(
        self, latency: LatencyEstimator, hashes: Sequence[BlockHash], start: int, end: int, block_size: int
    ) -> float:
        """Seconds to pull blocks ``[start, end)`` of ``hashes`` from the store: the router's
        :meth:`TtftTable.store_fetch` of ``end - start`` blocks with the disk blocks in that range
        read first; then the blocks up to ``end`` are touched (disk hits promoted)."""
        n = end - start
        if n <= 0:
            return 0.0
        hit = self.tiers.peek(hashes[:end])
        disk = sum(1 for in_dram in hit.tiers[start:end] if not in_dram)
        table = TtftTable(TtftEstimator(latency), 0, "", disk, self.disk_block_s)
        t = table.store_fetch(n, block_size)
        self.tiers.lookup(hashes[:end])
        st = self.stats
        st.fetches += 1
        st.fetched_blocks += n
        st.disk_blocks_read += disk
        st.fetch_s += t
        return t
