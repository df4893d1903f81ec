"""Live migration end to end through the router (router/lifecycle/grpc_migrator.py,
router/drain.py) with real decode workers on 127.0.0.1 (the tiny random Llama, SmolLM2's
tokenizer for the router), a real gRPC client and the router's own MigrateOut / ResumeStream
path.

One cluster serves the module: an in-process router (colocated placement: each request runs
whole on a decode worker, so no prefill worker or store is needed; the migration path is the
same as after a handoff) and two in-process decode workers. The tests:

* a stream migrated mid-way has greedy and seeded output (tokens and text) identical to an
  unmigrated run, and the migration is counted with its downtime and blocks;
* 32 concurrent streams with random migrations between the two workers are all identical to
  their unmigrated runs, and afterwards neither worker holds a block (their Stats);
* a drain empties a decode worker by migration while its streams continue, and they finish
  identical to unmigrated runs; the same through the router's Admin service (`pdserve drain
  WORKER --router ADDR`, clusters started without Ray), and ResumeWorker routes to it again.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.metrics import RouterMetrics
from pdserve.v1 import client_pb2
from router.drain import drain_decode_worker
from router.lifecycle.states import State
from router.policy import PolicyKind
from router.registry import WorkerLoad
from router.service import GenerateServicer, RouterConfig
from tests.integration.clusters import (
    IN_PROC_BLOCK_SIZE,
    IN_PROC_BLOCKS,
    IN_PROC_MODEL_ID,
    InProcCluster,
    random_prompt,
)

BLOCKS, BLOCK_SIZE = IN_PROC_BLOCKS, IN_PROC_BLOCK_SIZE  # the workers' KV
GREEDY = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=96, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
CALL_S = 120.0
ATTEMPTS = 3  # a migration the stream outran is retried (see the first test)
# each engine step lasts at least this long while a test acts on running streams (migrate, drain,
# rebalance): the tiny model decodes a step in ~1.5 ms, so 88 tokens left gave a loaded host's
# MigrateOut ~0.15 s; paced, >= 0.9 s. Only that window is paced (InProcCluster.paced).
PACE_S = 0.01


class _Cluster(InProcCluster):
    """The in-process router (colocated placement, migration on, Admin service with drains)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        cfg = RouterConfig(model_path=str(path), model_id=IN_PROC_MODEL_ID, policy=PolicyKind.COLOCATED)
        self.svc = GenerateServicer(self.registry, cfg, RouterMetrics(self.metrics_registry))
        assert self.svc.migrator is not None  # migration is on by default
        from router.admin_service import ADMIN_SERVICE, AdminServicer
        from router.drainer import WorkerDrains

        self.drains = WorkerDrains(self.svc, self.registry, lambda: self.server.loop)
        self.serve(
            [
                (client_pb2.DESCRIPTOR.services_by_name["Generate"], self.svc),
                (ADMIN_SERVICE, AdminServicer(self.registry, IN_PROC_MODEL_ID, drains=self.drains)),
            ]
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm_path):
    with _Cluster.on_tiny_llama(tmp_path_factory.mktemp("mig"), smollm_path) as cl:
        yield cl


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout=CALL_S) as c:
        yield c


def _prompt(i: int) -> list[int]:
    return random_prompt(1000, i)


def _decoding(cluster: _Cluster, min_tokens: int) -> dict[str, str]:
    """Requests decoding now with at least ``min_tokens`` output tokens: id -> decode worker."""
    out = {}
    for rid, d in cluster.svc.running().items():
        if d.state is State.DECODING and len(d.legs.run.out_ids) >= min_tokens:
            out[rid] = d.m.decode_id
    return out


def _busiest_once_decoding(cluster: _Cluster, futs: list) -> tuple[dict[str, int], str]:
    """Wait until every stream of ``futs`` decodes (4+ tokens); (streams per worker, the worker
    with most of them)."""
    deadline = time.monotonic() + CALL_S
    while len(running := _decoding(cluster, 4)) < len(futs):
        assert time.monotonic() < deadline and not any(f.done() for f in futs), "streams did not start"
        time.sleep(0.002)
    counts = {w: list(running.values()).count(w) for w in cluster.workers}
    return counts, max(counts, key=lambda w: counts[w])


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_stream_migrated_mid_way_equals_the_unmigrated_run(cluster, client, params) -> None:
    """A stream can finish on its source while MigrateOut is in flight (a loaded host: the
    source decodes the rest before it handles the call); the migration is then rightly
    ``abandoned`` and the output still equals the reference. Such an attempt is repeated (at
    most ``ATTEMPTS``); one of them must migrate."""
    prompt = _prompt(1)
    ref = client.complete(prompt, params)
    assert len(ref.token_ids) == params.max_tokens
    outcomes = []
    for _ in range(ATTEMPTS):
        moved_before = cluster.metric("pdserve_router_migrations_total", reason="manual", result="migrated")
        downtime_before = cluster.metric("pdserve_router_migration_downtime_seconds_count")
        with ThreadPoolExecutor(1) as ex:
            with cluster.paced(PACE_S):  # still decoding when MigrateOut arrives
                fut = ex.submit(client.complete, prompt, params)
                deadline = time.monotonic() + CALL_S
                while not (running := _decoding(cluster, 8)):
                    assert not fut.done() and time.monotonic() < deadline, "the request never decoded"
                    time.sleep(0.001)
                ((rid, src),) = running.items()
                outcome = cluster.migrate(rid, cluster.other(src))
            got = fut.result(CALL_S)
        outcomes.append(outcome)
        assert got.token_ids == ref.token_ids and got.text == ref.text
        assert got.finish.reason == ref.finish.reason
        cluster.wait_no_blocks()
        if not outcome.migrated:
            assert outcome.result == "abandoned", outcome  # the request ended first: try again
            continue
        assert (
            cluster.metric("pdserve_router_migrations_total", reason="manual", result="migrated")
            == moved_before + 1
        )
        assert cluster.metric("pdserve_router_migration_downtime_seconds_count") == downtime_before + 1
        assert cluster.metric("pdserve_router_migration_blocks_copied_total") > 0
        break
    assert outcomes[-1].migrated, outcomes


