"""FollowingStoreClient: a worker's store client follows a restarted store node to its new port."""

from __future__ import annotations

import os

import pytest

from engine.block_hash import chain_hashes
from kv_store.client import FollowingStoreClient, KVStoreClient
from kv_store.layout import KVLayout
from kv_store.service import serve
from kv_store.store import StoreConfig
from pdserve.errors import UnavailableError

L = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)  # 1 KiB


def _blocks(n: int) -> tuple[list[bytes], list[bytes]]:
    hs = chain_hashes(list(range(n * L.block_size)), L.block_size, "m")
    return [bytes(h) for h in hs], [os.urandom(L.block_nbytes) for _ in range(n)]


def test_follows_the_node_to_its_new_address_and_retries_the_call() -> None:
    first = serve(StoreConfig("node-a", L, capacity_blocks=8))
    where = {"address": first.address}
    made: list[str] = []

    def connect(address: str) -> KVStoreClient:
        made.append(address)
        return KVStoreClient(address, timeout_s=5)

    client = FollowingStoreClient(lambda: where["address"], connect, first.address)
    hs, data = _blocks(2)
    try:
        assert client.put_blocks(L, hs, data).num_stored == 2
        assert client.lookup(hs).num_prefix_blocks == 2
        first.stop(0)  # the node dies ...
        second = serve(StoreConfig("node-a", L, capacity_blocks=8))  # ... and restarts elsewhere, empty
        where["address"] = second.address
        try:
            assert client.lookup(hs).num_prefix_blocks == 0  # retried at the new address
            assert client.address == second.address and client.moves == 1
            assert made == [first.address, second.address]
            assert client.put_blocks(L, hs, data).num_stored == 2
            assert client.get_blocks(L, hs) == data
        finally:
            second.stop(0)
    finally:
        client.close()


def test_a_node_that_did_not_move_raises_the_original_error() -> None:
    srv = serve(StoreConfig("node-b", L, capacity_blocks=8))
    address = srv.address
    client = FollowingStoreClient(lambda: address, lambda a: KVStoreClient(a, timeout_s=2), address)
    srv.stop(0)
    try:
        with pytest.raises(UnavailableError):
            client.lookup(_blocks(1)[0])
        assert client.moves == 0

        def restarting() -> str:
            raise RuntimeError("actor restarting")

        client._resolve = restarting
        with pytest.raises(UnavailableError):  # the resolver's failure does not mask the call's
            client.stats()
    finally:
        client.close()
