"""Request ids and structured logs (pdserve.tracing), and the measured/traced service edges:
the router's Generate wrapper and relay, the KV store servicer (in-process gRPC on loopback) and
the decode worker's KV pull (fake engine loop and transports)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry

from decode_worker.puller import StorePuller
from decode_worker.service import DecodeServicer
from engine.block_hash import chain_hashes
from engine.outputs import RequestOutput
from engine.request import FinishReason
from kv_store.client import KVStoreClient
from kv_store.convert import handle_to_proto
from kv_store.handle import BlockLocation, KVHandle
from kv_store.layout import KVLayout
from kv_store.service import StoreServer, serve
from kv_store.store import StoreConfig
from kv_store.transport import AutoTransport, FakeTransport, ShmTransport
from pdserve.auth import EdgeAuth
from pdserve.errors import (
    DeadlineExceededError,
    RequestNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from pdserve.limits import grpc_options
from pdserve.metrics import PULL_FAILURE_REASONS, KVPullMetrics, RouterMetrics, StoreMetrics
from pdserve.tracing import (
    JsonFormatter,
    current_request_id,
    log_event,
    request_scope,
    traced_channel,
)
from pdserve.v1 import client_pb2, common_pb2, worker_pb2
from pdserve.worker_base import Role
from router.lifecycle.grpc_legs import GrpcLegs
from router.lifecycle.grpc_legs import RequestRun as _Run
from router.registry import Registry
from router.service import GenerateServicer

log = logging.getLogger("pdserve.test.tracing")


# ---------------------------------------------------------------------------- tracing
def test_request_scope_nests_and_restores():
    assert current_request_id() == ""
    with request_scope("outer"):
        with request_scope("inner"):
            assert current_request_id() == "inner"
        assert current_request_id() == "outer"
    assert current_request_id() == ""


def test_request_scope_is_per_thread():
    seen: list[str] = []
    with request_scope("main"):
        t = threading.Thread(target=lambda: seen.append(current_request_id()))
        t.start()
        t.join()
    assert seen == [""]


def test_request_scope_in_a_generator_closed_in_another_thread_does_not_raise():
    def gen() -> Iterator[int]:
        with request_scope("g"):
            yield 1

    g = gen()
    started = threading.Thread(target=lambda: next(g))  # bound in that thread, not in ours
    started.start()
    started.join()
    errors: list[BaseException] = []

    def close() -> None:
        try:
            g.close()
        except BaseException as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    t = threading.Thread(target=close)
    t.start()
    t.join()
    assert errors == [] and current_request_id() == ""


def _format(record: logging.LogRecord, component: str = "router") -> dict:
    return json.loads(JsonFormatter(component).format(record))


def test_json_formatter_carries_request_id_and_fields(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    with request_scope(""):  # no id bound here, whatever an earlier test left in this thread
        with request_scope("req-1"):
            log_event(log, "prefill done", cached_tokens=16, queue_s=0.001)
            log.info("plain %s", "line")
        log_event(log, "explicit", request_id="req-2")
        log_event(log, "no id")
        # only this logger's records: threads left by other tests may log to the root logger meanwhile
        done, plain, explicit, none = (_format(r) for r in caplog.records if r.name == log.name)
    assert done == {
        "ts": done["ts"],
        "level": "info",
        "component": "router",
        "logger": log.name,
        "msg": "prefill done",
        "request_id": "req-1",
        "cached_tokens": 16,
        "queue_s": 0.001,
    }
    assert plain["msg"] == "plain line" and "request_id" not in plain  # formatted outside the scope
    assert explicit["request_id"] == "req-2"
    assert "request_id" not in none


def test_json_formatter_leaves_out_private_attributes():
    """Ray's record factory stamps ``_ray_timestamp_ns`` on every record once ray.init ran."""
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
    rec._ray_timestamp_ns = 123
    rec.tokens = 4
    out = _format(rec)
    assert out["tokens"] == 4 and not any(k.startswith("_") for k in out), out


def test_json_formatter_reads_the_bound_id_when_formatting_in_scope():
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello", (), None)
    with request_scope("req-9"):
        out = _format(rec, "kv0")
    assert out["request_id"] == "req-9" and out["level"] == "warning" and out["component"] == "kv0"


