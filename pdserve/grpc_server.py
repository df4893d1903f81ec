"""Start a gRPC server with pdserve's servicer wrapping, health checking and reflection: a sync
one on a thread pool (:func:`start_server`), or an asyncio one on an event-loop thread
(:func:`start_aio_server`, for data planes whose calls mostly wait: one stream costs memory, not
a thread).

Transport security (TLS, mutual TLS, the cluster token on internal services, plaintext only on
loopback) comes from :mod:`pdserve.security`: the process's installed configuration, or the one
passed as ``security``."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.keepalive import KEEPALIVE
from pdserve.limits import grpc_options
from pdserve.security import SecurityConfig, bind, server_security
from pdserve.status import (
    _FACTORIES,
    _aborted,
    _check,
    _safe_deserializer,
    _serializer,
    _wrap,
    abort_with_aio,
    add_servicer,
)

T = TypeVar("T")


def start_server(
    services: list[tuple[_descriptor.ServiceDescriptor, object]],
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 32,
    name: str = "pdserve",
    security: SecurityConfig | None = None,
    not_serving: tuple[str, ...] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Serve ``services`` on host:port (0 = any free port); returns (server, bound port, health).

    Health (grpc.health.v1) starts SERVING for ``""`` (overall) and every service, except the
    names in ``not_serving``, which start NOT_SERVING: a server whose readiness depends on more
    than being up (the router: its workers) sets them through the returned servicer.

    ``security``: default :func:`pdserve.security.current`. Raises
    :class:`pdserve.security.SecurityConfigError` before binding anything when the address or
    the services cannot be served safely (plaintext off loopback; internal services without a
    way to authenticate callers)."""
    sec = server_security([d.full_name for d, _ in services], security)
    sec.config.check_bind(host)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name),
        options=[*grpc_options(), *KEEPALIVE.server_options()],
        interceptors=sec.interceptors,
    )
    for desc, impl in services:
        add_servicer(server, desc, impl)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = [d.full_name for d, _ in services]
    for n in ["", *names]:
        ok = n not in not_serving
        hs.set(
            n, health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        )
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = bind(server, host, port, sec)
    server.start()
    return server, bound, hs


# ---------------------------------------------------------------------------- asyncio servers
class AioServer:
    """A ``grpc.aio`` server running on its own event-loop thread (started by
    :func:`start_aio_server`). ``loop`` is that loop: every coroutine of the servicers runs there,
    so a call that waits (a stream waiting on tokens) costs memory, not a thread.
    :meth:`run` runs a coroutine there from another thread; :meth:`stop` ends the server and
    the loop (calls get ``grace_s`` seconds)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._serve_loop, name=f"{name}-aio", daemon=True)
        self._thread.start()

    def _serve_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the server's loop and return its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, grace_s: float | None = 2.0) -> threading.Event:
        """Stop serving (calls in flight get ``grace_s`` seconds), then the loop. Returns a set
        event, so that ``server.stop(grace).wait()`` reads as for a sync ``grpc.Server``."""
        if not self.loop.is_closed() and self.loop.is_running():
            if self.server is not None:
                self.run(self.server.stop(grace_s))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
        done = threading.Event()
        done.set()
        return done


def start_aio_server(
    services: list[tuple[_descriptor.ServiceDescriptor, object]],
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "pdserve",
    security: SecurityConfig | None = None,
    not_serving: tuple[str, ...] = (),
    sync_threads: int = 4,
) -> tuple[AioServer, int, health.HealthServicer]:
    """:func:`start_server` on ``grpc.aio``: serve ``services`` from one event-loop thread
    (:class:`AioServer`); returns (server, bound port, health). Servicer methods are wrapped by
    :func:`add_aio_servicer`. Health (a thread-safe servicer: set it from any thread) and
    reflection run on a pool of ``sync_threads`` threads."""
    sec = server_security([d.full_name for d, _ in services], security)
    sec.config.check_bind(host)
    srv = AioServer(name)

    async def build() -> tuple[grpc.aio.Server, int, health.HealthServicer]:
        server = grpc.aio.server(
            futures.ThreadPoolExecutor(max_workers=sync_threads, thread_name_prefix=f"{name}-sync"),
            options=[*grpc_options(), *KEEPALIVE.server_options()],
            interceptors=[_AioInterceptor(i) for i in sec.interceptors],
        )
        for desc, impl in services:
            add_aio_servicer(server, desc, impl)
        hs = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        names = [d.full_name for d, _ in services]
        for n in ["", *names]:
            ok = n not in not_serving
            hs.set(
                n,
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING,
            )
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        bound = bind(server, host, port, sec)  # type: ignore[arg-type]
        await server.start()
        return server, bound, hs

    try:
        srv.server, bound, hs = srv.run(build())
    except BaseException:
        srv.stop(0)
        raise
    return srv, bound, hs


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _CaptureAbort:
    """Stands in for a servicer context to learn the status a sync handler aborts with."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Denied(code, details)


