"""BlockStore in-process: arena + node + index together (heap arena and shm arena)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from engine.block_hash import chain_hashes
from kv_store.index import InMemoryIndex
from kv_store.layout import KVLayout
from kv_store.store import BlockStore, StoreConfig
from pdserve.errors import InvalidRequestError, LayoutMismatchError, RequestNotFoundError

L = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_size=4)


def blocks(n: int, salt: str = "") -> tuple[list[bytes], list[bytes]]:
    hs = chain_hashes(list(range(n * 4)), 4, "m", salt=salt)
    return hs, [os.urandom(L.block_nbytes) for _ in hs]


@pytest.mark.parametrize("use_shm", [False, True])
def test_put_get_lease_and_index(use_shm: bool) -> None:
    index = InMemoryIndex()
    store = BlockStore(StoreConfig("n1", L, capacity_blocks=3, use_shm=use_shm), index)
    try:
        hs, data = blocks(4)
        assert [store.put_block(h, d) for h, d in zip(hs[:3], data[:3], strict=True)] == [True] * 3
        assert store.put_block(hs[0], data[0]) is False
        assert index.lookup(hs).num_prefix_blocks == 3
        assert [store.get_block(h) for h in hs[:3]] == data[:3]
        grant = store.lease(hs[:1], ttl_s=5)
        assert grant.slot_nbytes == L.block_nbytes and len(grant.slots) == 1
        assert grant.shm_name == (store.arena.name if use_shm else "")
        store.put_block(hs[3], data[3])  # evicts LRU unpinned: hs[1]
        assert store.exists(hs) == [True, False, True, True]
        r = store.lookup(hs)
        assert r.num_prefix_blocks == 1  # the index saw the eviction
        assert store.release(grant.lease_id)
        assert store.delete([hs[0]]).deleted == (hs[0],)
        assert index.lookup(hs).num_prefix_blocks == 0
        st = store.stats().node
        assert (st.num_blocks, st.evictions, st.num_leases) == (2, 1, 0)
    finally:
        store.close()
    assert index.nodes() == []
    if use_shm:
        assert not Path("/dev/shm", store.arena.name).exists()


def test_pinned_views_are_zero_copy_and_block_eviction() -> None:
    with BlockStore(StoreConfig("n1", L, capacity_blocks=1, use_shm=False)) as store:
        hs, data = blocks(2)
        store.put_block(hs[0], data[0])
        with store.pinned_views([hs[0]]) as (v,):
            assert bytes(v) == data[0]
            with pytest.raises(Exception, match="leased or being read"):
                store.put_block(hs[1], data[1])
            del v
        store.put_block(hs[1], data[1])
        with pytest.raises(RequestNotFoundError):
            store.get_block(hs[0])


def test_bad_inputs() -> None:
    with BlockStore(StoreConfig("n1", L, capacity_blocks=1, use_shm=False)) as store:
        hs, data = blocks(1)
        with pytest.raises(InvalidRequestError, match="layout needs"):
            store.put_block(hs[0], data[0][:-1])
        with pytest.raises(InvalidRequestError, match="16-byte"):
            store.put_block(b"x", data[0])
        with pytest.raises(LayoutMismatchError, match="head_dim: 8 != 16"):
            store.check_layout(KVLayout("m", 2, 2, 16, "float16", 4))
        assert store.stats().node.num_pending == 0  # failed puts leave nothing reserved


def test_concurrent_puts_of_same_and_different_blocks() -> None:
    with BlockStore(StoreConfig("n1", L, capacity_blocks=64, use_shm=False)) as store:
        hs, data = blocks(32)

        def worker() -> None:
            for h, d in zip(hs, data, strict=True):
                store.put_block(h, d)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = store.stats().node
        assert st.num_blocks == 32 and st.puts == 32 and st.put_dedups == 96 and st.num_pinned == 0
        assert [store.get_block(h) for h in hs] == data
