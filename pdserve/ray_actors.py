"""The pdserve roles as Ray actors: each runs the existing gRPC server in its actor process.

* :class:`StoreActor`: one KV store node per Ray node (pinned there by node affinity; named
  ``pdserve-store-<node id>`` so workers find the store of their node).
* :class:`RouterActor`: the router (Generate + Registry services), and the drain hook scale-down
  uses (mark a worker draining: the router stops routing to it but keeps counting its in-flight
  requests).
* :class:`WorkerActor`: a prefill or decode worker; it registers with every router (``routers``) through its
  :class:`~pdserve.worker_base.Heartbeater`, so a restarted actor (``max_restarts``) registers again
  under the same worker id at its new address. With ``kv_transfer: {kind: dist}`` the workers
  ``up`` starts are given a :class:`DistSeat` and join one torch.distributed process group for
  direct KV handoff (see :class:`~pdserve.cluster_config.KVTransferConfig`); a restarted actor does
  not rejoin it (the group's membership is fixed) and uses the store path instead.

The classes are plain Python (``ray.remote(cls)`` is applied by :mod:`pdserve.ray_cluster`), so
they import Ray only to learn their node. Contract of every actor: ``__init__`` returns once its
server accepts calls; ``info()`` is its address card; ``stop()`` ends its servers and frees its
memory (the store unlinks its shared memory) and is idempotent.

Servers bind to ``ClusterConfig.host``: a literal address (``127.0.0.1`` in tests) or ``"node"``,
the Ray node's IP. Simulated hosts (``store.host_id_per_node``): every actor sets
``PDSERVE_HOST_ID`` to ``<machine host id>#<ray node id>`` before it builds anything, so that store
locations and the decode workers' transport choice (shm on the same id, gRPC otherwise) treat each
Ray node as its own machine even when all raylets share one (``ray.cluster_utils.Cluster``).

Transport security: every actor installs ``config.security`` first (:func:`apply_security`: TLS
with the node's certificate files off loopback, mutual TLS, the cluster token; see
:class:`~pdserve.cluster_config.SecuritySection`), so its servers and channels use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdserve.cluster_config import NODE_IP, ClusterConfig, IndexKind, PoolRole, router_tenant_state_url

if TYPE_CHECKING:
    from pdserve.worker_base import WorkerConfig
    from router.service import RouterConfig

log = logging.getLogger(__name__)

STORE_PREFIX = "pdserve-store-"
ROUTER_NAME = "pdserve-router"


def router_actor_name(index: int) -> str:
    """The Ray name of router ``index`` (``routers`` in the cluster config): pdserve-router,
    pdserve-router-1, ..."""
    return ROUTER_NAME if index == 0 else f"{ROUTER_NAME}-{index}"


WORKER_PREFIX = "pdserve-"


@dataclass(frozen=True)
class DistSeat:
    """A worker's place in the process group of the direct KV handoff: ``rank`` of
    ``world_size``; ``init_method`` ``tcp://HOST:PORT`` of rank 0's TCP store ("" for rank 0
    itself: it picks ``HOST:PORT`` on its node, see :meth:`WorkerActor.dist_init_method`)."""

    rank: int
    world_size: int
    init_method: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"dist rank {self.rank} not in [0, {self.world_size})")
        if (self.rank == 0) != (not self.init_method):
            raise ValueError("rank 0 picks the init method; every other rank must be given it")


def _reconstructed() -> bool:
    """Whether this actor is a restart (Ray ran ``__init__`` again after a failure)."""
    import ray

    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def store_actor_name(node_id: str, model_tag: str = "") -> str:
    """The Ray name of the store node on ``node_id`` (``model_tag``: of that model, in a cluster
    serving several models: each model has its own store node per Ray node)."""
    return f"{STORE_PREFIX}{model_tag}-{node_id}" if model_tag else f"{STORE_PREFIX}{node_id}"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _bind_host(config: ClusterConfig) -> str:
    if config.host != NODE_IP:
        return config.host
    import ray

    return ray.util.get_node_ip_address()


def apply_host_id(config: ClusterConfig) -> str:
    """Set this process's shared-memory host id (see module docstring); returns it."""
    from kv_store.arena import host_id

    if config.store.host_id_per_node:
        os.environ.pop("PDSERVE_HOST_ID", None)
        os.environ["PDSERVE_HOST_ID"] = f"{host_id()}#{_node_id()[:16]}"
    return host_id()


