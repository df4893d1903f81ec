"""Start a sync gRPC server with pdserve's servicer wrapping, health checking and reflection."""

from __future__ import annotations

from concurrent import futures

import grpc
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.limits import grpc_options
from pdserve.status import add_servicer


def start_server(
    services: list[tuple[_descriptor.ServiceDescriptor, object]],
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 32,
    name: str = "pdserve",
    not_serving: tuple[str, ...] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Serve ``services`` on host:port (0 = any free port); returns (server, bound port, health).

    Health (grpc.health.v1) starts SERVING for ``""`` (overall) and every service, except the
    names in ``not_serving``, which start NOT_SERVING: a server whose readiness depends on more
    than being up (the router: its workers) sets them through the returned servicer."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name), options=grpc_options()
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
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    server.start()
    return server, bound, hs
