"""In-process set-ups of the chunk-wise KV-streaming modules (issue #14), one definition each:

* :class:`StoreNode`, :func:`serve_prefill`, :func:`serve_decode`: a KV store node (server,
  client, transport) and real prefill / decode workers (the real servicers behind gRPC on
  127.0.0.1), the building blocks of test_kv_stream_workers.py's pair and of :class:`Cluster`;
* :class:`Cluster` and its fixtures (``model_path``, ``cluster``, ``whole``): in-process routers
  (``kv_stream`` store and grpc) in front of a store node, two prefill and two decode workers on
  the tiny random Llama with SmolLM2's tokenizer, 32-token prefill chunks
  (test_kv_stream_router.py, test_kv_stream_router_groups.py; test_kv_stream_direct.py with
  direct streams);
* :func:`check_cancel_mid_prefill`: a client that cancels while a prefill streams leaves
  nothing behind (the same check of each of those modules);
* :class:`Slow`, :func:`slowed`, :func:`streaming_prefill_worker`, :func:`wait_streaming_prefill`,
  :func:`seeded_prompt`, :func:`redispatches`: what their tests use to act mid-prefill and judge
  the outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.metrics import RouterMetrics
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import client_pb2, client_pb2_grpc, direct_pb2, worker_pb2
from pdserve.worker_base import Role, WorkerConfig, WorkerState, engine_layout, served_adapters
from router.lifecycle.states import State
from router.lifecycle.stream_mode import KVStreamMode
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig

BLOCKS = 256
BLOCK_SIZE = 16
CHUNK = 32  # the prefill chunk: a 200-token prompt streams in 7 chunks
ECFG = EngineConfig(
    num_kv_blocks=BLOCKS,
    block_size=BLOCK_SIZE,
    long_prefill_token_threshold=CHUNK,
    enable_prefix_caching=False,
)
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
CALL_S = 120.0
SLOW_STEP_S = 0.05  # a slowed prefill step: time enough to act while a prompt streams


# ------------------------------------------------------------------ building blocks
class Slow:
    """Slows an engine's steps by ``delay_s`` while set (so a test can act mid-prefill)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.delay_s = 0.0
        step = engine.step

        def slow_step(*a, **kw):
            if self.delay_s:
                time.sleep(self.delay_s)
            return step(*a, **kw)

        engine.step = slow_step  # type: ignore[method-assign]


@contextlib.contextmanager
def slowed(slows: Iterable[Slow], delay_s: float = SLOW_STEP_S) -> Iterator[None]:
    """Every engine of ``slows`` slowed by ``delay_s`` per step while the block runs."""
    slows = list(slows)
    for s in slows:
        s.delay_s = delay_s
    try:
        yield
    finally:
        for s in slows:
            s.delay_s = 0.0


def blocks_in_use(st: WorkerState) -> int:
    """Engine blocks of ``st``'s worker held by a request (allocated or tracked), read on its loop."""
    return st.loop.call(lambda e: e.kv.num_blocks - e.kv.num_free_blocks + len(e._tracked))


class StoreNode:
    """An in-process KV store node of ``layout`` (``capacity_blocks``), a client of it and this
    host's transport."""

    def __init__(self, layout, capacity_blocks: int) -> None:
        from kv_store.arena import host_id
        from kv_store.client import KVStoreClient
        from kv_store.service import serve
        from kv_store.store import StoreConfig
        from kv_store.transport import AutoTransport

        self.srv = serve(StoreConfig(node_id="kvs0", layout=layout, capacity_blocks=capacity_blocks))
        self.address = self.srv.address
        self.client = KVStoreClient(self.address)
        self.transport = AutoTransport(host_id())

    def close(self) -> None:
        self.transport.close()
        self.client.close()
        self.srv.stop(0)


@dataclass
class Served:
    """A worker served on 127.0.0.1: its state (``state.address`` set), servicer and server."""

    state: WorkerState
    servicer: object
    server: grpc.Server