def apply_security(config: ClusterConfig) -> None:
    """Install this actor's TLS / mTLS / cluster-token configuration (``config.security``; the
    files are read here, on the actor's node) for its servers and channels."""
    from pdserve.security import install

    install(config.security.security_config(config.host))


def kv_dtype(config: ClusterConfig) -> str:
    """The KV dtype the store nodes are laid out for (the engine's ``auto`` on CPU is float32)."""
    d = config.prefill.dtype
    return "float32" if d == "auto" else d


# ---------------------------------------------------------------------------- store
class StoreActor:
    """One KV store node (gRPC server + shared-memory arena) on this Ray node."""

    def __init__(self, config: ClusterConfig) -> None:
        from prometheus_client import REGISTRY

        from engine.models.config import ModelConfig
        from kv_store.layout import KVLayout
        from kv_store.service import serve
        from kv_store.store import StoreConfig
        from pdserve.metrics import StoreMetrics, serve_metrics

        self.node_id = _node_id()
        self.host_id = apply_host_id(config)
        self.model = Path(config.model).name
        self.several = bool(config.model_tag)  # one store node per model on this Ray node
        apply_security(config)
        mc = ModelConfig.from_path(config.model)
        layout = KVLayout(
            Path(config.model).name,
            mc.num_hidden_layers,
            mc.num_key_value_heads,
            mc.head_dim,
            kv_dtype(config),
            config.prefill.block_size,
        )
        index = None
        if config.index.kind is IndexKind.REDIS:
            from kv_store.redis_index import RedisIndex

            index = RedisIndex.from_url(config.index.url)
        self._registry = REGISTRY
        self._store_node = f"kv-{self.node_id[:8]}"
        self.server = serve(
            StoreConfig(
                node_id=self._store_node,
                layout=layout,
                capacity_blocks=config.store.capacity_blocks,
                host=_bind_host(config),
                port=config.store.port,
                use_shm=config.store.use_shm,
            ),
            index,
            metrics=StoreMetrics(REGISTRY, self._store_node),
        )
        self.metrics_port = serve_metrics(0)
        self._stopped = False

    def address(self) -> str:
        return self.server.address

    def info(self) -> dict[str, Any]:
        loc = self.server.store.location
        return {
            "node_id": self.node_id,
            "store_node": loc.node_id,
            "address": loc.address,
            "host_id": loc.host_id,
            "model": self.model,  # the model whose KV layout it holds
            "several": self.several,
            "metrics": f"127.0.0.1:{self.metrics_port}",
            "pid": os.getpid(),
        }

    def _transfer_blocks(self, transport: str, direction: str) -> int:
        v = self._registry.get_sample_value(
            "pdserve_kv_transfer_blocks_total",
            {"node_id": self._store_node, "transport": transport, "direction": direction},
        )
        return int(v or 0)

    def stats(self) -> dict[str, Any]:
        """Usage and transfer counters: ``blocks_out_grpc`` are blocks read over gRPC (other hosts),
        ``blocks_out_shm`` blocks read from shared memory (same host), ``blocks_in`` puts."""
        n = self.server.store.stats().node
        return {
            **self.info(),
            "capacity_blocks": n.capacity_blocks,
            "num_blocks": n.num_blocks,
            "num_leases": n.num_leases,
            "bytes_used": n.bytes_used,
            "capacity_bytes": n.capacity_bytes,
            "kv_usage": n.num_blocks / n.capacity_blocks if n.capacity_blocks else 0.0,
            "blocks_in": self._transfer_blocks("grpc", "in"),
            "blocks_out_grpc": self._transfer_blocks("grpc", "out"),
            "blocks_out_shm": self._transfer_blocks("shm", "out"),
        }

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.stop(1.0)


