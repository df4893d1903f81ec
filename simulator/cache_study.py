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