def serve_prefill(
    name: str, path: str | Path, engine: LLMEngine, ecfg: EngineConfig, node: StoreNode
) -> Served:
    """A prefill worker ``name`` on ``engine`` publishing to ``node`` (services Worker,
    WorkerAdmin and KVStream) on a free loopback port."""
    from pdserve.worker_main import serve_worker, worker_services
    from prefill_worker.aio_service import AsyncPrefillServicer
    from prefill_worker.publisher import StorePublisher

    st = WorkerState(WorkerConfig(name, Role.PREFILL, str(path), node.address, engine=ecfg), engine)
    svc = AsyncPrefillServicer(st, StorePublisher(node.client), node.client, node.transport, None)
    services, _ = worker_services(svc, Role.PREFILL, None)
    server, port = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, name)
    st.address = f"127.0.0.1:{port}"
    return Served(st, svc, server)


def serve_decode(
    name: str,
    path: str | Path,
    engine: LLMEngine,
    ecfg: EngineConfig,
    node: StoreNode,
    *,
    direct_streams: bool = False,
) -> Served:
    """A decode worker ``name`` on ``engine`` pulling from ``node`` (service Worker; DirectStream
    too when ``direct_streams``) on a free loopback port."""
    from decode_worker.direct import enable_direct_streams
    from decode_worker.puller import StorePuller
    from decode_worker.service import AsyncDecodeServicer
    from pdserve.metrics import KVPullMetrics
    from pdserve.worker_main import serve_worker

    st = WorkerState(WorkerConfig(name, Role.DECODE, str(path), node.address, engine=ecfg), engine)
    svc = AsyncDecodeServicer(
        st,
        StorePuller(node.transport, {node.address: node.client}),
        KVPullMetrics(CollectorRegistry(), name),
        stream_window_s=0.0,
    )
    services = [(worker_pb2.DESCRIPTOR.services_by_name["Worker"], svc)]
    if direct_streams:
        enable_direct_streams(svc, services)
    server, port = serve_worker(services, Role.DECODE, "127.0.0.1", 0, name)
    st.address = f"127.0.0.1:{port}"
    return Served(st, svc, server)


