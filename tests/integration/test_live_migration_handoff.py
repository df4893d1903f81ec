"""Live migration of a request that came through the prefill → decode handoff (the disaggregated
path: a prefill worker publishes the prompt's KV to a store node, a decode worker pulls it and
decodes), through the router with real workers on 127.0.0.1 (tiny random Llama): migrated
mid-way from its decode worker to the other, greedy and seeded outputs equal the unmigrated run,
and afterwards no worker holds a block and the store no lease.

One in-process cluster serves the module: a KV store node, a prefill worker, two decode workers
(store pullers) and the router (least-loaded placement, migration on by default).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.arena import host_id
from kv_store.client import KVStoreClient
from kv_store.service import serve
from kv_store.store import StoreConfig
from kv_store.transport import AutoTransport
from pdserve.client import Client
from pdserve.metrics import KVPullMetrics, RouterMetrics
from pdserve.v1 import client_pb2, worker_pb2
from pdserve.worker_base import Role, WorkerConfig, WorkerState, engine_layout
from router.lifecycle.states import State
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig
from tests.integration.clusters import paced_loops
from tests.workers import worker_stats

BLOCKS = 128
BLOCK_SIZE = 16
CALL_S = 120.0
GREEDY = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=96, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)
# each engine step lasts at least this long until the migration has answered: unpaced, the tiny
# model decodes a step in ~1.5 ms and could finish the 88 tokens left before MigrateOut arrives
# on a loaded host (tests.integration.clusters.paced_loops)
PACE_S = 0.01


class _Cluster:
    def __init__(self, path) -> None:
        from decode_worker.puller import StorePuller
        from decode_worker.service import AsyncDecodeServicer
        from decode_worker.spill_puller import SpillPuller
        from pdserve.grpc_server import start_aio_server
        from pdserve.worker_main import serve_worker
        from prefill_worker.aio_service import AsyncPrefillServicer
        from prefill_worker.publisher import StorePublisher

        ecfg = EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE)
        engines = {n: LLMEngine.from_pretrained(path, ecfg) for n in ("prefill-0", "dec-a", "dec-b")}
        self.store_srv = serve(
            StoreConfig(node_id="kv0", layout=engine_layout(engines["prefill-0"]), capacity_blocks=512)
        )
        self.store = KVStoreClient(self.store_srv.address)
        self.transport = AutoTransport(host_id())
        self.states, self.servers, self.addresses, self.closers = [], [], {}, []
        self.registry = Registry(heartbeat_timeout_s=1e9)  # no heartbeats here: never expire
        svc_desc = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
        for name, eng in engines.items():
            role = Role.PREFILL if name.startswith("prefill") else Role.DECODE
            st = WorkerState(WorkerConfig(name, role, str(path), self.store_srv.address, engine=ecfg), eng)
            self.states.append(st)
            if role is Role.PREFILL:
                svc = AsyncPrefillServicer(st, StorePublisher(self.store), self.store, self.transport, None)
            else:
                puller = SpillPuller(StorePuller(self.transport, {self.store_srv.address: self.store}))
                svc = AsyncDecodeServicer(
                    st, puller, KVPullMetrics(CollectorRegistry(), name), stream_window_s=0.0
                )
                self.closers.append(svc.close)
            server, port = serve_worker([(svc_desc, svc)], role, "127.0.0.1", 0, name)
            st.address = self.addresses[name] = f"127.0.0.1:{port}"
            self.servers.append(server)
            kind = WorkerKind.PREFILL if role is Role.PREFILL else WorkerKind.DECODE
            self.registry.register(
                name, kind, st.address, "llama", WorkerLoad(0, 0, BLOCKS, 0, block_size=BLOCK_SIZE)
            )
        self.metrics_registry = CollectorRegistry()
        cfg = RouterConfig(model_path=str(path), model_id="llama", store_address=self.store_srv.address)
        self.svc = GenerateServicer(self.registry, cfg, RouterMetrics(self.metrics_registry))
        services = [(client_pb2.DESCRIPTOR.services_by_name["Generate"], self.svc)]
        self.server, port, _ = start_aio_server(services, "127.0.0.1", 0, name="router")
        self.address = f"127.0.0.1:{port}"

    def wait_clean(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            used = {n: worker_stats(a).kv_blocks_used for n, a in self.addresses.items()}
            leases = self.store.stats().node.num_leases
            if not any(used.values()) and leases == 0:
                return
            assert time.monotonic() < deadline, f"leak: blocks {used}, store leases {leases}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.stop(0)
        for s in self.servers:
            s.stop(0).wait()
        for c in self.closers:
            c()
        for st in self.states:
            st.close()
        self.transport.close()
        self.store.close()
        self.store_srv.stop(0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm_path):
    from tests.tiny_models import make_tiny_models

    path = make_tiny_models(tmp_path_factory.mktemp("mig-pd"), tokenizer_from=smollm_path)["llama"]
    cl = _Cluster(path)
    yield cl
    cl.stop()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_handed_off_stream_migrated_mid_way_equals_the_unmigrated_run(cluster, params) -> None:
    prompt = [5 + (i * 11) % 290 for i in range(45)]
    with Client(cluster.address, timeout=CALL_S) as client:
        ref = client.complete(prompt, params)
        cluster.wait_clean()
        with ThreadPoolExecutor(1) as ex:
            with paced_loops([st.loop for st in cluster.states], PACE_S):  # decoding at MigrateOut
                fut = ex.submit(client.complete, prompt, params)
                deadline = time.monotonic() + CALL_S
                while True:
                    running = {
                        r: (d.m.decode_id, d.m.prefill_id)
                        for r, d in cluster.svc.running().items()
                        if d.state is State.DECODING and len(d.legs.run.out_ids) >= 8
                    }
                    if running:
                        break
                    assert not fut.done() and time.monotonic() < deadline, "the request never decoded"
                    time.sleep(0.001)
                ((rid, (src, prefilled_by)),) = running.items()
                assert prefilled_by == "prefill-0"  # the disaggregated path: handed off, not local
                dest = "dec-b" if src == "dec-a" else "dec-a"

                async def go():
                    return await cluster.svc.migrate(rid, dest)

                outcome = asyncio.run_coroutine_threadsafe(go(), cluster.server.loop).result(CALL_S)
            got = fut.result(CALL_S)
    assert outcome.migrated, outcome
    assert got.token_ids == ref.token_ids and got.text == ref.text
    cluster.wait_clean()
