"""The decode worker's ``grpc.aio`` store channels (``StorePuller._aio``: one per event loop and
store node, opened by ``release_async``) are closed when the servicer closes, whether their event
loop still runs or has stopped first (the worker stops its server, and so the loop, before it
closes the servicer), through the pullers the worker stacks (SpillPuller, DistPuller)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from decode_worker.puller import StorePuller
from pdserve.worker_base import Role


class _LoopThread:
    """An event loop on its own thread, as the worker's AioServer runs one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._t.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._t.join(10)
        self.loop.close()


def _open(puller: StorePuller, lt: _LoopThread, *addresses: str) -> list:
    async def get() -> list:
        return [puller._aio_client(a) for a in addresses]

    return lt.run(get())


def _closed(client) -> bool:
    return client._channel._channel.closed()


def _servicer(puller):
    from prometheus_client import CollectorRegistry

    from decode_worker.service import AsyncDecodeServicer
    from pdserve.metrics import KVPullMetrics

    state = SimpleNamespace(
        config=SimpleNamespace(worker_id="decode-9", role=Role.DECODE, admission_timeout_s=1.0),
        engine=SimpleNamespace(model_id="m"),
        loop=SimpleNamespace(),
        count_finished=lambda: None,
    )
    return AsyncDecodeServicer(state, puller, KVPullMetrics(CollectorRegistry(), "decode-9"))  # type: ignore[arg-type]


def test_servicer_close_closes_channels_of_a_running_loop() -> None:
    lt = _LoopThread()
    try:
        puller = StorePuller(SimpleNamespace())  # type: ignore[arg-type]
        clients = _open(puller, lt, "127.0.0.1:1", "127.0.0.1:2")
        assert len(puller._aio) == 2 and not any(_closed(c) for c in clients)
        _servicer(puller).close()
        assert puller._aio == {}
        assert all(_closed(c) for c in clients)
    finally:
        lt.stop()


def test_channels_of_a_stopped_loop_are_closed_too() -> None:
    from decode_worker.spill_puller import SpillPuller

    lt = _LoopThread()
    store = StorePuller(SimpleNamespace())  # type: ignore[arg-type]
    (client,) = _open(store, lt, "127.0.0.1:1")
    lt.stop()  # as the worker: server (and loop) stopped, then the servicer closed
    _servicer(SpillPuller(store)).close()  # the worker's stack: closing is passed down
    assert store._aio == {} and _closed(client)
    store.close()  # idempotent


def test_aclose_closes_the_running_loops_channels_only() -> None:
    a, b = _LoopThread(), _LoopThread()
    try:
        puller = StorePuller(SimpleNamespace())  # type: ignore[arg-type]
        (ca,) = _open(puller, a, "127.0.0.1:1")
        (cb,) = _open(puller, b, "127.0.0.1:1")
        a.run(puller.aclose())
        assert _closed(ca) and not _closed(cb)
        assert list(puller._aio) == [(b.loop, "127.0.0.1:1")]
        puller.close()
        assert _closed(cb) and puller._aio == {}
    finally:
        a.stop()
        b.stop()
