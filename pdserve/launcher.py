"""Start the embedded default cluster as processes on 127.0.0.1: store, router, prefill, decode.

``launch(model_path)`` returns a :class:`LocalCluster` once every process is serving (each prints
a JSON line with its address and its Prometheus /metrics address) and every worker has registered
with the router. ``stop()`` ends them all (SIGTERM, then SIGKILL after a grace period).
``write_file_sd(path)`` writes a Prometheus file_sd target list of their /metrics endpoints.

``ClusterSpec.index_url``: where the store node registers its blocks. ``"memory"`` (default) is
the store's private in-process index; a ``redis://host:port/db[?prefix=p]`` URL runs the cluster
over a Redis index (:mod:`kv_store.redis_index`) that routers and other tools can open with the
same URL (:func:`kv_store.redis_index.make_index`) for a global Lookup; the launched router gets
it (``--index URL``) and finds cached prefixes there itself. ``store_args`` are extra
``python -m kv_store`` options (e.g. ``--index-sync-interval-s 0.2``, ``--high-water 0.9``).
``num_stores`` > 1 (Redis index only) starts store nodes kv0..kvN-1; workers use kv0, which with
``replication_factor`` > 1 copies new blocks to the others in the background (best effort).

``ClusterSpec.kv_transport``: how KV moves from prefill to decode. ``store`` (default): through
the store node. ``dist``: directly, over one torch.distributed process group that every worker
joins (``dist_backend`` gloo | nccl; a free loopback port is allocated for its TCP store;
prefill-i is rank i, decode-i rank ``num_prefill + i``; see :mod:`pdserve.worker_main`).

``ClusterSpec.num_routers``: routers router, router-1, ... (the first on ``router_port``, the others
on free ports); every worker registers with all of them (``--router a,b``) and
``LocalCluster.router_addresses`` is what a client takes (``Client(cl.router_addresses)``).
A supervisor thread restarts a router process that exits while the cluster runs, on the ports it
had (so that workers and clients find it where they left it), at most ``router_restart_limit``
times per ``router_restart_window_s`` (then it stays down and :meth:`LocalCluster.dead` names it);
``LocalCluster.router_restarts`` records each restart. ``supervise_routers=False`` turns it off.

``ClusterSpec.models``: several base models (issue #16 part 3) instead of ``model_path``: a
:class:`ModelPool` each (its folder, whose name is the model id, and its own prefill / decode
worker counts). Each model gets its own store node (store, store-1, ...: kvK for model K; their
KV layouts differ) and its workers ``prefill-<model>-<i>`` / ``decode-<model>-<i>``, which
register with every router; every router serves all the models (``python -m router --model A
--model B``) and ``model_stores`` names each model's store. Not with ``num_stores`` > 1 or the
``dist`` transport.

``ClusterSpec.openai_port``: also start ``pdserve openai`` in front of every router (``openai_url``
names it), HTTPS with the cluster's certificate when ``tls``, else plain HTTP asked for explicitly
(``--tls off``) on 127.0.0.1 (:func:`openai_args`). ``ClusterSpec.tenant_state``: the routers'
``--tenant-state`` (per-tenant quotas and request ids; :func:`router_tenant_state_args`).

``ClusterSpec.tls``: run every process with TLS, mutual TLS between them and a cluster token
(:mod:`pdserve.security`). ``pki_dir`` names a ``pdserve certs`` folder to use; without one a
development CA, certificates and token are made in a temporary folder that ``stop()`` removes.
``LocalCluster.pki`` names the files (``pki.ca`` is what a client needs:
``Client(cl.router_address, ca=cl.pki.ca)``). Without ``tls`` (``tls=False``: the launcher binds
127.0.0.1 only) every process is started with an explicit ``--tls off``: plaintext on 127.0.0.1,
the development mode (pdserve never picks plaintext by itself: ``--tls auto`` without certificates
is refused, see :mod:`pdserve.security`). Other ``PDSERVE_*`` variables of this process still
reach the children through their environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.models.config import ModelConfig
from pdserve.errors import UnavailableError
from pdserve.kv_transfer import DistBackend, KVTransport
from pdserve.proc_start import Starting, await_ready, spawn_chains, start
from pdserve.security import SecurityConfig, TLSMode

if TYPE_CHECKING:
    from pdserve.certs import PkiPaths

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (another process may still take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ModelPool:
    """One base model of a cluster serving several (``ClusterSpec.models``): its HF folder (the
    model id clients name is the folder's name, as the workers report it) and its own prefill and
    decode workers, which put and pull their KV through the model's own store node (the models'
    KV layouts differ)."""

    model_path: str
    num_prefill: int = 1
    num_decode: int = 1

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("ModelPool.model_path is required")
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError(
                f"model {self.model_id!r}: num_prefill must be >= 0 and num_decode >= 1, got "
                f"{self.num_prefill} and {self.num_decode}"
            )

    @property
    def model_id(self) -> str:
        """The id clients name (the folder's name: what its workers register with)."""
        return Path(self.model_path).name


@dataclass(frozen=True)
class ClusterSpec:
    model_path: str = ""  # the one model served (or ``models``, for several)
    num_prefill: int = 1
    num_decode: int = 1
    store_capacity_blocks: int = 4096
    worker_kv_blocks: int = 2048
    block_size: int = 16
    router_port: int = 0
    worker_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()  # extra ``python -m router`` flags, e.g. ("--policy", "goodput")
    startup_timeout_s: float = 180.0
    index_url: str = "memory"  # the store's KV index: "memory" | "redis://host:port/db[?prefix=p]"
    store_args: tuple[str, ...] = ()
    num_stores: int = 1  # store nodes kv0..kvN-1; workers put to and pull through kv0
    replication_factor: int = 1  # copies per block across the store nodes (needs a shared index)
    kv_transport: KVTransport = KVTransport.STORE  # "store" | "dist" (strings are accepted)
    dist_backend: DistBackend = DistBackend.GLOO  # kv_transport "dist": "gloo" (CPU) | "nccl" (GPU)
    tls: bool = False  # TLS + mTLS + cluster token on every process (see module docstring)
    pki_dir: str = ""  # with tls: a `pdserve certs` folder ("": a fresh dev CA in a temp folder)
    num_routers: int = 1  # routers router, router-1, ...; every worker registers with each
    supervise_routers: bool = True  # restart a router process that exits (see module docstring)
    router_restart_limit: int = 5  # restarts of one router per window, at most
    router_restart_window_s: float = 60.0
    # per-tenant quotas and request ids of the routers (python -m router --tenant-state): "auto"
    # shares them through a redis:// index_url with several routers; with several routers and no
    # Redis index, "auto" runs them per router with a warning (see router_tenant_state_args)
    tenant_state: str = "auto"
    openai_port: int | None = None  # also start `pdserve openai` on this port (0: any free); None: not
    openai_args: tuple[str, ...] = ()  # extra `pdserve openai` flags (e.g. ("--api-keys", FILE))
    # several base models (instead of model_path; num_prefill / num_decode are then per pool):
    # each with its own workers and store node; every router serves them all (see module doc)
    models: tuple[ModelPool, ...] = ()
    # direct token streams (decode workers stream to the SDK's clients, the router out of the
    # token path; a router serving several models relays): False runs every process with
    # --no-direct-streams (every token relayed by the router)
    direct_streams: bool = True
    # start the stores beside the routers and the prefill beside the decode workers (each kind's
    # workers still one after another, in order); False: every process after the one before
    # (the start-up before 2026-12-07; bench/launch_startup.py compares the two)
    parallel_start: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        if bool(self.model_path) == bool(self.models):
            raise ValueError("give ClusterSpec either model_path (one model) or models (several), not both")
        if self.models:
            ids = [m.model_id for m in self.models]
            if len(set(ids)) != len(ids):
                raise ValueError(f"the models' folder names are their ids and must be distinct, got {ids}")
        try:
            object.__setattr__(self, "kv_transport", KVTransport(self.kv_transport))
            object.__setattr__(self, "dist_backend", DistBackend(self.dist_backend))
        except ValueError as e:
            raise ValueError(
                f"{e}: kv_transport is one of {[t.value for t in KVTransport]}, "
                f"dist_backend one of {[b.value for b in DistBackend]}"
            ) from None
        if self.num_stores < 1:
            raise ValueError(f"num_stores must be >= 1, got {self.num_stores}")
        if self.num_routers < 1:
            raise ValueError(f"num_routers must be >= 1, got {self.num_routers}")
        if self.router_restart_limit < 0 or self.router_restart_window_s <= 0:
            raise ValueError(
                "router_restart_limit must be >= 0 and router_restart_window_s > 0, got "
                f"{self.router_restart_limit} and {self.router_restart_window_s}"
            )
        if self.num_stores > 1 and self.index_url == "memory":
            raise ValueError("several store nodes need a shared index: set index_url to a redis:// URL")
        if len(self.models) > 1:
            if self.num_stores > 1:
                raise ValueError(
                    "several models run one store node each: num_stores > 1 (replicas) is not supported with them"
                )
            if self.kv_transport is not KVTransport.STORE:
                raise ValueError(
                    "several models move KV through their own store nodes: kv_transport must be 'store'"
                )

    def pools(self) -> tuple[ModelPool, ...]:
        """The served models with their worker counts (one pool for ``model_path``)."""
        return self.models or (ModelPool(self.model_path, self.num_prefill, self.num_decode),)


@dataclass
class LocalCluster:
    spec: ClusterSpec
    router_address: str = ""  # the first router's data plane (Generate): what clients use
    control_address: str = ""  # the first router's control plane (Registry): what workers register at
    router_addresses: list[str] = field(default_factory=list)  # every router's data plane, in order
    control_addresses: list[str] = field(default_factory=list)  # every router's control plane
    router_restarts: list[tuple[str, float, int]] = field(default_factory=list)  # (name, time, status)
    store_address: str = ""  # kv0: the node the workers use
    store_node_id: str = ""
    store_addresses: dict[str, str] = field(default_factory=dict)  # node id -> address, every store
    model_stores: dict[str, str] = field(default_factory=dict)  # model id -> its workers' store address
    workers: dict[str, str] = field(default_factory=dict)  # worker_id -> address
    # decode worker_id -> its DirectStream port's address, for those serving it on a port of its
    # own (mutual TLS; otherwise on the worker's address)
    direct_addresses: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # process name -> /metrics host:port
    pki: PkiPaths | None = None  # tls: the certificates and tokens every process uses
    openai_url: str = ""  # with spec.openai_port: the OpenAI HTTP server's base URL (https with tls)
    security: SecurityConfig | None = None  # tls: what the processes run with (client side too)
    _tmp: str = ""  # a dev PKI folder made for this cluster, removed by stop()
    argv: dict[str, list[str]] = field(default_factory=dict)  # process name -> its python arguments
    _stopping: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)  # procs/restarts vs the supervisor
    _given_up: set[str] = field(default_factory=set)  # routers over their restart budget

    @property
    def router_names(self) -> list[str]:
        """Process names of the routers, in ``router_addresses`` order."""
        return [router_name(i) for i in range(len(self.router_addresses))]

    def dead(self) -> list[str]:
        """Processes that exited and will not be restarted (a supervised router that exited is
        not dead until its restart budget is spent or its restart failed)."""
        with self._lock:
            supervised = self.spec.supervise_routers and not self._stopping.is_set()
            return [
                n
                for n, p in self.procs.items()
                if p.poll() is not None
                and not (supervised and n in self.router_names and n not in self._given_up)
            ]

    def write_file_sd(self, path: str | Path) -> Path:
        """Write (atomically replace) a Prometheus ``file_sd_configs`` JSON file: one target group
        per process, labelled ``component`` (router | prefill | decode | kv_store) and ``process``
        (its name here: router, store, prefill-0, ...). Returns the path."""
        from pdserve.metrics import Component, ScrapeTarget, write_file_sd

        return write_file_sd(
            path,
            (
                ScrapeTarget(name, Component(_COMPONENT[name.split("-")[0]]), addr)
                for name, addr in self.metrics.items()
            ),
        )

    def stop(self, grace_s: float = 5.0) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.kill()
        p.wait()

    def restart(self, name: str, timeout_s: float | None = None, stop_on_failure: bool = True) -> dict:
        """Start process ``name`` again (after :meth:`kill` or a crash) with its arguments, on the
        port it served before (``--port``), so that its peers find it where they left it; returns
        its ready line. Raises RuntimeError while it still runs. A process that does not start
        raises UnavailableError, after stopping the whole cluster unless ``stop_on_failure`` is off."""
        with self._lock:
            return self._restart(name, timeout_s, stop_on_failure)

    def _restart(self, name: str, timeout_s: float | None, stop_on_failure: bool) -> dict:
        p = self.procs[name]
        if p.poll() is None:
            raise RuntimeError(f"{name} is still running: kill it first")
        stores = {
            ("store" if i == 0 else f"store-{i}"): a for i, a in enumerate(self.store_addresses.values())
        }
        routers = dict(zip(self.router_names, self.router_addresses, strict=True))
        known = {**stores, **self.workers, **routers}
        if not known.get(name):
            raise RuntimeError(f"no address known for {name}")
        args = _pin(list(self.argv[name]), "--port", _port(known[name]))
        if name in routers:
            control = self.control_addresses[self.router_names.index(name)]
            if control != known[name]:
                args = _pin(args, "--control-port", _port(control))
        info = _spawn(self, name, args, timeout_s or self.spec.startup_timeout_s, stop_on_failure)
        if info.get("direct"):  # a new DirectStream port (the router learns it from the worker)
            self.direct_addresses[name] = info["direct"]
        return info

    def supervise(self, poll_s: float = 0.2) -> None:
        """Start the router supervisor (``launch`` does, unless ``spec.supervise_routers`` is off)."""
        if self._supervisor is None:
            self._supervisor = threading.Thread(
                target=self._supervise, args=(poll_s,), name="router-supervisor", daemon=True
            )
            self._supervisor.start()

    def _supervise(self, poll_s: float) -> None:
        budgets = {
            n: RestartBudget(self.spec.router_restart_limit, self.spec.router_restart_window_s)
            for n in self.router_names
        }
        while not self._stopping.wait(poll_s):
            for name in self.router_names:
                with self._lock:  # a restart() called meanwhile by someone else is seen here
                    if self._stopping.is_set():
                        return
                    p = self.procs[name]
                    if p.poll() is None or name in self._given_up:
                        continue
                    now = time.monotonic()
                    if not budgets[name].allow(now):
                        log.error(
                            "router %s exited (status %s); restarted %d times within %gs already: left down",
                            name, p.returncode, self.spec.router_restart_limit, self.spec.router_restart_window_s,
                        )  # fmt: skip
                        self._given_up.add(name)
                        continue
                    log.warning(
                        "router %s exited unexpectedly (status %s): restarting it", name, p.returncode
                    )
                    try:
                        self.restart(name, stop_on_failure=False)
                    except Exception as e:  # noqa: BLE001 - tried again next poll, within the budget
                        log.error("router %s could not be restarted: %s", name, e)
                        continue
                    self.router_restarts.append((name, now, p.returncode))
                    log.warning(
                        "router %s restarted on %s",
                        name,
                        self.router_addresses[self.router_names.index(name)],
                    )

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port(address: str) -> str:
    return address.rsplit(":", 1)[1]


