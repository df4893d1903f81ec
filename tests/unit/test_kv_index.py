"""InMemoryIndex: longest-prefix lookup across nodes."""

from __future__ import annotations

import pytest

from engine.block_hash import chain_hashes
from kv_store.handle import BlockLocation
from kv_store.index import InMemoryIndex, KVIndex
from pdserve.errors import InvalidRequestError

A = BlockLocation("a", "127.0.0.1:1", "shm_a", "host1")
B = BlockLocation("b", "127.0.0.1:2", "", "host2")


def chain(n: int, salt: str = "") -> list[bytes]:
    return chain_hashes(list(range(n * 4)), 4, "m", salt=salt)


def make() -> InMemoryIndex:
    idx = InMemoryIndex()
    idx.add_node(A)
    idx.add_node(B)
    return idx


def test_is_a_kvindex() -> None:
    idx: KVIndex = make()
    assert idx.lookup([]).num_prefix_blocks == 0


def test_longest_prefix_stops_at_first_miss() -> None:
    idx = make()
    hs = chain(5)
    idx.register("a", hs[:2])
    idx.register("b", hs[1:3])
    idx.register("a", hs[4:])  # after a gap: not part of the prefix
    r = idx.lookup(hs)
    assert r.num_prefix_blocks == 3
    assert r.locations == ((A,), (A, B), (B,))
    assert r.nodes_with_whole_prefix() == []
    assert idx.lookup(hs[:2]).nodes_with_whole_prefix() == ["a"]
    assert idx.lookup(chain(5, salt="other")).num_prefix_blocks == 0


def test_unregister_and_drop_node() -> None:
    idx = make()
    hs = chain(3)
    idx.register("a", hs)
    idx.register("b", hs[:1])
    idx.unregister("a", hs[1:2])
    assert idx.lookup(hs).num_prefix_blocks == 1
    idx.drop_node("b")
    assert idx.lookup(hs).locations == ((A,),)
    idx.drop_node("a")
    assert idx.lookup(hs).num_prefix_blocks == 0
    assert idx.num_blocks() == 0
    idx.drop_node("never-added")
    idx.unregister("never-added", hs)


def test_register_is_idempotent_and_needs_known_node() -> None:
    idx = make()
    hs = chain(2)
    idx.register("a", hs)
    idx.register("a", hs)
    assert idx.num_blocks("a") == 2
    with pytest.raises(InvalidRequestError, match="add_node"):
        idx.register("zzz", hs)


def test_add_node_updates_address() -> None:
    idx = make()
    hs = chain(1)
    idx.register("a", hs)
    moved = BlockLocation("a", "127.0.0.1:9", "shm_a2", "host1")
    idx.add_node(moved)
    assert idx.lookup(hs).locations == ((moved,),)