def test_json_formatter_renders_exceptions_and_odd_values():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    rec.obj = object()
    out = _format(rec)
    assert "ValueError: boom" in out["exc"] and out["obj"].startswith("<object")


# ---------------------------------------------------------------------------- router edge
def _servicer(gen) -> tuple[GenerateServicer, CollectorRegistry]:
    reg = CollectorRegistry()
    svc = GenerateServicer.__new__(GenerateServicer)  # only the Generate wrapper is exercised
    svc.metrics = RouterMetrics(reg)
    svc.config = SimpleNamespace(stall_timeout_s=30.0, model_id="m")  # type: ignore[assignment]
    svc.edge = EdgeAuth(None)  # dev mode: no API keys
    svc._generate = gen  # type: ignore[method-assign]
    return svc, reg


class _GenCtx:
    """The part of ``grpc.aio.ServicerContext`` the Generate wrapper uses; ``written``: responses."""

    def __init__(self) -> None:
        self.written: list[client_pb2.GenerateResponse] = []

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()

    async def write(self, msg: client_pb2.GenerateResponse) -> None:
        self.written.append(msg)


def _generate(svc: GenerateServicer, req: client_pb2.GenerateRequest) -> list[client_pb2.GenerateResponse]:
    """Run the (async) Generate to its end on a fresh event loop; the responses it wrote."""
    ctx = _GenCtx()
    asyncio.run(svc.Generate(req, ctx))  # type: ignore[arg-type]
    return ctx.written


def _final(rid: str) -> client_pb2.GenerateResponse:
    r = client_pb2.GenerateResponse(request_id=rid, token_ids=[7])
    r.finish.usage.prompt_tokens = 33
    r.finish.usage.cached_prompt_tokens = 16
    r.finish.usage.completion_tokens = 3
    t = r.finish.timing
    t.ttft_s, t.e2e_s, t.queue_s, t.prefill_s, t.transfer_s, t.decode_s = 0.1, 0.3, 0.01, 0.08, 0.01, 0.2
    t.kv_pull_s = 0.004  # the decode-side part of transfer_s
    t.token_times_s.extend([0.1, 0.2, 0.3])
    return r


def _req(ttft_s: float = 0.0, tpot_s: float = 0.0, request_id: str = "") -> client_pb2.GenerateRequest:
    return client_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=client_pb2.TokenIds(ids=[1, 2, 3]),  # the edge admits only a real input
        slo=common_pb2.SLO(ttft_s=ttft_s, tpot_s=tpot_s),
    )


def test_generate_wrapper_records_a_completed_request(caplog):
    caplog.set_level(logging.INFO, logger="router.service")
    seen_ids: list[str] = []

    async def gen(req, ctx, lease_ttl_s=0.0):
        seen_ids.append(current_request_id())
        yield client_pb2.GenerateResponse(request_id=req.request_id, token_ids=[5])
        yield _final(req.request_id)

    svc, reg = _servicer(gen)
    req = _req(ttft_s=0.2, tpot_s=0.15)
    out = _generate(svc, req)
    assert len(out) == 2 and req.request_id and seen_ids == [req.request_id]  # id assigned and bound
    g = reg.get_sample_value
    assert g("pdserve_router_requests_total", {"slo_class": "interactive", "outcome": "ok"}) == 1
    assert g("pdserve_router_slo_requests_total", {"slo_class": "interactive", "result": "met"}) == 1
    assert g("pdserve_router_tpot_seconds_sum", {"slo_class": "interactive"}) == pytest.approx(0.1)
    assert g("pdserve_request_phase_seconds_sum", {"phase": "decode", "slo_class": "interactive"}) == 0.2
    # transfer is observed as the whole handoff (publish + pull), as the final message carries it
    assert g("pdserve_request_phase_seconds_sum", {"phase": "transfer", "slo_class": "interactive"}) == 0.01
    assert g("pdserve_router_prefix_hit_tokens_total", {}) == 16
    assert g("pdserve_router_inflight_requests", {}) == 0
    (done,) = [r for r in caplog.records if r.getMessage() == "request done"]
    assert done.request_id == req.request_id and done.slo_met is True and done.decode_s == 0.2
    assert done.transfer_s == 0.01 and done.kv_pull_s == 0.004


