"""Live migration of direct token streams (router/lifecycle/direct_legs.py ``DirectLegs.moved``,
router/lifecycle/grpc_migrator.py) with real decode workers on 127.0.0.1 serving DirectStream (the
tiny random Llama, SmolLM2's tokenizer for the router), a real SDK client taking its tokens from
the workers, and the router's own MigrateOut / ResumeStream / ResumeDirect path.

One cluster serves the module: an in-process router with direct streams (colocated placement:
each request runs whole on a decode worker, which streams every token straight to the client) and
two in-process decode workers. The tests:

* a direct stream migrated mid-way (after its client was redirected to the source and took
  tokens from it) has greedy and seeded output (tokens and text) identical to an unmigrated run,
  the client streams the rest straight from the destination (it attached there with a new
  ticket), the migration is counted, and no block stays held;
* a destination that cannot serve direct streams refuses the grant and the rest is relayed:
  output identical;
* stop strings: a migrated direct stream ends on a stop string matched on the destination, text
  identical;
* a drain empties a decode worker of its direct streams by migration while they continue, and
  they finish identical to unmigrated runs.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.metrics import RouterMetrics
from pdserve.v1 import client_pb2, direct_pb2, worker_pb2
from pdserve.worker_base import Role, WorkerConfig, WorkerState
from router.drain import drain_decode_worker
from router.lifecycle.direct_legs import DirectConfig, DirectLegs
from router.lifecycle.states import State
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig
from tests.workers import worker_stats

BLOCKS = 256
BLOCK_SIZE = 16
GREEDY = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=200, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
CALL_S = 120.0


class _Worker:
    """An in-process decode worker serving DirectStream on its own port (its engine, gRPC
    server and migration service)."""

    def __init__(self, path, name: str) -> None:
        from decode_worker.direct import enable_direct_streams
        from decode_worker.service import AsyncDecodeServicer
        from pdserve.metrics import KVPullMetrics
        from pdserve.worker_main import serve_worker

        eng = LLMEngine.from_pretrained(path, EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE))
        cfg = WorkerConfig(
            worker_id=name, role=Role.DECODE, model_path=str(path), store_address="", direct_streams=True
        )
        self.name = name
        self.state = WorkerState(cfg, eng)
        self.svc = AsyncDecodeServicer(
            self.state, None, KVPullMetrics(CollectorRegistry(), name), stream_window_s=0.0
        )
        services = [(worker_pb2.DESCRIPTOR.services_by_name["Worker"], self.svc)]
        enable_direct_streams(self.svc, services)
        self.server, port = serve_worker(services, Role.DECODE, "127.0.0.1", 0, name)
        self.address = self.state.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop(0).wait()
        self.svc.close()
        self.state.close()


class _Cluster:
    def __init__(self, path) -> None:
        from pdserve.grpc_server import start_aio_server

        self.workers = {n: _Worker(path, n) for n in ("dec-a", "dec-b")}
        self.attached: list[tuple[str, str]] = []  # (worker, request id) per client attach
        for n, w in self.workers.items():
            ds = w.svc.direct
            attach = ds._attach

            def spy_attach(conn, a, _attach=attach, _n=n):
                self.attached.append((_n, a.request_id))
                return _attach(conn, a)

            ds._attach = spy_attach
        self.registry = Registry(heartbeat_timeout_s=1e9)  # no heartbeats here: never expire
        for n, w in self.workers.items():
            self.registry.register(
                n, WorkerKind.DECODE, w.address, "llama", WorkerLoad(0, 0, BLOCKS, 0, block_size=BLOCK_SIZE)
            )
        self.metrics_registry = CollectorRegistry()
        cfg = RouterConfig(
            model_path=str(path),
            model_id="llama",
            policy=PolicyKind.COLOCATED,
            direct_streams=True,
            # progress often: the router learns of the tokens (and the test of the decoding) soon
            direct=DirectConfig(progress_interval_s=0.02),
        )
        self.svc = GenerateServicer(self.registry, cfg, RouterMetrics(self.metrics_registry))
        assert self.svc.migrator is not None and self.svc.direct is not None
        self.resumes: list[tuple[str, int]] = []  # (request id, tokens the client had) per ResumeDirect
        book = self.svc.direct
        resume = book.ResumeDirect

        async def spy(req, ctx):
            self.resumes.append((req.request_id, len(req.token_ids)))
            return await resume(req, ctx)

        book.ResumeDirect = spy  # type: ignore[method-assign]
        services = [
            (client_pb2.DESCRIPTOR.services_by_name["Generate"], self.svc),
            (direct_pb2.DESCRIPTOR.services_by_name["DirectResume"], self.svc.direct),
        ]
        self.server, port, _ = start_aio_server(services, "127.0.0.1", 0, name="router")
        self.address = f"127.0.0.1:{port}"

    def on_loop(self, coro, timeout_s: float = CALL_S):
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(timeout_s)

    def metric(self, name: str, **labels) -> float:
        return self.metrics_registry.get_sample_value(name, labels) or 0.0

    def used_blocks(self) -> dict[str, int]:
        return {n: worker_stats(w.address).kv_blocks_used for n, w in self.workers.items()}

    def wait_no_blocks(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while any(self.used_blocks().values()):
            assert time.monotonic() < deadline, f"blocks leaked: {self.used_blocks()}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.stop(0)
        for w in self.workers.values():
            w.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm_path):
    from tests.tiny_models import make_tiny_models

    path = make_tiny_models(tmp_path_factory.mktemp("dmig"), tokenizer_from=smollm_path)["llama"]
    cl = _Cluster(path)
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout=CALL_S, direct=True) as c:
        yield c


def _prompt(i: int) -> list[int]:
    rng = random.Random(2000 + i)
    return [rng.randrange(5, 300) for _ in range(20 + (i * 7) % 40)]


def _direct_decoding(cluster: _Cluster, min_tokens: int) -> dict[str, str]:
    """Direct requests decoding now whose client was redirected to their worker and of which the
    router knows ``min_tokens`` output tokens or more: id -> decode worker."""
    out = {}
    for rid, d in cluster.svc.running().items():
        legs = d.legs
        if (
            d.state is State.DECODING
            and isinstance(legs, DirectLegs)
            and legs._direct
            and legs._redirect is not None
            and len(legs.run.out_ids) >= min_tokens
        ):
            out[rid] = d.m.decode_id
    return out


def _other(worker: str) -> str:
    return "dec-b" if worker == "dec-a" else "dec-a"


@pytest.mark.parametrize(
    "params,known",
    [(GREEDY, 8), (SEEDED, 8), (GREEDY, 0)],
    ids=["greedy", "seeded", "greedy-right-after-redirect"],
)
def test_a_direct_stream_migrated_mid_way_equals_the_unmigrated_run(cluster, client, params, known) -> None:
    """``known``: output tokens the router knows (from progress) when the migration starts; 0:
    right after the redirect, the router knowing next to nothing of what the client took."""
    prompt = _prompt(1)
    ref = client.complete(prompt, params)
    assert len(ref.token_ids) == params.max_tokens
    moved_before = cluster.metric("pdserve_router_migrations_total", reason="manual", result="migrated")
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(client.complete, prompt, params)
        deadline = time.monotonic() + CALL_S
        while not (running := _direct_decoding(cluster, known)):
            assert not fut.done() and time.monotonic() < deadline, "the request never decoded directly"
            time.sleep(0.001)
        ((rid, src),) = running.items()

        async def go():
            return await cluster.svc.migrate(rid, _other(src))

        outcome = cluster.on_loop(go())
        got = fut.result(CALL_S)
    assert outcome.migrated, outcome
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.finish.reason == ref.finish.reason
    assert len(got.token_ids) == params.max_tokens
    # the client took tokens from the source, then resumed through the router (ResumeDirect)
    (resumed,) = [r for r in cluster.resumes if r[0] == rid]
    assert max(known, 1) <= resumed[1] < params.max_tokens, resumed
    # then streamed straight from the destination: attached there, the router not relaying
    assert [w for w, r in cluster.attached if r == rid] == [src, _other(src)]
    assert (
        cluster.metric("pdserve_router_migrations_total", reason="manual", result="migrated")
        == moved_before + 1
    )
    assert cluster.metric("pdserve_router_migration_blocks_copied_total") > 0
    cluster.wait_no_blocks()


def test_drain_empties_a_decode_worker_of_direct_streams_while_they_continue(cluster, client) -> None:
    n = 6
    params = SamplingParams(max_tokens=320, temperature=0.0, ignore_eos=True)
    prompts = [_prompt(100 + i) for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        refs = list(ex.map(lambda p: client.complete(p, params), prompts))
    cluster.wait_no_blocks()
    drained_before = cluster.metric("pdserve_router_migrations_total", reason="drain", result="migrated")
    with ThreadPoolExecutor(n) as ex:
        futs = [ex.submit(client.complete, p, params) for p in prompts]
        deadline = time.monotonic() + CALL_S
        while len(running := _direct_decoding(cluster, 4)) < n:
            assert time.monotonic() < deadline and not any(f.done() for f in futs), "streams did not start"
            time.sleep(0.002)
        counts = {w: list(running.values()).count(w) for w in cluster.workers}
        victim = max(counts, key=lambda w: counts[w])
        report = cluster.on_loop(drain_decode_worker(cluster.svc, victim, timeout_s=60, poll_s=0.01))
        still_running = sum(not f.done() for f in futs)
        on_victim = [r for r, d in cluster.svc.running().items() if d.m.decode_id == victim]
        got = [f.result(CALL_S) for f in futs]
    assert report.drained and report.remaining == 0 and on_victim == [], report
    assert report.migrated == counts[victim] >= 1 and report.aborted == 0, report
    assert still_running >= 1  # the drain did not wait for them to finish
    assert cluster.used_blocks()[victim] == 0
    for r, g in zip(refs, got, strict=True):
        assert g.token_ids == r.token_ids and g.text == r.text
    assert (
        cluster.metric("pdserve_router_migrations_total", reason="drain", result="migrated")
        == drained_before + counts[victim]
    )
    moved = {r for r, w in running.items() if w == victim}
    assert moved <= {r for r, _ in cluster.resumes}  # each moved stream resumed through the router
    cluster.registry.get(victim).draining = False
    cluster.wait_no_blocks()


def _migrate_mid_way(cluster: _Cluster, client: Client, prompt: list[int], params: SamplingParams):
    """Run ``prompt`` and migrate it once the router knows 4 of its tokens: (result, request
    id, source, outcome)."""
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(client.complete, prompt, params)
        deadline = time.monotonic() + CALL_S
        while not (running := _direct_decoding(cluster, 4)):
            assert not fut.done() and time.monotonic() < deadline, "the request never decoded directly"
            time.sleep(0.001)
        ((rid, src),) = running.items()

        async def go():
            return await cluster.svc.migrate(rid, _other(src))

        outcome = cluster.on_loop(go())
        return fut.result(CALL_S), rid, src, outcome


def test_a_destination_without_direct_streams_relays_the_rest(cluster, client) -> None:
    prompt = _prompt(3)
    ref = client.complete(prompt, GREEDY)
    dests = {n: w.svc for n, w in cluster.workers.items()}
    saved = {n: s.direct for n, s in dests.items()}
    # the destination's Decode / ResumeStream see no direct streams (its Attach still serves the
    # source's client): it refuses the grant, and the router relays from the client's index
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(client.complete, prompt, GREEDY)
        deadline = time.monotonic() + CALL_S
        while not (running := _direct_decoding(cluster, 4)):
            assert not fut.done() and time.monotonic() < deadline, "the request never decoded directly"
            time.sleep(0.001)
        ((rid, src),) = running.items()
        dests[_other(src)].direct = None
        try:

            async def go():
                return await cluster.svc.migrate(rid, _other(src))

            outcome = cluster.on_loop(go())
            got = fut.result(CALL_S)
        finally:
            for n, s in dests.items():
                s.direct = saved[n]
    assert outcome.migrated, outcome
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert [w for w, r in cluster.attached if r == rid] == [src]  # never attached to the destination
    cluster.wait_no_blocks()


def test_a_migrated_direct_stream_ends_on_a_stop_string_matched_on_the_destination(cluster, client) -> None:
    """The stop string is taken from the unmigrated run's text, after the migration point: the
    destination renders the text (continuing the client's) and ends the request on it."""
    prompt = _prompt(4)
    full = client.complete(prompt, GREEDY)
    text = full.text
    at = len(text) // 2  # well after the migration point (the router knows 4 tokens then)
    stop = next(
        (
            text[i : i + n]
            for i in range(at, len(text))
            for n in range(1, 13)
            if i + n <= len(text)
            and text[i : i + n].strip()
            and "\ufffd" not in text[i : i + n]
            and text.find(text[i : i + n]) == i
        ),
        None,
    )
    assert stop is not None, f"no stop string found in the reference text {text!r}"
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, stop=(stop,))
    ref = client.complete(prompt, params)
    assert ref.finish.reason == "stop" and ref.finish.stop == stop and ref.text == text[: text.find(stop)]
    got, rid, src, outcome = _migrate_mid_way(cluster, client, prompt, params)
    assert outcome.migrated, outcome
    assert got.text == ref.text and got.token_ids == ref.token_ids
    assert got.finish.reason == ref.finish.reason and got.finish.stop == stop
    assert [w for w, r in cluster.attached if r == rid] == [src, _other(src)]
    cluster.wait_no_blocks()


