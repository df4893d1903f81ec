"""Prefix-cache hit ratio of a trace under one global cache (Mooncake's cache study).

Replays a trace's prefix ids (``WorkloadRequest.hash_ids``: one id per ``hash_block`` prompt
tokens, equal ids at equal positions = equal prefixes) through one :class:`PrefixStore` of
``capacity_blocks`` hash blocks (LRU; ``None`` = unlimited). A request reuses its longest
leading run of stored blocks, then stores all its blocks. Hit ratio = reused prompt tokens /
prompt tokens (a reused block counts ``hash_block`` tokens, capped at the prompt length).
Requests without prefix ids count as misses. Pure: no simulation clock, no latency model.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.prefix_store import PrefixStore
from simulator.sim import trace_block_keys
from simulator.workload import Workload


@dataclass(frozen=True)
class HitRatio:
    hit_tokens: int
    input_tokens: int
    evictions: int

    @property
    def ratio(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0


def prefix_hit_ratio(workload: Workload, capacity_blocks: int | None = None) -> HitRatio:
    """Hit ratio of ``workload`` with a global prefix cache of ``capacity_blocks`` hash blocks."""
    store = PrefixStore(1, capacity_blocks)
    hit = total = 0
    for r in workload.requests:
        total += r.input_len
        if not r.hash_ids:
            continue
        # one key per hash block: block_size = hash_block makes trace_block_keys 1:1 with ids
        keys = trace_block_keys(r.hash_ids, len(r.hash_ids) * r.hash_block, r.hash_block, r.hash_block)
        k = store.prefix_blocks(keys)
        hit += min(k * r.hash_block, r.input_len)
        store.add(keys)
    return HitRatio(hit, total, store.evictions)


@dataclass(frozen=True)
class TieredHitRatio:
    """Hit ratio of a trace under a DRAM + disk pool (:class:`simulator.tiered_store.TieredPrefixStore`).

    ``dram_tokens``/``disk_tokens``: reused prompt tokens found in DRAM / only on disk at lookup
    time (a reused block counts ``hash_block`` tokens, the last one capped at the prompt length);
    ``per_request``: for each request, ``(input_len, dram_tokens, disk_tokens, dram_run_tokens)``
    where ``dram_run_tokens`` is the leading all-DRAM part (what it would reuse if it skipped
    disk reads)."""

    dram_tokens: int
    disk_tokens: int
    input_tokens: int
    promotions: int
    demotions: int
    per_request: tuple[tuple[int, int, int, int], ...]

    @property
    def ratio(self) -> float:
        return (self.dram_tokens + self.disk_tokens) / self.input_tokens if self.input_tokens else 0.0

    @property
    def dram_ratio(self) -> float:
        return self.dram_tokens / self.input_tokens if self.input_tokens else 0.0


def tiered_prefix_hit_ratio(
    workload: Workload, dram_blocks: int, disk_blocks: int | None = 0
) -> TieredHitRatio:
    """Replay ``workload``'s prefix ids through one global DRAM + disk pool of ``dram_blocks`` and
    ``disk_blocks`` hash blocks (0: no disk tier; None: unlimited disk). Same accounting as
    :func:`prefix_hit_ratio`, which this equals (in total) when ``disk_blocks`` is 0."""
    from simulator.tiered_store import TieredPrefixStore

    store = TieredPrefixStore(dram_blocks, disk_blocks)
    dram = disk = total = 0
    per: list[tuple[int, int, int, int]] = []
    for r in workload.requests:
        total += r.input_len
        if not r.hash_ids:
            per.append((r.input_len, 0, 0, 0))
            continue
        keys = trace_block_keys(r.hash_ids, len(r.hash_ids) * r.hash_block, r.hash_block, r.hash_block)
        hit = store.lookup(keys)
        # tokens per reused block, the last capped at the prompt length (as prefix_hit_ratio)
        toks = [min(r.hash_block, r.input_len - i * r.hash_block) for i in range(hit.blocks)]
        d = sum(t for t, in_dram in zip(toks, hit.tiers, strict=True) if in_dram)
        k = sum(toks) - d
        run = sum(toks[: hit.dram_run])
        dram += d
        disk += k
        per.append((r.input_len, d, k, run))
        store.add(keys)
    return TieredHitRatio(dram, disk, total, store.promotions, store.demotions, tuple(per))