def test_generate_wrapper_keeps_the_client_request_id():
    async def gen(req, ctx, lease_ttl_s=0.0):
        yield _final(req.request_id)

    svc, _ = _servicer(gen)
    req = _req(request_id="client-id-1")
    assert [r.request_id for r in _generate(svc, req)] == ["client-id-1"]


def test_generate_wrapper_records_a_rejection_as_slo_miss(caplog):
    caplog.set_level(logging.INFO, logger="router.service")

    async def gen(req, ctx, lease_ttl_s=0.0):
        raise ResourceExhaustedError("no pair meets the SLO", retry_after_s=1.0)
        yield  # pragma: no cover

    svc, reg = _servicer(gen)
    with pytest.raises(ResourceExhaustedError):
        _generate(svc, _req(ttft_s=2.0))
    g = reg.get_sample_value
    assert g("pdserve_router_requests_total", {"slo_class": "standard", "outcome": "rejected"}) == 1
    assert g("pdserve_router_slo_requests_total", {"slo_class": "standard", "result": "missed"}) == 1
    assert g("pdserve_router_inflight_requests", {}) == 0
    (failed,) = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert failed.outcome == "rejected" and failed.error == "ResourceExhaustedError"


def test_generate_wrapper_counts_client_cancellation():
    async def ends_early(req, ctx, lease_ttl_s=0.0):
        yield client_pb2.GenerateResponse(request_id=req.request_id, token_ids=[5])

    async def long(req, ctx, lease_ttl_s=0.0):
        while True:
            yield client_pb2.GenerateResponse(request_id=req.request_id, token_ids=[5])
            await asyncio.sleep(0.001)

    svc, reg = _servicer(ends_early)
    _generate(svc, _req())  # stream ended without a finish: the client went away
    svc2, reg2 = _servicer(long)

    async def cancelled_after_one() -> None:
        ctx = _GenCtx()
        task = asyncio.ensure_future(svc2.Generate(_req(), ctx))  # type: ignore[arg-type]
        while not ctx.written:
            await asyncio.sleep(0.001)
        assert reg2.get_sample_value("pdserve_router_inflight_requests", {}) == 1
        task.cancel()  # grpc.aio cancels the handler's task when the client cancels
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_after_one())
    for r in (reg, reg2):
        assert (
            r.get_sample_value(
                "pdserve_router_requests_total", {"slo_class": "default", "outcome": "cancelled"}
            )
            == 1
        )
        assert (
            r.get_sample_value(
                "pdserve_router_slo_requests_total", {"slo_class": "default", "result": "missed"}
            )
            == 0
        )
        assert r.get_sample_value("pdserve_router_inflight_requests", {}) == 0


