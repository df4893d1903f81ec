"""Chunk-wise KV streaming through the router (issue #14 part 2; router.lifecycle.stream_legs):
in-process routers with ``kv_stream`` = store and grpc in front of real workers on 127.0.0.1 (the
tiny random Llama with SmolLM2's tokenizer, a KV store node, two prefill workers, two decode
workers). The router sends each request's Prefill (``kv_stream``) and Decode
(``kv_stream_address``) at once:

* outputs (greedy and seeded) equal the engine run whole, and the prefill worker really streamed
  (its registry opened streams; the prompt spans several prefill chunks);
* a client cancelled mid-prefill leaves nothing: no engine block on any worker, no store lease,
  no stream in either prefill worker's registry;
* a decode worker killed mid-prefill (its server stopped while the prefill streams to it) is
  re-dispatched: prefilled again, decoded on the other decode worker, output identical;
* a prefill worker killed mid-prefill (its server stopped while its stream has published chunks)
  is re-dispatched: the request completes identically on the other prefill worker.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.metrics import RouterMetrics
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import client_pb2, client_pb2_grpc, direct_pb2, worker_pb2
from pdserve.worker_base import Role, WorkerConfig, WorkerState, engine_layout
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


class _Slow:
    """Slows an engine's steps by ``delay_s`` while set (so a test can act mid-prefill)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.delay_s = 0.0
        step = engine.step

        def slow_step(*a, **kw):
            if self.delay_s:
                time.sleep(self.delay_s)
            return step(*a, **kw)

        engine.step = slow_step  # type: ignore[method-assign]


class _Cluster:
    """``direct_streams``: the decode workers serve DirectStream and the routers grant direct
    token streams (tests/integration/test_kv_stream_direct.py); off: every token relayed."""

    def __init__(self, path, direct_streams: bool = False) -> None:
        from decode_worker.direct import enable_direct_streams
        from decode_worker.puller import StorePuller
        from decode_worker.service import AsyncDecodeServicer
        from kv_store.arena import host_id
        from kv_store.client import KVStoreClient
        from kv_store.service import serve
        from kv_store.store import StoreConfig
        from kv_store.transport import AutoTransport
        from pdserve.grpc_server import start_aio_server
        from pdserve.metrics import KVPullMetrics
        from pdserve.worker_main import serve_worker, worker_services
        from prefill_worker.publisher import StorePublisher
        from prefill_worker.service import PrefillServicer

        engines = {n: LLMEngine.from_pretrained(path, ECFG) for n in ("pre-a", "pre-b", "dec-a", "dec-b")}
        self.store_srv = serve(
            StoreConfig(node_id="kvs0", layout=engine_layout(engines["dec-a"]), capacity_blocks=1024)
        )
        saddr = self.store_srv.address
        self.store = KVStoreClient(saddr)
        self.transport = AutoTransport(host_id())
        self.registry = Registry(heartbeat_timeout_s=1e9)  # no heartbeats here: never expire
        self.states: dict[str, WorkerState] = {}
        self.servers: dict[str, grpc.Server] = {}
        self.prefill: dict[str, PrefillServicer] = {}
        self.slow = {n: _Slow(engines[n]) for n in ("pre-a", "pre-b")}
        for n in ("pre-a", "pre-b"):
            st = WorkerState(WorkerConfig(n, Role.PREFILL, str(path), saddr, engine=ECFG), engines[n])
            svc = PrefillServicer(st, StorePublisher(self.store), self.store, self.transport, None)
            services, _ = worker_services(svc, Role.PREFILL, None)  # Worker, WorkerAdmin, KVStream
            self.servers[n], port = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, n)
            st.address = f"127.0.0.1:{port}"
            self.states[n], self.prefill[n] = st, svc
            self.registry.register(
                n, WorkerKind.PREFILL, st.address, "llama", WorkerLoad(0, 0, BLOCKS, 0, block_size=BLOCK_SIZE)
            )
        self.decode: dict[str, AsyncDecodeServicer] = {}
        desc = worker_pb2.DESCRIPTOR.services_by_name
        for n in ("dec-a", "dec-b"):
            st = WorkerState(WorkerConfig(n, Role.DECODE, str(path), saddr, engine=ECFG), engines[n])
            self.decode[n] = AsyncDecodeServicer(
                st,
                StorePuller(self.transport, {saddr: self.store}),
                KVPullMetrics(CollectorRegistry(), n),
                stream_window_s=0.0,
            )
            dservices = [(desc["Worker"], self.decode[n])]
            if direct_streams:
                enable_direct_streams(self.decode[n], dservices)
            self.servers[n], port = serve_worker(dservices, Role.DECODE, "127.0.0.1", 0, n)
            st.address = f"127.0.0.1:{port}"
            self.states[n] = st
            self.registry.register(
                n, WorkerKind.DECODE, st.address, "llama", WorkerLoad(0, 0, BLOCKS, 0, block_size=BLOCK_SIZE)
            )
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
            svc = GenerateServicer(self.registry, cfg, RouterMetrics(self.metrics[mode]))
            rservices = [(client_pb2.DESCRIPTOR.services_by_name["Generate"], svc)]
            if direct_streams:
                rservices.append((direct_pb2.DESCRIPTOR.services_by_name["DirectResume"], svc.direct))
            server, rport, _ = start_aio_server(rservices, "127.0.0.1", 0, name="router")
            self.routers[mode] = (svc, server, f"127.0.0.1:{rport}")
        self.stopped: set[str] = set()

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
            n: st.loop.call(lambda e: e.kv.num_blocks - e.kv.num_free_blocks + len(e._tracked))
            for n, st in self.states.items()
            if n not in self.stopped
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
        self.transport.close()
        self.store.close()
        self.store_srv.stop(0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, smollm_path):
    from tests.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("kvsr"), tokenizer_from=smollm_path)["llama"]