# ---------------------------------------------------------------------------- router
def router_config(config: ClusterConfig, index: int = 0) -> RouterConfig:
    """The router's :class:`~router.service.RouterConfig` for this cluster: model, bind host (Ray
    is asked only when ``config.host`` is ``"node"``), port, heartbeats and placement policy from
    ``config.router``, and ``index_url`` set to ``config.index.url`` when the index is Redis (the
    router then finds cached prefixes in the shared index itself); None for the memory index,
    which is private to each store node. ``index``: which of the ``routers`` (router ``i`` listens
    on ``router.port + i`` when a port is set)."""
    from router.migration_client import MigrationTransport
    from router.policy import GoodputConfig
    from router.service import RouterConfig

    r = config.router
    return RouterConfig(
        model_path=config.model,
        model_id=Path(config.model).name,
        host=_bind_host(config),
        port=r.port + index if r.port else 0,
        heartbeat_interval_s=r.heartbeat_interval_s,
        heartbeat_timeout_s=r.heartbeat_timeout_s,
        policy=r.policy,
        goodput=GoodputConfig(
            slo_margin=r.slo_margin,
            tenant_max_inflight=r.tenant_max_inflight or None,
            local_prefill=r.local_prefill_max_tokens > 0,
            local_prefill_max_tokens=r.local_prefill_max_tokens,
            shared_cores=r.shared_cores or None,
        ),
        latency_profile=r.latency_profile or None,
        index_url=config.index.url if config.index.kind is IndexKind.REDIS else None,
        max_redispatches=r.max_redispatches,
        direct_streams=config.direct_on,  # direct token streams (README); several models relay
        migration_transport=MigrationTransport.parse(r.migration_transport.value),
    )


def router_configs(config: ClusterConfig, index: int = 0) -> list[RouterConfig]:
    """One :func:`router_config` per served model (``config.views()``), in order: a router serving
    several models runs a policy per model (router.multi_model)."""
    return [router_config(v, index) for v in config.views()]


def worker_config(
    config: ClusterConfig,
    role: PoolRole,
    worker_id: str,
    store_address: str,
    host: str,
    router_addresses: tuple[str, ...] | list[str],
) -> WorkerConfig:
    """Pure: the :class:`~pdserve.worker_base.WorkerConfig` of a worker of pool ``role``: its
    pool's engine, the cluster's LoRA adapters and heartbeat interval, and for a decode worker
    ``direct_streams`` = :attr:`ClusterConfig.direct_on` (the routers' setting: a router with
    direct streams needs its decode workers to serve them). DirectStream's own port (mutual TLS)
    is always a free one (``direct_port`` 0)."""
    from pdserve.worker_base import Role, WorkerConfig

    wrole = Role.PREFILL if role is PoolRole.PREFILL else Role.DECODE
    return WorkerConfig(
        worker_id=worker_id,
        role=wrole,
        model_path=config.model,
        store_address=store_address,
        host=host,
        router_addresses=tuple(router_addresses),
        engine=config.pool(role).engine_config(),
        heartbeat_interval_s=config.router.heartbeat_interval_s,
        lora=config.lora.lora_config(),
        direct_streams=wrole is Role.DECODE and config.direct_on,
    )