# ---------------------------------------------------------------------------- KV store edge
L = KVLayout("m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4)  # 256 B blocks


@pytest.fixture
def node() -> Iterator[tuple[StoreServer, CollectorRegistry, KVStoreClient]]:
    reg = CollectorRegistry()
    srv = serve(StoreConfig("node-m", L, capacity_blocks=8), metrics=StoreMetrics(reg, "node-m"))
    ch = traced_channel(grpc.insecure_channel(srv.address, options=grpc_options()))
    client = KVStoreClient(srv.address, timeout_s=10, channel=ch)
    yield srv, reg, client
    client.close()
    ch.close()
    srv.stop(0)


def test_store_edge_counts_transfers_by_transport_and_logs_request_ids(node, caplog):
    srv, reg, client = node
    caplog.set_level(logging.INFO, logger="kv_store.service")
    hs = chain_hashes(list(range(3 * L.block_size)), L.block_size, "m")
    data = [os.urandom(L.block_nbytes) for _ in hs]
    with request_scope("req-42"):
        res = client.put_blocks(L, hs, data, lease_ttl_s=5.0)
        assert client.release(res.lease_id)
    assert client.get_blocks(L, hs[:2]) == data[:2]
    assert client.lookup(hs + chain_hashes(list(range(99, 103)), L.block_size, "m")).num_prefix_blocks == 3
    shm = ShmTransport(release_delay_s=0)
    loc = srv.store.location
    with shm.fetch(BlockLocation(loc.node_id, loc.address, loc.shm_name, loc.host_id), L, hs) as got:
        assert [bytes(v) for v in got.views] == data
    shm.close()
    with pytest.raises(RequestNotFoundError):
        client.get_blocks(L, chain_hashes(list(range(50, 54)), L.block_size, "m"))

    g = reg.get_sample_value
    n = {"node_id": "node-m"}
    nb = L.block_nbytes
    assert g("pdserve_kv_transfer_bytes_total", {**n, "transport": "grpc", "direction": "in"}) == 3 * nb
    assert g("pdserve_kv_transfer_blocks_total", {**n, "transport": "grpc", "direction": "in"}) == 3
    assert g("pdserve_kv_transfer_bytes_total", {**n, "transport": "grpc", "direction": "out"}) == 2 * nb
    assert g("pdserve_kv_transfer_bytes_total", {**n, "transport": "shm", "direction": "out"}) == 3 * nb
    assert g("pdserve_kv_transfer_seconds_count", {**n, "transport": "shm", "op": "lease"}) == 1
    assert g("pdserve_kv_transfer_seconds_count", {**n, "transport": "grpc", "op": "get"}) == 2
    assert g("pdserve_kv_transfer_failures_total", {**n, "transport": "grpc", "op": "get"}) == 1
    assert g("pdserve_kv_transfer_failures_total", {**n, "transport": "grpc", "op": "put"}) == 0
    assert g("pdserve_kv_lookup_blocks_total", {**n, "result": "hit"}) == 3
    assert g("pdserve_kv_lookup_blocks_total", {**n, "result": "miss"}) == 1
    assert g("pdserve_kv_blocks", {**n, "state": "stored"}) == 3  # node state read at scrape time
    assert g("pdserve_kv_capacity_blocks", n) == 8
    assert g("pdserve_kv_leases", n) == 0

    put = [r for r in caplog.records if r.getMessage() == "kv put"]
    rel = [r for r in caplog.records if r.getMessage() == "kv release"]
    assert [(r.request_id, r.blocks, r.stored) for r in put] == [("req-42", 3, 3)]
    assert [(r.request_id, r.released) for r in rel if r.lease_id == res.lease_id] == [("req-42", True)]


# ---------------------------------------------------------------------------- router relay
class _Detok:
    """Stands in for IncrementalDetokenizer: renders nothing, matches no stop string."""

    def add(self, ids, final=False):
        return "", None


async def _decode_stream(pull_s: float, gap_s: float) -> AsyncIterator[worker_pb2.DecodeResponse]:
    """A decode worker's stream (async, as a ``grpc.aio`` call): the KV pull (``pull_s``,
    reported on the first message), then two messages ``gap_s`` apart, the last one finishing."""
    await asyncio.sleep(pull_s)
    yield worker_pb2.DecodeResponse(request_id="r", token_ids=[5], kv_pull_s=pull_s)
    await asyncio.sleep(gap_s)
    last = worker_pb2.DecodeResponse(request_id="r", token_ids=[6])
    last.finish.reason = common_pb2.FINISH_REASON_LENGTH
    yield last


def _relayed(
    stream: AsyncIterator[worker_pb2.DecodeResponse], run: _Run
) -> list[client_pb2.GenerateResponse]:
    """Everything the relay (GrpcLegs.stream + render) sends the client for ``stream`` (only the
    relay and its Finish are exercised)."""
    svc = GenerateServicer.__new__(GenerateServicer)
    svc.registry = Registry()  # the relay counts each message as the worker's proof of life
    svc._streamed_at = {}  # when each worker last streamed a message (stall sparing)
    svc.tokenizer = None  # the fake messages carry no text: the router renders nothing
    legs = GrpcLegs(svc, None, run, None)  # type: ignore[arg-type]

    async def collect() -> list[client_pb2.GenerateResponse]:
        worker = SimpleNamespace(worker_id="d0")
        out = []
        async for chunk in legs.stream(stream, worker, len(run.out_ids)):  # type: ignore[arg-type]
            resp, done = legs.render(chunk, 0)
            out.append(resp)
            if done:
                break
        return out

    return asyncio.run(collect())


def test_relay_adds_the_decode_side_pull_to_transfer_and_leaves_it_out_of_decode():
    run = _Run("r", [1, 2, 3], None, time.monotonic(), _Detok())  # type: ignore[arg-type]
    run.pre_timing = common_pb2.Timing(queue_s=0.001, prefill_s=0.02, transfer_s=0.003)
    run.token_times.append(0.03)  # the first token, sampled by the prefill worker
    run.out_ids.append(4)
    run.detok_fed = 1  # the router's detokenizer already has the first token
    t0 = time.monotonic()
    out = _relayed(_decode_stream(0.2, 0.05), run)
    wall = time.monotonic() - t0
    t = out[-1].finish.timing
    assert t.kv_pull_s == pytest.approx(0.2)
    assert t.transfer_s == pytest.approx(0.003 + 0.2)  # publish + pull: the whole handoff
    assert 0.05 <= t.decode_s <= wall - 0.2 + 1e-6  # the relay's time without the pull
    assert (t.queue_s, t.prefill_s) == pytest.approx((0.001, 0.02))
    assert out[-1].finish.usage.completion_tokens == 3


def test_relay_without_handoff_reports_no_pull():
    run = _Run("r", [1, 2, 3], None, time.monotonic(), _Detok())  # type: ignore[arg-type]
    out = _relayed(_decode_stream(0.0, 0.0), run)
    t = out[-1].finish.timing
    assert t.kv_pull_s == 0 and t.transfer_s == 0 and t.decode_s >= 0


# ---------------------------------------------------------------------------- decode worker edge
HOST = "host-a"


class _Engine:
    """The engine calls a handoff decode makes, recorded."""

    def __init__(self) -> None:
        self.imported: list[tuple[str, int]] = []

    def can_admit(self, num_tokens: int, adapter_id: str = "") -> bool:
        return True

    def check_adapter(self, adapter_id: str) -> None:
        """The base model only (a worker started without --lora)."""
        assert adapter_id == ""

    def import_kv(self, rid, ids, first_token, blocks, params, **kw) -> None:
        self.imported.append((rid, int(blocks.shape[0])))

    def has_request(self, rid: str) -> bool:
        return True


class _Loop:
    """Runs engine calls inline; each added request's queue holds its one (finishing) output."""

    def __init__(self) -> None:
        self.engine = _Engine()
        self.aborted: list[str] = []

    def call(self, fn, timeout_s=None):
        return fn(self.engine)

    def add(self, rid, adder) -> queue.SimpleQueue:
        adder(self.engine)
        q: queue.SimpleQueue = queue.SimpleQueue()
        q.put(RequestOutput(rid, [9], [9], "", "", True, FinishReason.LENGTH, 8, 0))
        return q

    def abort(self, rid: str) -> bool:
        self.aborted.append(rid)
        return True


class _Ctx:
    def time_remaining(self):
        return None

    def is_active(self) -> bool:
        return True

    def add_callback(self, fn) -> None:
        pass


class _Store:
    """The KVStoreClient calls of a puller (lease release), recorded."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def release(self, lease_id: str) -> bool:
        self.released.append(lease_id)
        return True


class _Failing:
    """A transport whose every fetch raises ``exc`` (an unreachable node, an arena not attachable...)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def fetch(self, location, layout, hashes):
        raise self.exc

    def close(self) -> None:
        pass


def _state() -> SimpleNamespace:
    loop = _Loop()
    return SimpleNamespace(
        config=SimpleNamespace(worker_id="decode-9", role=Role.DECODE, admission_timeout_s=1.0),
        layout=L,
        loop=loop,
        engine=loop.engine,  # no tokenizer: the worker sends tokens without text (has_text unset)
        count_finished=lambda: None,
    )


def _handoff(host_id: str) -> tuple[worker_pb2.DecodeRequest, KVHandle]:
    ids = list(range(2 * L.block_size))
    loc = BlockLocation("kv0", "kv0:1", shm_name="arena-kv0", host_id=host_id)
    h = KVHandle(
        "r1", tuple(chain_hashes(ids, L.block_size, "m")), (loc, loc), L, len(ids), lease_id="lease-1"
    )
    req = worker_pb2.DecodeRequest(
        request_id="r1", prompt_token_ids=ids, kv=handle_to_proto(h), first_token=3
    )
    return req, h


def _decoder(grpc_t, shm_t) -> tuple[DecodeServicer, CollectorRegistry, _Store, AutoTransport]:
    reg, store = CollectorRegistry(), _Store()
    transport = AutoTransport(HOST, grpc=grpc_t, shm=shm_t)
    svc = DecodeServicer(
        _state(),  # type: ignore[arg-type]
        StorePuller(transport, {"kv0:1": store}),  # type: ignore[dict-item]
        KVPullMetrics(reg, "decode-9"),
    )
    return svc, reg, store, transport


def _pull_failures(reg: CollectorRegistry) -> dict[tuple[str, str], float]:
    """Non-zero ``pdserve_worker_kv_pull_failures_total`` by (transport, reason)."""
    out = {}
    for t in ("grpc", "shm"):
        for r in PULL_FAILURE_REASONS:
            v = reg.get_sample_value(
                "pdserve_worker_kv_pull_failures_total",
                {"worker_id": "decode-9", "role": "decode", "transport": t, "reason": r},
            )
            if v:
                out[(t, r)] = v
    return out


def _pulls(reg: CollectorRegistry, transport: str) -> float | None:
    return reg.get_sample_value(
        "pdserve_worker_kv_pull_seconds_count",
        {"worker_id": "decode-9", "role": "decode", "transport": transport},
    )


def test_decode_reports_its_pull_time_and_counts_an_shm_fallback(caplog):
    """Same host: shm is chosen, the arena cannot be attached, the blocks come through gRPC. The
    pull succeeds; the fallback is counted as a consumer-side failure the store never sees."""
    caplog.set_level(logging.INFO, logger="decode_worker.service")
    fake = FakeTransport()
    req, h = _handoff(HOST)
    for hh in h.block_hashes:
        fake.put("kv0", hh, os.urandom(L.block_nbytes))
    svc, reg, store, transport = _decoder(fake, _Failing(UnavailableError("arena-kv0 cannot be attached")))
    out = list(svc.Decode(req, _Ctx()))
    assert transport.fallbacks == 1 and fake.open == 0
    assert [list(m.token_ids) for m in out] == [[9]] and out[0].HasField("finish")
    assert out[0].kv_pull_s > 0  # the first (here: only) message carries the pull time
    assert svc.state.loop.engine.imported == [("r1", 2)]
    assert store.released == ["lease-1"]
    assert _pull_failures(reg) == {("shm", "shm_fallback"): 1}
    assert _pulls(reg, "shm") == 1 and _pulls(reg, "grpc") == 0
    (done,) = [r for r in caplog.records if r.getMessage() == "decode done"]
    assert done.request_id == "r1" and done.tokens == 1 and done.kv_pull_s == round(out[0].kv_pull_s, 6)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (UnavailableError("store node kv0 is unreachable"), "unavailable"),
        (RequestNotFoundError("2 blocks not stored on kv0"), "not_found"),
        (DeadlineExceededError("pull timed out"), "timeout"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_a_failed_pull_is_counted_on_the_decode_worker(caplog, exc, reason):
    """Another host (gRPC): the pull fails; the decode fails with it, the lease is still
    released, and the worker counts the failure by transport and reason."""
    caplog.set_level(logging.INFO, logger="decode_worker.service")
    req, _ = _handoff("host-b")
    svc, reg, store, _t = _decoder(_Failing(exc), _Failing(AssertionError("shm must not be tried")))
    with pytest.raises(type(exc)):
        list(svc.Decode(req, _Ctx()))
    assert _pull_failures(reg) == {("grpc", reason): 1}
    assert _pulls(reg, "grpc") == 1  # failed attempts are timed too
    assert store.released == ["lease-1"]
    assert svc.state.loop.engine.imported == []
    (failed,) = [r for r in caplog.records if r.getMessage() == "decode failed"]
    assert failed.error == type(exc).__name__ and failed.kv_pull_s == 0


def test_decode_servicer_exports_pull_metrics_in_the_default_registry():
    import prometheus_client

    state = _state()
    state.config.worker_id = "decode-default-registry"
    DecodeServicer(state, StorePuller(FakeTransport()))  # type: ignore[arg-type]
    DecodeServicer(state, StorePuller(FakeTransport()))  # type: ignore[arg-type]  # shares the families
    labels = {
        "worker_id": "decode-default-registry",
        "role": "decode",
        "transport": "shm",
        "reason": "shm_fallback",
    }
    assert prometheus_client.REGISTRY.get_sample_value("pdserve_worker_kv_pull_failures_total", labels) == 0
