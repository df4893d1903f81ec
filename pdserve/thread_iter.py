"""A blocking iterator served from an event loop, one item per thread hop (#12: grpc.aio servers).

A sync server-streaming handler on a ``grpc.aio`` server runs on the server's thread pool and hands
each message to the loop from its thread; a loop that stops while such a handler waits (the server
stopped mid-stream) leaves that thread blocked for good, and with it the interpreter's exit.
:func:`iterate_on_threads` turns the handler's iterator into an async generator instead: each
``next()`` runs on a thread of the given executor and is awaited on the loop, so no thread waits on
the loop, and a thread is held only while an item is being made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def iterate_on_threads(
    it: Iterator[T], executor: Executor, on_abandon: Callable[[], None] | None = None
) -> AsyncIterator[T]:
    """The items of ``it``, each made by ``next(it)`` on a thread of ``executor``. A consumer that
    stops early (the call cancelled, the async generator closed) calls ``on_abandon`` (e.g. to
    wake a ``next`` blocked on a condition), and ``it`` is closed (its ``finally`` runs) as soon as
    no ``next`` of it is running: at once, or when the running one returns. An exception of
    ``next`` is raised here; ``it`` is closed after it too."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[object] | None = None
    finished = False
    try:
        while True:
            pending = loop.run_in_executor(executor, next, it, _END)
            item = await asyncio.shield(pending)  # cancelled: the next goes on (finally)
            pending = None
            if item is _END:
                finished = True
                return
            yield item  # type: ignore[misc]
    finally:
        if not finished and on_abandon is not None:
            on_abandon()
        if pending is None or pending.done():
            getattr(it, "close", lambda: None)()
        else:  # a next still on its thread: closed once it returns
            pending.add_done_callback(lambda _f: getattr(it, "close", lambda: None)())
