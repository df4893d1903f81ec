"""The HTTP I/O of the OpenAI-compatible front end (standard library ``http.server`` only).

:class:`OpenAIServer` listens on ``ServerConfig.host:port`` (a ThreadingHTTPServer: one thread per
connection, HTTP/1.1 keep-alive) and forwards each request to the router through one shared
:class:`pdserve.client.Client`. Everything that is not socket work (validation, response objects,
error mapping) lives in :mod:`pdserve.openai_api.translate` and :mod:`pdserve.openai_api.errors`.

Contracts:

* Every failure is answered with the OpenAI error JSON and the status of
  :func:`pdserve.openai_api.errors.error_response`; no request can kill the server.
* A streamed request waits for the router's first message before sending headers, so a refusal
  (400/404/429/503...) arrives as a real HTTP status even with ``stream: true``. A failure after
  that is sent as one ``data: {"error": ...}`` event followed by ``data: [DONE]``. Streams use
  chunked transfer encoding, so the connection stays reusable.
* A client that disconnects (while streaming or while waiting for a whole response) cancels the
  gRPC call, which aborts the request in the cluster and frees its KV blocks.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from pdserve.auth.edge import EdgeAuth, check_listen_address
from pdserve.auth.keys import open_key_store
from pdserve.auth.validate import check_json_strings, check_request_id
from pdserve.client import Chunk, Client, ServingStatus, Stream
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.openai_api.errors import (
    ErrorCodeStr,
    ErrorResponse,
    FieldError,
    HttpError,
    UnknownModelError,
    error_response,
)
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
    resolve_model,
    sse_event,
)

log = logging.getLogger(__name__)

# Errors a socket write raises when the client has gone away.
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_DRAIN_LIMIT = 64 << 20  # an oversized body up to this is read and dropped before the 413


@dataclass(frozen=True)
class ServerConfig:
    """``router``: the router's gRPC address. ``port`` 0 picks a free port (see
    :attr:`OpenAIServer.port`). ``max_body_bytes``: larger bodies get 413. ``request_timeout_s``:
    deadline of each generation (504 when exceeded; None = none). ``models_ttl_s``: how long the
    router's model list is cached for ``model`` checks. ``idle_timeout_s``: an idle keep-alive
    connection is closed after this long. ``api_keys``: the key store (a YAML/JSON file or
    redis:// URL, :mod:`pdserve.auth.keys`; give the router the same): requests need
    ``Authorization: Bearer <key>`` (401 otherwise) and run as the key's tenant; None: dev mode,
    allowed only on a loopback ``host``, where a request's tenant is its ``user`` field.
    ``tls_cert``/``tls_key``: serve HTTPS (both or neither); plain HTTP only on loopback."""

    router: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 << 20
    request_timeout_s: float | None = 600.0
    models_ttl_s: float = 10.0
    idle_timeout_s: float = 120.0
    defaults: Defaults = Defaults()
    api_keys: str | None = None
    # HTTPS: the certificate chain and private key (PEM) to serve with; None: plain HTTP, which is
    # allowed only on a loopback ``host`` (keys and prompts would cross the network in clear text)
    tls_cert: str | None = None
    tls_key: str | None = None


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


class _DisconnectWatcher:
    """Calls ``on_gone`` once if the peer closes ``sock`` while a generation is running.

    Polls the socket for readability; EOF (a zero-byte peek) means the client is gone. Bytes of a
    pipelined next request mean it is still there, and watching stops.
    """

    POLL_S = 0.2

    def __init__(self, sock: socket.socket, on_gone: Callable[[], None]) -> None:
        self._sock = sock
        self._on_gone = on_gone
        self._stop = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="openai-disconnect-watch", daemon=True)

    def __enter__(self) -> _DisconnectWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # No join: the thread sees the flag within POLL_S and exits; waiting for it would add that
        # much latency to every request. A late cancel() of a finished call is a no-op.
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], self.POLL_S)
                if not ready:
                    continue
                data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                data = b""
            if data:
                return  # a pipelined request: the client is alive
            if not self._stop.is_set():
                self.fired = True
                log.info("client disconnected; cancelling its generation")
                self._on_gone()
            return


class _Http(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], app: OpenAIServer, tls: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.tls = tls
        super().__init__(addr, _Handler)

    def get_request(self):  # type: ignore[no-untyped-def] - socketserver's signature
        sock, addr = super().get_request()
        if self.tls is not None:
            # the handshake runs in the connection's own thread (_Handler.setup), so a slow or
            # silent client cannot stall the accept loop
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pdserve-openai"
    server: _Http

    # ------------------------------------------------------------------ plumbing
    def setup(self) -> None:
        self.timeout = self.server.app.config.idle_timeout_s
        if self.server.tls is not None:
            self.request.settimeout(self.timeout)
            self.request.do_handshake()  # a failed handshake ends this connection only
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
        log.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch(Method.GET.value)

    def do_POST(self) -> None:
        self._dispatch(Method.POST.value)

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _send_json(
        self, status: HTTPStatus, obj: Any, headers: Iterable[tuple[str, str]] = (), *, head: bool = False
    ) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _send_error(self, err: ErrorResponse) -> None:
        if err.close_connection:
            self.close_connection = True
        if err.status >= 500:
            log.warning("%s %s -> %d: %s", self.command, self.path, err.status, err.body["error"]["message"])
        with contextlib.suppress(*_GONE):
            self._send_json(err.status, err.body, err.headers, head=self.command == "HEAD")

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except _GONE:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - every failure becomes an error response
            self._send_error(error_response(e))

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        if len(path) > 1:
            path = path.rstrip("/")
        app = self.server.app
        if path.startswith(_MODEL_PREFIX):
            if method != Method.GET.value:
                self._refuse_method(path, (Method.GET.value,))
            app.authorize(self.headers.get("Authorization"))
            model = path[len(_MODEL_PREFIX) :]
            app.resolve(model)
            self._send_json(HTTPStatus.OK, model_object(model, app.created))
            return
        try:
            route = Route(path)
        except ValueError:
            self._discard_body()
            raise HttpError(
                HTTPStatus.NOT_FOUND, f"Invalid URL ({method} {path})", ErrorCodeStr.UNKNOWN_URL
            ) from None
        allowed = _METHODS[route]
        if method != allowed.value:
            self._refuse_method(path, (allowed.value,))
        if route is Route.HEALTH:
            app.check_health()
            self._send_json(HTTPStatus.OK, {"status": "ok", "router": app.config.router})
        elif route is Route.MODELS:
            app.authorize(self.headers.get("Authorization"))
            self._send_json(HTTPStatus.OK, models_response(app.models(refresh=True), app.created))
        else:
            body = self._read_json()
            check_json_strings(body)  # a lone surrogate anywhere: 400 here, not a 500 later
            d = app.config.defaults
            call = parse_completion(body, d) if route is Route.COMPLETIONS else parse_chat(body, d)
            self._generate(call)

    def _refuse_method(self, path: str, allowed: tuple[str, ...]) -> None:
        self._discard_body()
        raise HttpError(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"{self.command} is not allowed on {path}; use {', '.join(allowed)}",
            ErrorCodeStr.METHOD_NOT_ALLOWED,
            allow=allowed,
        )

    def _body_length(self) -> int | None:
        """Content-Length of the request (None when absent); refuses chunked/oversized bodies."""
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(
                HTTPStatus.LENGTH_REQUIRED,
                "send the request body with a Content-Length header (chunked bodies are not supported)",
                ErrorCodeStr.LENGTH_REQUIRED,
                close_connection=True,
            )
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise FieldError(f"invalid Content-Length header: {raw!r}") from None
        limit = self.server.app.config.max_body_bytes
        if n > limit:
            if n <= _DRAIN_LIMIT:  # read it away, so the client sees the 413 rather than a reset
                self._drain(n)
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body is {n} bytes; the limit is {limit}",
                ErrorCodeStr.BODY_TOO_LARGE,
                close_connection=True,
            )
        return n

    def _drain(self, n: int) -> None:
        while n > 0:
            got = self.rfile.read(min(n, 1 << 16))
            if not got:
                return
            n -= len(got)

    def _discard_body(self) -> None:
        """Read and drop a body we will not use, so the connection stays in sync."""
        try:
            n = self._body_length()
        except Exception:  # noqa: BLE001 - any doubt: do not reuse the connection
            self.close_connection = True
            return
        if n:
            self._drain(n)

    def _read_json(self) -> dict[str, Any]:
        n = self._body_length()
        if not n:
            raise FieldError("the request needs a JSON body (with a Content-Length header)")
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            raise FieldError(f"request body ended after {len(raw)} of {n} bytes")
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise FieldError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise FieldError("the request body must be a JSON object")
        return body

    # ---------------------------------------------------------------- generation
    def _generate(self, call: GenerateCall) -> None:
        app = self.server.app
        tenant, auth_md = app.edge.forward_http(self.headers.get("Authorization"), call.tenant)
        model = app.resolve(call.model)
        # X-Request-Id: the client's idempotency key (a second request with it while the first runs
        # is refused with 409); by default a fresh id
        rid = check_request_id(self.headers.get("X-Request-Id") or "") or uuid.uuid4().hex
        meta = ResponseMeta(
            call.kind, call.kind.id_prefix + rid, int(time.time()), model, call.include_usage, call.logprobs
        )
        stream = app.client.generate(
            call.sdk_prompt(),
            call.params,
            timeout=app.config.request_timeout_s,
            metadata=auth_md,
            **{**call.sdk_kwargs(model, rid), "tenant": tenant},
        )
        with _DisconnectWatcher(self.connection, stream.cancel) as watch:
            try:
                if call.stream:
                    self._stream(meta, stream, watch)
                else:
                    chunks = list(stream)
                    if watch.fired:
                        self.close_connection = True
                        return
                    self._send_json(HTTPStatus.OK, build_response(meta, chunks), (("X-Request-Id", rid),))
            except _GONE:
                stream.cancel()
                self.close_connection = True

    def _stream(self, meta: ResponseMeta, stream: Stream, watch: _DisconnectWatcher) -> None:
        it: Iterator[Chunk] = iter(stream)
        first = next(it, None)  # errors here are still real HTTP statuses
        if watch.fired:
            self.close_connection = True
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Request-Id", meta.id[len(meta.kind.id_prefix) :])
        self.end_headers()
        tr = StreamTranslator(meta)
        events = [sse_event(o) for o in tr.start()]
        chunk = first
        try:
            while chunk is not None:
                events += [sse_event(o) for o in tr.chunk(chunk)]
                self._write_chunk(b"".join(events))
                events = []
                chunk = next(it, None)
            if watch.fired:
                raise BrokenPipeError("client disconnected")
            events += [sse_event(o) for o in tr.end()]
        except _GONE:
            raise
        except Exception as e:  # noqa: BLE001 - a failure mid-stream: one error event, then [DONE]
            err = error_response(e)
            log.warning("stream %s failed after headers: %s", meta.id, err.body["error"]["message"])
            events.append(sse_event(err.body))
        events.append(SSE_DONE)
        self._write_chunk(b"".join(events))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk (chunked transfer encoding), flushed at once."""
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP; raises InvalidRequestError for half a
    key pair, unreadable files, or plain HTTP on a non-loopback ``host``."""
    from pdserve.security import is_loopback

    if bool(config.tls_cert) != bool(config.tls_key):
        raise InvalidRequestError("HTTPS needs both --tls-cert and --tls-key (or neither)")
    if not config.tls_cert:
        if not is_loopback(config.host):
            raise InvalidRequestError(
                f"the OpenAI HTTP server would listen on {config.host!r} in plain HTTP: API keys and "
                "prompts would cross the network in clear text. Give --tls-cert/--tls-key (e.g. "
                "`pdserve certs`: server.pem, server.key) or listen on 127.0.0.1"
            )
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidRequestError(f"cannot load --tls-cert/--tls-key: {e}") from None
    return ctx


class OpenAIServer:
    """The OpenAI-compatible HTTP front end of one router.

    ``start()`` serves in a background thread (tests, embedding); ``serve_forever()`` in the
    calling one; ``close()`` stops serving and closes the gRPC channel. ``port`` is the bound port
    (useful with ``ServerConfig.port == 0``).
    """

    def __init__(self, config: ServerConfig, client: Client | None = None) -> None:
        self.config = config
        store = open_key_store(config.api_keys) if config.api_keys else None
        check_listen_address(config.host, store, "OpenAI HTTP server")
        tls = _tls_context(config)
        self.edge = EdgeAuth(store)
        self.client = client if client is not None else Client(config.router)
        self._own_client = client is None
        self.created = int(time.time())
        self._models: tuple[str, ...] = ()
        self._models_at = 0.0
        self._models_lock = threading.Lock()
        try:
            self._http = _Http((config.host, config.port), self, tls)
        except BaseException:
            if self._own_client:
                self.client.close()
            raise
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._http.server_address[0])

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (``https`` with TLS; append ``/v1/...``)."""
        scheme = "https" if self._http.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def models(self, *, refresh: bool = False) -> tuple[str, ...]:
        """The router's model ids, cached ``models_ttl_s``; raises the SDK's typed errors
        (UnavailableError when the router cannot be reached)."""
        with self._models_lock:
            now = time.monotonic()
            if refresh or not self._models or now - self._models_at > self.config.models_ttl_s:
                self._models = tuple(self.client.list_models())
                self._models_at = now
            return self._models

    def check_health(self) -> None:
        """Returns when the router's grpc.health.v1 status of its Generate service is SERVING;
        raises UnavailableError (503) when it is not (no prefill or no decode worker registered)
        or the router cannot be reached."""
        status = self.client.health()
        if status is not ServingStatus.SERVING:
            raise UnavailableError(
                f"the router at {self.config.router} is {status.value}: it has no worker to place a "
                "request on (a prefill or decode worker is missing); retry shortly"
            )

    def authorize(self, authorization: str | None) -> None:
        """With a key store, raise UnauthenticatedError (401) unless ``authorization`` carries a
        valid key; in dev mode everything is allowed."""
        if not self.edge.dev_mode:
            self.edge.principal(authorization)

    def resolve(self, requested: str | None) -> str:
        """The model id a request runs on (see :func:`translate.resolve_model`); a name missing
        from the cached list is checked once more against a fresh one before the 404."""
        try:
            return resolve_model(requested, self.models())
        except UnknownModelError:
            return resolve_model(requested, self.models(refresh=True))

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=self._http.serve_forever, name="openai-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._http.serve_forever()

    def close(self) -> None:
        """Stop accepting requests and release the socket and (if owned) the gRPC channel."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._http.server_close()
        if self._own_client:
            self.client.close()

    def shutdown(self) -> None:
        """Make a ``serve_forever()`` running in another thread return."""
        self._http.shutdown()

    def __enter__(self) -> OpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