class RouterActor:
    """The router's Generate and Registry services in this actor's process."""

    def __init__(self, config: ClusterConfig, index: int = 0) -> None:
        from prometheus_client import REGISTRY

        from pdserve.auth.cli_args import edge_from_config
        from pdserve.grpc_server import start_aio_server
        from pdserve.metrics import RouterMetrics, serve_metrics
        from pdserve.v1 import client_pb2, direct_pb2
        from router.admin_service import ADMIN_SERVICE, AdminServicer
        from router.drainer import WorkerDrains
        from router.health import HEALTH_SERVICES, start_router_health
        from router.multi_model import ModelDispatcher, ModelDrains
        from router.registry import Registry
        from router.registry_service import (
            REGISTRY_SERVICE,
            RegistryServicer,
            start_control_server,
            worker_verifier,
        )
        from router.service import GenerateServicer

        apply_security(config)
        cfgs = router_configs(config, index)  # one per served model
        cfg = cfgs[0]
        self.registry = Registry(cfg.heartbeat_timeout_s)
        # the control plane (Registry) on its own server and threads; workers register at the
        # data address (what ROUTER_NAME resolves to) and are told this one for their heartbeats
        r = config.router
        # API keys (router.api_keys; none: dev mode, which check_security allows on loopback only)
        edge = edge_from_config(
            r.api_keys,
            r.api_keys_redis_prefix,
            r.salt_secret_file,
            cfg.host,
            "router",
            names=("router.api_keys", "router.salt_secret_file"),
        )
        # per-tenant quotas and request ids shared by the routers (router.tenant_state; several
        # routers: the Redis index unless tenant_state is local, checked when the config loaded)
        self._shared = None
        shared_url = router_tenant_state_url(config)
        if shared_url:
            from pdserve.auth.shared_redis import RedisSharedBackend
            from pdserve.auth.shared_state import SharedEdgeState

            self._shared = SharedEdgeState(RedisSharedBackend.from_url(shared_url)).start()
            edge.gate, edge.ids = self._shared.gate, self._shared.ids
        elif config.routers > 1:
            log.warning(
                "%d routers each keep their own tenant quotas and request ids (router.tenant_state: local)",
                config.routers,
            )
        verifier = (
            worker_verifier(
                self.registry,
                cfgs,  # a worker is checked against the model it registers for
                **({"max_kv_blocks": r.max_worker_kv_blocks} if r.max_worker_kv_blocks else {}),
            )
            if r.verify_workers
            else None
        )
        registry_servicer = RegistryServicer(self.registry, cfg, verifier=verifier)
        self.control, self._control_address, _ = start_control_server(registry_servicer, cfg.host, 0)
        metrics = RouterMetrics(REGISTRY, [c.model_id for c in cfgs])  # a model label when several
        multi = len(cfgs) > 1
        # one servicer per model: own tokenizer, placement policy and state (router.multi_model)
        servicers = {
            c.model_id: GenerateServicer(self.registry, c, metrics, edge=edge, track_gauges=not multi)
            for c in cfgs
        }
        self._generate = servicers[cfg.model_id]
        front: Any = self._generate
        per_model = {
            m: WorkerDrains(svc, self.registry, lambda: self.server.loop) for m, svc in servicers.items()
        }
        self._drain_sets = [d.draining for d in per_model.values()]
        drains: Any = per_model[cfg.model_id]
        if multi:  # Generate / Tokenize routed by the request's model; ListModels lists them all
            front = ModelDispatcher(servicers)
            front.track_gauges()
            drains = ModelDrains(self.registry, per_model)
        services = [
            (client_pb2.DESCRIPTOR.services_by_name["Generate"], front),
            (REGISTRY_SERVICE, registry_servicer),
            (ADMIN_SERVICE, AdminServicer(self.registry, list(servicers), drains=drains)),  # operators
        ]
        if self._generate.direct is not None:  # ResumeDirect of direct streams whose worker was lost
            services.append((direct_pb2.DESCRIPTOR.services_by_name["DirectResume"], self._generate.direct))
        # the data plane on an event loop: a stream costs memory, not a thread (router.service)
        self.server, port, hs = start_aio_server(
            services, cfg.host, cfg.port, name="router", not_serving=HEALTH_SERVICES
        )
        # NOT_SERVING until it can place a request (of any of its models)
        self._health = start_router_health(self.registry, cfg, hs, model_ids=list(servicers))
        self._address = f"{cfg.host}:{port}"
        self._policy = cfg.policy.value
        self._index = bool(cfg.index_url)
        self.metrics_port = serve_metrics(0)
        self._drains = drains
        self._stopped = False

    def address(self) -> str:
        return self._address

    def info(self) -> dict[str, Any]:
        return {
            "node_id": _node_id(),
            "address": self._address,
            "control": self._control_address,  # the Registry's own server (worker heartbeats)
            "metrics": f"127.0.0.1:{self.metrics_port}",
            "pid": os.getpid(),
            "policy": self._policy,  # placement policy
            "index": self._index,  # whether it reads a shared (Redis) KV index
        }

    def workers(self) -> list[dict[str, Any]]:
        """Every worker the router knows (silent ones expire here), draining ones included."""
        ids = [w.worker_id for w in self.registry.alive()] + sorted(set().union(*self._drain_sets))
        out, seen = [], set()
        for wid in ids:
            w = self.registry.get(wid)
            if w is None or wid in seen:
                continue
            seen.add(wid)
            out.append(
                {
                    "worker_id": w.worker_id,
                    "role": w.kind.value,
                    "model": w.model,
                    "address": w.address,
                    "num_running": w.load.num_running,
                    "num_waiting": w.load.num_waiting,
                    "kv_usage": w.load.kv_usage,
                    "inflight": w.inflight,
                    "draining": w.draining,
                }
            )
        return sorted(out, key=lambda d: (d["role"] != "prefill", d["worker_id"]))

    def drain(self, worker_id: str, timeout_s: float = 120.0) -> bool:
        """Stop routing new requests to ``worker_id``; its in-flight count keeps being tracked.
        A decode worker's running requests are moved off it by live migration when the router
        has it on (:class:`router.drainer.WorkerDrains`, in the background: see
        :meth:`drain_report`); the others finish there. False when the router does not know it."""
        return self._drains.drain(worker_id, timeout_s)

    def drain_report(self, worker_id: str) -> dict[str, Any] | None:
        """The migration drain of ``worker_id`` once it ended (``router.drain.DrainReport`` as a
        dict; ``error`` when it failed), None while it runs or when there was none."""
        return self._drains.report(worker_id)

    def resume(self, worker_id: str) -> bool:
        """Undo :meth:`drain`: route to ``worker_id`` again. False when the router does not know it."""
        return self._drains.resume(worker_id)

    def inflight(self, worker_id: str) -> int:
        """Requests the router has in flight on ``worker_id`` (0 when unknown)."""
        return self._drains.inflight(worker_id)

    def forget(self, worker_id: str) -> None:
        for draining in self._drain_sets:
            draining.discard(worker_id)
        self.registry.deregister(worker_id)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._health.stop()
            self.server.stop(2).wait()
            self.control.stop(1).wait()
            if self._shared is not None:
                self._shared.close()  # releases this router's slots and request ids at once


