"""The producer's lease released off the admission path (#12, decode_worker/loop_admission.py and
kv_store/aio_client.py): the import goes to the engine while the release is in flight; tokens
pass, the request's end waits for the release (and sends it at once); a release that fails fails
the stream naming the store, with the request aborted; one that failed before the import imports
nothing; a caller that leaves still releases. The aio client batches releases over a bounded
window (or max_batch), and flush() sends at once. In process (fake puller and engine loop), and
a real store node on loopback for the client."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.errors import StoreUnavailableError
from tests.unit.test_decode_loop_admission import _Ctx, _Engine, _out, _Puller, _req, _servicer

DOWN = StoreUnavailableError("KV store 127.0.0.1:1 is unavailable: down")


class _HeldPuller(_Puller):
    """A puller whose release waits until ``answer`` is called (then fails with ``error``, if any);
    ``flushes`` counts flush_releases calls."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self._go: asyncio.Future[BaseException | None] | None = None
        self.released = False

    def flush_releases(self) -> None:
        self.flushes += 1

    async def release_async(self, handle) -> None:
        self._go = asyncio.get_running_loop().create_future()
        self.events.append("release_started")
        err = await self._go
        self.events.append("release_async")
        self.released = True
        if err is not None:
            raise err

    def answer(self, error: BaseException | None = None) -> None:
        assert self._go is not None, "no release in flight"
        self._go.set_result(error)


async def _until(cond, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.001)


def _wait_aborted(loop) -> None:
    deadline = time.monotonic() + 10
    while not loop.aborted:  # the abort runs on an admission thread
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.01)


def test_the_import_goes_ahead_and_the_finish_waits_for_the_release() -> None:
    puller = _HeldPuller()
    svc, loop, engine = _servicer(puller, [True])

    async def main() -> list:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        await _until(lambda: "r1" in loop.outs, "the import was not handed to the engine")
        assert not puller.released  # imported while the release is in flight
        out = loop.outs["r1"]
        out.put(_out("r1", 5))  # type: ignore[attr-defined]
        first = await asyncio.wait_for(task, 10)  # a token passes before the release is done
        out.put(_out("r1", 6, finished=True))  # type: ignore[attr-defined]
        nxt = asyncio.ensure_future(gen.__anext__())
        await _until(lambda: puller.flushes >= 1, "the held finish did not send the release at once")
        await asyncio.sleep(0.1)
        assert not nxt.done()  # the finish waits for the release
        puller.answer()
        msgs = [first, await asyncio.wait_for(nxt, 10)]
        async for m in gen:
            msgs.append(m)
        return msgs

    msgs = asyncio.run(asyncio.wait_for(main(), 30))
    assert [t for m in msgs for t in m.token_ids] == [5, 6]
    assert msgs[-1].HasField("finish") and puller.released
    assert engine.imported == ["r1"] and loop.aborted == []
    svc.close()


def test_a_release_that_fails_after_tokens_fails_the_stream_and_drops_the_finish() -> None:
    puller = _HeldPuller()
    svc, loop, engine = _servicer(puller, [True])
    got: list = []

    async def main() -> None:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        await _until(lambda: "r1" in loop.outs, "the import was not handed to the engine")
        out = loop.outs["r1"]
        out.put(_out("r1", 5))  # type: ignore[attr-defined]
        got.append(await asyncio.wait_for(task, 10))
        out.put(_out("r1", 6, finished=True))  # type: ignore[attr-defined]
        await _until(lambda: puller.flushes >= 1, "the held finish did not send the release at once")
        puller.answer(DOWN)
        async for m in gen:
            got.append(m)

    with pytest.raises(StoreUnavailableError, match="KV store 127.0.0.1:1"):
        asyncio.run(asyncio.wait_for(main(), 30))
    assert [t for m in got for t in m.token_ids] == [5]
    assert not any(m.HasField("finish") for m in got)  # never finished before its release
    _wait_aborted(loop)
    assert loop.aborted == ["r1"]
    svc.close()


def test_a_release_that_failed_before_the_import_imports_nothing() -> None:
    """No room at first; meanwhile the store fails the release: the retry fails the request with
    the store's error and imports nothing."""
    puller = _Puller(release_error=DOWN)
    svc, loop, engine = _servicer(puller, [False, True])

    async def main() -> None:
        async for _ in svc.Decode(_req(), _Ctx()):
            pass

    with pytest.raises(StoreUnavailableError, match="KV store 127.0.0.1:1"):
        asyncio.run(asyncio.wait_for(main(), 20))
    assert engine.imported == [] and "r1" not in loop.outs
    svc.close()


class _DoneEngine(_Engine):
    def has_request(self, rid: str) -> bool:
        return False  # the first token ended it: done at once


@pytest.mark.parametrize("error", [None, DOWN])
def test_a_request_done_at_once_is_answered_after_its_release(error) -> None:
    puller = _HeldPuller()
    svc, loop, engine = _servicer(puller, [True])
    loop.engine = svc.state.engine = _DoneEngine([True])

    async def main() -> list:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        await _until(lambda: puller.flushes >= 1, "a request done at once did not send its release")
        await asyncio.sleep(0.05)
        assert not task.done()
        puller.answer(error)
        msgs = [await asyncio.wait_for(task, 10)]
        async for m in gen:
            msgs.append(m)
        return msgs

    if error is None:
        msgs = asyncio.run(asyncio.wait_for(main(), 30))
        assert len(msgs) == 1 and msgs[0].HasField("finish")
    else:
        with pytest.raises(StoreUnavailableError, match="KV store 127.0.0.1:1"):
            asyncio.run(asyncio.wait_for(main(), 30))
    _wait_aborted(loop)  # answered or not, the engine's request is cleaned up
    assert loop.aborted == ["r1"]
    svc.close()