class _AioInterceptor(grpc.aio.ServerInterceptor):
    """Runs a sync :class:`grpc.ServerInterceptor` that passes a call on or denies it
    (:class:`pdserve.security.ClusterAuthInterceptor`) on an asyncio server: a denial (a handler
    that aborts) becomes an async handler ending the call with the same status."""

    def __init__(self, inner: grpc.ServerInterceptor) -> None:
        self.inner = inner

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        verdict = self.inner.intercept_service(lambda _d: handler, handler_call_details)
        if verdict is handler or verdict is None:
            return verdict
        fn = verdict.unary_unary or verdict.unary_stream or verdict.stream_unary or verdict.stream_stream
        try:
            fn(None, _CaptureAbort())
        except _Denied as d:
            code, details = d.code, d.details
        else:  # pragma: no cover - a verdict that does not abort is passed on as it is
            return verdict

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, details)

        kind = (verdict.request_streaming, verdict.response_streaming)
        return _FACTORIES[kind](
            deny,
            request_deserializer=verdict.request_deserializer,
            response_serializer=verdict.response_serializer,
        )


def add_aio_servicer(
    server: grpc.aio.Server, service: _descriptor.ServiceDescriptor, servicer: object
) -> None:
    """:func:`pdserve.status.add_servicer` for ``grpc.aio`` servers: every method's exception
    becomes its status (:func:`pdserve.status.status_for`), an undecodable request
    INVALID_ARGUMENT, a method the servicer lacks UNIMPLEMENTED.

    Methods: a coroutine function (unary response; or server-streaming, writing with
    ``await context.write(msg)``) or an async generator function (server-streaming) runs on the
    event loop and must never block it. A bidirectional method may be a coroutine function
    taking the (checked) request iterator and writing with ``await context.write(msg)``. A
    streaming method must be async (TypeError otherwise: a sync one's thread blocks for good when
    the server stops mid-stream). A plain (sync) unary method is wrapped as
    :func:`pdserve.status.add_servicer` does and gRPC runs it on the server's thread pool
    (``start_aio_server(sync_threads=...)``), so it may block briefly (a registration that calls
    the worker back, tokenizing a long prompt) without stalling the loop.
    """
    handlers = {}
    for m in service.methods:
        fn = getattr(servicer, m.name, None)
        if fn is None:
            continue
        is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        if m.client_streaming and is_async and not (m.server_streaming and inspect.iscoroutinefunction(fn)):
            raise TypeError(
                f"{m.full_name}: async client-streaming methods are supported only as bidirectional "
                "coroutines (reading the request iterator, writing with context.write)"
            )
        if (m.client_streaming or m.server_streaming) and not is_async:
            # gRPC would run it on the server's threads, each message handed to or taken from
            # the loop by a thread that waits on it: stopped mid-stream, the server leaves that
            # thread blocked for good (and with it the process's exit)
            raise TypeError(
                f"{m.full_name}: a streaming method on a grpc.aio server must be async (an async "
                "generator, or a coroutine writing with context.write); run blocking steps on "
                "threads (pdserve.thread_iter.iterate_on_threads)"
            )
        if not m.server_streaming and inspect.isasyncgenfunction(fn):
            raise TypeError(f"{m.full_name}: a unary method cannot be an async generator")
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        factory = _FACTORIES[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = factory(
            _aio_wrap(fn, m.client_streaming)
            if is_async
            else _wrap(fn, m.client_streaming, m.server_streaming),
            request_deserializer=_safe_deserializer(req_cls, m.full_name),
            response_serializer=_serializer(resp_cls),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


async def _checked_aiter(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for r in requests:
        yield _check(r)


def _aio_wrap(fn: Callable[..., Any], client_streaming: bool = False) -> Callable[..., Any]:
    async def fail(context: grpc.aio.ServicerContext, e: Exception) -> None:
        if isinstance(e, grpc.aio.AbortError) or _aborted(context):
            raise e
        await abort_with_aio(context, e)

    if inspect.isasyncgenfunction(fn):

        async def stream_handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for r in fn(_check(request), context):
                    yield r
            except Exception as e:
                await fail(context, e)

        return stream_handler

    if inspect.iscoroutinefunction(fn):

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await fn(_checked_aiter(request) if client_streaming else _check(request), context)
            except Exception as e:
                await fail(context, e)

        return handler

    raise TypeError(f"{fn!r} is neither a coroutine function nor an async generator function")
