"""pdserve on Ray: the controller actor and the driver-side ``up`` / ``down`` / ``status`` / ``scale``.

``up`` creates one detached actor, ``pdserve-controller`` in the config's namespace (default
``pdserve``), and the controller creates and owns everything else: one :class:`StoreActor` per
alive Ray node (node affinity; per model and node when the config serves several models: their
KV layouts differ), the :class:`RouterActor` (serving every model, a policy per model), and the
prefill and decode pools (of each model)
(:class:`WorkerActor`, one placement group of one bundle per worker: ``{"CPU": num_cpus, "GPU":
tp}``). Actors are restarted on failure (``max_restarts``) and workers register again with the
router. Because the controller owns them, ``down`` (which stops them, removes their placement
groups and kills the controller) ends exactly what ``up`` started and nothing else.

Direct KV handoff (``kv_transfer: {kind: dist}``): the workers ``up`` starts form one
torch.distributed process group (prefill-i rank i, decode-j rank ``P + j``); the first one is
started first and picks the group's TCP store address on its node, the others are then started
with it. With several models, each model's workers form their own group (ranks as above within
the model; a router pairs only one model's workers, so a handoff never crosses groups). Workers added later by ``scale`` (and restarted ones) are not in the group: they use the
store path (a decode worker has direct handles spilled to the prefill worker's store).

``scale`` resizes each pool independently: new workers are added (and must register), surplus
workers are drained before removal: the router stops routing to them, then the controller waits
until the router has nothing in flight on them and their engine is idle for ``drain_quiet_s``
(bounded by ``drain_timeout_s``), then stops and kills them. The newest workers go first. On a
cluster serving several models it resizes the pools of the one model it names
(:func:`scale_target`: a model is required there, and an unknown one is refused naming the
served models); the other models' workers are never touched.

The driver functions expect ``ray.init(address=..., namespace=config.namespace)`` to have run
(:func:`connect` does it); with Ray token auth on, the driver must hold the cluster's token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; see deploy/ray/README.md).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.cluster_config import ClusterConfig, PoolRole, capacity_shortfall, check_security
from pdserve.errors import InvalidRequestError, PdserveError, UnavailableError
from pdserve.kv_transfer import KVTransport
from pdserve.ray_actors import (
    WORKER_PREFIX,
    DistSeat,
    RouterActor,
    StoreActor,
    WorkerActor,
    router_actor_name,
    store_actor_name,
)

log = logging.getLogger(__name__)

CONTROLLER_NAME = "pdserve-controller"
DEFAULT_NAMESPACE = "pdserve"
_CALL_TIMEOUT_S = 30.0


def _index(worker_id: str) -> int:
    return int(worker_id.rsplit("-", 1)[1])


def scale_target(config: ClusterConfig, model: str | None) -> ClusterConfig:
    """Pure: the single-model config whose pools ``scale`` resizes. One model: ``config`` itself
    (``model``, when given, must be its id). Several: the view of ``model``
    (:meth:`ClusterConfig.views`); none given, or one not served, raises InvalidRequestError
    naming the served models."""
    ids = config.model_ids
    served = ", ".join(repr(m) for m in ids)
    if model is None or model == "":
        if config.several:
            raise InvalidRequestError(
                f"this cluster serves several models ({served}): name the one to scale with --model"
            )
        return config
    for view in config.views():
        if Path(view.model).name == model:
            return view
    raise InvalidRequestError(f"unknown model {model!r}: this cluster serves {served}")


def with_model_counts(
    config: ClusterConfig, view: ClusterConfig, prefill: int | None, decode: int | None
) -> ClusterConfig:
    """Pure: ``config`` with the pools of ``view``'s model resized (None: unchanged); the whole
    cluster, for the capacity check of a scale."""
    if not config.several:
        return config.with_counts(prefill, decode)
    from dataclasses import replace

    resized = view.with_counts(prefill, decode)
    models = tuple(
        replace(m, prefill=resized.prefill, decode=resized.decode) if m.model_id == view.model_tag else m
        for m in config.models
    )
    return replace(config, models=models)


def plan_scale(
    live: dict[PoolRole, list[str]], targets: dict[PoolRole, int | None]
) -> tuple[list[PoolRole], list[str]]:
    """Pure: which workers to add (one role per new worker) and which to remove (newest first,
    by the number in ``<role>-<n>``) to bring each pool of ``live`` to its target (None: leave it)."""
    add: list[PoolRole] = []
    remove: list[str] = []
    for role, n in targets.items():
        if n is None:
            continue
        if n < 0:
            raise InvalidRequestError(f"--{role.value} must be >= 0, got {n}")
        cur = sorted(live.get(role, []), key=_index)
        add += [role] * max(0, n - len(cur))
        remove += cur[n:][::-1]
    return add, remove


@dataclass
class _Worker:
    worker_id: str
    role: PoolRole
    handle: Any
    pg: Any  # placement group or None
    info: dict[str, Any]
    view: ClusterConfig  # its model's config (ClusterConfig.views)


class Controller:
    """Owns the cluster's actors (run as the detached ``pdserve-controller`` actor; thread-safe:
    ``status`` may run while ``scale`` drains)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.stores: dict[str, Any] = {}  # ray node id -> StoreActor handle
        self.store_info: dict[str, dict[str, Any]] = {}
        self.routers: list[Any] = []  # router actor handles (``routers`` of the config), in order
        self.router_infos: list[dict[str, Any]] = []
        self.workers: dict[str, _Worker] = {}
        self._next: dict[tuple[str, PoolRole], int] = {}  # (model tag, role) -> next worker number
        self._lock = threading.RLock()  # membership changes (up / scale / down) one at a time
        self._down = False

    @property
    def router(self) -> Any:
        """The first router's handle (None before ``up``)."""
        return self.routers[0] if self.routers else None

    @property
    def router_info(self) -> dict[str, Any]:
        return self.router_infos[0] if self.router_infos else {}

    # ------------------------------------------------------------------ helpers
    def _opts(self, **kw: Any) -> dict[str, Any]:
        return {"namespace": self.config.namespace, "max_restarts": self.config.max_restarts, **kw}

    def _check_capacity(self, config: ClusterConfig) -> None:
        """InvalidRequestError at once when the Ray cluster can never hold ``config`` (instead of
        a placement group waiting ``startup_timeout_s`` for resources that do not exist)."""
        import ray

        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        why = capacity_shortfall(config, ray.cluster_resources(), nodes)
        if why:
            raise InvalidRequestError(why)

    def _ensure_stores(self) -> None:
        """One store node per alive Ray node that has none yet."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        new = {}
        for node in nodes:
            for view in self.config.views():  # several models: a store node per model (layouts differ)
                key = _store_key(node, view.model_tag)
                if key in self.stores:
                    continue
                new[key] = (
                    ray.remote(StoreActor)
                    .options(
                        **self._opts(
                            name=store_actor_name(node, view.model_tag),
                            num_cpus=self.config.store.num_cpus,
                            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                        )
                    )
                    .remote(view)
                )
        for key, h in new.items():
            self.store_info[key] = _get(h.info.remote(), self.config.startup_timeout_s, f"store {key}")
            self.stores[key] = h

    def _start_routers(self) -> None:
        """Start the ``routers`` router actors (in parallel); Ray restarts each (``max_restarts``)."""
        import ray

        r = self.config.router
        handles = []
        for i in range(self.config.routers):
            opts = self._opts(name=router_actor_name(i), num_cpus=r.num_cpus)
            if r.node_resource:
                opts["resources"] = {r.node_resource: 0.001}
            handles.append(ray.remote(RouterActor).options(**opts).remote(self.config, i))
        self.router_infos = [
            _get(h.info.remote(), self.config.startup_timeout_s, router_actor_name(i))
            for i, h in enumerate(handles)
        ]
        self.routers = handles

    def _create_worker(
        self, role: PoolRole, seat: DistSeat | None = None, view: ClusterConfig | None = None
    ) -> _Worker:
        """Start one worker of ``view``'s model (None: the one model): ``<role>-<n>``, or
        ``<role>-<model id>-<n>`` in a cluster serving several models."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        view = view or self.config
        pool = view.pool(role)
        n = self._next.get((view.model_tag, role), 0)
        self._next[(view.model_tag, role)] = n + 1
        wid = f"{role.value}-{view.model_tag}-{n}" if view.model_tag else f"{role.value}-{n}"
        bundle = pool.bundle()
        opts = self._opts(name=f"{WORKER_PREFIX}{wid}", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus)
        pg = None
        if bundle:
            pg = placement_group([bundle], strategy="STRICT_PACK", name=f"{WORKER_PREFIX}{wid}")
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        h = (
            ray.remote(WorkerActor)
            .options(**opts)
            .remote(view, role, wid, tuple(i["address"] for i in self.router_infos), seat)
        )
        w = _Worker(wid, role, h, pg, {}, view)
        self.workers[wid] = w
        return w

    def _wait_started(self, w: _Worker) -> None:
        """Wait until ``w``'s placement group is placed and the actor serves (its info is kept)."""
        import ray

        if w.pg is not None:
            try:
                ray.get(w.pg.ready(), timeout=self.config.startup_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise UnavailableError(
                    f"placement group of {w.worker_id} ({w.view.pool(w.role).bundle()}) was not "
                    f"placed within {self.config.startup_timeout_s}s: the cluster lacks the resources"
                ) from None
        w.info = _get(w.handle.info.remote(), self.config.startup_timeout_s, w.worker_id)

    def _start_workers(
        self,
        roles: list[PoolRole],
        group: bool = False,
        views: list[ClusterConfig] | None = None,
        view: ClusterConfig | None = None,
    ) -> list[str]:
        """Create workers for ``roles`` (in parallel; ``views``: the model of each, default the one
        model), wait until each serves and the router lists it. ``group``: they form a
        direct-handoff process group (rank = position in ``roles``; the first is started first,
        to learn the group's address), all of one model: ``view``'s (None: the one model)."""
        made: list[_Worker] = []
        if views is not None:
            made += [self._create_worker(r, None, v) for r, v in zip(roles, views, strict=True)]
            roles = []
        if group and len(roles) >= 2:
            world = len(roles)
            first = self._create_worker(roles[0], DistSeat(0, world), view)
            made.append(first)
            self._wait_started(first)
            init = _get(first.handle.dist_init_method.remote(), _CALL_TIMEOUT_S, first.worker_id)
            made += [
                self._create_worker(r, DistSeat(i, world, init), view) for i, r in enumerate(roles[1:], 1)
            ]
        elif roles:
            made += [self._create_worker(r, None, view) for r in roles]
        for w in made:
            if not w.info:
                self._wait_started(w)
        self._wait_listed({w.worker_id for w in made})
        return [w.worker_id for w in made]

    def _wait_listed(self, ids: set[str]) -> None:
        """Wait until every router lists every worker of ``ids``."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        for i, router in enumerate(self.routers):
            name = router_actor_name(i)
            while True:
                listed = {w["worker_id"] for w in _get(router.workers.remote(), _CALL_TIMEOUT_S, name)}
                if ids <= listed:
                    break
                if time.monotonic() > deadline:
                    raise UnavailableError(f"workers {sorted(ids - listed)} did not register with {name}")
                time.sleep(0.1)

    def _live(self, role: PoolRole, model_tag: str | None = None) -> list[_Worker]:
        """Workers of ``role`` (of the model ``model_tag`` names, None: of every model) whose
        actor is alive (dead ones are forgotten), oldest first."""
        import ray

        out = []
        for w in [
            w
            for w in self.workers.values()
            if w.role is role and (model_tag is None or w.view.model_tag == model_tag)
        ]:
            try:
                ray.get(w.handle.info.remote(), timeout=_CALL_TIMEOUT_S)
            except ray.exceptions.ActorDiedError:  # for good (restarts spent, or killed)
                self._forget(w)
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # restarting: still a member of its pool
            out.append(w)
        return sorted(out, key=lambda w: _index(w.worker_id))

    def _forget(self, w: _Worker) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self.workers.pop(w.worker_id, None)
        try:
            ray.kill(w.handle, no_restart=True)
        except Exception as e:  # noqa: BLE001 - already gone
            log.debug("kill %s: %s", w.worker_id, e)
        if w.pg is not None:
            remove_placement_group(w.pg)
        for router in self.routers:
            try:
                ray.get(router.forget.remote(w.worker_id), timeout=_CALL_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - the router drops it on its own by heartbeat
                log.debug("forget %s: %s", w.worker_id, e)

    def _drain_and_remove(self, w: _Worker) -> dict[str, Any]:
        """Stop routing to ``w``, wait until it is idle (router in-flight 0 and engine idle for
        ``drain_quiet_s``), then stop and kill it. Returns what it saw."""
        import ray

        c = self.config
        t0 = time.monotonic()
        busy_at_start = _get(w.handle.busy.remote(), _CALL_TIMEOUT_S, w.worker_id)
        for i, router in enumerate(self.routers):  # no router routes to it from now on
            _get(router.drain.remote(w.worker_id), _CALL_TIMEOUT_S, router_actor_name(i))
        quiet_since = None
        drained = False
        while time.monotonic() - t0 < c.drain_timeout_s:
            try:
                busy = ray.get(w.handle.busy.remote(), timeout=_CALL_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                break  # it died meanwhile: nothing left to drain
            busy += sum(
                ray.get([r.inflight.remote(w.worker_id) for r in self.routers], timeout=_CALL_TIMEOUT_S)
            )
            now = time.monotonic()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= c.drain_quiet_s:
                drained = True
                break
            time.sleep(0.05)
        try:
            ray.get(w.handle.stop.remote(), timeout=_CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - killed below anyway
            log.debug("stop %s: %s", w.worker_id, e)
        self._forget(w)
        return {
            "worker_id": w.worker_id,
            "busy_at_drain": busy_at_start,
            "drained": drained,
            "drain_s": round(time.monotonic() - t0, 3),
        }

    # ------------------------------------------------------------------ api
    def up(self) -> dict[str, Any]:
        """Start stores, router and both pools; return :meth:`addresses` once a request can be placed."""
        with self._lock:
            if self.routers:
                return self.addresses()
            self._check_capacity(self.config)
            self._ensure_stores()
            self._start_routers()
            dist = self.config.kv_transfer.kind is KVTransport.DIST
            if self.config.several and dist:
                # each model's workers form their own process group (a router pairs only workers
                # of one model: no handoff crosses groups); one model's group after the other
                for v in self.config.views():
                    self._start_workers(
                        [PoolRole.PREFILL] * v.prefill.count + [PoolRole.DECODE] * v.decode.count,
                        group=True,
                        view=v,
                    )
                return self.addresses()
            if self.config.several:  # every model's pools, in parallel
                views = [v for v in self.config.views() for r in PoolRole for _ in range(v.pool(r).count)]
                roles = [r for v in self.config.views() for r in PoolRole for _ in range(v.pool(r).count)]
                self._start_workers(roles, views=views)
                return self.addresses()
            roles = [PoolRole.PREFILL] * self.config.prefill.count + [
                PoolRole.DECODE
            ] * self.config.decode.count
            self._start_workers(roles, group=dist)
            return self.addresses()

    def addresses(self) -> dict[str, Any]:
        return {
            "router": self.router_info.get("address", ""),
            "routers": [i.get("address", "") for i in self.router_infos],  # every router, in order
            "stores": {n: i["address"] for n, i in self.store_info.items()},
            "workers": {wid: w.info.get("address", "") for wid, w in sorted(self.workers.items())},
        }

    def scale(
        self, prefill: int | None = None, decode: int | None = None, model: str | None = None
    ) -> dict[str, Any]:
        """Resize the pools (None: unchanged) of the one model, or of ``model`` on a cluster
        serving several (:func:`scale_target`'s refusals). Adds first, then drains and removes
        the surplus. Returns the workers added and removed, the counts after, and the model."""
        for name, n in (("prefill", prefill), ("decode", decode)):
            if n is not None and n < 0:
                raise InvalidRequestError(f"--{name} must be >= 0, got {n}")
        view = scale_target(self.config, model)
        tag = view.model_tag if self.config.several else None
        with self._lock:
            if not self.routers:
                raise UnavailableError("the cluster is not up")
            self._ensure_stores()  # nodes may have joined since
            live = {r: self._live(r, tag) for r in PoolRole}
            self._check_capacity(
                with_model_counts(
                    self.config,
                    view,
                    len(live[PoolRole.PREFILL]) if prefill is None else prefill,
                    len(live[PoolRole.DECODE]) if decode is None else decode,
                )
            )
            add, remove_ids = plan_scale(
                {r: [w.worker_id for w in ws] for r, ws in live.items()},
                {PoolRole.PREFILL: prefill, PoolRole.DECODE: decode},
            )
            remove = [self.workers[wid] for wid in remove_ids]
            added = []
            if add:
                added = self._start_workers(add, views=[view] * len(add)) if tag else self._start_workers(add)
            removed = []
            if remove:
                with ThreadPoolExecutor(max_workers=len(remove)) as ex:
                    removed = list(ex.map(self._drain_and_remove, remove))
            counts = {r.value: len(self._live(r, tag)) for r in PoolRole}
            return {"added": added, "removed": removed, "counts": counts, "model": Path(view.model).name}

    def status(self) -> dict[str, Any]:
        """Pools (per worker: node, address, alive, load, KV use), store nodes (KV use, transfer
        counters) and the router's view (which workers it routes to)."""
        import ray

        workers = []
        for w in sorted(list(self.workers.values()), key=lambda w: w.worker_id):
            row: dict[str, Any] = {
                "worker_id": w.worker_id,
                "role": w.role.value,
                "model": Path(w.view.model).name,
            }
            try:
                row |= ray.get(w.handle.stats.remote(), timeout=_CALL_TIMEOUT_S)
                row["alive"] = True
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                row |= {"alive": False, "error": type(e).__name__}
            workers.append(row)
        stores = []
        for node, h in sorted(self.stores.items()):
            try:
                stores.append({**ray.get(h.stats.remote(), timeout=_CALL_TIMEOUT_S), "alive": True})
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                stores.append({"node_id": node, "alive": False, "error": type(e).__name__})
        routed: list[dict[str, Any]] = []
        routers: list[dict[str, Any]] = []
        for i, router in enumerate(self.routers):
            row = {"name": router_actor_name(i), "alive": True}
            try:
                # a restarted router actor listens on a new port: report where it is now
                self.router_infos[i] = ray.get(router.info.remote(), timeout=_CALL_TIMEOUT_S)
                view = ray.get(router.workers.remote(), timeout=_CALL_TIMEOUT_S)
                row["workers"] = len(view)
                if i == 0:
                    routed = view
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                row |= {"alive": False, "error": type(e).__name__}
            info = self.router_infos[i]
            routers.append(row | {"address": info.get("address", ""), "metrics": info.get("metrics", "")})
        return {
            "router": self.router_info.get("address", ""),
            "router_metrics": self.router_info.get("metrics", ""),
            "routers": routers,  # every router: name, address, metrics, alive, workers it lists
            "pools": {r.value: [x for x in workers if x["role"] == r.value] for r in PoolRole},
            "stores": stores,
            "routed": routed,
        }

    def shutdown(self) -> dict[str, int]:
        """Stop every actor this controller started and remove their placement groups."""
        import ray

        with self._lock:
            self._down = True
            n_workers = len(self.workers)
            for w in list(self.workers.values()):
                try:
                    ray.get(w.handle.stop.remote(), timeout=10)
                except Exception as e:  # noqa: BLE001 - killed below anyway
                    log.debug("stop %s: %s", w.worker_id, e)
                self._forget(w)
            n_routers = len(self.routers)
            others = list(self.routers) + list(self.stores.values())
            for h in others:
                try:
                    ray.get(h.stop.remote(), timeout=10)
                except Exception as e:  # noqa: BLE001
                    log.debug("stop: %s", e)
                ray.kill(h, no_restart=True)
            n_stores = len(self.stores)
            self.routers, self.router_infos, self.stores, self.store_info = [], [], {}, {}
            return {"workers": n_workers, "stores": n_stores, "routers": n_routers}


def _store_key(node: str, model_tag: str) -> str:
    """Key of a store actor in ``Controller.stores``: the Ray node id (``<model id>/<node id>``
    in a cluster serving several models)."""
    return f"{model_tag}/{node}" if model_tag else node


def _get(ref: Any, timeout_s: float, what: str) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise UnavailableError(f"{what} did not answer within {timeout_s}s") from None
    except ray.exceptions.RayActorError as e:
        why = _init_failure(e)
        if why is not None:  # its __init__ raised: Ray does not restart it, so this is final
            log.warning("%s failed to start: %s", what, e)
            raise UnavailableError(f"{what} failed to start: {why}") from None
        raise UnavailableError(f"{what} failed to start or died: {e}") from None


def _init_failure(e: Any) -> str | None:
    """What an actor's ``__init__`` raised: the last line of Ray's error (``Type: message``; a
    pdserve error's bare message), the traceback being for the log; None when it died otherwise."""
    if not getattr(e, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    # a pdserve error's message stands alone ("pdserve.errors.UnavailableError: msg" -> "msg")
    return last.split(": ", 1)[1] if last.startswith("pdserve.errors.") and ": " in last else last


# ---------------------------------------------------------------------------- driver side
def connect(address: str | None = "auto", namespace: str = DEFAULT_NAMESPACE) -> None:
    """``ray.init`` this driver into the cluster at ``address`` (``auto``: the local one)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    except ray.exceptions.AuthenticationError as e:
        raise UnavailableError(
            f"the Ray cluster at {address!r} refused this driver's token ({e}); set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token: see deploy/ray/README.md"
        ) from None
    except ConnectionError as e:
        if _auth_failure(e):
            raise UnavailableError(
                f"the Ray cluster at {address!r} refused this driver's token; set RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token: see deploy/ray/README.md"
            ) from None
        raise UnavailableError(
            f"cannot reach a Ray cluster at {address!r}: {e}. Start one (`ray start --head`) or pass --address"
        ) from None


def _auth_failure(e: BaseException | None) -> bool:
    """Whether a failed ``ray.init`` (or its causes) was an authentication failure."""
    while e is not None:
        if "InvalidAuthToken" in str(e) or type(e).__name__ == "AuthenticationError":
            return True
        e = e.__cause__ or e.__context__
    return False


def controller(namespace: str = DEFAULT_NAMESPACE) -> Any | None:
    """The running controller actor's handle, or None."""
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    except ValueError:
        return None


def up(config: ClusterConfig) -> dict[str, Any]:
    """Start the cluster described by ``config`` (error if one is up in that namespace, or if it
    would serve off loopback without TLS and a cluster token: :func:`check_security`)."""
    import ray

    check_security(config)

    if controller(config.namespace) is not None:
        raise InvalidRequestError(
            f"pdserve is already up in Ray namespace {config.namespace!r}: run `pdserve down` first"
        )
    h = (
        ray.remote(Controller)
        .options(
            name=CONTROLLER_NAME,
            namespace=config.namespace,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=8,
            max_restarts=0,
        )
        .remote(config)
    )
    try:
        return _unwrap(h.up.remote(), config.startup_timeout_s * 3)
    except BaseException:
        _stop(h)
        raise


def _require(namespace: str) -> Any:
    h = controller(namespace)
    if h is None:
        raise UnavailableError(f"pdserve is not up in Ray namespace {namespace!r}: run `pdserve up`")
    return h


def _unwrap(ref: Any, timeout_s: float | None = None) -> Any:
    """ray.get, re-raising a pdserve error raised inside the controller as itself."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise UnavailableError(f"the pdserve controller did not answer within {timeout_s}s") from None
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, PdserveError):
            raise type(e.cause)(e.cause.message) from None
        raise


def status(namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    return _unwrap(_require(namespace).status.remote(), 120)


def scale(
    prefill: int | None = None,
    decode: int | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    model: str | None = None,
) -> dict:
    """Resize the pools (of ``model``, on a cluster serving several): :meth:`Controller.scale`."""
    return _unwrap(_require(namespace).scale.remote(prefill, decode, model))


def _stop(h: Any) -> dict[str, int]:
    import ray

    try:
        out = ray.get(h.shutdown.remote(), timeout=300)
    except Exception as e:  # noqa: BLE001 - its children die with it (they are owned by it)
        log.warning("controller shutdown failed (%s); killing it", e)
        out = {}
    ray.kill(h, no_restart=True)
    return out


def down(namespace: str = DEFAULT_NAMESPACE) -> dict[str, int]:
    """Stop everything ``up`` started in ``namespace`` (only that): returns the counts stopped."""
    return _stop(_require(namespace))