# ---------------------------------------------------------------------------- workers
class WorkerActor:
    """A prefill or decode worker using the KV store node of its own Ray node."""

    def __init__(
        self,
        config: ClusterConfig,
        role: PoolRole,
        worker_id: str,
        router_addresses: tuple[str, ...],
        seat: DistSeat | None = None,
    ) -> None:
        import ray
        from prometheus_client import REGISTRY

        from kv_store.client import FollowingStoreClient, KVStoreClient
        from kv_store.transport import AutoTransport
        from pdserve.metrics import WorkerMetrics, serve_metrics
        from pdserve.security import internal_channel
        from pdserve.tracing import traced_channel
        from pdserve.worker_base import RouterLinks, WorkerState
        from pdserve.worker_main import build_service, serve_worker, worker_services

        self.node_id = _node_id()
        self.host_id = apply_host_id(config)
        apply_security(config)
        host = _bind_host(config)
        # join the direct-handoff group while the model loads (the other ranks may start later)
        self.dist = (
            self._join_group(config, seat, host) if seat is not None and not _reconstructed() else None
        )
        store = ray.get_actor(store_actor_name(self.node_id, config.model_tag), namespace=config.namespace)
        self.store_address = ray.get(store.address.remote(), timeout=60)
        cfg = worker_config(config, role, worker_id, self.store_address, host, router_addresses)
        wrole = cfg.role
        self.worker_id = worker_id
        self.role = role
        try:
            self.state = WorkerState.load(cfg)
        except Exception as e:  # noqa: BLE001 - the actor's creation fails naming the loader's error
            from pdserve.errors import PdserveError, UnavailableError

            why = str(e) if isinstance(e, PdserveError) else f"{type(e).__name__}: {e}"
            # Ray does not restart an actor whose __init__ raised: `pdserve up` fails at once
            raise UnavailableError(f"{worker_id} cannot load model {config.model!r}: {why}") from None
        # a dead tensor-parallel rank breaks the engine for good: end the actor, Ray restarts it
        self.state.on_engine_broken(lambda why: os._exit(1))
        namespace = config.namespace
        store_name = store_actor_name(self.node_id, config.model_tag)

        def store_now() -> str:  # a restarted store actor listens on a new port
            return ray.get(ray.get_actor(store_name, namespace=namespace).address.remote(), timeout=10)

        def connect(address: str) -> KVStoreClient:
            channel = traced_channel(internal_channel(address))
            return KVStoreClient(address, channel=channel, own_channel=True)

        self._store = FollowingStoreClient(store_now, connect, self.store_address)
        self._transport = AutoTransport(self.host_id)
        self._svc = svc = build_service(
            self.state, self._store, self._transport, self.dist, config.kv_transfer.outbox_bytes
        )
        services, self._peer = worker_services(svc, wrole, self.dist)
        # direct token streams (config.direct_streams): DirectStream on the worker's port, or under
        # mutual TLS on a port of its own (no client certificate; named to the routers per request)
        ds, direct_own_port = None, False
        if cfg.direct_streams:
            from decode_worker.direct import enable_direct_streams, needs_own_port

            direct_own_port = needs_own_port()
            ds = enable_direct_streams(svc, services, own_port=direct_own_port)
        self.server, port = serve_worker(services, wrole, host, 0, worker_id)  # grpc.aio
        self.state.address = f"{host}:{port}"
        self._direct_port = None
        if direct_own_port:
            from decode_worker.direct import serve_direct_port

            self._direct_port = serve_direct_port(self.server, ds, host, 0)
        self.state.attach_metrics(
            WorkerMetrics(REGISTRY, worker_id, role.value, snapshot=self.state.metrics_snapshot)
        )
        self.metrics_port = serve_metrics(0)

        def router_now(index: int) -> Callable[[], str]:
            def resolve() -> str:  # a restarted router actor may listen on a new port
                router = ray.get_actor(router_actor_name(index), namespace=namespace)
                return ray.get(router.address.remote(), timeout=10)

            return resolve

        # registered with every router (``routers``), each heartbeat on its own thread
        self._hb = RouterLinks(
            self.state,
            tuple(router_addresses),
            resolvers=[router_now(i) for i in range(len(router_addresses))],
        )
        self._hb.start()
        self._lock = threading.Lock()
        self._stopped = False

    @staticmethod
    def _join_group(config: ClusterConfig, seat: DistSeat, host: str) -> Any:
        """Start joining the direct-handoff process group (in the background); rank 0 picks
        ``host:port`` for its TCP store here."""
        from pdserve.kv_transfer import DistBackend
        from pdserve.launcher import free_port
        from pdserve.worker_main import DistGroup, DistOptions

        t = config.kv_transfer
        if t.socket_ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = t.socket_ifname
            os.environ["NCCL_SOCKET_IFNAME"] = t.socket_ifname
        init = seat.init_method or f"tcp://{host}:{t.port or free_port(host)}"
        options = DistOptions(
            init_method=init,
            rank=seat.rank,
            world_size=seat.world_size,
            backend=t.backend,
            timeout_s=t.timeout_s,
            outbox_bytes=t.outbox_bytes,
            # Ray shows an actor only its own GPUs: its first visible one is its device
            cuda_device=0 if t.backend is DistBackend.NCCL else None,
        )
        return DistGroup(options).start()

    def dist_init_method(self) -> str:
        """``tcp://HOST:PORT`` of this worker's process group ("" when it is in none)."""
        return self.dist.options.init_method if self.dist is not None else ""

    def dist_state(self) -> dict[str, Any]:
        """This worker's place in the direct-handoff group: rank (-1: not in one), world size,
        whether it formed / failed; plus its direct-handoff counters."""
        d = self.dist
        puller = getattr(self._svc, "puller", None)
        # a SpillPuller, or a DistPuller wrapping one
        spill = puller if hasattr(puller, "spills") else getattr(puller, "fallback", None)
        return {
            "rank": d.rank if d is not None else -1,
            "world_size": d.world_size if d is not None else 0,
            "ready": bool(d is not None and d.ready),
            "failed": bool(d is not None and d.failed),
            "direct_pulls": int(getattr(puller, "direct_pulls", 0)),
            "spilled_pulls": int(getattr(spill, "spills", 0)),
            "pushes": int(getattr(self._peer, "pushes", 0)),
            "spills_served": int(getattr(self._peer, "spills", 0)),
            "store_fallbacks": int(getattr(getattr(self._svc, "publisher", None), "fallbacks", 0)),
        }

    def info(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "role": self.role.value,
            "node_id": self.node_id,
            "address": self.state.address,
            "store": self._store.address,  # where the node is now (it may have restarted)
            "host_id": self.host_id,
            "pid": os.getpid(),
            "metrics": f"127.0.0.1:{self.metrics_port}",
            "direct_streams": self.state.config.direct_streams,
            # DirectStream's own port under mutual TLS ("": served on ``address``, or not at all)
            "direct": self._direct_port.address if self._direct_port is not None else "",
            "dist_rank": self.dist.rank if self.dist is not None else -1,
            "tp": self.state.engine.config.tensor_parallel_size,
            # pids of the tensor-parallel follower processes (ranks 1..tp-1)
            "tp_followers": [p.pid for p in getattr(self.state.engine.runner, "followers", [])],
        }

    def stats(self) -> dict[str, Any]:
        s = self.state.stats()
        return {
            **self.info(),
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_blocks_used": s.kv_blocks_used,
            "kv_blocks_total": s.kv_blocks_total,
            "requests_finished": s.requests_finished_total,
            "kv_shm_fallbacks": self._transport.fallbacks,  # same-host reads that fell back to gRPC
            "kv_transfer": self.dist_state(),
        }

    def busy(self) -> int:
        """Requests waiting or running in this worker's engine."""
        s = self.state.stats()
        return s.num_running + s.num_waiting

    def stop(self) -> None:
        """Deregister from the router, stop serving (in-flight calls get 2 s), free the engine."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._hb.stop(deregister=True)
        if self._direct_port is not None:
            self._direct_port.stop()
        self.server.stop(2).wait()
        with contextlib.suppress(Exception):
            self._svc.close()  # its admission (decode) or blocking (prefill) threads
        self.state.close()
        with contextlib.suppress(Exception):
            self._transport.close()
        self._store.close()
        if self.dist is not None:
            self.dist.close()
