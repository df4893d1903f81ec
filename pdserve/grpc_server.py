"""Start a sync gRPC server with pdserve's servicer wrapping, health checking and reflection.

Transport security (TLS, mutual TLS, the cluster token on internal services, plaintext only on
loopback) comes from :mod:`pdserve.security`: the process's installed configuration, or the one
passed as ``security``."""

from __future__ import annotations

from concurrent import futures

import grpc
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.limits import grpc_options
from pdserve.security import SecurityConfig, bind, server_security
from pdserve.status import add_servicer


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
        options=grpc_options(),
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
