"""A pdserve gRPC server owns its port: grpc enables SO_REUSEPORT by default on Linux, so a
second router (a second `pdserve serve` on the same --address, or an orphan of an earlier one)
bound the port too and the kernel split new connections between two clusters, silently."""

from __future__ import annotations

import pytest

from pdserve.grpc_server import start_aio_server, start_server
from pdserve.security import SecurityConfig, TLSMode


def _plain() -> SecurityConfig:
    return SecurityConfig(tls=TLSMode.OFF)


def test_a_second_server_on_a_port_in_use_fails_to_bind() -> None:
    first, port, _ = start_server([], "127.0.0.1", 0, security=_plain())
    try:
        with pytest.raises((OSError, RuntimeError)):
            start_server([], "127.0.0.1", port, security=_plain())
        with pytest.raises((OSError, RuntimeError)):
            start_aio_server([], "127.0.0.1", port, security=_plain())
    finally:
        first.stop(0).wait()
    again, port2, _ = start_server([], "127.0.0.1", port, security=_plain())  # free again: it binds
    again.stop(0).wait()
    assert port2 == port
