"""StoreNode policy: LRU eviction, capacity, pins, leases and their expiry (fake clock)."""

from __future__ import annotations

import pytest

from kv_store.node import NodeConfig, StoreNode
from pdserve.errors import InvalidRequestError, RequestNotFoundError, ResourceExhaustedError


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def make(
    capacity: int = 3, clock: FakeClock | None = None, quota: int | None = 0
) -> tuple[StoreNode, FakeClock]:
    """``quota``: leased blocks per owner (0: the whole capacity, so that these tests of eviction
    are not about quotas; None: the node's default, half the capacity)."""
    clock = clock or FakeClock()
    ids = iter(f"lease{i}" for i in range(1000))
    node = StoreNode(
        NodeConfig(
            capacity,
            100,
            default_lease_ttl_s=10,
            max_lease_ttl_s=60,
            max_leased_blocks_per_owner=capacity if quota == 0 else quota,
        ),
        clock=clock,
        new_lease_id=lambda: next(ids),
    )
    return node, clock


def put(node: StoreNode, i: int) -> tuple[bytes, ...]:
    t = node.begin_put(h(i))
    node.commit_put(t)
    return t.evicted


def test_put_get_and_idempotent_put() -> None:
    node, _ = make()
    assert put(node, 1) == ()
    slot = node.get(h(1))
    assert slot is not None
    t = node.begin_put(h(1))
    assert not t.is_new and t.slot == slot
    node.commit_put(t)
    s = node.stats()
    assert (s.num_blocks, s.puts, s.put_dedups, s.hits) == (1, 1, 1, 1)
    assert node.get(h(2)) is None and node.stats().misses == 1


def test_uncommitted_put_is_invisible_and_abort_frees_slot() -> None:
    node, _ = make(capacity=1)
    t = node.begin_put(h(1))
    assert node.exists([h(1)]) == [False]
    assert node.stats().num_pending == 1
    with pytest.raises(ResourceExhaustedError):  # the only slot is reserved
        node.begin_put(h(2))
    node.abort_put(t)
    assert node.stats().num_pending == 0
    put(node, 2)
    assert node.exists([h(1), h(2)]) == [False, True]


def test_lru_eviction_at_capacity() -> None:
    node, _ = make(capacity=3)
    for i in (1, 2, 3):
        put(node, i)
    node.get(h(1))  # 1 is now most recent: order 2, 3, 1
    assert put(node, 4) == (h(2),)
    assert put(node, 5) == (h(3),)
    assert node.exists([h(1), h(2), h(3), h(4), h(5)]) == [True, False, False, True, True]
    assert node.stats().evictions == 2
    assert len(node) == 3


def test_lease_pins_until_release() -> None:
    node, _ = make(capacity=2)
    put(node, 1)
    put(node, 2)
    lease = node.lease([h(1), h(2)], ttl_s=30)
    assert lease.lease_id == "lease0" and lease.ttl_s == 30
    with pytest.raises(ResourceExhaustedError) as ei:
        node.begin_put(h(3))
    assert ei.value.retry_after_s == pytest.approx(30)
    assert node.stats().num_pinned == 2
    assert node.release(lease.lease_id) is True
    assert node.release(lease.lease_id) is False  # idempotent
    assert put(node, 3) == (h(1),)


def test_lease_expiry_reaped_on_access() -> None:
    node, clock = make(capacity=1)
    put(node, 1)
    lease = node.lease([h(1)])  # default ttl 10
    clock.advance(9.9)
    with pytest.raises(ResourceExhaustedError):
        node.begin_put(h(2))
    assert node.stats().num_leases == 1
    clock.advance(0.2)
    assert put(node, 2) == (h(1),)  # expired lease reaped, block evictable again
    s = node.stats()
    assert (s.num_leases, s.expired_leases) == (0, 1)
    assert node.release(lease.lease_id) is False


