"""The HTTP I/O of the OpenAI-compatible front end: an ASGI application served by uvicorn.

:class:`OpenAIServer` binds ``ServerConfig.host:port`` and runs uvicorn (h11, HTTP/1.1 keep-alive)
in ONE background thread with its own asyncio event loop. Every request is a coroutine on that
loop and reaches the router through one shared asyncio SDK client
(:func:`pdserve.openai_api.router_client.open_router_client`, ``grpc.aio``): there is no thread per
connection or per request, so a waiting or streaming request costs memory, not a thread.
Requests are read with Starlette's :class:`~starlette.requests.Request`; responses are raw ASGI
messages (header names keep their usual casing; each SSE event leaves at once). Everything that is not I/O (validation, response objects, error
mapping) lives in :mod:`pdserve.openai_api.translate` and :mod:`pdserve.openai_api.errors`.

Contracts:

* Every failure is answered with the OpenAI error JSON and the status of
  :func:`pdserve.openai_api.errors.error_response`; no request can kill the server.
* A streamed request waits for the router's first message before sending headers, so a refusal
  (400/404/429/503...) arrives as a real HTTP status even with ``stream: true``. A failure after
  that is sent as one ``data: {"error": ...}`` event followed by ``data: [DONE]``. Streams use
  chunked transfer encoding, so the connection stays reusable.
* A client that disconnects (while streaming or while waiting for a whole response) cancels the
  gRPC call, which aborts the request in the cluster and frees its KV blocks.
* Bounded input: the request line and headers together at most ``max_header_bytes`` and at
  most ``max_header_count`` header fields (431 and the connection closed; a header block still
  incomplete past ``max_header_bytes`` is refused by h11 before it is parsed: 400, closed, so
  memory stays bounded), a body of at most ``max_body_bytes`` (413; a larger declared body up to
  64 MiB is read away first so the client sees the answer, not a reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import h11
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pdserve.auth.edge import EdgeAuth, check_listen_address
from pdserve.auth.keys import open_key_store
from pdserve.auth.validate import check_json_strings, check_request_id
from pdserve.client import Chunk, ServingStatus
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.openai_api.errors import (
    ErrorCodeStr,
    ErrorResponse,
    ErrorType,
    FieldError,
    HttpError,
    UnknownModelError,
    error_body,
    error_response,
)
from pdserve.openai_api.router_client import RouterClient, open_router_client
from pdserve.openai_api.translate import (
    SSE_DONE,
    Defaults,
    GenerateCall,
    ResponseMeta,
    StreamTranslator,
    build_response,
    model_object,
    models_response,
    parse_chat,
    parse_completion,
    resolve_target,
    sse_event,
)
from pdserve.security import SecurityConfigError, TLSMode, http_serves_tls, tls_mode_from_env

log = logging.getLogger(__name__)

_DRAIN_LIMIT = 64 << 20  # an oversized body up to this is read and dropped before the 413
_T = TypeVar("_T")


def parse_routers(value: str | Sequence[str]) -> tuple[str, ...]:
    """Router addresses from ``"a:1,b:2"`` (the CLI's ``--router``) or a sequence of them;
    raises InvalidRequestError for none or an empty entry."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    out = tuple(p.strip() for p in parts)
    if not out or any(not p for p in out):
        raise InvalidRequestError(f"router: expected HOST:PORT[,HOST:PORT...], got {value!r}")
    return out


@dataclass(frozen=True)
class ServerConfig:
    """``router``: the router's gRPC address, or several (``"a:1,b:2"`` or a tuple) that the
    SDK client fails over between. ``port`` 0 picks a free port (see :attr:`OpenAIServer.port`).
    ``max_body_bytes``: larger bodies get 413. ``max_header_bytes``: the request line and headers
    together, ``max_header_count``: header fields (more: 431, or 400 from h11 for a header block
    still incomplete past ``max_header_bytes``; the connection is closed).
    ``request_timeout_s``: deadline of each generation (504 when exceeded; None = none).
    ``models_ttl_s``: how long the router's model list is cached for ``model`` checks.
    ``idle_timeout_s``: an idle keep-alive connection is closed after this long.
    ``shutdown_grace_s``: how long :meth:`OpenAIServer.close` lets running requests finish before
    cancelling them. ``api_keys``: the key store (a YAML/JSON file or redis:// URL,
    :mod:`pdserve.auth.keys`; give the router the same): requests need ``Authorization: Bearer
    <key>`` (401 otherwise) and run as the key's tenant; None: dev mode, allowed only on a loopback
    ``host``, where a request's tenant is its ``user`` field. ``tls_cert``/``tls_key``: serve
    HTTPS (both or neither). ``tls``: on, off or auto (None: on with ``tls_cert``, else
    ``$PDSERVE_TLS``, else auto): auto serves HTTPS when given a certificate and is refused
    without one; plain HTTP must be asked for (``tls`` off) and only on a loopback ``host``
    (:func:`pdserve.security.http_serves_tls`)."""

    router: str | tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 << 20
    max_header_bytes: int = 32 << 10
    max_header_count: int = 100
    request_timeout_s: float | None = 600.0
    models_ttl_s: float = 10.0
    idle_timeout_s: float = 120.0
    shutdown_grace_s: float = 5.0
    defaults: Defaults = Defaults()
    api_keys: str | None = None
    # HTTPS: the certificate chain and private key (PEM) to serve with; None: plain HTTP, which is
    # allowed only on a loopback ``host`` (keys and prompts would cross the network in clear text)
    tls_cert: str | None = None
    tls_key: str | None = None
    # on | off | auto (TLSMode or its value); None: on with tls_cert, else $PDSERVE_TLS (unset:
    # auto). auto = HTTPS when a certificate is given, refused without one; off = plain HTTP,
    # loopback only
    tls: TLSMode | str | None = None

    def __post_init__(self) -> None:
        if self.tls is None:  # a certificate given here wins over the environment's choice
            object.__setattr__(self, "tls", TLSMode.ON if self.tls_cert else tls_mode_from_env())
        elif not isinstance(self.tls, TLSMode):
            try:
                object.__setattr__(self, "tls", TLSMode(str(self.tls).lower()))
            except ValueError:
                raise SecurityConfigError(
                    f"--tls must be one of {[m.value for m in TLSMode]}, got {self.tls!r}"
                ) from None
        parse_routers(self.router)
        for name in ("max_body_bytes", "max_header_bytes", "max_header_count"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def routers(self) -> tuple[str, ...]:
        """The router addresses, in the order given."""
        return parse_routers(self.router)


class Method(enum.Enum):
    GET = "GET"
    POST = "POST"


class Route(enum.Enum):
    HEALTH = "/health"
    MODELS = "/v1/models"
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


_METHODS: dict[Route, Method] = {
    Route.HEALTH: Method.GET,
    Route.MODELS: Method.GET,
    Route.COMPLETIONS: Method.POST,
    Route.CHAT: Method.POST,
}
_MODEL_PREFIX = Route.MODELS.value + "/"


class _ClientGone(Exception):
    """The client disconnected; nothing more is sent on this request."""


class _Exchange:
    """One HTTP request and its response (the per-request state of :class:`_App`)."""

    def __init__(self, app: OpenAIServer, scope: Scope, receive: Receive, send: Send) -> None:
        self.app = app
        self.scope = scope
        self.req = Request(scope, receive)
        self.receive = receive
        self._send = send
        self.method: str = scope["method"]
        self.close_connection = False
        self.started = False  # response headers sent
        self.finishing = False  # the last body message is being sent: a disconnect now is moot
        self.gone = False  # the client disconnected (set by the watcher)

    # ------------------------------------------------------------------ plumbing
    async def run(self) -> None:
        try:
            await self._route()
        except _ClientGone:
            log.debug("client disconnected: %s %s", self.method, self.scope["path"])
        except Exception as e:  # noqa: BLE001 - every failure becomes an error response
            if self.started:  # cannot happen by design; never leave a half response unexplained
                log.exception("%s %s failed after the response started", self.method, self.scope["path"])
                return
            await self._send_error(error_response(e))

    async def _send_json(self, status: HTTPStatus, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        # raw ASGI messages rather than a Starlette Response, which lower-cases header names:
        # clients that look headers up case-sensitively (a dict of them) see the usual casing
        data = json.dumps(obj).encode()
        hdrs = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(data)).encode())]
        hdrs += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if self.close_connection:
            hdrs.append((b"Connection", b"close"))
        self.finishing = True
        self.started = True
        await self._send({"type": "http.response.start", "status": int(status), "headers": hdrs})
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def _send_error(self, err: ErrorResponse) -> None:
        if err.close_connection:
            self.close_connection = True
        if err.status >= 500:
            log.warning(
                "%s %s -> %d: %s", self.method, self.scope["path"], err.status, err.body["error"]["message"]
            )
        await self._send_json(err.status, err.body, err.headers)

    def _header(self, name: str) -> str | None:
        return self.req.headers.get(name)

    def _check_header_bounds(self) -> None:
        """431 for more than ``max_header_count`` fields or request line + fields over
        ``max_header_bytes`` (h11 refuses headers that grow past it while incomplete; a block that
        arrives whole is measured here)."""
        cfg = self.app.config
        fields = self.scope["headers"]
        line = (
            len(self.method)
            + len(self.scope.get("raw_path") or b"")
            + len(self.scope.get("query_string") or b"")
        )
        size = line + 12 + sum(len(k) + len(v) + 4 for k, v in fields)  # ": " and CRLF per field
        if len(fields) > cfg.max_header_count:
            problem = f"has {len(fields)} header fields; the limit is {cfg.max_header_count}"
        elif size > cfg.max_header_bytes:
            problem = f"line and headers are {size} bytes; the limit is {cfg.max_header_bytes}"
        else:
            return
        raise HttpError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"the request {problem}",
            ErrorCodeStr.HEADERS_TOO_LARGE,
            close_connection=True,
        )

    async def _route(self) -> None:
        self._check_header_bounds()
        path: str = self.scope["path"]  # already percent-decoded by the server
        if len(path) > 1:
            path = path.rstrip("/")
        app = self.app
        method = self.method
        if path.startswith(_MODEL_PREFIX):
            if method != Method.GET.value:
                await self._refuse_method(path, (Method.GET.value,))
            await app.authorize(self._header("Authorization"))
            model = path[len(_MODEL_PREFIX) :]
            base, adapter = await app.resolve(model)
            obj = (
                model_object(model, app.created, parent=base) if adapter else model_object(model, app.created)
            )
            await self._send_json(HTTPStatus.OK, obj)
            return
        try:
            route = Route(path)
        except ValueError:
            await self._discard_body()
            raise HttpError(
                HTTPStatus.NOT_FOUND, f"Invalid URL ({method} {path})", ErrorCodeStr.UNKNOWN_URL
            ) from None
        allowed = _METHODS[route]
        if method != allowed.value:
            await self._refuse_method(path, (allowed.value,))
        if route is Route.HEALTH:
            await app.check_health()
            await self._send_json(HTTPStatus.OK, {"status": "ok", "router": ",".join(app.config.routers)})
        elif route is Route.MODELS:
            await app.authorize(self._header("Authorization"))
            ids = await app.models(refresh=True)
            await self._send_json(HTTPStatus.OK, models_response(ids, app.created, app.adapters()))
        else:
            body = await self._read_json()
            check_json_strings(body)  # a lone surrogate anywhere: 400 here, not a 500 later
            d = app.config.defaults
            call = parse_completion(body, d) if route is Route.COMPLETIONS else parse_chat(body, d)
            await self._generate(call)

    async def _refuse_method(self, path: str, allowed: tuple[str, ...]) -> None:
        await self._discard_body()
        raise HttpError(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"{self.method} is not allowed on {path}; use {', '.join(allowed)}",
            ErrorCodeStr.METHOD_NOT_ALLOWED,
            allow=allowed,
        )

    # ---------------------------------------------------------------- request body
    async def _body_length(self) -> int | None:
        """Content-Length of the request (None when absent); refuses chunked/oversized bodies."""
        if self._header("Transfer-Encoding"):
            raise HttpError(
                HTTPStatus.LENGTH_REQUIRED,
                "send the request body with a Content-Length header (chunked bodies are not supported)",
                ErrorCodeStr.LENGTH_REQUIRED,
                close_connection=True,
            )
        raw = self._header("Content-Length")
        if raw is None:
            return None
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise FieldError(f"invalid Content-Length header: {raw!r}") from None
        limit = self.app.config.max_body_bytes
        if n > limit:
            if n <= _DRAIN_LIMIT:  # read it away, so the client sees the 413 rather than a reset
                await self._drain()
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body is {n} bytes; the limit is {limit}",
                ErrorCodeStr.BODY_TOO_LARGE,
                close_connection=True,
            )
        return n

    async def _drain(self) -> None:
        """Read the rest of the body and drop it (``_body_length`` bounds how much)."""
        try:
            async for _ in self.req.stream():
                pass
        except ClientDisconnect:
            raise _ClientGone from None

    async def _discard_body(self) -> None:
        """Read and drop a body we will not use, so the connection stays in sync."""
        try:
            n = await self._body_length()
        except _ClientGone:
            raise
        except Exception:  # noqa: BLE001 - any doubt: do not reuse the connection
            self.close_connection = True
            return
        if n:
            await self._drain()

    async def _read_json(self) -> dict[str, Any]:
        n = await self._body_length()
        if not n:
            raise FieldError("the request needs a JSON body (with a Content-Length header)")
        buf = bytearray()
        try:
            async for part in self.req.stream():
                buf += part
                if len(buf) > n:  # the server enforces Content-Length; never trust it blindly
                    self.close_connection = True
                    raise FieldError(f"request body is longer than its Content-Length {n}")
        except ClientDisconnect:
            raise _ClientGone from None
        if len(buf) < n:
            self.close_connection = True
            raise FieldError(f"request body ended after {len(buf)} of {n} bytes")
        try:
            body = json.loads(bytes(buf), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise FieldError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise FieldError("the request body must be a JSON object")
        return body

    # ---------------------------------------------------------------- generation
    async def _watch_disconnect(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` (the request's handler) when the client disconnects before the
        response is complete. The body has been read, so ``receive`` only reports the end."""
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                if not self.finishing:
                    self.gone = True
                    log.info("client disconnected; cancelling its generation")
                    task.cancel()
                return

    async def _generate(self, call: GenerateCall) -> None:
        app = self.app
        tenant, auth_md = await app.forward_http(self._header("Authorization"), call.tenant)
        model, adapter = await app.resolve(call.model)
        # X-Request-Id: the client's idempotency key (a second request with it while the first runs
        # is refused with 409); by default a fresh id
        rid = check_request_id(self._header("X-Request-Id") or "") or uuid.uuid4().hex
        meta = ResponseMeta(
            call.kind,
            call.kind.id_prefix + rid,
            int(time.time()),
            adapter or model,  # the name the request used: an adapter's responses name the adapter
            call.include_usage,
            call.logprobs,
            n=call.params.n,
        )
        stream = app.client.generate(
            call.sdk_prompt(),
            call.params,
            timeout=app.config.request_timeout_s,
            metadata=auth_md,
            **{**call.sdk_kwargs(model, rid, adapter), "tenant": tenant},
        )
        me = asyncio.current_task()
        assert me is not None
        watcher = asyncio.create_task(self._watch_disconnect(me), name="openai-disconnect-watch")
        try:
            if call.stream:
                await self._stream(meta, stream)
            else:
                chunks = [c async for c in stream]
                await self._send_json(HTTPStatus.OK, build_response(meta, chunks), (("X-Request-Id", rid),))
        except asyncio.CancelledError:
            me.uncancel()
            if self.gone:
                raise _ClientGone from None
            raise _shutting_down() from None  # close() ran out of grace: 503 for this request
        finally:
            watcher.cancel()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # cancels the gRPC call if it is still running

    async def _stream(self, meta: ResponseMeta, stream: AsyncIterator[Chunk]) -> None:
        first = await anext(stream, None)  # errors here are still real HTTP statuses
        headers = [
            (b"Content-Type", b"text/event-stream"),
            (b"Cache-Control", b"no-cache"),
            (b"X-Request-Id", meta.id[len(meta.kind.id_prefix) :].encode()),
        ]
        self.started = True
        await self._send({"type": "http.response.start", "status": HTTPStatus.OK.value, "headers": headers})
        tr = StreamTranslator(meta)
        events = [sse_event(o) for o in tr.start()]
        chunk = first
        try:
            while chunk is not None:
                events += [sse_event(o) for o in tr.chunk(chunk)]
                if events:
                    await self._send(
                        {"type": "http.response.body", "body": b"".join(events), "more_body": True}
                    )
                events = []
                chunk = await anext(stream, None)
            events += [sse_event(o) for o in tr.end()]
        except (Exception, asyncio.CancelledError) as e:  # a failure mid-stream: one error event, then [DONE]
            if isinstance(e, asyncio.CancelledError):
                if self.gone:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                e = _shutting_down()  # noqa: PLW2901 - close() ran out of grace
            err = error_response(e)
            log.warning("stream %s failed after headers: %s", meta.id, err.body["error"]["message"])
            events.append(sse_event(err.body))
        events.append(SSE_DONE)
        self.finishing = True
        await self._send({"type": "http.response.body", "body": b"".join(events), "more_body": False})


def _shutting_down() -> UnavailableError:
    return UnavailableError("the OpenAI HTTP server is shutting down; retry the request")


class _App:
    """The ASGI application: HTTP requests only (uvicorn runs it without lifespan/websockets)."""

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # not reachable with lifespan="off", ws="none"
            raise RuntimeError(f"unsupported ASGI scope type {scope['type']!r}")
        await _Exchange(self.server, scope, receive, send).run()


class _H11(H11Protocol):
    """uvicorn's h11 protocol, answering a request it cannot parse (malformed, or request line +
    headers over ``h11_max_incomplete_event_size``) with the OpenAI error JSON, not plain text."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size
        body = json.dumps(
            error_body(
                f"invalid HTTP request: malformed, or its request line and headers exceed {limit} bytes",
                ErrorType.INVALID_REQUEST,
                ErrorCodeStr.INVALID_VALUE,
            )
        ).encode()
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=HTTPStatus.BAD_REQUEST.value, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, reporting when it listens (``on_started``)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP (:func:`pdserve.security.http_serves_tls`:
    plain HTTP only when asked for, ``tls`` off, and only on a loopback ``host``); raises
    InvalidRequestError for a refused choice, half a key pair or unreadable files."""
    assert isinstance(config.tls, TLSMode)
    if not http_serves_tls(
        config.tls, config.tls_cert, config.tls_key, config.host, "the OpenAI HTTP server"
    ):
        return None
    assert config.tls_cert and config.tls_key
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidRequestError(f"cannot load --tls-cert/--tls-key: {e}") from None
    return ctx


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket (IPv4 or IPv6 by ``host``); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


class OpenAIServer:
    """The OpenAI-compatible HTTP front end of one router (or of several, with failover).

    The constructor validates the configuration and binds the socket (so ``port`` is known and a
    busy port raises OSError here); ``start()`` serves in a background thread (one thread with an
    asyncio loop for all connections) and returns once uvicorn is listening; ``serve_forever()``
    blocks until ``shutdown()``/``close()``; ``close()`` stops serving (requests still running get
    ``shutdown_grace_s`` to finish, then are cancelled, which cancels their gRPC calls) and closes
    the gRPC channel it opened.

    ``client``: a ready :class:`~pdserve.openai_api.router_client.RouterClient` (test doubles;
    it is used on the server's own loop and not closed here). By default the server opens an
    asyncio SDK client to ``config.routers`` on its loop with ``client_options`` (AsyncClient's
    keywords: ``tls``, ``ca``, ``cert``, ``key``, ``server_name``, ``api_key``).
    """

    BACKLOG = 1024

    def __init__(
        self,
        config: ServerConfig,
        client: RouterClient | None = None,
        *,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        store = open_key_store(config.api_keys) if config.api_keys else None
        check_listen_address(config.host, store, "OpenAI HTTP server")
        self._tls = _tls_context(config)
        self.edge = EdgeAuth(store)
        self._given_client = client
        self._client_options = dict(client_options or {})
        self._client: RouterClient | None = client
        self.created = int(time.time())
        self._models: tuple[str, ...] = ()
        self._adapters: dict[str, tuple[str, ...]] = {}  # base model id -> its LoRA adapters
        self._models_at = 0.0
        self._models_lock = asyncio.Lock()  # binds to the server's loop on first use
        self._sock = _listen(config.host, config.port, self.BACKLOG)
        self._host, self._port = self._sock.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._uv: _Uvicorn | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._exit_requested = False

    @property
    def host(self) -> str:
        return str(self._host)

    @property
    def port(self) -> int:
        return int(self._port)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (``https`` with TLS; append ``/v1/...``)."""
        scheme = "https" if self._tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def client(self) -> RouterClient:
        """The router client (exists while the server runs)."""
        if self._client is None:
            raise UnavailableError("the OpenAI server is not running")
        return self._client

    # ------------------------------------------------------------------ request helpers
    async def _blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` for the key store: inline in dev mode (pure), in the loop's small
        default executor otherwise (a file or Redis read must not stall every other request)."""
        if self.edge.dev_mode:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def models(self, *, refresh: bool = False) -> tuple[str, ...]:
        """The router's model ids, cached ``models_ttl_s``; raises the SDK's typed errors
        (UnavailableError when the router cannot be reached)."""
        async with self._models_lock:
            now = time.monotonic()
            if refresh or not self._models or now - self._models_at > self.config.models_ttl_s:
                self._models = tuple(await self.client.list_models())
                # a router client stand-in without list_adapters (tests' scripted SDKs) serves none
                lister = getattr(self.client, "list_adapters", None)
                self._adapters = (
                    {m: tuple(a) for m, a in (await lister()).items()} if lister is not None else {}
                )
                self._models_at = now
            return self._models

    def adapters(self) -> dict[str, tuple[str, ...]]:
        """The LoRA adapters of each base model, as of the last :meth:`models` refresh."""
        return self._adapters

    async def check_health(self) -> None:
        """Returns when the router's grpc.health.v1 status of its Generate service is SERVING;
        raises UnavailableError (503) when it is not (no prefill or no decode worker registered)
        or the router cannot be reached."""
        status = await self.client.health()
        if status is not ServingStatus.SERVING:
            raise UnavailableError(
                f"the router at {','.join(self.config.routers)} is {status.value}: it has no worker to "
                "place a request on (a prefill or decode worker is missing); retry shortly"
            )

    async def authorize(self, authorization: str | None) -> None:
        """With a key store, raise UnauthenticatedError (401) unless ``authorization`` carries a
        valid key; in dev mode everything is allowed."""
        if not self.edge.dev_mode:
            await self._blocking(self.edge.principal, authorization)

    async def forward_http(
        self, authorization: str | None, user: str
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """:meth:`EdgeAuth.forward_http` off the event loop when a key store is read."""
        return await self._blocking(self.edge.forward_http, authorization, user)

    async def resolve(self, requested: str | None) -> tuple[str, str]:
        """The (base model id, LoRA adapter) a request runs on (see
        :func:`translate.resolve_target`); a name missing from the cached lists is checked once
        more against fresh ones before the 404."""
        try:
            return resolve_target(requested, await self.models(), self.adapters())
        except UnknownModelError:
            return resolve_target(requested, await self.models(refresh=True), self.adapters())

    # ------------------------------------------------------------------ lifecycle
    def _uvicorn_config(self) -> uvicorn.Config:
        c = self.config
        cfg = uvicorn.Config(
            _App(self),
            http=_H11,  # h11: bounded header parsing (h11_max_incomplete_event_size)
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=True,
            headers=[("server", "pdserve-openai")],
            proxy_headers=False,
            backlog=self.BACKLOG,
            timeout_keep_alive=max(1, math.ceil(c.idle_timeout_s)),
            timeout_graceful_shutdown=max(1, math.ceil(c.shutdown_grace_s)),
            h11_max_incomplete_event_size=c.max_header_bytes,
        )
        cfg.load()
        cfg.ssl = self._tls  # our context (TLS >= 1.2, checked key pair), on the pre-bound socket
        return cfg

    async def _serve(self) -> None:
        own = self._client is None
        if own:
            self._client = open_router_client(self.config.routers, **self._client_options)
        try:
            self._uv = _Uvicorn(self._uvicorn_config(), self._ready.set)
            if self._exit_requested:
                self._uv.should_exit = True
            await self._uv.serve(sockets=[self._sock])
            # requests cancelled after the grace period answer 503 / an error event: let them, then
            # close what uvicorn left open, on the loop, so nothing is left for the collector
            tasks = set(self._uv.server_state.tasks)
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            conns = [getattr(c, "transport", None) for c in self._uv.server_state.connections]
            for transport in conns:
                if transport is not None:
                    transport.close()  # flushes what was written
            if conns:
                await asyncio.sleep(0.1)
                for transport in conns:
                    if transport is not None:
                        transport.abort()  # a peer that does not read: drop its buffer
                await asyncio.sleep(0)
        finally:
            if own and self._client is not None:
                await self._client.close()
                self._client = None

    def _run(self) -> None:
        try:
            with asyncio.Runner() as runner:
                self._loop = runner.get_loop()
                runner.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by start() or logged
            self._failure = e
            if self._ready.is_set():
                log.exception("the OpenAI HTTP server stopped with an error")
        finally:
            self._ready.set()
            self._sock.close()

    def start(self) -> OpenAIServer:
        """Serve in a background thread; returns once listening (raises what failed otherwise)."""
        if self._thread is not None:
            raise RuntimeError("OpenAIServer.start() called twice")
        self._thread = threading.Thread(target=self._run, name=f"openai-http-{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread's stead until :meth:`shutdown` or :meth:`close`."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        self._thread.join()

    def shutdown(self) -> None:
        """Ask the server to stop (returns at once; :meth:`close` waits for it)."""
        self._exit_requested = True
        uv, loop = self._uv, self._loop
        if uv is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(setattr, uv, "should_exit", True)

    def close(self) -> None:
        """Stop accepting requests, let running ones finish (``shutdown_grace_s``, then cancelled)
        and release the socket and (if opened here) the gRPC channel."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=self.config.shutdown_grace_s + 30)
            if self._thread.is_alive():
                log.error("the OpenAI HTTP server thread did not stop")
        else:
            self._sock.close()

    def __enter__(self) -> OpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
