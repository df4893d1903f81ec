"""Pure policy of the distributed KV pool: global lookup, replica targets, watermark eviction,
index re-sync decisions (no Redis, no sockets)."""

from __future__ import annotations

import pytest

from engine.block_hash import chain_hashes
from kv_store.handle import BlockLocation
from kv_store.index import (
    InMemoryIndex,
    LookupResult,
    best_node_for_prefix,
    locate_prefix,
    prompt_prefix_hashes,
)
from kv_store.index_sync import IndexSyncer, SyncState, needs_resync
from kv_store.node import NodeConfig, StoreNode
from kv_store.replication import NodeCapacity, choose_targets
from pdserve.errors import UnavailableError

A, B, C = (BlockLocation(n, f"127.0.0.1:{i}") for i, n in enumerate("abc", 1))


def chain(n: int) -> list[bytes]:
    return chain_hashes(list(range(n * 4)), 4, "m")


def test_best_node_for_prefix_prefers_longest_contiguous_prefix() -> None:
    idx = InMemoryIndex()
    for loc in (A, B, C):
        idx.add_node(loc)
    hs = chain(4)
    idx.register("a", hs[:2])
    idx.register("b", hs[:3])
    idx.register("c", hs[1:4])  # holds more blocks, but not from block 0
    r = idx.lookup(hs)
    assert r.num_prefix_blocks == 4
    assert r.prefix_blocks_by_node() == {"a": 2, "b": 3}
    assert best_node_for_prefix(r) == (B, 3)
    assert r.best_node() == (B, 3)
    # ties on length are broken by load, then by node id
    idx.register("a", hs[2:3])
    r = idx.lookup(hs)
    assert best_node_for_prefix(r) == (A, 3)
    assert best_node_for_prefix(r, load={"a": 0.9, "b": 0.1}.__getitem__) == (B, 3)
    assert best_node_for_prefix(LookupResult(0, ())) is None


def test_locate_prefix_from_prompt_token_ids() -> None:
    """The router's one-call Lookup: hashes of the blocks a prefix cache can serve (never the
    block holding the last prompt token), then the node with the longest cached run."""
    ids = list(range(4 * 3 + 1))  # 13 tokens, block size 4: 3 full blocks, all servable
    hs = prompt_prefix_hashes(ids, 4, "m")
    assert hs == chain_hashes(ids, 4, "m")[:3]
    assert len(prompt_prefix_hashes(ids[:12], 4, "m")) == 2  # last token in block 3: not servable
    assert prompt_prefix_hashes(ids[:4], 4, "m") == [] and prompt_prefix_hashes([], 4, "m") == []
    assert prompt_prefix_hashes(ids, 4, "m", adapter_id="lora") != hs
    idx = InMemoryIndex()
    for loc in (A, B):
        idx.add_node(loc)
    assert locate_prefix(idx, ids, 4, "m") is None
    idx.register("a", hs[:1])
    idx.register("b", hs[:2])
    assert locate_prefix(idx, ids, 4, "m") == (B, 2)
    assert locate_prefix(idx, ids, 4, "m", salt="tenant2") is None  # another tenant's keys
    assert locate_prefix(idx, ids[:4], 4, "m") is None  # no servable block


def test_choose_targets_ranks_by_free_capacity() -> None:
    cands = [NodeCapacity("a", 5), NodeCapacity("b", 9), NodeCapacity("c", 9), NodeCapacity("d", 0)]
    assert choose_targets(cands, exclude={"c"}) == ["b", "a", "d"]
    assert choose_targets([], exclude=()) == []


def test_watermark_eviction_evicts_lru_unpinned_down_to_low_water() -> None:
    node = StoreNode(NodeConfig(10, 1, high_water=0.8, low_water=0.5))
    hs = chain(9)
    for h in hs:
        node.commit_put(node.begin_put(h))
        if h == hs[7]:
            assert node.watermark_excess() == 0  # 8 used: at, not past, the high-water mark
    assert node.watermark_excess() == 4  # 9 used > 8: down to 5
    node.pin([hs[1]])
    assert node.evictable(limit=3) == [hs[0], hs[2], hs[3]]
    evicted = node.evict_to_low_water(protected={hs[0]})
    assert evicted == (hs[2], hs[3], hs[4], hs[5])
    assert len(node) == 5 and node.stats().evictions == 4
    assert node.evict_to_low_water() == ()  # below the high-water mark now
    assert sorted(node.stored_hashes()) == sorted([hs[0], hs[1], hs[6], hs[7], hs[8]])


def test_watermarks_are_validated() -> None:
    with pytest.raises(ValueError, match="low_water"):
        NodeConfig(10, 1, high_water=0.5, low_water=0.8)
    with pytest.raises(ValueError, match="low_water"):
        NodeConfig(10, 1, high_water=1.5)


def test_needs_resync() -> None:
    assert needs_resync(SyncState(), "g1", 0)
    assert not needs_resync(SyncState("g1", 0), "g1", 0)
    assert needs_resync(SyncState("g1", 0), "g2", 0)  # Redis restarted
    assert needs_resync(SyncState("g1", 0), "g1", 1)  # a write was dropped


class FakeIndex:
    """A SyncableIndex whose generation and failures the test sets; down raises."""

    def __init__(self) -> None:
        self.generation = "g1"
        self.write_failures = 0
        self.down = False

    def ensure_generation(self) -> str:
        if self.down:
            raise UnavailableError("down")
        return self.generation


def test_index_syncer_resyncs_on_new_generation_or_dropped_write() -> None:
    idx = FakeIndex()
    calls: list[int] = []
    syncer = IndexSyncer(idx, lambda: calls.append(1), interval_s=0.01)
    assert syncer.tick() is True  # first tick: initial registration
    assert syncer.tick() is False
    idx.down = True
    assert syncer.tick() is False  # probe fails: retried next tick, nothing raised
    idx.down, idx.generation = False, "g2"
    assert syncer.tick() is True
    idx.write_failures = 3
    assert syncer.tick() is True
    assert syncer.tick() is False
    assert len(calls) == syncer.resyncs == 3


def test_index_syncer_keeps_state_when_resync_fails() -> None:
    idx = FakeIndex()
    fail = [True]

    def resync() -> None:
        if fail[0]:
            raise UnavailableError("redis went away mid-resync")

    syncer = IndexSyncer(idx, resync, interval_s=0.01)
    assert syncer.tick() is False and syncer.state == SyncState()
    fail[0] = False
    assert syncer.tick() is True and syncer.state == SyncState("g1", 0)