def test_two_leases_on_one_block() -> None:
    node, clock = make(capacity=1, quota=2)
    put(node, 1)
    a = node.lease([h(1)], ttl_s=5)
    node.lease([h(1)], ttl_s=20)
    node.release(a.lease_id)
    with pytest.raises(ResourceExhaustedError):
        node.begin_put(h(2))
    clock.advance(21)
    put(node, 2)


def test_lease_is_all_or_nothing() -> None:
    node, _ = make()
    put(node, 1)
    with pytest.raises(RequestNotFoundError, match="1 of 2 KV blocks are not stored"):
        node.lease([h(1), h(9)])
    assert node.stats().num_leases == 0 and node.stats().num_pinned == 0


@pytest.mark.parametrize("ttl", [-1.0, float("nan")])
def test_bad_lease_ttl(ttl: float) -> None:
    node, _ = make()
    put(node, 1)
    with pytest.raises(InvalidRequestError, match="ttl_s"):
        node.lease([h(1)], ttl_s=ttl)


@pytest.mark.parametrize("ttl", [61.0, 1e9, float("inf")])
def test_long_lease_ttl_is_clamped_to_the_max(ttl: float) -> None:
    node, clock = make(capacity=1, quota=2)
    put(node, 1)
    lease = node.lease([h(1)], ttl_s=ttl)
    assert lease.ttl_s == 60 and lease.ttl_clamped and lease.expires_at == pytest.approx(clock() + 60)
    assert not node.lease([h(1)], ttl_s=60).ttl_clamped
    assert node.stats().lease_ttl_clamps == 1
    clock.advance(60.01)  # the block is evictable again after the max ttl, whatever was asked
    assert put(node, 2) == (h(1),)


def test_pins_block_eviction_and_delete() -> None:
    node, _ = make(capacity=1)
    put(node, 1)
    assert node.pin([h(1)]) == [node.slot_of(h(1))]
    with pytest.raises(ResourceExhaustedError):
        node.begin_put(h(2))
    res = node.delete([h(1), h(7)])
    assert (res.deleted, res.num_missing, res.num_pinned) == ((), 1, 1)
    node.unpin([h(1)])
    res = node.delete([h(1)])
    assert res.deleted == (h(1),)
    assert len(node) == 0
    with pytest.raises(ValueError):
        node.unpin([h(1)])


def test_put_under_lease() -> None:
    node, clock = make(capacity=2)
    lease = node.lease([], ttl_s=5)
    t = node.begin_put(h(1))
    node.commit_put(t)
    node.add_to_lease(lease.lease_id, h(1))
    put(node, 2)
    assert put(node, 3) == (h(2),)  # 1 is leased, 2 is the only candidate
    clock.advance(6)  # lease expired: 1 becomes evictable, counted as used when its lease ended
    assert put(node, 4) == (h(3),)
    assert put(node, 5) == (h(1),)
    with pytest.raises(RequestNotFoundError):
        node.add_to_lease(lease.lease_id, h(4))


def test_evicted_slot_is_reused() -> None:
    node, _ = make(capacity=1)
    put(node, 1)
    s1 = node.slot_of(h(1))
    put(node, 2)
    assert node.slot_of(h(2)) == s1 and node.slot_of(h(1)) is None


def test_lease_on_in_flight_put_that_aborts_does_not_corrupt_counts() -> None:
    node, _ = make(capacity=2)
    first = node.begin_put(h(1))  # writer A reserves
    second = node.begin_put(h(1))  # writer B dedups against the in-flight put
    assert not second.is_new
    lease = node.lease([], ttl_s=30)
    node.add_to_lease(lease.lease_id, h(1))  # B leases what it believes is stored
    node.abort_put(first)  # A fails: the block is gone
    assert node.exists([h(1)]) == [False]
    put(node, 1)  # put again: a fresh entry, not pinned by B's old lease
    node.release(lease.lease_id)
    assert node.stats().num_pinned == 0
    put(node, 2)
    assert put(node, 3) == (h(1),)  # evictable normally: no negative/leaked lease counts