# ------------------------------------------------------------------ the router cluster
class Cluster:
    """Store node, prefill workers pre-a / pre-b and decode workers dec-a / dec-b (engines
    :data:`ECFG`, registered never expiring under model ``llama``) and a router per
    ``kv_stream`` mode (store, grpc; metrics per mode in ``metrics``). ``direct_streams``: the
    decode workers serve DirectStream and the routers grant direct token streams
    (test_kv_stream_direct.py); off: every token relayed. ``lora``: every worker's engine serves
    these LoRA adapters and registers them (test_kv_stream_lora.py); None: the base model only.
    ``decode_max_loras``: the decode engines' adapter slots (``lora.max_loras``: None, as the
    prefill engines'), small to make a decode worker evict or wait for a slot
    (test_kv_stream_lora_faults.py)."""

    def __init__(
        self,
        path,
        direct_streams: bool = False,
        lora: LoRAConfig | None = None,
        decode_max_loras: int | None = None,
    ) -> None:
        dlora = lora
        if lora is not None and decode_max_loras is not None:
            dlora = dataclasses.replace(lora, max_loras=decode_max_loras)
        engines = {
            n: LLMEngine.from_pretrained(path, ECFG, lora=dlora if n.startswith("dec") else lora)
            for n in ("pre-a", "pre-b", "dec-a", "dec-b")
        }
        self.node = StoreNode(engine_layout(engines["dec-a"]), capacity_blocks=1024)
        self.store = self.node.client
        self.registry = Registry(heartbeat_timeout_s=1e9)  # no heartbeats here: never expire
        self.states: dict[str, WorkerState] = {}
        self.servers: dict[str, grpc.Server] = {}
        self.prefill = {}
        self.slow = {n: Slow(engines[n]) for n in ("pre-a", "pre-b")}
        for n in ("pre-a", "pre-b"):
            w = serve_prefill(n, path, engines[n], ECFG, self.node)
            self.states[n], self.prefill[n], self.servers[n] = w.state, w.servicer, w.server
            self._register(n, WorkerKind.PREFILL)
        self.decode = {}
        for n in ("dec-a", "dec-b"):
            w = serve_decode(n, path, engines[n], ECFG, self.node, direct_streams=direct_streams)
            self.states[n], self.decode[n], self.servers[n] = w.state, w.servicer, w.server
            self._register(n, WorkerKind.DECODE)
        self.routers: dict[KVStreamMode, tuple[GenerateServicer, object, str]] = {}
        self.metrics: dict[KVStreamMode, CollectorRegistry] = {}
        for mode in (KVStreamMode.STORE, KVStreamMode.GRPC):
            cfg = RouterConfig(
                model_path=str(path),
                model_id="llama",
                kv_stream=mode,
                max_redispatches=2,
                direct_streams=direct_streams,
            )
            self.metrics[mode] = CollectorRegistry()
            self.add_router(mode, cfg, self.metrics[mode])
        self.stopped: set[str] = set()

    def add_router(self, mode: KVStreamMode, cfg: RouterConfig, metrics: CollectorRegistry) -> None:
        """A router servicer of ``cfg`` on the registry (Generate; DirectResume too when
        ``cfg.direct_streams``) on a free loopback port, as ``routers[mode]``."""
        from pdserve.grpc_server import start_aio_server

        svc = GenerateServicer(self.registry, cfg, RouterMetrics(metrics))
        services = [(client_pb2.DESCRIPTOR.services_by_name["Generate"], svc)]
        if cfg.direct_streams:
            assert svc.direct is not None
            services.append((direct_pb2.DESCRIPTOR.services_by_name["DirectResume"], svc.direct))
        server, port, _ = start_aio_server(services, "127.0.0.1", 0, name="router")
        self.routers[mode] = (svc, server, f"127.0.0.1:{port}")

    def _register(self, name: str, kind: WorkerKind) -> None:
        self.registry.register(
            name,
            kind,
            self.states[name].address,
            "llama",
            WorkerLoad(0, 0, BLOCKS, 0, block_size=BLOCK_SIZE),
            adapters=tuple(served_adapters(self.states[name].engine)),
        )

    def address(self, mode: KVStreamMode) -> str:
        return self.routers[mode][2]

    def streams_opened(self) -> int:
        return sum(p.streams.opened for p in self.prefill.values())

    def kill(self, name: str) -> None:
        """Stop ``name``'s gRPC server at once (in-flight calls fail; it answers nothing more)."""
        self.stopped.add(name)
        self.servers[name].stop(0).wait()

    def leaks(self) -> tuple[dict[str, int], int, list]:
        used = {  # (a stopped worker's engine stands for a dead process: its memory went with it)
            n: blocks_in_use(st) for n, st in self.states.items() if n not in self.stopped
        }
        streams = [m for n, p in self.prefill.items() for m in p.streams.live()]
        return used, self.store.stats().node.num_leases, streams

    def wait_clean(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            used, leases, streams = self.leaks()
            if not any(used.values()) and leases == 0 and not streams:
                return
            assert time.monotonic() < deadline, (
                f"leak: blocks {used}, store leases {leases}, streams {streams}"
            )
            time.sleep(0.05)

    def stop(self) -> None:
        for _, server, _ in self.routers.values():
            server.stop(0)  # type: ignore[attr-defined]
        for n, s in self.servers.items():
            if n not in self.stopped:
                s.stop(0).wait()
        for d in self.decode.values():
            d.close()
        for p in self.prefill.values():
            p.streams.stop()
        for st in self.states.values():
            st.close()
        self.node.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, smollm_path):
    """The tiny random Llama with SmolLM2's tokenizer."""
    from tests.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("kvsr"), tokenizer_from=smollm_path)["llama"]


