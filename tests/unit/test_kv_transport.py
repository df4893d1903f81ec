"""Transport choice and the fake/auto transports (no network)."""

from __future__ import annotations

import pytest

from kv_store.handle import BlockLocation
from kv_store.layout import KVLayout
from kv_store.transport import AutoTransport, FakeTransport, FetchedBlocks, TransportKind, choose_transport
from pdserve.errors import RequestNotFoundError, UnavailableError

L = KVLayout("m", 1, 1, 4, "float32", 1)  # 32-byte blocks
H1, H2 = b"\x01" * 16, b"\x02" * 16


def test_choose_transport() -> None:
    same = BlockLocation("n", "127.0.0.1:1", "pdkv_x", "hostA")
    assert choose_transport(same, "hostA") is TransportKind.SHM
    assert choose_transport(same, "hostB") is TransportKind.GRPC
    assert choose_transport(BlockLocation("n", "a:1", "", "hostA"), "hostA") is TransportKind.GRPC
    assert choose_transport(same, "") is TransportKind.GRPC


def test_fake_transport_fetch_and_release() -> None:
    t = FakeTransport()
    t.put("n", H1, b"a" * 32)
    t.put("n", H2, b"b" * 32)
    with t.fetch(BlockLocation("n"), L, [H2, H1]) as got:
        assert [bytes(v) for v in got.views] == [b"b" * 32, b"a" * 32]
        assert t.open == 1
    assert t.open == 0 and t.calls == [("n", (H2, H1))]
    with pytest.raises(RequestNotFoundError):
        t.fetch(BlockLocation("other"), L, [H1])


class _FailingShm:
    def fetch(self, location, layout, hashes):
        raise UnavailableError("no arena")

    def close(self) -> None:
        pass


def test_auto_transport_falls_back_to_grpc() -> None:
    grpc_fake = FakeTransport()
    grpc_fake.put("n", H1, b"z" * 32)
    auto = AutoTransport("hostA", grpc=grpc_fake, shm=_FailingShm())
    with auto.fetch(BlockLocation("n", "a:1", "pdkv_x", "hostA"), L, [H1]) as got:
        assert bytes(got.views[0]) == b"z" * 32
    assert auto.fallbacks == 1
    shm_fake = FakeTransport()
    shm_fake.put("n", H1, b"s" * 32)
    auto = AutoTransport("hostA", grpc=grpc_fake, shm=shm_fake)
    with auto.fetch(BlockLocation("n", "a:1", "pdkv_x", "hostA"), L, [H1]) as got:
        assert bytes(got.views[0]) == b"s" * 32
    with auto.fetch(BlockLocation("n", "a:1", "pdkv_x", "hostB"), L, [H1]) as got:
        assert bytes(got.views[0]) == b"z" * 32
    auto.close()


def test_fetched_blocks_release_once() -> None:
    calls = []
    fb = FetchedBlocks([memoryview(b"abc")], lambda: calls.append(1))
    fb.release()
    fb.release()
    assert calls == [1] and fb.views == []