def test_a_caller_that_leaves_still_releases() -> None:
    puller = _HeldPuller()
    svc, loop, engine = _servicer(puller, [True])

    async def main() -> None:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        await _until(lambda: "r1" in loop.outs, "the import was not handed to the engine")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        puller.answer()
        await _until(lambda: puller.released, "the release of a caller that left did not run")

    asyncio.run(asyncio.wait_for(main(), 30))
    _wait_aborted(loop)
    assert loop.aborted == ["r1"]
    svc.close()


# --- the aio client's window -------------------------------------------------------------------


def _client_node():
    from tests.unit.test_kv_aio_client import _leases, _node

    store, stop, address, layout = _node()
    return store, stop, address, layout, _leases


def test_releases_within_the_window_go_in_one_call() -> None:
    from kv_store.aio_client import AsyncKVStoreClient

    store, stop, address, layout, leases_of = _client_node()
    try:
        leases = leases_of(address, layout, 3)

        async def main() -> tuple[list[bool], int]:
            c = AsyncKVStoreClient(address, timeout_s=10, window_s=0.2, max_batch=32)
            try:
                ts = []
                for x in leases:  # in different turns of the loop, within the window
                    ts.append(asyncio.ensure_future(c.release(x)))
                    await asyncio.sleep(0.005)
                return list(await asyncio.gather(*ts)), c.release_calls
            finally:
                await c.close()

        got, calls = asyncio.run(asyncio.wait_for(main(), 30))
        assert got == [True, True, True] and calls == 1
        assert store.stats().node.num_leases == 0
    finally:
        stop()


def test_max_batch_sends_before_the_window_and_flush_sends_at_once() -> None:
    from kv_store.aio_client import AsyncKVStoreClient

    store, stop, address, layout, leases_of = _client_node()
    try:
        leases = leases_of(address, layout, 3)

        async def main() -> tuple[list[bool], bool, int]:
            c = AsyncKVStoreClient(address, timeout_s=10, window_s=60.0, max_batch=2)
            try:
                t0 = time.monotonic()
                two = await asyncio.wait_for(asyncio.gather(c.release(leases[0]), c.release(leases[1])), 10)
                third = asyncio.ensure_future(c.release(leases[2]))
                await asyncio.sleep(0.05)
                pending = not third.done()  # waits for its (60 s) window
                c.flush()
                got = [*two, await asyncio.wait_for(third, 10)]
                assert time.monotonic() - t0 < 20
                return got, pending, c.release_calls
            finally:
                await c.close()

        got, pending, calls = asyncio.run(asyncio.wait_for(main(), 30))
        assert got == [True, True, True] and pending and calls == 2
        assert store.stats().node.num_leases == 0
    finally:
        stop()


def test_a_window_of_zero_sends_each_turns_releases() -> None:
    from kv_store.aio_client import AsyncKVStoreClient

    store, stop, address, layout, leases_of = _client_node()
    try:
        leases = leases_of(address, layout, 2)

        async def main() -> int:
            c = AsyncKVStoreClient(address, timeout_s=10, window_s=0.0)
            try:
                for x in leases:
                    assert await c.release(x)
                return c.release_calls
            finally:
                await c.close()

        assert asyncio.run(asyncio.wait_for(main(), 30)) == 2
    finally:
        stop()


@pytest.mark.parametrize(
    "kw", [{"window_s": -0.001}, {"window_s": float("nan")}, {"max_batch": 0}, {"max_batch": 257}]
)
def test_a_bad_window_or_batch_is_refused_naming_it(kw) -> None:
    from kv_store.aio_client import AsyncKVStoreClient

    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        AsyncKVStoreClient("127.0.0.1:1", **kw)


def test_store_puller_flush_releases_sends_the_queued_release_now() -> None:
    """StorePuller.flush_releases sends what release_async queued on this loop (a 60 s window
    here) at once; the lease is released."""
    from decode_worker.puller import StorePuller
    from kv_store.aio_client import AsyncKVStoreClient
    from kv_store.handle import BlockLocation, KVHandle

    store, stop, address, layout, leases_of = _client_node()
    try:
        (lease,) = leases_of(address, layout, 1)
        puller = StorePuller(transport=None)  # type: ignore[arg-type]
        loc = BlockLocation("n1", address, "", "h")
        handle = KVHandle("r1", (b"k" * 16,), (loc,), layout, 2, lease_id=lease)

        async def main() -> bool:
            key = (asyncio.get_running_loop(), address)
            puller._aio[key] = AsyncKVStoreClient(address, timeout_s=10, window_s=60.0)
            t = asyncio.ensure_future(puller.release_async(handle))
            await asyncio.sleep(0.05)
            waiting = not t.done()
            puller.flush_releases()
            await asyncio.wait_for(t, 10)
            await puller.aclose()
            return waiting

        assert asyncio.run(asyncio.wait_for(main(), 30))
        assert store.stats().node.num_leases == 0
    finally:
        stop()
