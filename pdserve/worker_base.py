"""What prefill and decode workers share: config, engine start-up, stats, router registration."""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from engine.config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.lora import LoRAConfig
from kv_store.convert import layout_to_proto
from kv_store.layout import KVLayout
from pdserve.auth.worker_token import worker_metadata, worker_token_from
from pdserve.metrics import AdapterSnapshot, WorkerMetrics, WorkerSnapshot
from pdserve.security import internal_channel
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)


def adapter_residency(e: LLMEngine) -> dict:
    """The WorkerStats fields on ``e``'s LoRA adapters (empty without LoRA): which are in an engine
    slot and in host memory now, the measured load times, and how busy the tiers are (slots
    pinned, requests waiting for an adapter, the mean full-table period, reads queued) (run on
    the engine thread)."""
    lora = e.lora
    if lora is None:
        return {}
    return {
        "adapters_in_slot": sorted(lora.slot_resident()),
        "adapters_in_host": sorted(lora.host_resident()),
        "adapter_slot_load_s": lora.stats.slot_load_s,
        "adapter_disk_load_s": lora.stats.disk_load_s,
        "adapter_slots": lora.slots.num_slots,
        "adapter_slots_pinned": lora.slots.num_pinned(),
        "adapter_slot_waiters": e.num_lora_waiting,
        "adapter_slot_free_s": lora.full.mean_s,
        "adapter_reads_queued": lora.reads_queued(),
    }


def adapter_snapshots(e: LLMEngine) -> tuple[AdapterSnapshot, ...]:
    """Per-adapter counters and residency of ``e``'s LoRA adapters (run on the engine thread)."""
    if e.lora is None:
        return ()
    slot, host = set(e.lora.slot_resident()), set(e.lora.host_resident())
    out = []
    for name in e.lora.names():
        c = e.lora.stats.of(name)
        out.append(
            AdapterSnapshot(
                name,
                c.prefill_tokens,
                c.decode_tokens,
                c.slot_loads,
                c.disk_loads,
                name in slot,
                name in host,
            )
        )
    return tuple(out)


class Role(enum.Enum):
    PREFILL = worker_pb2.WORKER_ROLE_PREFILL
    DECODE = worker_pb2.WORKER_ROLE_DECODE


# decode: the default adaptive-coalescing window of a stream (seconds), chosen by measurement with
# bench/serving_efficiency.py (tiny model, 64 streams, 256 tokens per request, 2 cores): windows
# 0 / 50 / 100 ms cost the router 0.23 / 0.065 / 0.059 ms CPU per token and all processes 0.66 /
# 0.30 / 0.31: 50 ms takes most of the gain and delays a token by at most 50 ms (never the first
# token nor the finish). README "Concurrency figures and the token path".
DEFAULT_STREAM_WINDOW_S = 0.05


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    role: Role
    model_path: str
    store_address: str
    host: str = "127.0.0.1"
    port: int = 0
    # every router to register with (README "Several routers"); empty: not registered anywhere
    router_addresses: tuple[str, ...] = ()
    engine: EngineConfig = field(default_factory=EngineConfig)
    heartbeat_interval_s: float = 0.5
    lease_ttl_s: float = 30.0
    admission_timeout_s: float = 30.0  # decode: how long a handoff may wait for free blocks
    stream_interval: int = 1  # decode: tokens per streamed message after the first (1: each at once)
    # decode: after the first message, at most one message per this many seconds (tokens ready
    # meanwhile go together; 0: none). See decode_worker.service.AsyncDecodeServicer.
    stream_window_s: float = DEFAULT_STREAM_WINDOW_S
    metrics_port: int = 0  # /metrics on 127.0.0.1 (0: any free port)
    lora: LoRAConfig | None = None  # LoRA adapters served (--lora NAME=PATH); None: base model only
    direct_streams: bool = False  # decode: serve DirectStream to clients (--direct-streams)
    direct_port: int = 0  # decode under mutual TLS: DirectStream's own port (--direct-port; 0: any)