def _pin(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag value`` (replacing the flag's value when it is there)."""
    if flag in args:
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def router_name(i: int) -> str:
    """The process name of router ``i``: router, router-1, router-2, ..."""
    return "router" if i == 0 else f"router-{i}"


class RestartBudget:
    """At most ``limit`` restarts in any ``window_s`` seconds (pure: the caller passes the time)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: list[float] = []

    def allow(self, now: float) -> bool:
        """Whether a restart at ``now`` is within the budget (it is then counted)."""
        self._times = [t for t in self._times if now - t < self.window_s]
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


_COMPONENT = {"store": "kv_store", "router": "router", "prefill": "prefill", "decode": "decode"}


def child_env(*paths: str) -> dict[str, str]:
    """The environment a launched process gets: this one's, the repository (and ``paths``) first on
    PYTHONPATH, one OpenMP thread and no tokenizer threads unless already set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths, env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _start(
    cluster: LocalCluster, name: str, args: list[str], timeout_s: float, wake: threading.Event | None = None
) -> Starting:
    """Start ``python args`` as ``cluster``'s process ``name`` (:func:`pdserve.proc_start.start`)
    with :func:`child_env`, in the repository."""
    return start(cluster, name, args, timeout_s, child_env(), ROOT, wake)


def _spawn(
    cluster: LocalCluster, name: str, args: list[str], timeout_s: float, stop_on_failure: bool = True
) -> dict:
    """Start process ``name`` and wait for its ready line (:mod:`pdserve.proc_start`: a failure
    raises UnavailableError naming it, after stopping the cluster unless ``stop_on_failure`` is
    off, when only the process is killed)."""
    return await_ready(cluster, _start(cluster, name, args, timeout_s), stop_on_failure)


def router_index_args(index_url: str) -> list[str]:
    """The ``python -m router`` options that make it read the cluster's KV index: ``--index URL``
    for a shared index (any URL but ``"memory"``, e.g. ``redis://host:port/db?prefix=p``), none for
    ``"memory"`` (the store's private in-process index, which only a store Lookup can read)."""
    return [] if index_url == "memory" else ["--index", index_url]


def router_tenant_state_args(spec: ClusterSpec) -> list[str]:
    """The ``python -m router`` flags of the routers' tenant state: ``--cluster-routers N`` with
    several routers, and ``--tenant-state``: what ``spec.tenant_state`` says; ``auto`` with several
    routers and no Redis index (nothing to share through) becomes an explicit ``local``, logged as
    a warning: each router then enforces every tenant's quota on its own (N x the quota)."""
    out = [] if spec.num_routers == 1 else ["--cluster-routers", str(spec.num_routers)]
    state = spec.tenant_state
    if state == "auto" and spec.num_routers > 1 and spec.index_url == "memory":
        log.warning(
            "%d routers without a Redis index: tenant quotas, request rates and request ids are per "
            "router (a tenant gets %d x its quota); set index_url (pdserve serve --index) to a redis:// "
            "URL to share them",
            spec.num_routers,
            spec.num_routers,
        )
        state = "local"
    return out if state == "auto" else [*out, "--tenant-state", state]


def openai_args(cl: LocalCluster, port: int) -> list[str]:
    """The ``python -m pdserve.openai_api`` flags of an OpenAI HTTP server in front of ``cl``'s
    routers: HTTPS with the cluster's certificate and the router channel verified against its CA
    when the cluster runs TLS, else the explicit plain-HTTP choice ``--tls off`` (127.0.0.1)."""
    args = ["--router", ",".join(cl.router_addresses), "--host", "127.0.0.1", "--port", str(port)]
    if cl.pki is None:
        return [*args, "--tls", "off"]
    p = cl.pki
    tls = ["--tls", "on", "--tls-cert", str(p.server_cert), "--tls-key", str(p.server_key)]
    return [*args, *tls, "--router-tls-ca", str(p.ca)]


def _setup_security(cl: LocalCluster) -> list[str]:
    """With ``spec.tls``: the PKI (``pki_dir``, else a dev CA made in a temp folder owned by
    ``cl``) and the flags that run a process with TLS, mTLS and the cluster token; else the
    explicit plaintext choice ``--tls off`` (every process binds 127.0.0.1)."""
    spec = cl.spec
    if not spec.tls:
        if spec.pki_dir:
            raise ValueError("ClusterSpec.pki_dir is only used with tls=True")
        return ["--tls", "off"]  # plaintext on loopback, asked for explicitly
    import tempfile

    from pdserve.certs import PkiPaths, write_dev_pki

    if spec.pki_dir:
        d = Path(spec.pki_dir)
        cl.pki = PkiPaths(
            *(d / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")),
            d / "cluster-token",
            d / "metrics-token",
        )
    else:
        cl._tmp = tempfile.mkdtemp(prefix="pdserve-pki-")
        cl.pki = write_dev_pki(cl._tmp)
    p = cl.pki
    cl.security = SecurityConfig(
        tls=TLSMode.ON,
        ca_file=str(p.ca),
        cert_file=str(p.server_cert),
        key_file=str(p.server_key),
        cluster_token_file=str(p.cluster_token),
    )  # reads the files: a missing one fails here, naming it
    return cl.security.to_args()


def launch(spec: ClusterSpec) -> LocalCluster:
    from pdserve.v1 import router_pb2  # noqa: F401 - fail early if protos are missing

    cl = LocalCluster(spec)
    try:
        return _launch(cl, spec)
    except BaseException:
        # whatever failed (a process that did not start stopped the cluster already; a worker
        # that never registered, a failed Popen, an interrupt did not), nothing is left running
        cl.stop()
        raise


def _launch(cl: LocalCluster, spec: ClusterSpec) -> LocalCluster:
    sec = _setup_security(cl)  # the security flags of every process ([] without tls)
    pools = spec.pools()
    multi = len(spec.models) > 1
    t = spec.startup_timeout_s
    # store nodes: kv0..kvN-1 of the one model, or one per model (kvK for model K: layouts differ)
    store_models = [pools[0]] * spec.num_stores if not multi else list(pools)
    stores: list[tuple[str, list[str]]] = []
    for i, pool in enumerate(store_models):
        mc = ModelConfig.from_path(pool.model_path)
        stores.append(
            (
                "store" if i == 0 else f"store-{i}",
                [
                    "-m",
                    "kv_store",
                    "--node-id",
                    f"kv{i}",
                    "--capacity-blocks",
                    str(spec.store_capacity_blocks),
                    "--model-id",
                    pool.model_id,
                    "--num-layers",
                    str(mc.num_hidden_layers),
                    "--num-kv-heads",
                    str(mc.num_key_value_heads),
                    "--head-dim",
                    str(mc.head_dim),
                    "--dtype",
                    "float32",
                    "--block-size",
                    str(spec.block_size),
                    "--index",
                    spec.index_url,
                    "--replication-factor",
                    str(spec.replication_factor),
                    *sec,
                    *spec.store_args,
                ],
            )
        )
    model_flags = [f for pool in pools for f in ("--model", pool.model_path)]

    def routers(store_flag: list[str]) -> list[tuple[str, list[str]]]:
        return [
            (
                router_name(i),
                [
                    "-m",
                    "router",
                    *model_flags,
                    "--port",
                    str(spec.router_port if i == 0 else 0),
                    *store_flag,
                    *router_index_args(spec.index_url),
                    *router_tenant_state_args(spec),
                    *([] if spec.direct_streams else ["--no-direct-streams"]),
                    *sec,
                    *spec.router_args,
                ],
            )
            for i in range(spec.num_routers)
        ]

    # the stores and the routers start side by side, except that with the direct (dist) handoff
    # KV handles name prefill workers, not the store: the router is told where the store is, for
    # its prefix lookups (it would otherwise learn it from the handles). A shared (redis) index:
    # the router finds cached prefixes there itself, as the store nodes see them; the "memory"
    # index is private to the store process, so the router asks the store.
    if spec.kv_transport is KVTransport.DIST:
        ready = spawn_chains(cl, [stores], t, _start)
        ready |= spawn_chains(cl, [routers(["--store", ready["store"]["address"]])], t, _start)
    else:
        ready = spawn_chains(cl, _side_by_side(spec, [stores, routers([])]), t, _start)
    for (name, _), pool in zip(stores, store_models, strict=True):
        store = ready[name]
        cl.store_addresses[store["node_id"]] = store["address"]
        cl.model_stores.setdefault(pool.model_id, store["address"])  # one model: kv0
    cl.store_node_id, cl.store_address = next(iter(cl.store_addresses.items()))
    for i in range(spec.num_routers):
        router = ready[router_name(i)]
        cl.router_addresses.append(router["address"])
        # workers register and heartbeat on the router's control port (its own server and threads:
        # client load cannot delay heartbeats); a router without one serves Registry on its address
        cl.control_addresses.append(router.get("control") or router["address"])
    cl.router_address, cl.control_address = cl.router_addresses[0], cl.control_addresses[0]
    world = sum(p.num_prefill + p.num_decode for p in pools)
    dist_init = f"tcp://127.0.0.1:{free_port()}" if spec.kv_transport is KVTransport.DIST else ""
    rank = 0  # prefill ranks 0..P-1, decode ranks P..P+D-1
    # one chain per kind (prefill, decode): the two kinds load their models at the same time, the
    # workers of one kind start, and so register with the routers, in order (the routers break
    # placement ties by registration order); the workers join the dist group in the background
    chains: dict[str, list[tuple[str, list[str]]]] = {"prefill": [], "decode": []}
    named: list[str] = []  # a pool's prefill workers, then its decode workers, pool by pool
    for pool in pools:
        common = [
            "--model",
            pool.model_path,
            "--store",
            cl.model_stores[pool.model_id],
            "--router",
            ",".join(cl.control_addresses),  # every worker registers with every router
            "--kv-blocks",
            str(spec.worker_kv_blocks),
            "--block-size",
            str(spec.block_size),
            *([] if spec.direct_streams else ["--no-direct-streams"]),
            *sec,
            *spec.worker_args,
        ]
        for role, n in (("prefill", pool.num_prefill), ("decode", pool.num_decode)):
            for i in range(n):
                # several models: the model in the id (role first: it names the component)
                wid = f"{role}-{pool.model_id}-{i}" if multi else f"{role}-{i}"
                dist: list[str] = []
                if dist_init:
                    dist = [
                        "--dist-init",
                        dist_init,
                        "--dist-rank",
                        str(rank),
                        "--dist-world",
                        str(world),
                        "--dist-backend",
                        spec.dist_backend.value,
                    ]
                chains[role].append((wid, ["-m", f"{role}_worker", "--worker-id", wid, *common, *dist]))
                named.append(wid)
                rank += 1
    ready = spawn_chains(cl, _side_by_side(spec, list(chains.values())), t, _start)
    for wid in named:  # cl.workers in that order, as when they started one by one
        info = ready[wid]
        cl.workers[wid] = info["address"]
        if info.get("direct"):
            cl.direct_addresses[wid] = info["direct"]
    wait_registered(cl, t)
    if spec.openai_port is not None:
        argv = ["-m", "pdserve.openai_api", *openai_args(cl, spec.openai_port), "--ready-json"]
        if not spec.direct_streams:
            argv.append("--no-direct-streams")
        cl.openai_url = _spawn(cl, "openai", [*argv, *spec.openai_args], t)["url"]
    if spec.supervise_routers:
        cl.supervise()
    return cl


def _side_by_side(
    spec: ClusterSpec, chains: list[list[tuple[str, list[str]]]]
) -> list[list[tuple[str, list[str]]]]:
    """``chains`` as they are (started side by side), or joined into one (one process after the
    other) without ``spec.parallel_start`` (with several models: every model's prefill workers,
    then every model's decode workers; before 2026-12-07 the launcher went model by model)."""
    return chains if spec.parallel_start else [[p for c in chains for p in c]]


def _generate_serving(ch) -> bool:
    """Whether the router's grpc.health.v1 status of its Generate service is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        r = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="pdserve.v1.Generate"), timeout=5
        )
    except grpc.RpcError:
        return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


def wait_registered(cl: LocalCluster, timeout_s: float) -> None:
    """Block until every router can place a request of every model (one prefill and one decode
    of each registered)."""
    deadline = time.monotonic() + timeout_s
    several = len(cl.spec.models) > 1
    for address in cl.router_addresses or [cl.router_address]:
        for pool in cl.spec.pools():
            model = pool.model_id if several else ""
            wait_router_ready(cl, address, max(0.0, deadline - time.monotonic()), model=model)


def wait_router_ready(cl: LocalCluster, address: str, timeout_s: float, model: str = "") -> None:
    """Block until the router at ``address`` can place a request (of ``model``: a router serving
    several base models needs it named; one prefill and one decode registered with it);
    UnavailableError after ``timeout_s``."""
    import grpc

    from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2

    if cl.pki is not None:  # the client API: TLS, verified against the cluster CA, no token
        from pdserve.security import client_credentials

        ch = grpc.secure_channel(address, client_credentials(ca=str(cl.pki.ca)))
    else:
        ch = grpc.insecure_channel(address)
    stub = client_pb2_grpc.GenerateStub(ch)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                list(
                    stub.Generate(
                        client_pb2.GenerateRequest(
                            model=model,
                            prompt_token_ids=client_pb2.TokenIds(ids=[1, 2]),
                            sampling=common_pb2.SamplingParams(
                                max_tokens=2, temperature=0.0, ignore_eos=True
                            ),
                        ),
                        timeout=30,
                    )
                )
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # a router with API keys (--api-keys):
                    if _generate_serving(ch):  # ready once its health says it can place a request
                        return
                elif e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.2)
        of = f" for model {model!r}" if model else ""
        raise UnavailableError(f"workers{of} did not register with the router at {address} in time")
    finally:
        ch.close()
