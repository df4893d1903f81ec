"""pdserve.thread_iter.iterate_on_threads: a blocking iterator served from an event loop, one
next() per thread hop; an early stop wakes and closes it, never while a next() runs."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.thread_iter import iterate_on_threads


def test_items_in_order_each_made_on_a_thread() -> None:
    main = threading.get_ident()
    made_on: list[int] = []

    def gen():
        for i in range(3):
            made_on.append(threading.get_ident())
            yield i

    async def run() -> list[int]:
        with ThreadPoolExecutor(2) as ex:
            return [x async for x in iterate_on_threads(gen(), ex)]

    assert asyncio.run(run()) == [0, 1, 2]
    assert made_on and main not in made_on


def test_an_error_of_next_is_raised_and_the_iterator_closed() -> None:
    closed = threading.Event()

    def gen():
        try:
            yield 1
            raise ValueError("broken producer")
        finally:
            closed.set()

    async def run() -> list[int]:
        got = []
        with ThreadPoolExecutor(1) as ex:
            async for x in iterate_on_threads(gen(), ex):
                got.append(x)
        return got

    with pytest.raises(ValueError, match="broken producer"):
        asyncio.run(run())
    assert closed.is_set()


def test_a_consumer_cancelled_while_next_blocks_wakes_it_then_closes_it() -> None:
    wake, closed, abandoned = threading.Event(), threading.Event(), threading.Event()
    running = threading.Event()

    def gen():
        try:
            yield "first"
            running.set()
            wake.wait(10)  # blocked on its producer
            yield "never delivered"
        finally:
            closed.set()

    def on_abandon() -> None:
        abandoned.set()
        wake.set()

    async def run() -> None:
        ex = ThreadPoolExecutor(1)
        got = []

        async def consume() -> None:
            async for x in iterate_on_threads(gen(), ex, on_abandon):
                got.append(x)

        t = asyncio.ensure_future(consume())
        while not running.is_set():
            await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert got == ["first"] and abandoned.is_set()
        for _ in range(500):  # closed once the blocked next returned (woken by on_abandon)
            if closed.is_set():
                break
            await asyncio.sleep(0.01)
        ex.shutdown(wait=True)

    asyncio.run(run())
    assert closed.is_set()


def test_a_finished_iterator_is_not_abandoned() -> None:
    abandoned = []

    async def run() -> list[int]:
        with ThreadPoolExecutor(1) as ex:
            return [x async for x in iterate_on_threads(iter([1, 2]), ex, lambda: abandoned.append(1))]

    assert asyncio.run(run()) == [1, 2] and abandoned == []
