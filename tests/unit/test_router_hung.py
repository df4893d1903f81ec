"""Hung (not dead) workers: progress deadlines (router.progress), quarantine (router.quarantine,
Registry), keepalive options (pdserve.keepalive), and the router's handling of a stalled call
(GenerateServicer against the fake workers of test_router_redispatch: a worker that stops
answering without failing).

Pure parts run on a fake clock. The servicer tests use deadlines of a few hundred milliseconds
(a hung fake waits forever, so they end by the deadline, never by luck of timing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from pdserve.keepalive import KEEPALIVE, Keepalive
from pdserve.metrics import RouterMetrics
from pdserve.security import SecurityConfig
from pdserve.v1 import client_pb2, common_pb2, worker_pb2
from router.failover import LostPhase, LostWorker, Redispatches
from router.progress import ProgressConfig, ProgressWatch, StallPhase
from router.quarantine import QuarantineBook, QuarantineConfig, QuarantineReason
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig
from tests.unit.test_router_redispatch import (
    PROMPT,
    FakeContext,
    FakeRpcError,
    FakeStore,
    FakeWorker,
    _Call,
    reference,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------- progress (pure)
def test_gap_is_the_floor_without_a_prediction_and_k_tpot_above_it() -> None:
    c = ProgressConfig(floor_s=2.0, tpot_factor=10.0)
    assert c.gap_s(None, 1) == 2.0
    assert c.gap_s(0.0, 1) == 2.0
    assert c.gap_s(0.05, 1) == 2.0  # 10 x 50 ms = 0.5 s < floor
    assert c.gap_s(0.5, 1) == pytest.approx(5.0)
    assert c.gap_s(0.5, 4) == pytest.approx(20.0)  # 4 tokens per message: 4 steps per message


def test_prefill_deadline_has_a_floor_a_ttft_multiple_and_a_queue_allowance() -> None:
    c = ProgressConfig(prefill_floor_s=10.0, ttft_factor=5.0, prefill_s_per_token=0.01)
    assert c.prefill_deadline_s(None, 0) == 10.0
    assert c.prefill_deadline_s(1.0, 0) == 10.0
    assert c.prefill_deadline_s(4.0, 0) == pytest.approx(20.0)
    assert c.prefill_deadline_s(None, 500) == pytest.approx(15.0)
    assert c.first_message_deadline_s(100) == pytest.approx(c.first_message_s + 1.0)


def test_disabled_progress_has_no_deadlines() -> None:
    c = ProgressConfig(enabled=False)
    assert c.gap_s(0.1, 1) is None and c.prefill_deadline_s(1.0, 10) is None
    assert c.first_message_deadline_s() is None
    w = ProgressWatch(c)
    assert w.waiting(0.0) is None and not w.stalled(1e9)


@pytest.mark.parametrize(
    "bad", [dict(floor_s=0), dict(tpot_factor=-1), dict(first_message_s=0), dict(prefill_s_per_token=-0.1)]
)
def test_progress_config_refuses_bad_values(bad) -> None:
    with pytest.raises(ValueError, match="progress"):
        ProgressConfig(**bad)


def test_watch_counts_only_waits_for_the_worker() -> None:
    clock = FakeClock()
    w = ProgressWatch(ProgressConfig(floor_s=2.0, first_message_s=8.0), predicted_tpot_s=None)
    assert w.phase is StallPhase.FIRST_MESSAGE
    assert w.waiting(clock()) == 8.0
    clock.t += 7.9
    assert not w.stalled(clock())
    clock.t += 0.2
    assert w.stalled(clock())
    w.received(1)
    assert w.phase is StallPhase.STREAM and not w.stalled(clock())
    clock.t += 100.0  # the client held the message (flow control): no wait was running
    assert not w.stalled(clock())
    assert w.waiting(clock()) == 2.0
    clock.t += 1.9
    assert not w.stalled(clock())
    clock.t += 0.2
    assert w.stalled(clock())
    assert "a message after 1" in w.describe(2.1)


def test_watch_scales_with_tokens_per_message() -> None:
    w = ProgressWatch(ProgressConfig(floor_s=1.0, tpot_factor=10.0), predicted_tpot_s=0.1)
    w.received(1)
    assert w.bound_s() == pytest.approx(1.0)
    w.received(5)  # the worker batches 5 tokens per message: 5 steps between messages
    assert w.bound_s() == pytest.approx(5.0)
    w.received(2)  # the largest count seen stays
    assert w.bound_s() == pytest.approx(5.0)


# ---------------------------------------------------------------------------- quarantine (pure)
def test_quarantine_book_state_machine_with_backoff() -> None:
    clock = FakeClock()
    book = QuarantineBook(QuarantineConfig(probe_interval_s=1.0, max_probe_interval_s=4.0), clock)
    assert book.next_due_in() is None
    assert book.quarantine("d1", QuarantineReason.STALLED_DECODE, "no progress")
    assert not book.quarantine("d1", QuarantineReason.STALLED_PREFILL)  # the first reason stays
    assert book.get("d1").reason is QuarantineReason.STALLED_DECODE
    assert book.due() == [] and book.next_due_in() == pytest.approx(1.0)
    clock.t += 1.0
    assert [r.worker_id for r in book.due()] == ["d1"]
    assert book.probe_result("d1", ok=False) is None
    assert book.next_due_in() == pytest.approx(2.0)  # doubled
    clock.t += 2.0
    assert book.probe_result("d1", ok=False) is None
    assert book.next_due_in() == pytest.approx(4.0)  # doubled again, at the bound
    clock.t += 4.0
    assert book.probe_result("d1", ok=False) is None
    assert book.next_due_in() == pytest.approx(4.0)  # bounded
    clock.t += 4.0
    lifted = book.probe_result("d1", ok=True)
    assert lifted is not None and lifted.failed_probes == 3 and lifted.since == 100.0
    assert not book.is_quarantined("d1") and book.next_due_in() is None
    assert book.probe_result("d1", ok=True) is None  # not quarantined any more: ignored


def test_quarantine_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="probe_interval_s"):
        QuarantineConfig(probe_interval_s=0)
    with pytest.raises(ValueError, match="max_probe_interval_s"):
        QuarantineConfig(probe_interval_s=2.0, max_probe_interval_s=1.0)


def test_registry_quarantine_survives_heartbeats_expiry_and_reregistration() -> None:
    clock = FakeClock()
    reg = Registry(heartbeat_timeout_s=3.0, clock=clock)
    changes: list[int] = []
    reg.add_listener(lambda: changes.append(1))
    load = WorkerLoad(0, 0, 100, 0)
    reg.register("d0", WorkerKind.DECODE, "a0", "m", load)
    reg.register("d1", WorkerKind.DECODE, "a1", "m", load)
    n = len(changes)
    assert reg.quarantine("d1", QuarantineReason.STALLED_DECODE, "no progress")
    assert len(changes) == n + 1  # health follows
    assert [w.worker_id for w in reg.alive(WorkerKind.DECODE)] == ["d0"]
    assert reg.get("d1") is not None  # still known (probed at its address)
    assert reg.heartbeat("d1", load)  # a heartbeat does not lift it
    assert [w.worker_id for w in reg.alive(WorkerKind.DECODE)] == ["d0"]
    clock.t += 10.0  # d1 silent (SIGSTOPped): expired
    reg.heartbeat("d0", load)
    assert [w.worker_id for w in reg.alive(WorkerKind.DECODE)] == ["d0"]
    assert reg.get("d1") is None and reg.quarantined.is_quarantined("d1")
    reg.register("d1", WorkerKind.DECODE, "a1", "m", load)  # it woke up and registers again
    reg.register("d0", WorkerKind.DECODE, "a0", "m", load)
    assert [w.worker_id for w in reg.alive(WorkerKind.DECODE)] == ["d0"]
    reg.drop("d1")  # dropped by the router (a failed call): still quarantined when back
    reg.register("d1", WorkerKind.DECODE, "a1", "m", load)
    assert reg.quarantined.is_quarantined("d1")
    assert reg.probe_result("d1", ok=False) is None
    assert reg.probe_result("d1", ok=True) is not None
    assert sorted(w.worker_id for w in reg.alive(WorkerKind.DECODE)) == ["d0", "d1"]


def test_registry_deregister_forgets_the_quarantine() -> None:
    reg = Registry(heartbeat_timeout_s=1e9)
    reg.register("p0", WorkerKind.PREFILL, "a", "m", WorkerLoad())
    reg.quarantine("p0", QuarantineReason.STALLED_PREFILL)
    assert reg.deregister("p0")
    assert not reg.quarantined.is_quarantined("p0")


def test_a_stalled_worker_is_not_excluded_for_good() -> None:
    b = Redispatches("r", limit=3)
    b.record(LostWorker("d0", LostPhase.DECODE, "no progress", stalled=True))
    b.record(LostWorker("d1", LostPhase.DECODE, "Socket closed"))
    assert b.excluded == {"d1"}
    assert "decode worker d0 (stalled): no progress" in b.exhausted("x").message


# ---------------------------------------------------------------------------- keepalive
def test_keepalive_options_on_channels_and_servers() -> None:
    ch = dict(KEEPALIVE.channel_options())
    assert ch["grpc.keepalive_time_ms"] == KEEPALIVE.time_ms
    assert ch["grpc.keepalive_timeout_ms"] == KEEPALIVE.timeout_ms
    assert ch["grpc.keepalive_permit_without_calls"] == 1
    assert ch["grpc.http2.max_pings_without_data"] == 0
    srv = dict(KEEPALIVE.server_options())
    # a server accepts pings at least as often as clients send them, and never strikes them out
    assert srv["grpc.http2.min_ping_interval_without_data_ms"] <= ch["grpc.keepalive_time_ms"]
    assert srv["grpc.http2.max_ping_strikes"] == 0
    # every internal channel (sync ones and the router's grpc.aio ones) carries them
    opts = dict(SecurityConfig().channel_options())
    assert opts["grpc.keepalive_time_ms"] == KEEPALIVE.time_ms


def test_keepalive_refuses_settings_that_would_goaway_our_own_clients() -> None:
    with pytest.raises(ValueError, match="must not exceed time_ms"):
        Keepalive(time_ms=1000, server_min_ping_interval_ms=5000)
    with pytest.raises(ValueError, match="timeout_ms"):
        Keepalive(timeout_ms=0)


def test_keepalive_pings_do_not_break_a_live_channel() -> None:
    """A server of pdserve.grpc_server and a channel pinging it every 100 ms: calls keep working
    (no GOAWAY too_many_pings) while the channel idles between them."""
    from pdserve.grpc_server import start_server

    ka = Keepalive(time_ms=100, timeout_ms=2000, server_min_ping_interval_ms=50)
    server, port, _ = start_server([], "127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=ka.channel_options()) as ch:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            stub = health_pb2_grpc.HealthStub(ch)
            for _ in range(3):
                assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
                time.sleep(0.4)  # several pings while idle
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------- servicer with hung fakes
class _HungStream:
    """A Decode stream that sends ``messages`` then hangs (no message, no error) until
    cancelled; several tokens per message when ``per_message`` > 1."""

    def __init__(self, worker: HungWorker, it: Iterator[worker_pb2.DecodeResponse], hang_after: int | None):
        self._w = worker
        self._it = it
        self._hang_after = hang_after
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[worker_pb2.DecodeResponse]:
        for i, m in enumerate(self._it):
            if self._hang_after is not None and i >= self._hang_after:
                self._w.hung_calls += 1
                await asyncio.Event().wait()  # SIGSTOP: nothing, ever
            yield m
            await asyncio.sleep(0)

    def cancel(self) -> bool:
        self.cancelled = True
        self._w.cancelled += 1
        return True


@dataclass
class HungWorker(FakeWorker):
    """``hang_after``: Decode messages sent before it hangs (None: never); ``hang_prefill``: a
    Prefill never answers; ``per_message``: tokens per Decode message; ``answers_probe``: its
    Stats answers (it woke up)."""

    hang_after: int | None = None
    hang_prefill: bool = False
    per_message: int = 1
    answers_probe: bool = False
    hung_calls: int = 0
    cancelled: int = 0
    probes: int = 0
    streams: list = field(default_factory=list)

    def Prefill(self, req, timeout=None, metadata=None):  # noqa: N802 - the stub's method name
        if self.hang_prefill:
            self.calls.append(req)
            w = self

            class _Hung(_Call):
                async def _result(self):
                    w.hung_calls += 1
                    await asyncio.Event().wait()

                def cancel(self) -> bool:
                    w.cancelled += 1
                    return True

            return _Hung(lambda: None)
        return super().Prefill(req, timeout, metadata)

    def Decode(self, req, timeout=None, metadata=None):  # noqa: N802
        self.calls.append(req)
        s = _HungStream(self, self._batched(self._decode(req)), self.hang_after)
        self.streams.append(s)
        return s

    def _batched(self, it: Iterator[worker_pb2.DecodeResponse]) -> Iterator[worker_pb2.DecodeResponse]:
        buf: list[worker_pb2.DecodeResponse] = []
        for m in it:
            buf.append(m)
            if len(buf) == self.per_message or m.HasField("finish"):
                out = worker_pb2.DecodeResponse(request_id=m.request_id)
                for b in buf:
                    out.token_ids.extend(b.token_ids)
                if m.HasField("finish"):
                    out.finish.CopyFrom(m.finish)
                buf = []
                yield out

    def Stats(self, req, timeout=None, metadata=None):  # noqa: N802
        self.probes += 1
        ok = self.answers_probe

        def answer():
            if not ok:
                raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            return worker_pb2.WorkerStats()

        return _Call(answer)


class HungStubs:
    def __init__(self, workers: dict[str, HungWorker], store: FakeStore) -> None:
        self.workers, self._store = workers, store

    def worker(self, address: str) -> HungWorker:
        return self.workers[address]

    def store(self, address: str) -> FakeStore:
        return self._store


FAST = ProgressConfig(floor_s=0.3, first_message_s=0.5, prefill_floor_s=0.5, prefill_s_per_token=0.0)
FAST_PROBES = QuarantineConfig(probe_interval_s=0.02, max_probe_interval_s=0.05, probe_timeout_s=0.1)


@pytest.fixture(scope="module")
def model_path(smollm_path):
    return str(smollm_path)


def _cluster(model_path: str, prefill: dict[str, dict], decode: dict[str, dict], progress=FAST):
    store = FakeStore()
    reg = Registry(heartbeat_timeout_s=1e9, quarantine=FAST_PROBES)
    workers: dict[str, HungWorker] = {}
    for kind, spec in ((WorkerKind.PREFILL, prefill), (WorkerKind.DECODE, decode)):
        for i, (wid, kw) in enumerate(spec.items()):
            workers[wid] = HungWorker(wid, store, **kw)
            # the first decode worker has the most free blocks: the policy places there first
            free = 1000 - i
            reg.register(wid, kind, wid, "m", WorkerLoad(0, 0, free, 0, block_size=16))
    metrics_reg = CollectorRegistry()
    cfg = RouterConfig(model_path=model_path, model_id="m", progress=progress)
    svc = GenerateServicer(reg, cfg, RouterMetrics(metrics_reg))
    svc.stubs = HungStubs(workers, store)  # type: ignore[assignment]
    return svc, workers, store, metrics_reg


def _request(max_tokens: int = 12, **sampling) -> client_pb2.GenerateRequest:
    return client_pb2.GenerateRequest(
        request_id="req-1",
        prompt_token_ids=client_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling
        ),
    )


async def _generate(svc: GenerateServicer, req, ctx=None):
    ctx = ctx or FakeContext()
    await svc.Generate(req, ctx)
    return [t for r in ctx.written for t in r.token_ids], ctx.written[-1]


async def _until(cond, timeout_s: float = 5.0) -> None:
    """Wait (on the loop, so the prober runs) until ``cond()``; fail after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _quarantined(reg: CollectorRegistry, role: str) -> float:
    return reg.get_sample_value("pdserve_router_quarantined_workers", {"role": role})