@pytest.fixture(scope="module")
def cluster(model_path):
    """The module's :class:`Cluster` (relayed token streams)."""
    cl = Cluster(model_path)
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def whole(model_path):
    """The engine run whole (the reference)."""
    return LLMEngine.from_pretrained(model_path, EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE))


# ------------------------------------------------------------------ acting mid-prefill
def seeded_prompt(n: int, seed: int) -> list[int]:
    """``n`` token ids in [5, 300), a function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n,), generator=g).tolist()


def streaming_prefill_worker(cluster: Cluster) -> str | None:
    """A prefill worker whose stream has published a chunk now (None: none has)."""
    return next(
        (n for n, p in cluster.prefill.items() if any(m.ready_chunks for m in p.streams.live())), None
    )


def wait_streaming_prefill(cluster: Cluster, fut: Future) -> str:
    """The prefill worker whose stream published a chunk first, while ``fut`` (the request)
    runs (AssertionError: it finished first, or no chunk within ``CALL_S``)."""
    deadline = time.monotonic() + CALL_S
    while True:
        assert time.monotonic() < deadline and not fut.done(), "the prefill never streamed a chunk"
        victim = streaming_prefill_worker(cluster)
        if victim is not None:
            return victim
        time.sleep(0.002)


def slowly_streaming(cluster: Cluster, fut: Future, mode: KVStreamMode) -> tuple[str, str]:
    """Wait until a prefill worker's stream published a chunk; (prefill worker, decode worker)
    of the one request running on ``mode``'s router (asserted STREAMING)."""
    svc = cluster.routers[mode][0]
    deadline = time.monotonic() + CALL_S
    while True:
        assert time.monotonic() < deadline and not fut.done(), "the prefill never streamed a chunk"
        pw = streaming_prefill_worker(cluster)
        running = list(svc.running().values())
        if pw is not None and running:
            assert running[0].state is State.STREAMING
            return pw, running[0].m.decode_id
        time.sleep(0.002)


def redispatches(cluster: Cluster, mode: KVStreamMode, phase: str) -> float:
    """``mode``'s router's re-dispatches of ``phase`` so far."""
    return (
        cluster.metrics[mode].get_sample_value("pdserve_router_redispatches_total", {"phase": phase}) or 0.0
    )


def check_cancel_mid_prefill(
    cluster: Cluster,
    prompt: list[int],
    params: SamplingParams,
    *,
    direct_stream: bool = False,
    mode: KVStreamMode = KVStreamMode.STORE,
) -> None:
    """A Generate of ``prompt`` / ``params`` (``direct_stream`` asked or not) sent to ``mode``'s
    router with the prefill workers slowed, cancelled once a prefill worker's stream has
    published a chunk: the call ends CANCELLED and the cluster is left clean
    (``cluster.wait_clean``)."""
    request = client_pb2.GenerateRequest(
        prompt_token_ids=client_pb2.TokenIds(ids=prompt),
        sampling=sampling_to_proto(params),
        direct_stream=direct_stream,
    )
    with slowed(cluster.slow.values()), grpc.insecure_channel(cluster.address(mode)) as ch:
        call = client_pb2_grpc.GenerateStub(ch).Generate(request, timeout=CALL_S)
        codes: list[grpc.StatusCode] = []

        def read() -> None:
            try:
                next(call, None)
            except grpc.RpcError as e:
                codes.append(e.code())

        first = threading.Thread(target=read, daemon=True)
        first.start()
        deadline = time.monotonic() + CALL_S
        while streaming_prefill_worker(cluster) is None:
            assert time.monotonic() < deadline, "no stream published a chunk"
            time.sleep(0.005)
        call.cancel()
        first.join(CALL_S)
        assert codes == [grpc.StatusCode.CANCELLED]
    cluster.wait_clean()