@pytest.fixture(scope="module")
def cluster(model_path):
    cl = _Cluster(model_path)
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def whole(model_path):
    return LLMEngine.from_pretrained(model_path, EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE))


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n,), generator=g).tolist()


@pytest.mark.parametrize("mode", [KVStreamMode.STORE, KVStreamMode.GRPC], ids=["store", "grpc"])
def test_streamed_requests_equal_the_engine_run_whole(cluster, whole, mode) -> None:
    prompts = [_prompt(200, 1), _prompt(130, 2), _prompt(77, 3)]
    params = [GREEDY, SEEDED, GREEDY]
    refs = whole.generate(prompts, params)
    opened = cluster.streams_opened()
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(3) as ex:
        got = list(ex.map(lambda i: c.complete(prompts[i], params[i]), range(3)))
    for r, g in zip(refs, got, strict=True):
        assert g.token_ids == r.token_ids
        assert g.finish.reason == "length" and g.finish.completion_tokens == 16
    assert cluster.streams_opened() == opened + 3  # every handoff went by a stream
    cluster.wait_clean()


def test_client_cancelled_mid_prefill_leaves_nothing(cluster) -> None:
    for s in cluster.slow.values():
        s.delay_s = 0.05
    try:
        with grpc.insecure_channel(cluster.address(KVStreamMode.STORE)) as ch:
            call = client_pb2_grpc.GenerateStub(ch).Generate(
                client_pb2.GenerateRequest(
                    prompt_token_ids=client_pb2.TokenIds(ids=_prompt(300, 4)),
                    sampling=sampling_to_proto(GREEDY),
                ),
                timeout=CALL_S,
            )
            codes: list[grpc.StatusCode] = []

            def read() -> None:
                try:
                    next(call, None)
                except grpc.RpcError as e:
                    codes.append(e.code())

            first = threading.Thread(target=read, daemon=True)
            first.start()
            deadline = time.monotonic() + CALL_S
            while not any(m.ready_chunks for p in cluster.prefill.values() for m in p.streams.live()):
                assert time.monotonic() < deadline, "no stream published a chunk"
                time.sleep(0.005)
            call.cancel()
            first.join(CALL_S)
            assert codes == [grpc.StatusCode.CANCELLED]
    finally:
        for s in cluster.slow.values():
            s.delay_s = 0.0
    cluster.wait_clean()


def _slowly_streaming(cluster, fut, mode: KVStreamMode) -> tuple[str, str]:
    """Wait until a prefill worker's stream published a chunk; (prefill worker, decode worker)
    of the one request running on ``mode``'s router."""
    svc = cluster.routers[mode][0]
    deadline = time.monotonic() + CALL_S
    while True:
        assert time.monotonic() < deadline and not fut.done(), "the prefill never streamed a chunk"
        pw = next(
            (n for n, p in cluster.prefill.items() if any(m.ready_chunks for m in p.streams.live())), None
        )
        running = list(svc.running().values())
        if pw is not None and running:
            assert running[0].state is State.STREAMING
            return pw, running[0].m.decode_id
        time.sleep(0.002)


def _redispatches(cluster, mode: KVStreamMode, phase: str) -> float:
    return (
        cluster.metrics[mode].get_sample_value("pdserve_router_redispatches_total", {"phase": phase}) or 0.0
    )


def test_decode_worker_killed_mid_prefill_is_redispatched(cluster, whole) -> None:
    """Stops a decode worker for good (the next test keeps one of each)."""
    prompt = _prompt(300, 6)
    ref = whole.generate([prompt], [GREEDY])[0]
    mode = KVStreamMode.STORE
    before = _redispatches(cluster, mode, "decode")
    for s in cluster.slow.values():
        s.delay_s = 0.05
    try:
        with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(1) as ex:
            fut = ex.submit(c.complete, prompt, GREEDY)
            _, victim = _slowly_streaming(cluster, fut, mode)
            cluster.kill(victim)
            got = fut.result(CALL_S)
    finally:
        for s in cluster.slow.values():
            s.delay_s = 0.0
    assert got.token_ids == ref.token_ids
    assert _redispatches(cluster, mode, "decode") == before + 1
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    cluster.wait_clean()


def test_prefill_worker_killed_mid_prefill_is_redispatched(cluster, whole) -> None:
    """Last in the module: it stops a prefill worker for good."""
    prompt = _prompt(300, 5)
    ref = whole.generate([prompt], [SEEDED])[0]
    for s in cluster.slow.values():
        s.delay_s = 0.05
    mode = KVStreamMode.GRPC
    before = _redispatches(cluster, mode, "prefill")
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(1) as ex:
        fut = ex.submit(c.complete, prompt, SEEDED)
        victim, _ = _slowly_streaming(cluster, fut, mode)
        cluster.kill(victim)
        for s in cluster.slow.values():
            s.delay_s = 0.0
        got = fut.result(CALL_S)
    assert got.token_ids == ref.token_ids
    assert _redispatches(cluster, mode, "prefill") == before + 1
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    cluster.wait_clean()
