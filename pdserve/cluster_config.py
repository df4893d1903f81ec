"""Configuration of a pdserve cluster on Ray (``pdserve up --config cluster.yaml``).

Pure: frozen dataclasses parsed from a YAML mapping, validated with messages that name the key
to fix (:class:`InvalidRequestError`). No Ray import here.

Example (every key but ``model`` has a default)::

    model: /models/SmolLM2-135M-Instruct
    prefill: {count: 1, num_cpus: 1, kv_blocks: 2048}
    decode:  {count: 2, num_cpus: 1, device: cuda, tp: 1}   # cuda: num_gpus = tp per worker
    store:   {capacity_blocks: 4096, num_cpus: 0}
    router:  {port: 50051, heartbeat_timeout_s: 3.0, policy: goodput, api_keys: /etc/pdserve/api-keys.yaml}
                                               # router.migration_transport: grpc | store | dist (live
                                               # migration's KV; dist needs kv_transfer.kind: dist)
    routers: 2                                 # router actors (ports port, port+1, ...); workers register with all
    index:   {kind: memory}                    # or {kind: redis, url: redis://host:6379/0}
    kv_transfer: {kind: store}                 # or {kind: dist, backend: gloo|nccl} (direct)
    host: node                                 # bind to the Ray node's IP ("127.0.0.1" in tests)
    security:                                  # files present at these paths on every node
      ca: /etc/pdserve/tls/ca.pem              # (`pdserve certs --out DIR`, DIR copied to each node)
      cert: /etc/pdserve/tls/server.pem
      key: /etc/pdserve/tls/server.key
      cluster_token_file: /etc/pdserve/tls/cluster-token
    max_restarts: 3
    drain_timeout_s: 120
    direct_streams: true                       # decode workers stream tokens straight to clients (false: relayed)
    lora:                                      # LoRA adapters every worker serves (paths on every node)
      adapters: {sql: /adapters/sql, chat: /adapters/chat}
      max_loras: 8                             # adapter slots in engine memory (LRU)

Several base models: ``models`` instead of ``model``/``prefill``/``decode``/``lora``, one entry per
model with its pools and adapters (:class:`ModelPoolConfig`; its id is the folder's name)::

    models:
      - {model: /models/A, prefill: {count: 1}, decode: {count: 2}, lora: {adapters: {sql: /adapters/sql}}}
      - {model: /models/B, prefill: {count: 1}, decode: {count: 1}}

:meth:`ClusterConfig.views` gives each model's single-model config (what its workers and store
nodes are built from); the routers serve every model. Direct KV handoff (``kv_transfer.kind:
dist``) with several models: each model's workers form their own process group (a router pairs
only workers of one model, so no handoff crosses groups); with a fixed ``kv_transfer.port``,
model ``i``'s group uses ``port + i``.

``direct_streams`` (default true, as ``pdserve serve``): the routers send each client that offers
one a redirect to its decode worker's DirectStream and the worker streams the tokens to the
client (README "Direct token streams"); false relays every token through the router (routers and
decode workers both started without them). A cluster of several models relays (as a router
serving several models does): ``direct_streams: true`` given with ``models`` is refused.

``security`` (:class:`SecuritySection`, checked by :func:`check_security` when ``pdserve up``
starts a cluster): ``tls: auto`` (default) is on when certificates are given or ``host`` is not
a loopback address; on loopback without certificates it is refused (plaintext only when asked
for: ``tls: off``, loopback only); with TLS on the config must name the CA, the certificate and key every actor
serves with (and presents to the others: mutual TLS), and a cluster token file (the router's
Registry shares its port with the client API, so it authenticates workers by the token). Plaintext
off loopback is refused (``tls: off`` with ``host: node`` is an error). The paths are read by each
actor on its own node (:meth:`SecuritySection.security_config`), never shipped through Ray.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.scheduler import SchedulingPolicy
from pdserve import mlfq_knobs, offload_knobs
from pdserve.auth.keys import DEFAULT_REDIS_PREFIX
from pdserve.errors import InvalidRequestError
from pdserve.kv_transfer import DEFAULT_DIST_TIMEOUT_S, DEFAULT_OUTBOX_BYTES, DistBackend, KVTransport
from pdserve.redis_access import is_redis_url
from pdserve.security import CLUSTER_SERVER_NAME, SecurityConfig, TLSMode, is_loopback
from router.policy.placement import PolicyKind

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.lora import LoRAConfig

NODE_IP = "node"  # ``host`` value: bind each actor's servers to its Ray node's IP address


class PoolRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class IndexKind(enum.Enum):
    MEMORY = "memory"  # each store node keeps its own in-memory index
    REDIS = "redis"  # one Redis index shared by every store node


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class MigrationTransportKind(enum.Enum):
    """``router.migration_transport``: how a live migration's KV stages travel between decode
    workers (the routers' ``--migration-transport``; ``router.migration_client.MigrationTransport``)."""

    GRPC = "grpc"  # inside the worker-to-worker MigrateIn stream
    STORE = "store"  # through the source's KV store node (shared memory on one host)
    DIST = "dist"  # over the workers' torch.distributed group (needs kv_transfer.kind: dist)


@dataclass(frozen=True)
class PoolConfig:
    """One worker pool. ``tp``: tensor-parallel size, the processes one worker's model is split
    over (:mod:`engine.tp_runner`); ``num_gpus`` per worker is ``tp`` on cuda and 0 on cpu (a CPU
    worker's ranks share its ``num_cpus``)."""

    count: int = 1
    num_cpus: float = 1.0
    device: Device = Device.CPU
    tp: int = 1  # tensor-parallel size: GPUs one worker spans
    kv_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    chunk: int = 512  # prefill chunk (Sarathi) in tokens
    dtype: str = "auto"
    # host-memory KV pool behind the engine's (vLLM's --swap-space): preempted requests are
    # swapped out and back when cheaper than recomputing (0: always recompute; not with tp > 1)
    swap_space_gib: float = 0.0
    # local-disk KV tier behind the host pool (cold KV, #15): GiB of preallocated, checksummed
    # segment files under swap_disk_dir ("": the system's temp folder); 0: off. Needs swap_space_gib
    swap_disk_gib: float = 0.0
    swap_disk_dir: str = ""
    scheduling_policy: str = "priority"  # engine queue order: priority, fcfs or mlfq (FastServe)
    # mlfq only (pdserve.mlfq_knobs: the EngineConfig fields of the same names; defaults are
    # EngineConfig's, read through mlfq_knobs: one source; a value other than the default needs
    # scheduling_policy: mlfq)
    mlfq_num_levels: int = mlfq_knobs.default("mlfq_num_levels")
    mlfq_quantum_iters: int = mlfq_knobs.default("mlfq_quantum_iters")
    mlfq_base_prefill_s: float = mlfq_knobs.default("mlfq_base_prefill_s")
    mlfq_starvation_s: float = mlfq_knobs.default("mlfq_starvation_s")
    mlfq_swap_watermark: float = mlfq_knobs.default("mlfq_swap_watermark")
    mlfq_swap_backoff_iters: int = mlfq_knobs.default("mlfq_swap_backoff_iters")
    mlfq_swap_backoff_max_iters: int = mlfq_knobs.default("mlfq_swap_backoff_max_iters")
    # a queued request preempts a lower level after waiting this many iterations (>= 0)
    mlfq_preempt_wait_iters: int = mlfq_knobs.default("mlfq_preempt_wait_iters")
    # device memory the weights may use (FlexGen-style offloading: layers beyond it live in host
    # memory and are copied in ahead of use); 0: all weights resident. Not with tp > 1
    weight_budget_gib: float = 0.0
    # with weight_budget_gib or device_budget_gib: host memory for offloaded layers in GiB, the rest
    # in a scratch file under weight_offload_dir ("": the system's temp folder); .inf: no limit,
    # 0: every offloaded layer on disk
    weight_host_gib: float = math.inf
    weight_offload_dir: str = ""
    # FlexGen offloading beyond the weights (pdserve.offload_knobs; 0 / false: off): device memory
    # the KV pool may use (the other layers' KV in host memory, copied in a layer ahead), device
    # memory weights and KV share (split by the cost model; not with weight_budget_gib or
    # kv_budget_gib), and an offline throughput job's batch size from the cost model (needs
    # weight_budget_gib or device_budget_gib). Sizes in GiB; the budgets not with tp > 1
    kv_budget_gib: float = 0.0
    # with kv_budget_gib or device_budget_gib: host memory for offloaded layers' KV (.inf: no limit;
    # 0: all on disk), the rest in a memory-mapped file under kv_offload_dir ("": system temp)
    kv_host_gib: float = math.inf
    kv_offload_dir: str = ""
    device_budget_gib: float = 0.0
    offline_batch: bool = False
    max_model_len: int = 0  # longest prompt + output served (0: the model's max_position_embeddings)

    @property
    def num_gpus(self) -> int:
        return self.tp if self.device is Device.CUDA else 0

    def engine_config(self) -> EngineConfig:
        """The engine configuration of one worker of this pool."""
        from engine.config import EngineConfig

        return EngineConfig(
            num_kv_blocks=self.kv_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_batched_tokens,
            long_prefill_token_threshold=self.chunk,
            device=self.device.value,
            dtype=self.dtype,
            tensor_parallel_size=self.tp,
            swap_space_bytes=int(self.swap_space_gib * (1 << 30)),
            swap_disk_bytes=int(self.swap_disk_gib * (1 << 30)),
            swap_disk_dir=self.swap_disk_dir or None,
            scheduling_policy=SchedulingPolicy(self.scheduling_policy),
            **{k.field: getattr(self, k.field) for k in mlfq_knobs.KNOBS},
            weight_memory_budget_bytes=int(self.weight_budget_gib * (1 << 30))
            if self.weight_budget_gib
            else None,
            **offload_knobs.engine_kwargs(self._offload_values()),
            max_model_len=self.max_model_len or None,
        )

    def _offload_values(self) -> dict[str, object]:
        """The offload settings as :func:`pdserve.offload_knobs.problems` takes them (0: not set)."""
        return {
            offload_knobs.WEIGHT: self.weight_budget_gib or None,
            offload_knobs.WEIGHT_HOST: None if self.weight_host_gib == math.inf else self.weight_host_gib,
            offload_knobs.WEIGHT_DIR: self.weight_offload_dir or None,
            offload_knobs.KV_HOST: None if self.kv_host_gib == math.inf else self.kv_host_gib,
            offload_knobs.KV_DIR: self.kv_offload_dir or None,
            offload_knobs.KV: self.kv_budget_gib or None,
            offload_knobs.DEVICE: self.device_budget_gib or None,
            offload_knobs.OFFLINE: self.offline_batch,
        }

    def bundle(self) -> dict[str, float]:
        """Resources of one worker's placement-group bundle (empty: needs no placement group)."""
        b: dict[str, float] = {}
        if self.num_cpus > 0:
            b["CPU"] = float(self.num_cpus)
        if self.num_gpus > 0:
            b["GPU"] = float(self.num_gpus)
        return b


@dataclass(frozen=True)
class StorePoolConfig:
    """One KV store node per Ray node."""

    capacity_blocks: int = 4096
    num_cpus: float = 0.0
    use_shm: bool = True
    port: int = 0  # 0: any free port
    # Simulated hosts: give each Ray node's shared-memory domain its own host id, so that KV blocks
    # crossing Ray nodes use the gRPC transport even when every raylet runs on one machine (tests).
    host_id_per_node: bool = False


@dataclass(frozen=True)
class RouterPoolConfig:
    port: int = 0  # 0: any free port (a restarted router then gets a new one: set it in production)
    num_cpus: float = 0.0
    # custom Ray resource that pins the router to the node(s) advertising it (e.g. the head, behind
    # a Kubernetes Service); "" places it anywhere
    node_resource: str = ""
    heartbeat_timeout_s: float = 3.0
    heartbeat_interval_s: float = 0.5
    # placement (``python -m router --policy``; default goodput, calibrated by each worker's
    # start-up step-time profile): least_loaded needs no latency model and never
    # refuses work; goodput places by predicted TTFT/TPOT and refuses what would miss its SLO
    policy: PolicyKind = PolicyKind.GOODPUT
    latency_profile: str = ""  # ``pdserve profile`` JSON seeding goodput's predictions ("": none)
    max_redispatches: int = 2  # re-dispatches of a request whose worker was lost
    shared_cores: int = 0  # goodput: every worker on one CPU host of this many cores (0: own devices)
    slo_margin: float = 0.1  # goodput: headroom kept below a request's SLO
    tenant_max_inflight: int = 0  # goodput: per-tenant in-flight quota of each router (0: none)
    # where per-tenant in-flight counts, request rates and client request ids live (``python -m
    # router --tenant-state``): auto = the router's memory for one router, the Redis index for
    # several (refused without one); local = each router's memory (several routers: a tenant gets
    # N x its limits); or a redis:// URL shared by every router
    tenant_state: str = "auto"
    local_prefill_max_tokens: int = 256  # goodput: uncached tokens a decode worker may prefill (0: never)
    # edge auth (``python -m router --api-keys``): a key file on the router's node or a redis:// URL;
    # "" = dev mode, allowed only when ``host`` is loopback (check_security refuses it otherwise)
    api_keys: str = ""
    api_keys_redis_prefix: str = DEFAULT_REDIS_PREFIX
    salt_secret_file: str = ""  # a secret mixed into every cache salt ("": none)
    verify_workers: bool = True  # registrations checked against the worker's own Stats
    max_worker_kv_blocks: int = 0  # refuse a worker reporting more KV blocks (0: no bound)
    # live migration's KV transport (``python -m router --migration-transport``); dist moves the
    # stages over the workers' process group, so it needs kv_transfer.kind: dist
    migration_transport: MigrationTransportKind = MigrationTransportKind.GRPC


@dataclass(frozen=True)
class IndexConfig:
    kind: IndexKind = IndexKind.MEMORY
    url: str = ""  # redis://host:port/db when kind is redis


@dataclass(frozen=True)
class KVTransferConfig:
    """How KV moves from prefill to decode workers.

    ``kind: store`` (default): through the store node of the prefill worker's Ray node (shared
    memory on the same node, gRPC across nodes). ``kind: dist``: directly, over one
    torch.distributed process group of the workers started by ``pdserve up`` (``backend`` gloo on
    CPU, nccl on GPU; rank 0 is the first prefill worker, whose node hosts the group's TCP store
    on ``port``, 0: a free one). A group has a fixed membership: workers added later by ``pdserve
    scale``, or restarted after a failure, are not in it; a prefill worker outside it publishes to
    its store, and a decode worker outside it has direct handles spilled to the prefill worker's
    store (``KVPeer.SpillKV``), so nothing is lost, only the direct path is not taken.
    ``socket_ifname``: the network interface gloo/NCCL use between nodes (sets
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME in the workers; "" leaves them to choose).
    """

    kind: KVTransport = KVTransport.STORE
    backend: DistBackend = DistBackend.GLOO
    port: int = 0
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    outbox_bytes: int = DEFAULT_OUTBOX_BYTES
    socket_ifname: str = ""


@dataclass(frozen=True)
class SecuritySection:
    """Transport security of every actor (see module docstring and :mod:`pdserve.security`).
    ``ca``/``cert``/``key``/``*_file``: paths present on every Ray node (a mounted Secret, files
    copied by the cluster launcher). ``metrics_token_file``: /metrics then requires the bearer
    token."""

    tls: TLSMode = TLSMode.AUTO  # auto: on with certificates or off loopback; else refused
    ca: str = ""
    cert: str = ""
    key: str = ""
    mtls: bool = True  # workers and store nodes require a client certificate signed by ``ca``
    server_name: str = CLUSTER_SERVER_NAME  # the name internal channels verify in certificates
    cluster_token_file: str = ""
    metrics_token_file: str = ""

    def tls_on(self, host: str) -> bool:
        """Whether the actors serve TLS when bound to ``host`` (``"node"``: the node's IP).
        ``auto`` without certificates on loopback is neither (:meth:`undecided`)."""
        if self.tls is TLSMode.AUTO:
            return bool(self.ca or self.cert or self.key) or host == NODE_IP or not is_loopback(host)
        return self.tls is TLSMode.ON

    def undecided(self, host: str) -> bool:
        """``tls: auto`` on loopback without certificates: plaintext was not asked for."""
        return self.tls is TLSMode.AUTO and not self.tls_on(host)

    def security_config(self, host: str) -> SecurityConfig:
        """The :class:`~pdserve.security.SecurityConfig` of an actor (reads the files: run it on the
        actor's node; a missing file is a SecurityConfigError naming it)."""
        on = self.tls_on(host)
        return SecurityConfig(
            tls=TLSMode.AUTO if self.undecided(host) else TLSMode.ON if on else TLSMode.OFF,
            ca_file=self.ca if on else "",
            cert_file=self.cert if on else "",
            key_file=self.key if on else "",
            mtls=self.mtls,
            server_name=self.server_name,
            cluster_token_file=self.cluster_token_file,
            metrics_token_file=self.metrics_token_file,
        )


@dataclass(frozen=True)
class LoRASection:
    """LoRA adapters served by every prefill and decode worker (the cluster counterpart of the
    workers' ``--lora NAME=PATH``, ``--max-loras``, ``--max-lora-rank``, ``--max-cpu-loras``).
    ``adapters`` maps a name (what requests put in ``adapter`` / OpenAI ``model``) to a PEFT
    adapter folder present at that path on every node; each worker validates and loads them when
    it starts (a bad adapter fails the start naming it and the field). ``max_lora_rank`` and
    ``max_cpu_loras`` 0: the engine's defaults (largest rank given; every adapter kept in host
    memory). With tensor parallelism each rank keeps its part of every adapter (engine.lora)."""

    adapters: tuple[tuple[str, str], ...] = ()
    max_loras: int = 8
    max_lora_rank: int = 0
    max_cpu_loras: int = 0

    def lora_config(self) -> LoRAConfig | None:
        """The workers' :class:`engine.lora.LoRAConfig` (None: no adapters, base model only)."""
        if not self.adapters:
            return None
        from engine.lora import AdapterSpec, LoRAConfig

        return LoRAConfig(
            tuple(AdapterSpec(n, p) for n, p in self.adapters),
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank or None,
            max_cpu_loras=self.max_cpu_loras or None,
        )


def _lora_section(raw: Any) -> LoRASection:
    """Parse ``lora:`` (``adapters`` is a mapping NAME: PATH; the other keys are integers)."""
    if raw is None:
        return LoRASection()
    if not isinstance(raw, dict):
        raise _err("lora", f"expected a mapping, got {type(raw).__name__}")
    adapters = raw.get("adapters") or {}
    if not isinstance(adapters, dict):
        raise _err("lora.adapters", f"expected a mapping NAME: PATH, got {type(adapters).__name__}")
    pairs = []
    for name, path in adapters.items():
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise _err(f"lora.adapters.{name}", f"expected NAME: PATH (strings), got {name!r}: {path!r}")
        pairs.append((name, path))
    rest = _section(LoRASection, {k: v for k, v in raw.items() if k != "adapters"}, "lora")
    from dataclasses import replace

    sec = replace(rest, adapters=tuple(pairs))
    for k in ("max_lora_rank", "max_cpu_loras"):
        if getattr(sec, k) < 0:
            raise _err(f"lora.{k}", f"must be >= 0 (0: the engine's default), got {getattr(sec, k)}")
    if not sec.adapters and raw.keys() - {"adapters"}:
        raise _err("lora.adapters", "max_loras/max_lora_rank/max_cpu_loras given without any adapter")
    try:
        sec.lora_config()
    except ValueError as e:
        raise _err("lora", str(e)) from None
    return sec


@dataclass(frozen=True)
class ModelPoolConfig:
    """One base model of a cluster serving several (``models:``): its HF folder (its id is the
    folder's name), its own prefill and decode pools and its LoRA adapters."""

    model: str
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    lora: LoRASection = field(default_factory=LoRASection)

    @property
    def model_id(self) -> str:
        return Path(self.model).name


@dataclass(frozen=True)
class ClusterConfig:
    """A cluster of one base model (``model``, ``prefill``, ``decode``, ``lora``) or of several
    (``models``: each with its pools and adapters; ``model`` then empty). :meth:`views` gives one
    single-model config per served model (what each worker and store actor of that model is
    built from; the router serves them all)."""

    model: str = ""
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    store: StorePoolConfig = field(default_factory=StorePoolConfig)
    router: RouterPoolConfig = field(default_factory=RouterPoolConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    security: SecuritySection = field(default_factory=SecuritySection)
    lora: LoRASection = field(default_factory=LoRASection)
    host: str = NODE_IP  # "node" (the Ray node's IP) or a literal address such as 127.0.0.1
    # router actors, each with router's settings (router i on port + i when port is set); every
    # worker registers with all of them and clients fail over between them (README)
    routers: int = 1
    namespace: str = "pdserve"
    max_restarts: int = 3  # per actor, on failure (not for scale-down or ``pdserve down``)
    drain_timeout_s: float = 120.0  # scale-down: longest wait for a worker's requests to finish
    drain_quiet_s: float = 1.0  # scale-down: how long a worker must stay idle before removal
    startup_timeout_s: float = 300.0
    # decode workers stream tokens straight to clients (routers keep the lifecycle); false: relayed.
    # Several models relay (see direct_on)
    direct_streams: bool = True
    models: tuple[ModelPoolConfig, ...] = ()  # several base models (instead of model/prefill/decode/lora)
    # set on the per-model views of a several-model cluster (views()): the model's id, which
    # names its actors (a store node per model per Ray node: the models' KV layouts differ)
    model_tag: str = ""

    def pool(self, role: PoolRole) -> PoolConfig:
        return self.prefill if role is PoolRole.PREFILL else self.decode

    @property
    def several(self) -> bool:
        """Whether this config serves several base models (``models``)."""
        return bool(self.models)

    @property
    def direct_on(self) -> bool:
        """Whether the routers and decode workers serve direct token streams: ``direct_streams``
        for one model; never for several (nor their per-model views: their routers relay)."""
        return self.direct_streams and not self.models and not self.model_tag

    def views(self) -> list[ClusterConfig]:
        """One single-model config per served model, in order (``[self]`` for one model); a
        view of a several-model cluster has ``model_tag`` = the model's id, and with a fixed
        ``kv_transfer.port`` model ``i``'s view has ``port + i`` (each model's direct-handoff
        process group has its own TCP store)."""
        if not self.models:
            return [self]
        from dataclasses import replace

        t = self.kv_transfer
        return [
            replace(
                self,
                model=m.model,
                prefill=m.prefill,
                decode=m.decode,
                lora=m.lora,
                kv_transfer=replace(t, port=t.port + i) if t.port and t.kind is KVTransport.DIST else t,
                models=(),
                model_tag=m.model_id,
            )
            for i, m in enumerate(self.models)
        ]

    @property
    def model_ids(self) -> list[str]:
        """The served models' ids (their folders' names), in order."""
        return [Path(v.model).name for v in self.views()]

    def with_counts(self, prefill: int | None = None, decode: int | None = None) -> ClusterConfig:
        """A copy with new pool sizes (None: unchanged)."""
        from dataclasses import replace

        return replace(
            self,
            prefill=self.prefill if prefill is None else replace(self.prefill, count=prefill),
            decode=self.decode if decode is None else replace(self.decode, count=decode),
        )


def capacity_shortfall(c: ClusterConfig, total: dict[str, float], num_nodes: int) -> str | None:
    """Pure: why a Ray cluster with ``total`` resources (``ray.cluster_resources()``) over
    ``num_nodes`` nodes can never hold ``c``'s pools, store nodes and router (a message naming
    what is missing), or None when it can. Only totals are compared: resources other jobs hold
    now still make a placement wait (``startup_timeout_s``)."""
    need: dict[str, float] = {}
    why: dict[str, list[str]] = {}
    views = c.views()
    for view in views:
        for role in PoolRole:
            p = view.pool(role)
            name = f"{view.model_tag}.{role.value}" if view.model_tag else role.value
            for k, v in p.bundle().items():
                if p.count:
                    need[k] = need.get(k, 0.0) + v * p.count
                    per = f"{v:g} {k}" + (f" (tp {p.tp})" if k == "GPU" else "")
                    why.setdefault(k, []).append(f"{name}: {p.count} x {per}")
    for what, n in (
        ("store nodes", c.store.num_cpus * num_nodes * len(views)),
        ("routers", c.router.num_cpus * c.routers),
    ):
        if n:
            need["CPU"] = need.get("CPU", 0.0) + n
            why.setdefault("CPU", []).append(f"{what}: {n:g} CPU")
    short = [k for k, v in need.items() if v > total.get(k, 0.0) + 1e-9]
    if not short:
        return None
    parts = [
        f"{need[k]:g} {k} ({', '.join(why[k])}) but the Ray cluster has {total.get(k, 0.0):g}" for k in short
    ]
    return "cluster config needs " + "; ".join(parts) + ": lower the counts (or tp), or add nodes"


# ---------------------------------------------------------------------------- parsing
def _err(where: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"cluster config: {where}: {msg}")


def _section(cls: type, raw: Any, where: str):
    """Build dataclass ``cls`` from mapping ``raw``: unknown keys and wrong types are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _err(where, f"expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise _err(where, f"unknown key(s) {unknown}; known: {sorted(known)}")
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        kw[k] = _coerce(known[k].type, v, f"{where}.{k}")
    return cls(**kw)


_ENUMS = {
    "PoolRole": PoolRole,
    "IndexKind": IndexKind,
    "Device": Device,
    "KVTransport": KVTransport,
    "DistBackend": DistBackend,
    "PolicyKind": PolicyKind,
    "TLSMode": TLSMode,
    "MigrationTransportKind": MigrationTransportKind,
}


def _coerce(typ: Any, v: Any, where: str) -> Any:
    t = str(typ)
    if t in _ENUMS:
        e = _ENUMS[t]
        if e is TLSMode and isinstance(v, bool):  # YAML 1.1 reads a bare on/off as true/false
            v = "on" if v else "off"
        try:
            return e(str(v).lower())
        except ValueError:
            raise _err(where, f"{v!r} is not one of {[m.value for m in e]}") from None
    if t == "bool":
        if not isinstance(v, bool):
            raise _err(where, f"expected true/false, got {v!r}")
        return v
    if t == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise _err(where, f"expected an integer, got {v!r}")
        return v
    if t == "float":
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _err(where, f"expected a number, got {v!r}")
        return float(v)
    if t == "str":
        if not isinstance(v, str):
            raise _err(where, f"expected a string, got {v!r}")
        return v
    raise _err(where, f"unsupported type {t}")  # pragma: no cover - a new field without a coercion


def _check_pool(p: PoolConfig, where: str) -> None:
    if p.count < 0:
        raise _err(f"{where}.count", f"must be >= 0, got {p.count}")
    if p.num_cpus < 0:
        raise _err(f"{where}.num_cpus", f"must be >= 0, got {p.num_cpus}")
    if p.tp < 1:
        raise _err(f"{where}.tp", f"must be >= 1, got {p.tp}")
    for k in ("kv_blocks", "block_size", "max_num_seqs", "max_batched_tokens", "chunk"):
        if getattr(p, k) < 1:
            raise _err(f"{where}.{k}", f"must be >= 1, got {getattr(p, k)}")
    if not (p.swap_space_gib >= 0 and math.isfinite(p.swap_space_gib)):
        raise _err(f"{where}.swap_space_gib", f"must be >= 0 GiB (0: recompute only), got {p.swap_space_gib}")
    if p.swap_space_gib and p.tp > 1:
        raise _err(
            f"{where}.swap_space_gib",
            f"swapping is not supported with tensor parallelism (tp: {p.tp}): set swap_space_gib: 0",
        )
    if not (p.swap_disk_gib >= 0 and math.isfinite(p.swap_disk_gib)):
        raise _err(f"{where}.swap_disk_gib", f"must be >= 0 GiB (0: no disk tier), got {p.swap_disk_gib}")
    if p.swap_disk_gib and not p.swap_space_gib:
        raise _err(
            f"{where}.swap_disk_gib", "needs swap_space_gib > 0 (the disk tier sits behind the host pool)"
        )
    if p.swap_disk_dir and not p.swap_disk_gib:
        raise _err(f"{where}.swap_disk_dir", "needs swap_disk_gib > 0")
    if not (p.weight_budget_gib >= 0 and math.isfinite(p.weight_budget_gib)):
        raise _err(
            f"{where}.weight_budget_gib",
            f"must be >= 0 GiB (0: all weights resident), got {p.weight_budget_gib}",
        )
    if p.weight_budget_gib and p.tp > 1:
        raise _err(
            f"{where}.weight_budget_gib",
            f"weight offloading is not supported with tensor parallelism (tp: {p.tp}): set weight_budget_gib: 0",
        )
    for key in (offload_knobs.KV, offload_knobs.DEVICE):  # 0: off, as weight_budget_gib
        v = getattr(p, key)
        if not (v >= 0 and math.isfinite(v)):
            raise _err(f"{where}.{key}", f"must be >= 0 GiB (0: off), got {v}")
    for key, why in offload_knobs.problems(
        p._offload_values(), lambda k: f"{where}.{k}", p.scheduling_policy, p.tp
    ):
        raise _err(f"{where}.{key}", why)
    if p.max_model_len < 0:
        raise _err(
            f"{where}.max_model_len", f"must be >= 0 (0: the model's own limit), got {p.max_model_len}"
        )
    policies = [x.value for x in SchedulingPolicy]
    if p.scheduling_policy not in policies:
        raise _err(f"{where}.scheduling_policy", f"must be one of {policies}, got {p.scheduling_policy!r}")
    for k in mlfq_knobs.KNOBS:
        v = getattr(p, k.field)
        why = k.problem(v)
        if why is not None:
            raise _err(f"{where}.{k.field}", why)
        if v != k.default and p.scheduling_policy != SchedulingPolicy.MLFQ.value:
            raise _err(
                f"{where}.{k.field}",
                f"is read by the MLFQ scheduler only: set scheduling_policy: mlfq (it is {p.scheduling_policy!r})",
            )


def check_security(c: ClusterConfig) -> ClusterConfig:
    """Raise :class:`InvalidRequestError` naming the key to set when ``c`` would serve off
    loopback without TLS and a cluster token, or without API keys (``router.api_keys``)
    (``pdserve up`` checks this before starting anything; paths only: the files live on the nodes, each actor reads them there). Returns
    ``c``. Parsing (:func:`validate`) leaves this out, so that a config can be read and
    inspected anywhere."""
    s = c.security
    where = "the node's IP" if c.host == NODE_IP else repr(c.host)
    if s.undecided(c.host):
        raise _err(
            "security.tls",
            f"auto, but no certificates and host binds {where}: plaintext must be asked for. Set "
            "`security: {tls: off}` (plaintext on loopback, development), or give "
            "security.ca/cert/key/cluster_token_file (`pdserve certs --out DIR`)",
        )
    if not s.tls_on(c.host):
        if c.host == NODE_IP or not is_loopback(c.host):
            raise _err(
                "security.tls",
                f"off, but host binds {where}: plaintext is only served on loopback. Remove `tls: off` "
                "and give security.ca/cert/key/cluster_token_file (`pdserve certs --out DIR`), or set "
                "host: 127.0.0.1",
            )
        if s.ca or s.cert or s.key:
            raise _err("security.tls", "off, but ca/cert/key given: drop them or set tls: on")
        d = SecuritySection()
        for k in ("mtls", "server_name"):  # SecurityConfig reads them with TLS on only
            if getattr(s, k) != getattr(d, k):
                raise _err(
                    f"security.{k}", "is read with TLS on only, and tls is off: drop it or set tls: on"
                )
        return c
    missing = [k for k in ("ca", "cert", "key", "cluster_token_file") if not getattr(s, k)]
    if missing:
        raise _err(
            f"security.{missing[0]}",
            f"TLS is on (host binds {where}): set security.{', security.'.join(missing)} to files present "
            "on every node. Make them with `pdserve certs --out DIR` (ca.pem, server.pem, server.key, "
            "cluster-token) and copy DIR to each node (deploy/ray/README.md), or set host: 127.0.0.1 "
            "for a one-machine cluster",
        )
    if not c.router.api_keys and (c.host == NODE_IP or not is_loopback(c.host)):
        raise _err(
            "router.api_keys",
            f"not set, but host binds {where}: without API keys the router serves anyone (dev mode is "
            "loopback only). Make a key file with `pdserve keys --store FILE add --tenant NAME`, put it "
            "on the router's node and set router.api_keys to its path (or a redis:// key store), or "
            "set host: 127.0.0.1",
        )
    return c


def validate(c: ClusterConfig) -> ClusterConfig:
    """Raise :class:`InvalidRequestError` naming the first bad key; return ``c`` when valid."""
    if c.model_tag:
        raise _err("model_tag", "is set on the per-model views only (ClusterConfig.views)")
    if not c.models:
        return _validate_one(c, "")
    if c.model or c.prefill != PoolConfig() or c.decode != PoolConfig() or c.lora != LoRASection():
        raise _err("models", "give each model's pools and adapters in its entry, not at the top level")
    if len(c.models) < 2:
        raise _err("models", "list two or more models (one model: the top-level model/prefill/decode keys)")
    ids = c.model_ids
    if len(set(ids)) != len(ids):
        raise _err("models", f"the models' folder names are their ids and must be distinct, got {ids}")
    t = c.kv_transfer
    if t.kind is KVTransport.DIST and t.port and t.port + len(c.models) - 1 > 65535:
        raise _err(
            "kv_transfer.port",
            f"each of the {len(c.models)} models' process groups takes a port from {t.port}: past 65535",
        )
    for i, view in enumerate(c.views()):
        _validate_one(view, f"models[{i}].")
    return c


def _validate_one(c: ClusterConfig, at: str) -> ClusterConfig:
    """:func:`validate` of one model's config (``at``: the prefix of its pools' keys)."""
    if not c.model:
        raise _err(f"{at}model", "set the path of the HF model folder on the cluster's nodes")
    _check_pool(c.prefill, f"{at}prefill")
    _check_pool(c.decode, f"{at}decode")
    if c.prefill.block_size != c.decode.block_size:
        raise _err(f"{at}decode.block_size", "prefill and decode must use the same KV block size")
    if c.store.capacity_blocks < 1:
        raise _err("store.capacity_blocks", f"must be >= 1, got {c.store.capacity_blocks}")
    for where, port in (("store.port", c.store.port), ("router.port", c.router.port)):
        if not 0 <= port <= 65535:
            raise _err(where, f"must be in [0, 65535], got {port}")
    if c.routers < 1:
        raise _err("routers", f"must be >= 1, got {c.routers}")
    if c.router.port and c.router.port + c.routers - 1 > 65535:
        raise _err("routers", f"{c.routers} routers from router.port {c.router.port} run past port 65535")
    r = c.router
    if r.heartbeat_interval_s <= 0 or r.heartbeat_timeout_s <= r.heartbeat_interval_s:
        raise _err("router.heartbeat_timeout_s", "must exceed heartbeat_interval_s (both > 0)")
    if r.max_redispatches < 0:
        raise _err("router.max_redispatches", f"must be >= 0, got {r.max_redispatches}")
    if not 0 <= r.slo_margin < 1:
        raise _err("router.slo_margin", f"must be in [0, 1), got {r.slo_margin}")
    if r.tenant_max_inflight < 0 or r.local_prefill_max_tokens < 0:
        raise _err(
            "router.tenant_max_inflight", "tenant_max_inflight and local_prefill_max_tokens must be >= 0"
        )
    _check_tenant_state(c)
    if r.shared_cores < 0:
        raise _err(
            "router.shared_cores", f"must be >= 0 (0: workers have their own devices), got {r.shared_cores}"
        )
    if c.index.kind is IndexKind.REDIS and not is_redis_url(c.index.url):
        raise _err("index.url", "a redis index needs url: redis://HOST:PORT/DB")
    if c.index.kind is IndexKind.MEMORY and c.index.url:
        raise _err(
            "index.url",
            "is read with kind: redis only (kind is memory: each store node's private index); "
            "set index: {kind: redis, url: ...}, or drop url",
        )
    # open_key_store reads the prefix for a redis:// key store only (a file, or none: dev mode)
    if r.api_keys_redis_prefix != RouterPoolConfig.api_keys_redis_prefix and not is_redis_url(r.api_keys):
        raise _err(
            "router.api_keys_redis_prefix",
            f"is read with a redis:// key store only (router.api_keys is {r.api_keys or 'unset'!r}): "
            "drop it, or set router.api_keys: redis://HOST:PORT/DB",
        )
    _check_goodput_only(r)
    t = c.kv_transfer
    if not 0 <= t.port <= 65535:
        raise _err("kv_transfer.port", f"must be in [0, 65535], got {t.port}")
    if t.timeout_s <= 0:
        raise _err("kv_transfer.timeout_s", f"must be > 0, got {t.timeout_s}")
    if t.outbox_bytes < 1:
        raise _err("kv_transfer.outbox_bytes", f"must be >= 1, got {t.outbox_bytes}")
    if t.kind is KVTransport.DIST and t.backend is DistBackend.NCCL:
        for role, p in (("prefill", c.prefill), ("decode", c.decode)):
            if p.device is not Device.CUDA:
                raise _err(
                    "kv_transfer.backend",
                    f"nccl moves CUDA tensors: set {at}{role}.device: cuda (or backend: gloo)",
                )
    if r.migration_transport is MigrationTransportKind.DIST and t.kind is not KVTransport.DIST:
        raise _err(
            "router.migration_transport",
            "dist moves live migrations over the workers' torch.distributed process group, which only "
            "kv_transfer.kind: dist forms: set kv_transfer: {kind: dist}, or migration_transport: grpc or store",
        )
    if c.max_restarts < -1:
        raise _err("max_restarts", "must be >= 0 (or -1: unlimited)")
    if c.drain_timeout_s <= 0 or c.drain_quiet_s < 0:
        raise _err("drain_timeout_s", "must be > 0 (and drain_quiet_s >= 0)")
    if not c.namespace:
        raise _err("namespace", "must be non-empty")
    return c


_SECTIONS = {
    "prefill": PoolConfig,
    "decode": PoolConfig,
    "store": StorePoolConfig,
    "router": RouterPoolConfig,
    "index": IndexConfig,
    "kv_transfer": KVTransferConfig,
    "security": SecuritySection,
}


def _check_goodput_only(r: RouterPoolConfig) -> None:
    """The ``router`` keys only the goodput placement policy reads (its GoodputConfig), refused
    with a value other than their default under another ``router.policy`` (it would ignore them)."""
    if r.policy is PolicyKind.GOODPUT:
        return
    d = RouterPoolConfig()
    for k in ("slo_margin", "tenant_max_inflight", "local_prefill_max_tokens", "shared_cores"):
        if getattr(r, k) != getattr(d, k):
            raise _err(
                f"router.{k}",
                f"is read by the goodput placement policy only (policy is {r.policy.value}): set "
                f"router.policy: goodput, or drop {k}",
            )


def _check_tenant_state(c: ClusterConfig) -> None:
    """``router.tenant_state`` against ``routers`` and the index (pdserve.auth.shared_state's rule:
    several routers keep per-tenant state in Redis unless ``local`` is asked for), and the goodput
    policy's ``router.tenant_max_inflight``, which each router counts alone: refused with several
    routers sharing state (per-key ``max_inflight`` is the cluster-wide quota)."""
    from pdserve.auth.shared_state import choose_tenant_state

    r = c.router
    index_url = c.index.url if c.index.kind is IndexKind.REDIS else None
    try:
        choice = choose_tenant_state(r.tenant_state, index_url, c.routers)
    except ValueError as e:
        msg = str(getattr(e, "message", e)).replace("--tenant-state", "router.tenant_state")
        msg = msg.replace("--index redis://...", "index: {kind: redis, url: redis://...}")
        raise _err("router.tenant_state", msg) from None
    if c.routers > 1 and choice.url and r.tenant_max_inflight:
        raise _err(
            "router.tenant_max_inflight",
            f"is counted by each of the {c.routers} routers alone; set max_inflight on the tenants' API "
            "keys instead (shared by the routers through Redis), or router.tenant_state: local",
        )


def router_tenant_state_url(c: ClusterConfig) -> str:
    """The Redis URL the routers share per-tenant state through ("": each router's memory)."""
    from pdserve.auth.shared_state import choose_tenant_state

    index_url = c.index.url if c.index.kind is IndexKind.REDIS else None
    return choose_tenant_state(c.router.tenant_state, index_url, c.routers).url


def from_dict(raw: Any) -> ClusterConfig:
    """Parse the YAML mapping of a cluster config (see module docstring)."""
    if not isinstance(raw, dict):
        raise _err("top level", f"expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(ClusterConfig) if f.name != "model_tag"}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise _err("top level", f"unknown key(s) {unknown}; known: {sorted(known)}")
    if "models" in raw:
        top = sorted({"model", "prefill", "decode", "lora"} & set(raw))
        if top:
            raise _err(
                "models", f"give each model's {', '.join(top)} in its entry of models, not at the top level"
            )
        if raw.get("direct_streams") is True:
            raise _err(
                "direct_streams",
                "a cluster of several models relays every token (its routers serve several models); "
                "remove direct_streams: true, or run one cluster per model for direct streams",
            )
    elif "model" not in raw:
        raise _err("model", "missing: set the path of the HF model folder on the cluster's nodes")
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "lora":
            kw[k] = _lora_section(v)
        elif k == "models":
            kw[k] = _models_section(v)
        else:
            kw[k] = _section(_SECTIONS[k], v, k) if k in _SECTIONS else _coerce(known[k].type, v, k)
    return validate(ClusterConfig(**kw))


def _models_section(raw: Any) -> tuple[ModelPoolConfig, ...]:
    """Parse ``models:``: a list of mappings ``{model: PATH, prefill: {...}, decode: {...}, lora: {...}}``."""
    if not isinstance(raw, list):
        raise _err("models", f"expected a list of models, got {type(raw).__name__}")
    out = []
    for i, entry in enumerate(raw):
        at = f"models[{i}]"
        if not isinstance(entry, dict):
            raise _err(
                at, f"expected a mapping with model, prefill, decode, lora; got {type(entry).__name__}"
            )
        unknown = sorted(set(entry) - {"model", "prefill", "decode", "lora"})
        if unknown:
            raise _err(at, f"unknown key(s) {unknown}; known: ['decode', 'lora', 'model', 'prefill']")
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise _err(f"{at}.model", "set the path of the HF model folder on the cluster's nodes")
        try:
            lora = _lora_section(entry.get("lora"))
        except InvalidRequestError as e:
            raise InvalidRequestError(
                e.message.replace("cluster config: lora", f"cluster config: {at}.lora")
            ) from None
        out.append(
            ModelPoolConfig(
                model,
                _section(PoolConfig, entry.get("prefill"), f"{at}.prefill"),
                _section(PoolConfig, entry.get("decode"), f"{at}.decode"),
                lora,
            )
        )
    return tuple(out)


def load(path: str | Path) -> ClusterConfig:
    """Read and parse a cluster YAML file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidRequestError(f"cluster config: cannot read {p}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidRequestError(f"cluster config: {p} is not valid YAML: {e}") from None
    return from_dict(raw)