def engine_layout(engine: LLMEngine) -> KVLayout:
    s = engine.kv_shape
    return KVLayout(
        model_id=engine.model_id,
        num_layers=s.num_layers,
        num_kv_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        dtype=str(s.dtype).removeprefix("torch."),
        block_size=s.block_size,
    )


def profile_proto(profile) -> router_pb2.StepProfile | None:
    """A start-up profile (``engine.profile.StartupProfile``) as registration reports it (None:
    not measured, e.g. a state built around an engine without ``WorkerState.load``)."""
    if profile is None:
        return None
    return router_pb2.StepProfile(key=profile.key.digest(), **profile.model.to_dict())


def served_adapters(engine) -> list[str]:
    """The LoRA adapters ``engine`` serves, as registration reports them (an engine stand-in
    without ``adapters``, as the registry tests use, serves none)."""
    fn = getattr(engine, "adapters", None)
    return list(fn()) if fn is not None else []


class WorkerState:
    """Engine + loop + counters of one worker process (I/O-free; services wrap it)."""

    def __init__(self, config: WorkerConfig, engine: LLMEngine) -> None:
        self.config = config
        self.engine = engine
        self.loop = EngineLoop(engine, name=f"engine-{config.worker_id}")
        self.layout = engine_layout(engine)
        self.finished_total = 0
        self._lock = threading.Lock()
        self.address = ""
        # the worker's registrations with its routers (set by RouterLinks; None: not registered
        # anywhere, e.g. in tests): an adapter loaded at run time re-registers through it
        self.router_links: RouterLinks | None = None
        self.profile = None  # engine.profile.StartupProfile: its step-time model (None: not measured)

    @classmethod
    def load(cls, config: WorkerConfig) -> WorkerState:
        from engine import profile

        engine = LLMEngine.from_pretrained(config.model_path, config.engine, lora=config.lora)
        # its own speed, known before its first request (cached per model/hardware/engine version);
        # measured before the engine loop exists: the measurement steps the engine itself
        prof = profile.load_or_measure(engine, config.model_path) if profile.enabled() else None
        state = cls(config, engine)
        state.profile = prof
        return state

    def count_finished(self) -> None:
        with self._lock:
            self.finished_total += 1

    def stats(self) -> worker_pb2.WorkerStats:
        s, adapters, shape = self.loop.call(
            lambda e: (e.stats(), adapter_residency(e), e.scheduler.pool_shape())
        )
        hit = self.engine.kv.pool.stats.hit_rate
        return worker_pb2.WorkerStats(
            **adapters,
            max_model_len=shape.max_model_len,
            sliding_window=shape.sliding_window or 0,
            worker_id=self.config.worker_id,
            role=self.config.role.value,
            model=self.engine.model_id,
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            num_preempted=s.num_preemptions,
            kv_blocks_total=s.kv_blocks_total,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_cached=s.kv_blocks_cached,
            token_budget=s.token_budget,
            prefill_tokens_computed_total=s.prefill_tokens_computed,
            prefill_tokens_reused_total=s.prefill_tokens_reused,
            decode_tokens_total=s.decode_tokens,
            spec_draft_tokens_total=s.spec_draft_tokens,
            spec_accepted_tokens_total=s.spec_accepted_tokens,
            requests_finished_total=self.finished_total,
            prefix_cache_hit_rate=hit,
            kv_layout=layout_to_proto(self.layout),
        )

    def metrics_snapshot(self, timeout_s: float = 2.0) -> WorkerSnapshot:
        """Engine state for /metrics, read on the engine thread (TimeoutError if busy longer)."""

        def read(e: LLMEngine) -> WorkerSnapshot:
            s, p = e.stats(), e.kv.pool.stats
            hc = getattr(e.runner, "host_cache", None)
            block_nbytes = hc.block_nbytes if hc is not None else 0
            wo = e.weight_offload
            ws = wo.snapshot() if wo is not None else None
            ko = e.kv_offload
            ks = ko.snapshot() if ko is not None else None
            return WorkerSnapshot(
                running=s.num_running,
                waiting=s.num_waiting,
                kv_blocks_total=s.kv_blocks_total,
                kv_blocks_used=s.kv_blocks_used,
                kv_blocks_cached=s.kv_blocks_cached,
                token_budget=s.token_budget,
                prefill_tokens_computed=s.prefill_tokens_computed,
                prefill_tokens_reused=s.prefill_tokens_reused,
                decode_tokens=s.decode_tokens,
                spec_draft_tokens=s.spec_draft_tokens,
                spec_accepted_tokens=s.spec_accepted_tokens,
                preemptions=s.num_preemptions,
                requests_finished=self.finished_total,
                prefix_query_tokens=p.queries,
                prefix_hit_tokens=p.hits,
                prefix_evictions=p.evictions,
                swapped_requests=s.num_swapped,
                swap_outs=s.num_swap_outs,
                swap_ins=s.num_swap_ins,
                swapped_out_blocks=s.swapped_out_blocks,
                swapped_in_blocks=s.swapped_in_blocks,
                host_blocks_total=s.host_blocks_total,
                host_blocks_used=s.host_blocks_used,
                swapped_out_bytes=s.swapped_out_blocks * block_nbytes,
                swapped_in_bytes=s.swapped_in_blocks * block_nbytes,
                swap_copy_seconds=hc.copy_seconds if hc is not None else 0.0,
                mlfq_promotions=e.scheduler.num_promotions,
                swap_disk_blocks_total=s.disk_blocks_total,
                swap_disk_blocks_used=s.disk_blocks_used,
                swap_disk_spilled_blocks=s.disk_spilled_blocks,
                swap_disk_promoted_blocks=s.disk_promoted_blocks,
                swap_disk_full=s.disk_full,
                swap_disk_fallbacks=s.disk_fallbacks,
                swap_disk_write_errors=s.disk_write_errors,
                swap_disk_corrupt_blocks=s.disk_corrupt_blocks,
                swap_disk_seconds=s.disk_seconds,
                swap_disk_enabled=s.disk_enabled,
                swap_prefetches=s.swap_prefetches,
                swap_prefetch_evictions=s.swap_prefetch_evictions,
                weight_bytes=tuple(wo.tier_bytes().items()) if wo is not None else (),
                weight_prefetch_bytes=ws.bytes_copied if ws is not None else 0,
                weight_prefetch_stall_seconds=ws.stall_s if ws is not None else 0.0,
                kv_offload_bytes=(
                    (
                        ("device", ko.placement.device_bytes),
                        ("host", ko.placement.host_bytes),
                        *((("disk", ko.placement.disk_bytes),) if ko.placement.disk else ()),
                    )
                    if ko is not None
                    else ()
                ),
                kv_offload_read_bytes=ks.read_bytes if ks is not None else 0,
                kv_offload_write_bytes=ks.write_bytes if ks is not None else 0,
                kv_offload_stall_seconds=ks.stall_s if ks is not None else 0.0,
                adapters=adapter_snapshots(e),
            )

        return self.loop.call(read, timeout_s=timeout_s)

    def attach_metrics(self, metrics: WorkerMetrics) -> None:
        """Feed ``metrics``: step time and tokens per step from the engine loop's ``on_step`` hook
        (tokens = prefill + decode tokens the step processed, from the engine's counters)."""
        e = self.engine
        last = [e.prefill_tokens_computed + e.decode_tokens]

        def on_step(seconds: float, _new_tokens: int) -> None:  # runs on the engine thread
            now = e.prefill_tokens_computed + e.decode_tokens
            metrics.observe_step(seconds, now - last[0])
            last[0] = now

        self.loop.on_step = on_step

    def abort(self, request_id: str) -> bool:
        return self.loop.abort(request_id)

    def on_engine_broken(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once if the engine breaks for good (a tensor-parallel
        follower died: :class:`engine.tp_runner.TPModelRunner`); engines that cannot break
        ignore it."""
        if hasattr(self.engine.runner, "on_broken"):
            self.engine.runner.on_broken = callback

    def close(self) -> None:
        """Stop the engine loop, then release the engine (a tensor-parallel engine's followers)."""
        self.loop.stop()
        self.engine.close()


class Heartbeater:
    """Registers with the router and heartbeats stats; re-registers when the router forgot us.

    ``router_address`` is where to register: the router's control address, or (compatibility)
    its data address. The router answers with its control address
    (``RegisterResponse.control_address``, :mod:`router.registry_service`) and heartbeats and the
    final Deregister go there, to the control plane that client load cannot delay. When a
    heartbeat finds the control address unreachable, the worker registers again at
    ``router_address`` (which names the control address anew).

    A router that verifies workers (issue #13) hands out a worker token with the Register answer
    (:mod:`pdserve.auth.worker_token`); it is sent back with every Heartbeat, Deregister and
    re-Register, so only this worker can report its load or remove it.

    ``resolve`` (optional) returns the router's current address. It is called after a heartbeat
    finds the router unreachable; when the address changed (a restarted router actor bound a new
    port) the heartbeater reconnects there and registers again. Without it the address is fixed.
    """

    def __init__(
        self, state: WorkerState, router_address: str, resolve: Callable[[], str] | None = None
    ) -> None:
        self.state = state
        self.router_address = router_address
        self._resolve = resolve
        self._ch = internal_channel(router_address)
        self._stub = router_pb2_grpc.RegistryStub(self._ch)
        self.control_address = router_address  # where heartbeats go (learnt on registration)
        self._control_ch: grpc.Channel | None = None  # its channel, when it is not ``_ch``
        self._control_stub = self._stub
        self._token: str | None = None  # the router's worker token (none from a non-verifying router)
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends the wait between beats early (stop, register again)
        self._again = threading.Event()  # register again on the next beat (the adapters changed)
        self._registrations = 0  # successful Register calls so far (guarded by _cond)
        self._cond = threading.Condition()
        self.registered = False  # whether the last Register/Heartbeat found us known to the router
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{router_address}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _register(self) -> None:
        c = self.state.config
        r, call = self._stub.Register.with_call(
            router_pb2.RegisterRequest(
                worker_id=c.worker_id,
                role=c.role.value,
                address=self.state.address,
                model=self.state.engine.model_id,
                stats=self.state.stats(),
                profile=profile_proto(getattr(self.state, "profile", None)),
                adapters=served_adapters(self.state.engine),
            ),
            timeout=5,
            metadata=worker_metadata(self._token),
        )
        self._token = worker_token_from(call.trailing_metadata())
        self._use_control(r.control_address or self.router_address)

    def _use_control(self, address: str) -> None:
        """Heartbeat to ``address`` from now on (a channel of its own unless it is ``router_address``)."""
        if address == self.control_address:
            return
        log.info("heartbeats to the router's control address", extra={"control": address})
        self._close_control()
        self.control_address = address
        if address != self.router_address:
            self._control_ch = internal_channel(address)
            self._control_stub = router_pb2_grpc.RegistryStub(self._control_ch)

    def _close_control(self) -> None:
        """Back to heartbeating (and registering) at ``router_address``."""
        if self._control_ch is not None:
            self._control_ch.close()
            self._control_ch = None
        self.control_address = self.router_address
        self._control_stub = self._stub

    def _rediscover(self) -> None:
        """Ask ``resolve`` where the router is now; reconnect if it moved (errors: keep the old)."""
        if self._resolve is None:
            return
        try:
            address = self._resolve()
        except Exception as e:  # the router actor may be restarting: try again next beat
            log.debug("router address not resolvable: %s", e)
            return
        if address and address != self.router_address:
            log.info("router moved", extra={"old": self.router_address, "new": address})
            old = self._ch
            self._close_control()
            self.router_address = address
            self._ch = internal_channel(address)
            self._stub = router_pb2_grpc.RegistryStub(self._ch)
            self.control_address = address
            self._control_stub = self._stub
            old.close()

    def _run(self) -> None:
        registered = False
        interval = self.state.config.heartbeat_interval_s
        while not self._stop.is_set():
            try:
                if not registered or self._again.is_set():
                    self._again.clear()
                    self._register()
                    registered = True
                    with self._cond:
                        self._registrations += 1
                        self._cond.notify_all()
                else:
                    r = self._control_stub.Heartbeat(
                        router_pb2.HeartbeatRequest(
                            worker_id=self.state.config.worker_id, stats=self.state.stats()
                        ),
                        timeout=5,
                        metadata=worker_metadata(self._token),
                    )
                    registered = r.known
            except grpc.RpcError as e:
                log.debug("router %s not reachable: %s", self.router_address, e.code())
                registered = False
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._close_control()  # register again where we were told to
                    self._rediscover()
            self.registered = registered
            self._wake.wait(interval)
            self._wake.clear()

    def registrations(self) -> int:
        """Successful Register calls so far."""
        with self._cond:
            return self._registrations

    def register_again(self) -> None:
        """Register again now (not at the next beat): what the worker serves changed."""
        self._again.set()
        self._wake.set()

    def wait_registered_after(self, count: int, timeout_s: float) -> bool:
        """Wait until more than ``count`` Register calls succeeded; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._registrations > count, timeout_s)

    def request_stop(self) -> None:
        """Stop heartbeating after the beat in progress (without waiting for it)."""
        self._stop.set()
        self._wake.set()

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        if deregister:
            with contextlib.suppress(grpc.RpcError):
                self._control_stub.Deregister(
                    router_pb2.DeregisterRequest(worker_id=self.state.config.worker_id),
                    timeout=2,
                    metadata=worker_metadata(self._token),
                )
        self._close_control()
        self._ch.close()


class RouterLinks:
    """The worker's registration with every router of the cluster: one :class:`Heartbeater` per
    address, each on its own thread with its own channel and its own worker token (each router
    issues its own at Register), so a router that is down or slow delays nobody's heartbeats but
    its own. A router that comes back (restarted on its address) gets the registration again on
    its heartbeater's next beat. ``resolvers`` (optional, parallel to ``addresses``): each router's
    ``resolve`` (:class:`Heartbeater`; the Ray deployment, whose router actors may move), or None.
    """

    def __init__(
        self,
        state: WorkerState,
        addresses: Sequence[str],
        resolvers: Sequence[Callable[[], str] | None] = (),
    ) -> None:
        if resolvers and len(resolvers) != len(addresses):
            raise ValueError(f"{len(resolvers)} resolvers for {len(addresses)} router addresses")
        rs = list(resolvers) or [None] * len(addresses)
        self.heartbeaters = [Heartbeater(state, a, resolve=r) for a, r in zip(addresses, rs, strict=True)]
        state.router_links = self

    def register_again(self, timeout_s: float) -> dict[str, bool]:
        """Register again with every router now (the worker's adapters changed) and wait up to
        ``timeout_s`` for each; router address -> whether it has the new registration. A router
        that is down gets it when it comes back (its heartbeater registers on reconnecting)."""
        before = [hb.registrations() for hb in self.heartbeaters]
        for hb in self.heartbeaters:
            hb.register_again()
        end = time.monotonic() + timeout_s
        return {
            hb.router_address: hb.wait_registered_after(n, max(0.0, end - time.monotonic()))
            for hb, n in zip(self.heartbeaters, before, strict=True)
        }

    def start(self) -> None:
        for hb in self.heartbeaters:
            hb.start()

    def registered(self) -> dict[str, bool]:
        """Router address -> whether that router knows this worker (as of its last beat)."""
        return {hb.router_address: hb.registered for hb in self.heartbeaters}

    def stop(self, deregister: bool = True) -> None:
        """Stop every heartbeater and deregister from every router, all at once (a dead router
        costs its own timeout, not one per router)."""
        for hb in self.heartbeaters:
            hb.request_stop()
        threads = [
            threading.Thread(target=hb.stop, args=(deregister,), name=f"deregister-{hb.router_address}")
            for hb in self.heartbeaters
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
