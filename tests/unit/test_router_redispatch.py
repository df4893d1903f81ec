"""Router re-dispatch when a worker is lost (router.failover + GenerateServicer._serve).

The router runs in-process against fake workers: a deterministic "model" (the next token is a
function of the whole sequence) behind fake Prefill/Decode stubs (shaped like ``grpc.aio`` stubs:
an awaitable unary call, an async-iterable stream) that can die (UNAVAILABLE) at a chosen point,
and a fake KV store that grants and releases leases. No gRPC server, no torch. Each request runs
on its own event loop (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from pdserve.errors import UnavailableError
from pdserve.metrics import RouterMetrics
from pdserve.v1 import client_pb2, common_pb2, worker_pb2
from router.failover import (
    LostPhase,
    LostWorker,
    Redispatches,
    TokenStop,
    check_stop,
    resume_limits,
)
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig

PROMPT = [1, 504, 3000, 17, 9102, 222]


def next_token(seq: list[int]) -> int:
    """The fake model: deterministic in the whole sequence, ids in a plain-text range."""
    return 300 + (sum((i + 1) * t for i, t in enumerate(seq)) * 7919) % 4000


def reference(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = next_token(seq)
        out.append(t)
        seq.append(t)
    return out


# ---------------------------------------------------------------------------- pure parts
def test_resume_limits() -> None:
    assert resume_limits(10, 0, 0) == (10, 0)
    assert resume_limits(10, 4, 3) == (7, 1)
    assert resume_limits(10, 4, 6) == (4, 0)
    with pytest.raises(ValueError):
        resume_limits(10, 0, 10)


def test_check_stop_is_the_engine_rule() -> None:
    kw = dict(max_tokens=5, stop_token_ids=(7,), eos_token_ids={2}, ignore_eos=False)
    assert check_stop(2, 1, min_tokens=0, **kw) is TokenStop.STOP
    assert check_stop(2, 1, min_tokens=2, **kw) is None  # EOS ignored below min_tokens
    assert check_stop(2, 2, min_tokens=2, **kw) is TokenStop.STOP
    assert check_stop(7, 3, min_tokens=0, **kw) is TokenStop.STOP
    assert check_stop(9, 5, min_tokens=0, **kw) is TokenStop.LENGTH
    assert check_stop(2, 5, min_tokens=0, **kw) is TokenStop.STOP  # a stop wins over the length
    assert check_stop(2, 1, min_tokens=0, **{**kw, "ignore_eos": True}) is None


def test_redispatch_budget_names_the_lost_workers() -> None:
    b = Redispatches("r1", limit=2)
    b.record(LostWorker("decode-0", LostPhase.DECODE, "Socket closed"))
    b.record(LostWorker("prefill-1", LostPhase.PREFILL))
    assert b.count == 2 and b.excluded == {"decode-0", "prefill-1"}
    with pytest.raises(UnavailableError) as ei:
        b.record(LostWorker("decode-2", LostPhase.DECODE))
    msg = str(ei.value)
    assert "r1" in msg and "decode-0" in msg and "prefill-1" in msg and "decode-2" in msg
    assert "re-dispatched 2 times" in msg
    with pytest.raises(ValueError):
        Redispatches("r", limit=-1)
    with pytest.raises(ValueError):
        RouterConfig(model_path="m", model_id="m", max_redispatches=-1)


# ---------------------------------------------------------------------------- fakes
class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _dead() -> FakeRpcError:
    return FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")


@dataclass
class FakeStore:
    address: str = "store:1"
    blocks_present: bool = True
    leases: set[str] = field(default_factory=set)
    granted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    owners: list[str | None] = field(default_factory=list)

    def put(self, rid: str) -> common_pb2.KVHandle:
        lease = f"lease-{rid}-{len(self.granted)}"
        self.granted.append(lease)
        self.leases.add(lease)
        return common_pb2.KVHandle(
            request_id=rid,
            block_hashes=[bytes([len(self.granted)]) * 16],
            locations=[common_pb2.BlockLocation(node_id="kv0", address=self.address)],
            num_tokens=1,
            lease_id=lease,
        )

    def lease(self, hashes, ttl_s: float = 0.0, owner: str | None = None):
        if not self.blocks_present:
            raise RuntimeError("blocks not found")
        self.owners.append(owner)  # whom the router charged the lease to
        lease = f"relet-{len(self.granted)}"
        self.granted.append(lease)
        self.leases.add(lease)

        @dataclass
        class Grant:
            lease_id: str
            slots: tuple[int, ...] = ()
            expires_at_unix_s: float = 4242.0

        return Grant(lease)

    def release(self, lease_id: str) -> bool:
        self.released.append(lease_id)
        found = lease_id in self.leases
        self.leases.discard(lease_id)
        return found


class _Call:
    """A unary call as a ``grpc.aio`` stub returns it: awaitable (runs ``fn``), cancellable."""

    def __init__(self, fn) -> None:
        self._fn = fn

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        return self._fn()

    def cancel(self) -> bool:
        return False


class _Stream:
    """A server-streaming call as a ``grpc.aio`` stub returns it: async-iterable, cancellable."""

    def __init__(self, it: Iterator[worker_pb2.DecodeResponse]) -> None:
        self._it = it
        self.cancelled = False

    async def __aiter__(self):
        for m in self._it:
            yield m

    def cancel(self) -> bool:
        self.cancelled = True
        return True


@dataclass
class FakeWorker:
    """A prefill or decode worker; ``die_after``: messages it streams (or prefills it answers)
    before it dies (None: never)."""

    worker_id: str
    store: FakeStore
    die_after: int | None = None
    calls: list = field(default_factory=list)

    # Prefill
    def _prefill(self, req: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        self.calls.append(req)
        if self.die_after is not None and len(self.calls) > self.die_after:
            raise _dead()
        ids = list(req.prompt_token_ids)
        return worker_pb2.PrefillResponse(
            request_id=req.request_id,
            first_token=next_token(ids),
            kv=self.store.put(req.request_id),
            num_cached_tokens=0,
        )

    def Prefill(self, req, timeout=None, metadata=None) -> _Call:  # noqa: N802 - the stub's method name
        return _Call(lambda: self._prefill(req))

    # Decode
    def Decode(self, req: worker_pb2.DecodeRequest, timeout=None, metadata=None) -> _Stream:  # noqa: N802
        self.calls.append(req)
        return _Stream(self._decode(req))

    def _decode(self, req: worker_pb2.DecodeRequest) -> Iterator[worker_pb2.DecodeResponse]:
        if self.die_after == 0:
            raise _dead()
        if req.local_prefill:  # the whole request runs here: every token is streamed
            seq, n_out = list(req.prompt_token_ids), 0
        else:
            self.store.release(req.kv.lease_id)  # pulled: the producer's lease is released
            seq, n_out = [*req.prompt_token_ids, req.first_token], 1
        sent = 0
        while n_out < req.sampling.max_tokens:
            if self.die_after is not None and sent >= self.die_after:
                raise _dead()
            t = next_token(seq)
            seq.append(t)
            n_out += 1
            msg = worker_pb2.DecodeResponse(request_id=req.request_id, token_ids=[t])
            if n_out >= req.sampling.max_tokens:
                msg.finish.reason = common_pb2.FINISH_REASON_LENGTH
            sent += 1
            yield msg


class FakeStubs:
    def __init__(self, workers: dict[str, FakeWorker], store: FakeStore) -> None:
        self.workers = workers
        self._store = store

    def worker(self, address: str) -> FakeWorker:
        return self.workers[address]

    def store(self, address: str) -> FakeStore:
        return self._store


class FakeContext:
    """The part of ``grpc.aio.ServicerContext`` Generate uses; ``written``: the responses.
    ``leave_after``: the client goes away once it got that many responses."""

    def __init__(self, leave_after: int | None = None) -> None:
        self.active = True
        self.written: list[client_pb2.GenerateResponse] = []
        self.leave_after = leave_after

    def cancelled(self) -> bool:
        return not self.active

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> None:
        return None

    async def write(self, msg: client_pb2.GenerateResponse) -> None:
        self.written.append(msg)
        if self.leave_after is not None and len(self.written) >= self.leave_after:
            self.active = False


@pytest.fixture(scope="module")
def model_path(smollm_path):
    return str(smollm_path)


def _cluster(
    model_path: str,
    prefill: dict[str, int | None],
    decode: dict[str, int | None],
    limit: int = 2,
    policy: PolicyKind = PolicyKind.LEAST_LOADED,
) -> tuple[GenerateServicer, dict[str, FakeWorker], FakeStore, CollectorRegistry]:
    store = FakeStore()
    reg = Registry(heartbeat_timeout_s=1e9)
    workers: dict[str, FakeWorker] = {}
    for kind, spec in ((WorkerKind.PREFILL, prefill), (WorkerKind.DECODE, decode)):
        for wid, die_after in spec.items():
            workers[wid] = FakeWorker(wid, store, die_after)
            reg.register(wid, kind, wid, "m", WorkerLoad(0, 0, 1000, 0, block_size=16))
    metrics_reg = CollectorRegistry()
    cfg = RouterConfig(model_path=model_path, model_id="m", max_redispatches=limit, policy=policy)
    svc = GenerateServicer(reg, cfg, RouterMetrics(metrics_reg))
    svc.stubs = FakeStubs(workers, store)  # type: ignore[assignment]
    return svc, workers, store, metrics_reg


def _request(max_tokens: int = 12, **sampling) -> client_pb2.GenerateRequest:
    return client_pb2.GenerateRequest(
        request_id="req-1",
        prompt_token_ids=client_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling
        ),
    )


def _run(svc: GenerateServicer, req: client_pb2.GenerateRequest, ctx=None):
    ctx = ctx or FakeContext()
    asyncio.run(svc.Generate(req, ctx))
    out = ctx.written
    ids = [t for r in out for t in r.token_ids]
    text = "".join(r.text for r in out)
    return ids, text, out[-1]


def _redispatches(reg: CollectorRegistry, phase: str) -> float:
    return reg.get_sample_value("pdserve_router_redispatches_total", {"phase": phase})


# ---------------------------------------------------------------------------- decode lost
def test_no_failure_is_the_reference(model_path) -> None:
    svc, _, store, reg = _cluster(model_path, {"p0": None}, {"d0": None})
    ids, _, last = _run(svc, _request())
    assert ids == reference(PROMPT, 12)
    assert last.finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert last.finish.usage.completion_tokens == 12
    assert _redispatches(reg, "decode") == 0


@pytest.mark.parametrize("k", [1, 3, 10])
def test_decode_lost_mid_stream_resumes_without_losing_or_duplicating(model_path, k) -> None:
    ref_svc, _, _, _ = _cluster(model_path, {"p0": None}, {"d0": None})
    ref_ids, ref_text, _ = _run(ref_svc, _request())
    svc, w, store, reg = _cluster(model_path, {"p0": None}, {"d0": k, "d1": None})
    ids, text, last = _run(svc, _request(min_tokens=5))
    assert ids == ref_ids == reference(PROMPT, 12)
    assert text == ref_text
    assert last.finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert last.finish.usage.completion_tokens == 12 and last.finish.usage.prompt_tokens == len(PROMPT)
    # the resume: prompt + (first token + k relayed) prefilled again, limits reduced by as many
    re = w["p0"].calls[1]
    assert list(re.prompt_token_ids) == PROMPT + ref_ids[: k + 1]
    assert re.sampling.max_tokens == 12 - (k + 1) and re.sampling.min_tokens == max(0, 5 - (k + 1))
    assert re.sampling.seed_position_offset == k + 1  # seeded sampling continues at position k + 1
    if w["d1"].calls:
        assert w["d1"].calls[0].sampling.seed_position_offset == k + 1
    assert w["p0"].calls[0].sampling.seed_position_offset == 0
    # k=10: the resumed prefill samples the 12th (last) token itself: no decode is needed
    assert len(w["d1"].calls) == (1 if k + 2 < 12 else 0) and svc.registry.get("d0") is None
    assert _redispatches(reg, "decode") == 1 and _redispatches(reg, "prefill") == 0
    assert store.leases == set()  # every lease released


def test_decode_lost_before_a_token_reuses_the_kv_under_a_fresh_lease(model_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="router.service")
    svc, w, store, reg = _cluster(model_path, {"p0": None}, {"d0": 0, "d1": None})
    ids, _, _ = _run(svc, _request())
    (rec,) = [r for r in caplog.records if r.getMessage() == "redispatch"]
    assert (rec.request_id, rec.lost_worker, rec.decode, rec.kv_reused) == ("req-1", "d0", "d1", True)
    assert ids == reference(PROMPT, 12)
    assert len(w["p0"].calls) == 1  # no second prefill
    first, second = w["d0"].calls[0], w["d1"].calls[0]
    assert second.kv.block_hashes == first.kv.block_hashes and second.first_token == first.first_token
    assert second.kv.lease_id != first.kv.lease_id and second.kv.lease_id.startswith("relet")
    assert second.kv.lease_expires_at_unix_s == 4242.0  # the new lease's expiry, not the old one's
    assert first.kv.lease_id in store.released  # the old lease does not linger until its TTL
    assert store.leases == set()
    assert store.owners == ["tenant:"]  # charged to the request's (dev-mode, anonymous) tenant
    assert _redispatches(reg, "decode") == 1


def test_decode_lost_before_a_token_prefills_again_when_the_blocks_are_gone(model_path) -> None:
    svc, w, store, _ = _cluster(model_path, {"p0": None}, {"d0": 0, "d1": None})
    store.blocks_present = False
    ids, _, _ = _run(svc, _request())
    assert ids == reference(PROMPT, 12)
    assert list(w["p0"].calls[1].prompt_token_ids) == PROMPT + ids[:1]
    assert store.leases == set()


def test_redispatches_are_bounded(model_path) -> None:
    svc, w, store, reg = _cluster(model_path, {"p0": None}, {"d0": 2, "d1": 2, "d2": 2, "d3": None}, limit=2)
    with pytest.raises(UnavailableError) as ei:
        _run(svc, _request())
    msg = str(ei.value)
    assert all(d in msg for d in ("d0", "d1", "d2")) and "req-1" in msg
    assert not w["d3"].calls
    assert _redispatches(reg, "decode") == 2
    assert store.leases == set()
    outcome = {"slo_class": "default", "outcome": "rejected"}  # UNAVAILABLE counts as rejected
    assert reg.get_sample_value("pdserve_router_requests_total", outcome) == 1


def test_no_other_decode_worker_fails_unavailable_naming_the_lost_one(model_path) -> None:
    svc, _, _, _ = _cluster(model_path, {"p0": None}, {"d0": 3})
    with pytest.raises(UnavailableError, match="no other decode worker.*d0"):
        _run(svc, _request())


def test_no_redispatch_once_the_client_is_gone(model_path) -> None:
    svc, w, _, reg = _cluster(model_path, {"p0": None}, {"d0": 2, "d1": None})
    ctx = FakeContext(leave_after=3)  # first token + 2 relayed; d0 dies on its next message
    asyncio.run(svc.Generate(_request(), ctx))
    got = ctx.written
    assert [t for r in got for t in r.token_ids] == reference(PROMPT, 3)
    assert not w["d1"].calls and _redispatches(reg, "decode") == 0


# ---------------------------------------------------------------------------- prefill lost
def test_prefill_lost_is_sent_to_another_prefill_worker(model_path) -> None:
    svc, w, _, reg = _cluster(model_path, {"p0": 0, "p1": None}, {"d0": None})
    ids, _, _ = _run(svc, _request())
    assert ids == reference(PROMPT, 12)
    assert len(w["p0"].calls) == 1 and len(w["p1"].calls) == 1
    assert list(w["p1"].calls[0].prompt_token_ids) == PROMPT
    assert _redispatches(reg, "prefill") == 1 and svc.registry.get("p0") is None


def test_prefill_and_decode_losses_share_one_bound(model_path) -> None:
    svc, _, _, reg = _cluster(model_path, {"p0": 0, "p1": None}, {"d0": 1, "d1": None}, limit=1)
    with pytest.raises(UnavailableError, match="p0.*d0"):
        _run(svc, _request())
    assert _redispatches(reg, "prefill") == 1 and _redispatches(reg, "decode") == 0


# ---------------------------------------------------------------------------- local prefill
def test_colocated_decode_lost_mid_stream_resumes_on_another_decode_worker(model_path) -> None:
    svc, w, _, reg = _cluster(model_path, {}, {"d0": 4, "d1": None}, policy=PolicyKind.COLOCATED)
    ids, _, last = _run(svc, _request(max_tokens=10))
    assert ids == reference(PROMPT, 10)
    assert last.finish.usage.completion_tokens == 10
    resumed = w["d1"].calls[0]
    assert resumed.local_prefill and list(resumed.prompt_token_ids) == PROMPT + ids[:4]
    assert resumed.sampling.max_tokens == 6 and resumed.sampling.seed_position_offset == 4
    assert _redispatches(reg, "decode") == 1


def test_concurrent_placements_each_see_the_ones_placed_before(model_path) -> None:
    """Requests arriving together (a burst) spread over the prefill workers: placement and the
    reservation of the chosen worker's queue are one step, so the second placement sees the first
    even though neither has started its Prefill call yet."""
    svc, w, _, _ = _cluster(model_path, {"p0": None, "p1": None}, {"d0": None})
    place = svc.policy.place
    gate = threading.Barrier(2, timeout=10)
    entered: list[str] = []

    def slow_place(info, view):  # widen the window between reading the cluster and committing
        entered.append(info.request_id)
        d = place(info, view)
        time.sleep(0.2)
        return d

    svc.policy.place = slow_place  # type: ignore[method-assign]
    both_prefilling = threading.Barrier(2, timeout=10)  # no prefill ends before both are placed
    for wid in ("p0", "p1"):
        real = w[wid]._prefill

        def held(req, real=real):
            both_prefilling.wait()
            return real(req)

        w[wid]._prefill = held  # type: ignore[method-assign]

    def one(i: int) -> None:
        req = _request(max_tokens=2)
        req.request_id = f"burst-{i}"
        gate.wait()
        _run(svc, req)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(entered) == 2
    assert len(w["p0"].calls) == 1 and len(w["p1"].calls) == 1, "both requests went to one prefill worker"
    assert svc.outstanding.get("p0") == svc.outstanding.get("p1") == 0  # every reservation dropped
    assert svc.registry.get("d0").inflight == 0


def test_a_placed_request_is_in_flight_on_its_decode_worker_before_its_prefill(model_path) -> None:
    """A drain waits for the decode worker to be idle: the request counts there from placement."""
    svc, w, _, _ = _cluster(model_path, {"p0": None}, {"d0": None})
    seen: list[int] = []
    real = w["p0"]._prefill

    def spy(req):
        seen.append(svc.registry.get("d0").inflight)
        return real(req)

    w["p0"]._prefill = spy  # type: ignore[method-assign]
    _run(svc, _request(max_tokens=3))
    assert seen == [1] and svc.registry.get("d0").inflight == 0


def test_kv_gone_before_the_pull_is_prefilled_again_for_the_same_decode_worker(model_path) -> None:
    """NOT_FOUND from a Decode before its first message: the handed-off KV was evicted (or a direct
    transfer's outbox entry expired). The decode worker is fine: the request is prefilled again and
    goes back to it; counted as a ``kv`` re-dispatch, no worker dropped."""
    svc, w, store, reg = _cluster(model_path, {"p0": None}, {"d0": None})
    real = w["d0"]._decode
    calls = {"n": 0}

    def evicted_once(req):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FakeRpcError(grpc.StatusCode.NOT_FOUND, "3 of 3 KV blocks are not stored on this node")
        yield from real(req)

    w["d0"]._decode = evicted_once  # type: ignore[method-assign]
    ids, _, last = _run(svc, _request())
    assert ids == reference(PROMPT, 12) and last.finish.usage.completion_tokens == 12
    assert len(w["p0"].calls) == 2 and len(w["d0"].calls) == 2
    assert list(w["p0"].calls[1].prompt_token_ids) == PROMPT + ids[:1]  # first token kept, not re-sent
    assert svc.registry.get("d0") is not None  # not dropped
    assert _redispatches(reg, "kv") == 1 and _redispatches(reg, "decode") == 0
    assert store.leases == set()


def test_not_found_after_tokens_streamed_is_not_retried(model_path) -> None:
    svc, w, _, reg = _cluster(model_path, {"p0": None}, {"d0": None})
    real = w["d0"]._decode

    def fails_mid_stream(req):
        it = real(req)
        yield next(it)
        raise FakeRpcError(grpc.StatusCode.NOT_FOUND, "request vanished")

    w["d0"]._decode = fails_mid_stream  # type: ignore[method-assign]
    with pytest.raises(Exception, match="vanished"):
        _run(svc, _request())
    assert _redispatches(reg, "kv") == 0
