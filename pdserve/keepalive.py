"""HTTP/2 keepalive of every pdserve gRPC channel and server, in one place (pure; no grpc import).

A peer that stops answering without closing its connection (a SIGSTOPped or wedged process, a
host that vanished off the network) would otherwise hold a channel "connected" for the kernel's
TCP timeout (minutes to hours). With keepalive, a client channel pings its server every
``time_ms`` while it has calls in flight *and* while idle (``permit_without_calls``); a ping not
acknowledged within ``timeout_ms`` closes the transport, so every call on it fails UNAVAILABLE
(which the router treats as a lost worker, :mod:`router.failover`) and the channel reconnects.
Servers ping their clients the same way (a vanished client's streams are cancelled, freeing
their blocks), and accept the clients' pings: ``server_min_ping_interval_ms`` is below
``time_ms`` and ping strikes are unlimited, so a server never answers a client's keepalive with
GOAWAY ``too_many_pings`` (gRPC's default policy does, for pings more often than every 5 min
without data).

Keepalive only notices a peer whose *transport* is dead or frozen; a worker whose transport is
fine but whose engine makes no progress is caught by the router's per-stream progress deadline
(:mod:`router.progress`).

:data:`KEEPALIVE` is the configuration every channel and server uses:
:func:`pdserve.security.internal_channel` (and the router's ``grpc.aio`` worker channels, through
``SecurityConfig.channel_options``) apply :meth:`Keepalive.channel_options`;
:func:`pdserve.grpc_server.start_server` / ``start_aio_server`` and the KV store's server apply
:meth:`Keepalive.server_options`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keepalive:
    """Keepalive settings (milliseconds, as gRPC takes them).

    ``time_ms``: interval between pings on a connection; ``timeout_ms``: how long a ping may go
    unacknowledged before the connection is closed; ``permit_without_calls``: ping idle
    connections too; ``server_min_ping_interval_ms``: the most frequent client pings a server
    accepts (must not exceed ``time_ms``, or servers would GOAWAY our own clients).

    ``max_reconnect_backoff_ms``: a channel whose peer went away retries the connection at most
    this long apart (gRPC's default grows to 120 s). A peer restarted on its address (a worker,
    the store, a router) is then reached within about this long: meanwhile every call on the
    channel fails UNAVAILABLE at once, so with gRPC's default a router kept "losing" a restarted,
    re-registered worker for many seconds (found by tests/integration/test_chaos.py)."""

    time_ms: int = 10_000
    timeout_ms: int = 10_000
    permit_without_calls: bool = True
    server_min_ping_interval_ms: int = 5_000
    max_reconnect_backoff_ms: int = 1_000

    def __post_init__(self) -> None:
        for name in ("time_ms", "timeout_ms", "server_min_ping_interval_ms", "max_reconnect_backoff_ms"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"keepalive {name} must be > 0, got {v}")
        if self.server_min_ping_interval_ms > self.time_ms:
            raise ValueError(
                f"keepalive server_min_ping_interval_ms ({self.server_min_ping_interval_ms}) must not "
                f"exceed time_ms ({self.time_ms}): servers would refuse their clients' pings"
            )

    def channel_options(self) -> list[tuple[str, int]]:
        """Options of a client channel (sync or ``grpc.aio``)."""
        return [
            ("grpc.keepalive_time_ms", self.time_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),  # 0: no limit on pings without data
            *self.reconnect_options(),
        ]

    def reconnect_options(self) -> list[tuple[str, int]]:
        """The reconnect backoff bound alone (the client SDK's channels to routers take it too:
        a router restarted on its address is used again within about a second)."""
        return [
            ("grpc.initial_reconnect_backoff_ms", min(250, self.max_reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms),
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """Options of a server: it pings its clients, and accepts their pings; and it owns its
        port (no SO_REUSEPORT, grpc's default on Linux: a second pdserve serve or router started on
        a port in use would bind it too, and the kernel would split new connections between two
        clusters; now the second one fails to bind, naming the address)."""
        return [
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", self.time_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", self.server_min_ping_interval_ms),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", self.server_min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for its pings
        ]


KEEPALIVE = Keepalive()