def test_32_concurrent_streams_with_random_migrations(cluster, client) -> None:
    n = 32
    params = [GREEDY if i % 2 == 0 else SEEDED for i in range(n)]
    prompts = [_prompt(10 + i) for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        refs = list(ex.map(lambda i: client.complete(prompts[i], params[i]), range(n)))
    cluster.wait_no_blocks()
    rng = random.Random(7)
    outcomes = []
    pacing = cluster.paced(PACE_S)  # until 4 have migrated: the streams outlast their migrations
    with ThreadPoolExecutor(n) as ex, pacing:
        futs = [ex.submit(client.complete, prompts[i], params[i]) for i in range(n)]
        deadline = time.monotonic() + CALL_S
        tried: set[str] = set()
        while not all(f.done() for f in futs) and time.monotonic() < deadline:
            cands = {r: w for r, w in _decoding(cluster, 2).items() if r not in tried}
            if cands:
                picks = rng.sample(sorted(cands), k=min(len(cands), rng.randint(1, 4)))

                async def start(picks=picks, cands=cands):
                    futs_ = []
                    for r in picks:
                        try:
                            futs_.append(cluster.svc.migrate(r, cluster.other(cands[r])))
                        except Exception as e:  # noqa: BLE001 - it finished or moved meanwhile
                            futs_.append(asyncio.get_running_loop().create_future())
                            futs_[-1].set_result(e)
                    return await asyncio.gather(*futs_)

                outcomes += cluster.on_loop(start())
                tried.update(picks)
                if sum(getattr(o, "migrated", False) for o in outcomes) >= 4:
                    pacing.end()  # the rest at full speed
            time.sleep(rng.uniform(0.0, 0.02))
        got = [f.result(CALL_S) for f in futs]
    for i, (r, g) in enumerate(zip(refs, got, strict=True)):
        assert g.token_ids == r.token_ids, f"stream {i} differs from its unmigrated run"
        assert g.text == r.text, f"stream {i}'s text differs"
    moved = [o for o in outcomes if getattr(o, "migrated", False)]
    assert len(moved) >= 4, [getattr(o, "result", o) for o in outcomes]
    cluster.wait_no_blocks()
    assert cluster.svc.migrations.in_flight() == frozenset()


def test_drain_empties_a_decode_worker_while_its_streams_continue(cluster, client) -> None:
    n = 6
    params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    prompts = [_prompt(100 + i) for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        refs = list(ex.map(lambda p: client.complete(p, params), prompts))
    drained_before = cluster.metric("pdserve_router_migrations_total", reason="drain", result="migrated")
    with ThreadPoolExecutor(n) as ex:
        with cluster.paced(PACE_S):  # each stream counted on the victim is still there to migrate
            futs = [ex.submit(client.complete, p, params) for p in prompts]
            counts, victim = _busiest_once_decoding(cluster, futs)
            assert counts[victim] >= 1
            report = cluster.on_loop(drain_decode_worker(cluster.svc, victim, timeout_s=60, poll_s=0.01))
            # drained while the streams still run: nothing of this router decodes there any more
            still_running = sum(not f.done() for f in futs)
            on_victim = [r for r, d in cluster.svc.running().items() if d.m.decode_id == victim]
        got = [f.result(CALL_S) for f in futs]
    assert report.drained and report.remaining == 0 and on_victim == [], report
    assert report.migrated == counts[victim] and report.aborted == 0, report
    assert still_running >= 1  # the drain did not wait for them to finish
    assert cluster.used_blocks()[victim] == 0
    for r, g in zip(refs, got, strict=True):
        assert g.token_ids == r.token_ids and g.text == r.text
    assert (
        cluster.metric("pdserve_router_migrations_total", reason="drain", result="migrated")
        == drained_before + counts[victim]
    )
    cluster.wait_no_blocks()
    # the drained worker gets no new request
    cluster.registry.get(victim).draining = True
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(client.complete, _prompt(999), GREEDY)
        deadline = time.monotonic() + CALL_S
        seen: set[str] = set()
        while not fut.done() and time.monotonic() < deadline:
            seen |= set(_decoding(cluster, 0).values())
            time.sleep(0.002)
        fut.result(CALL_S)
    assert victim not in seen
    cluster.registry.get(victim).draining = False


def test_drain_through_the_admin_service_while_streams_continue(cluster, client) -> None:
    """`pdserve drain WORKER --router ADDR` (drain_via_routers -> Admin.Drain / DrainStatus):
    the worker is emptied by migration while its streams run, outputs identical; ResumeWorker
    routes to it again; an unknown worker is reported as not found."""
    from pdserve.drain_cli import drain_via_routers
    from pdserve.security import SecurityConfig, TLSMode
    from pdserve.v1 import admin_pb2, admin_pb2_grpc

    plain = SecurityConfig(tls=TLSMode.OFF)  # loopback, no token: the Admin service is open here
    n = 4
    params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    prompts = [_prompt(300 + i) for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        refs = list(ex.map(lambda p: client.complete(p, params), prompts))
    with ThreadPoolExecutor(n) as ex:
        with cluster.paced(PACE_S):  # each stream counted on the victim is still there to migrate
            futs = [ex.submit(client.complete, p, params) for p in prompts]
            counts, victim = _busiest_once_decoding(cluster, futs)
            out = drain_via_routers([cluster.address], victim, 60.0, poll_s=0.01, config=plain)
            still_running = sum(not f.done() for f in futs)
        got = [f.result(CALL_S) for f in futs]
    assert out["found"] and out["drained"] and out["inflight"] == 0, out
    assert out["reports"][0]["migrated"] == counts[victim] and out["reports"][0]["aborted"] == 0, out
    assert still_running >= 1  # the drain did not wait for them to finish
    for r, g in zip(refs, got, strict=True):
        assert g.token_ids == r.token_ids and g.text == r.text
    assert cluster.registry.get(victim).draining
    assert not drain_via_routers([cluster.address], "nope", 5.0, config=plain)["found"]
    from pdserve.security import internal_channel

    with internal_channel(cluster.address, plain) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        assert stub.ResumeWorker(admin_pb2.ResumeWorkerRequest(worker_id=victim), timeout=10).found
    assert not cluster.registry.get(victim).draining and victim not in cluster.drains.draining
    cluster.wait_no_blocks()


def test_the_rebalancer_moves_streams_off_a_loaded_worker(cluster, client) -> None:
    """The rebalancing loop on the router's event loop (as ``python -m router
    --rebalance-interval-s`` runs it): dec-a reports most of its blocks used, dec-b none; it
    moves streams to dec-b (reason load_balance) and they finish identical to unmigrated runs."""
    from router.policy.migration import MigrationConfig
    from router.rebalancer import RebalanceConfig, Rebalancer

    n = 4
    params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    prompts = [_prompt(200 + i) for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        refs = list(ex.map(lambda p: client.complete(p, params), prompts))
    cluster.wait_no_blocks()
    before = cluster.metric("pdserve_router_migrations_total", reason="load_balance", result="migrated")
    a, b = cluster.registry.get("dec-a"), cluster.registry.get("dec-b")
    b.draining = True  # every stream starts on dec-a
    rb = Rebalancer(
        cluster.svc,
        RebalanceConfig(interval_s=0.01, max_concurrent=2, policy=MigrationConfig(balance_threshold=8.0)),
    )
    moved = lambda: cluster.metric(  # noqa: E731
        "pdserve_router_migrations_total", reason="load_balance", result="migrated"
    )
    try:
        with ThreadPoolExecutor(n) as ex:
            with cluster.paced(PACE_S):  # the streams outlast the rebalancer's first move
                futs = [ex.submit(client.complete, p, params) for p in prompts]
                deadline = time.monotonic() + CALL_S
                while len(_decoding(cluster, 2)) < n:
                    assert time.monotonic() < deadline and not any(f.done() for f in futs), (
                        "streams did not start"
                    )
                    time.sleep(0.002)
                assert set(_decoding(cluster, 0).values()) == {"dec-a"}
                b.draining = False
                a.load = WorkerLoad(n, 0, BLOCKS, 200, block_size=BLOCK_SIZE)  # as its heartbeat would say
                rb.start(cluster.server.loop)
                while moved() < before + 1 and not all(f.done() for f in futs):
                    assert time.monotonic() < deadline, "the rebalancer moved nothing"
                    time.sleep(0.002)
            got = [f.result(CALL_S) for f in futs]
    finally:
        rb.stop()
        a.load = WorkerLoad(0, 0, BLOCKS, 0, block_size=BLOCK_SIZE)
        b.draining = False
    for r, g in zip(refs, got, strict=True):
        assert g.token_ids == r.token_ids and g.text == r.text
    assert moved() >= before + 1
    cluster.wait_no_blocks()
    assert cluster.svc.migrations.in_flight() == frozenset()