@pytest.mark.parametrize("per_message", [1, 3])
def test_decode_stalled_mid_stream_resumes_elsewhere_and_the_worker_is_quarantined(
    model_path, per_message, caplog
) -> None:
    svc, workers, store, mreg = _cluster(
        model_path,
        {"p0": {}},
        {"d-hung": {"hang_after": 2, "per_message": per_message}, "d-ok": {"per_message": per_message}},
    )

    async def scenario():
        ids, last = await _generate(svc, _request(max_tokens=14))
        assert ids == reference(PROMPT, 14)  # no gap, no duplicate
        assert last.finish.reason == common_pb2.FINISH_REASON_LENGTH
        assert last.finish.usage.completion_tokens == 14
        hung = workers["d-hung"]
        assert hung.hung_calls == 1 and hung.streams[0].cancelled  # the hung call was cancelled
        # the resumed leg ran on d-ok with prompt + the tokens relayed so far
        resumed = workers["d-ok"].calls[-1]
        assert resumed.sampling.seed_position_offset == 1 + 2 * per_message
        assert svc.registry.quarantined.is_quarantined("d-hung")
        assert [w.worker_id for w in svc.registry.alive(WorkerKind.DECODE)] == ["d-ok"]
        assert _quarantined(mreg, "decode") == 1
        # a new request goes to d-ok only
        n_hung = len(hung.calls)
        ids2, _ = await _generate(svc, _request(max_tokens=5))
        assert ids2 == reference(PROMPT, 5) and len(hung.calls) == n_hung
        # probed while hung: it stays quarantined
        await _until(lambda: hung.probes >= 2)
        assert svc.registry.quarantined.is_quarantined("d-hung")
        # it wakes up: it answers the probe and is back in service
        hung.answers_probe, hung.hang_after = True, None
        await _until(lambda: not svc.registry.quarantined.is_quarantined("d-hung"))
        assert _quarantined(mreg, "decode") == 0
        assert sorted(w.worker_id for w in svc.registry.alive(WorkerKind.DECODE)) == ["d-hung", "d-ok"]

    with caplog.at_level("INFO"):
        asyncio.run(scenario())
    events = {r.getMessage(): r for r in caplog.records}
    q = events["worker quarantined"]
    assert q.worker == "d-hung" and q.reason == "stalled_decode" and "no progress" in q.detail
    assert events["worker restored"].worker == "d-hung"
    assert events["redispatch"].stalled is True
    assert store.leases == set()  # no lease leaked