def test_a_direct_stream_migrated_twice_streams_from_each_destination(cluster, client) -> None:
    """Moved to the other worker, then back while it streams from there (its resumed stream
    ended at the switch like a Decode's): the client attaches to each in turn, output identical."""
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    prompt = _prompt(5)
    ref = client.complete(prompt, params)

    def direct_on(rid: str, worker: str, min_tokens: int) -> bool:
        d = cluster.svc.running().get(rid)
        legs = d.legs if d is not None else None
        return (
            d is not None
            and d.state is State.DECODING
            and legs._direct
            and legs._redirect is not None
            and legs._redirect.worker_id == worker
            and len(legs.run.out_ids) >= min_tokens
        )

    async def move(rid: str, to: str):
        return await cluster.svc.migrate(rid, to)

    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(client.complete, prompt, params)
        deadline = time.monotonic() + CALL_S
        while not (running := _direct_decoding(cluster, 4)):
            assert not fut.done() and time.monotonic() < deadline, "the request never decoded directly"
            time.sleep(0.001)
        ((rid, src),) = running.items()
        first = cluster.on_loop(move(rid, _other(src)))
        known = len(cluster.svc.running()[rid].legs.run.out_ids)
        while not direct_on(rid, _other(src), known + 4):
            assert not fut.done() and time.monotonic() < deadline, "never streamed from the destination"
            time.sleep(0.001)
        second = cluster.on_loop(move(rid, src))
        got = fut.result(CALL_S)
    assert first.migrated and second.migrated, (first, second)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert [w for w, r in cluster.attached if r == rid] == [src, _other(src), src]
    assert len([r for r in cluster.resumes if r[0] == rid]) == 2
    cluster.wait_no_blocks()