def test_decode_stalled_before_its_first_message_hands_the_kv_to_another(model_path) -> None:
    svc, workers, store, _ = _cluster(model_path, {"p0": {}}, {"d-hung": {"hang_after": 0}, "d-ok": {}})
    ids, _ = asyncio.run(_generate(svc, _request(max_tokens=8)))
    assert ids == reference(PROMPT, 8)
    assert len(workers["p0"].calls) == 1  # the KV was re-leased for d-ok: no second prefill
    assert svc.registry.quarantined.is_quarantined("d-hung")
    assert store.leases == set()


def test_prefill_stalled_goes_to_another_prefill_worker(model_path) -> None:
    svc, workers, store, mreg = _cluster(
        model_path, {"p-hung": {"hang_prefill": True}, "p-ok": {}}, {"d0": {}}
    )
    ids, _ = asyncio.run(_generate(svc, _request(max_tokens=6)))
    assert ids == reference(PROMPT, 6)
    assert workers["p-hung"].hung_calls == 1 and workers["p-hung"].cancelled >= 1
    assert svc.registry.quarantined.get("p-hung").reason is QuarantineReason.STALLED_PREFILL
    assert _quarantined(mreg, "prefill") == 1
    assert store.leases == set()


def test_a_lone_slow_worker_is_waited_for_not_failed(model_path) -> None:
    """The only decode worker stalls but answers its probe (slow, not hung): the request waits
    for the probe to restore it and resumes there."""
    svc, workers, _, _ = _cluster(model_path, {"p0": {}}, {"d0": {"hang_after": 3, "answers_probe": True}})
    w = workers["d0"]

    orig = w.Decode

    def decode_then_heal(req, timeout=None, metadata=None):
        s = orig(req, timeout, metadata)
        w.hang_after = None  # the next call (the resumed leg) streams normally
        return s

    w.Decode = decode_then_heal  # type: ignore[method-assign]
    ids, _ = asyncio.run(_generate(svc, _request(max_tokens=10)))
    assert ids == reference(PROMPT, 10)
    assert len(w.calls) == 2 and not svc.registry.quarantined.is_quarantined("d0")


def test_a_hung_lone_worker_fails_the_request_naming_it(model_path) -> None:
    svc, _, store, _ = _cluster(model_path, {"p0": {}}, {"d0": {"hang_after": 2}})
    from pdserve.errors import UnavailableError

    with pytest.raises(UnavailableError, match=r"d0 \(stalled\)"):
        asyncio.run(_generate(svc, _request(max_tokens=10)))
    assert store.leases == set()


def test_a_slow_client_is_not_a_stalled_worker(model_path) -> None:
    """Flow control: while the client holds a response the relay does not read the worker, and
    that time does not count against the worker's progress deadline."""

    class SlowClient(FakeContext):
        async def write(self, msg) -> None:
            await asyncio.sleep(0.4 if len(self.written) == 2 else 0)  # longer than the floor
            await super().write(msg)

    svc, workers, _, _ = _cluster(model_path, {"p0": {}}, {"d0": {}})
    ids, _ = asyncio.run(_generate(svc, _request(max_tokens=6), SlowClient()))
    assert ids == reference(PROMPT, 6)
    assert len(workers["d0"].calls) == 1 and not svc.registry.quarantined.ids()
