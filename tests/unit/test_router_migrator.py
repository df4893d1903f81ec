"""The router's Migrator over the decode workers' migration RPCs
(router/lifecycle/grpc_migrator.py), through GenerateServicer.migrate with the in-process fake
workers of test_router_redispatch and fake MigrateOut / ResumeStream: every MigrationReport
result maps to a commit (the stream continues on the destination with the same tokens and text,
the source's stream ending ABORTED "migrated" is the switch) or an abort (the request finishes on
its source), counted once by reason and result; unknown workers, a failed call and a resume call
the lifecycle never took are handled too."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from pdserve.errors import InvalidRequestError
from pdserve.v1 import common_pb2, worker_pb2
from router.lifecycle.grpc_migrator import (
    RESULT_LABELS,
    GrpcLegsMigrator,
    MigrationBook,
    MigrationInFlightError,
    MigrationOutcome,
)
from router.lifecycle.migrator import MigrationAbort, MigrationCommit, MigrationTicket
from router.migration_client import MigrationReport, MigrationResult
from router.policy.migration import MigrationReason
from router.registry import Registry, WorkerKind, WorkerLoad
from tests.unit.test_router_redispatch import (
    PROMPT,
    FakeContext,
    FakeRpcError,
    _cluster,
    _request,
    _run,
    next_token,
    reference,
)

N = 12  # output tokens of every request here


class _SourceStream:
    """A decode worker's stream that yields to the loop between messages and, once the fake
    MigrateOut stopped the request (``state["stop_at"]``), ends ABORTED "migrated" as the real
    source does."""

    def __init__(self, req: worker_pb2.DecodeRequest, state: dict) -> None:
        self.req, self.state, self.cancelled = req, state, False

    async def __aiter__(self):
        self.state["store"].release(self.req.kv.lease_id)  # pulled: the producer's lease goes
        seq = [*self.req.prompt_token_ids, self.req.first_token]
        n_out = 1
        while n_out < self.req.sampling.max_tokens:
            await asyncio.sleep(0)
            stop = self.state.get("stop_at")
            if stop is not None and n_out >= stop:
                raise FakeRpcError(
                    grpc.StatusCode.ABORTED, f"request migrated to dest at output token {stop}"
                )
            t = next_token(seq)
            seq.append(t)
            n_out += 1
            self.state["n_out"] = n_out
            msg = worker_pb2.DecodeResponse(request_id=self.req.request_id, token_ids=[t])
            if n_out >= self.req.sampling.max_tokens:
                msg.finish.reason = common_pb2.FINISH_REASON_LENGTH
            yield msg

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeRpcs:
    """MigrateOut answers ``result``; MIGRATED stops the source at the output it has and makes
    the destination resume there (its fake engine runs prompt + the output so far)."""

    def __init__(self, workers: dict, source_state: dict, result: MigrationResult, blocks: int = 3) -> None:
        self.workers, self.state, self.result, self.blocks = workers, source_state, result, blocks
        self.calls: list = []
        self.resumed: list = []

    async def migrate(self, request_id: str, source_address: str, dest_address: str) -> MigrationReport:
        self.calls.append((request_id, source_address, dest_address))
        await asyncio.sleep(0)
        if not self.result.migrated:
            return MigrationReport(self.result, message=f"fake {self.result.name}")
        k = self.state.get("n_out", 1)
        self.state["stop_at"] = k
        return MigrationReport(self.result, resume_token_index=k, blocks_copied=self.blocks, num_stages=2)

    def resume(self, request_id: str, dest_address: str, start_index: int):
        self.resumed.append((dest_address, start_index))
        ref = reference(PROMPT, N)
        sampling = common_pb2.SamplingParams(max_tokens=N - start_index, temperature=0.0, ignore_eos=True)
        return self.workers[dest_address].Decode(
            worker_pb2.DecodeRequest(
                request_id=request_id,
                prompt_token_ids=PROMPT + ref[:start_index],
                sampling=sampling,
                local_prefill=True,
            )
        )


class MigratingContext(FakeContext):
    """Asks the router to migrate the request to ``dest`` once it wrote ``at`` responses."""

    def __init__(self, svc, dest: str, at: int) -> None:
        super().__init__()
        self.svc, self.dest, self.at = svc, dest, at
        self.future: asyncio.Future | None = None

    async def write(self, msg) -> None:
        await super().write(msg)
        if len(self.written) == self.at:
            (cluster_id,) = self.svc._drivers
            self.future = self.svc.migrate(cluster_id, self.dest, MigrationReason.LOAD_BALANCE)


def _setup(model_path: str, result: MigrationResult):
    svc, w, store, reg = _cluster(model_path, {"p0": None}, {"d0": None, "d1": None})
    state: dict = {"store": store}
    src = w["d0"]
    src.Decode = lambda req, timeout=None, metadata=None: _SourceStream(req, state)  # type: ignore[method-assign]
    rpcs = FakeRpcs(w, state, result)
    svc.migrator = lambda legs: GrpcLegsMigrator(legs, rpcs, svc.migrations)
    return svc, w, store, reg, rpcs, state


def _count(reg, reason: str, result: str) -> float:
    return reg.get_sample_value("pdserve_router_migrations_total", {"reason": reason, "result": result})


@pytest.fixture(scope="module")
def model_path(smollm_path):
    return str(smollm_path)


@pytest.mark.parametrize("result", list(MigrationResult), ids=lambda r: r.name)
def test_every_migrate_out_result_maps_to_a_commit_or_an_abort(model_path, result) -> None:
    svc, w, store, reg, rpcs, state = _setup(model_path, result)
    ctx = MigratingContext(svc, "d1", at=4)
    ids, text, last = _run(svc, _request(N), ctx)
    ref_ids = reference(PROMPT, N)
    assert ids == ref_ids and last.finish.usage.completion_tokens == N
    assert rpcs.calls == [(next(iter(w["p0"].calls)).request_id, "d0", "d1")]
    label = RESULT_LABELS[result]
    assert _count(reg, "load_balance", label) == 1
    assert sum(_count(reg, "load_balance", r) for r in RESULT_LABELS.values()) == 1
    assert ctx.future is not None and ctx.future.done()
    outcome: MigrationOutcome = ctx.future.result()
    assert outcome.result == label and outcome.source == "d0" and outcome.destination == "d1"
    downtime = reg.get_sample_value("pdserve_router_migration_downtime_seconds_count")
    blocks = reg.get_sample_value("pdserve_router_migration_blocks_copied_total")
    if result.migrated:
        ((dest, start),) = rpcs.resumed
        assert dest == "d1" and 1 <= start <= state["stop_at"]
        assert len(w["d1"].calls) == 1  # the destination streamed the rest
        assert blocks == 3 and downtime == 1
    else:
        assert rpcs.resumed == [] and not w["d1"].calls and "stop_at" not in state
        assert blocks == 0 and downtime == 0
    # the text is the unmigrated run's
    ref_svc, _, _, _ = _cluster(model_path, {"p0": None}, {"d0": None})
    _, ref_text, _ = _run(ref_svc, _request(N))
    assert text == ref_text
    assert svc.registry.get("d0").inflight == svc.registry.get("d1").inflight == 0
    assert store.leases == set() and svc._drivers == {} and svc.migrations.in_flight() == frozenset()


def test_unknown_destination_and_failed_call_abort_and_the_request_finishes(model_path) -> None:
    svc, w, _, reg, rpcs, _ = _setup(model_path, MigrationResult.MIGRATED)
    ids, _, _ = _run(svc, _request(N), MigratingContext(svc, "nowhere", at=3))
    assert ids == reference(PROMPT, N) and rpcs.calls == []
    assert _count(reg, "load_balance", "unknown_worker") == 1

    svc, w, _, reg, rpcs, _ = _setup(model_path, MigrationResult.MIGRATED)

    async def refused(*_a):
        raise InvalidRequestError("request is not decoding there")

    rpcs.migrate = refused  # type: ignore[method-assign]
    ids, _, _ = _run(svc, _request(N), MigratingContext(svc, "d1", at=3))
    assert ids == reference(PROMPT, N)
    assert _count(reg, "load_balance", "error") == 1


def _fake_legs(out: int = 5):
    reg = Registry(heartbeat_timeout_s=1e9)
    for wid in ("d0", "d1"):
        reg.register(wid, WorkerKind.DECODE, f"addr-{wid}", "m", WorkerLoad(0, 0, 100, 0, block_size=16))
    reg.register("p0", WorkerKind.PREFILL, "addr-p0", "m", WorkerLoad(0, 0, 100, 0, block_size=16))
    run = SimpleNamespace(out_ids=list(range(out)), workers={})
    return SimpleNamespace(svc=SimpleNamespace(registry=reg), run=run, migrating_from=set())


class _Call:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _Rpcs:
    def __init__(self, report: MigrationReport) -> None:
        self.report = report
        self.calls: list = []
        self.opened: list[tuple[str, int, _Call]] = []

    async def migrate(self, request_id, source_address, dest_address):
        self.calls.append((source_address, dest_address))
        return self.report

    def resume(self, request_id, dest_address, start_index):
        c = _Call()
        self.opened.append((dest_address, start_index, c))
        return c


def test_commit_starts_at_what_the_client_has_and_an_untaken_stream_is_cancelled() -> None:
    async def go():
        legs = _fake_legs(out=5)
        book = MigrationBook()
        rpcs = _Rpcs(MigrationReport(MigrationResult.MIGRATED, resume_token_index=9, blocks_copied=4))
        m = GrpcLegsMigrator(legs, rpcs, book)  # type: ignore[arg-type]
        t = MigrationTicket("r", "d0", "d1", 3)
        fut = book.start("r", "drain")
        res = await m.migrate(t)
        assert isinstance(res, MigrationCommit) and res.first_index == 5  # min(9, relayed 5)
        assert rpcs.calls == [("addr-d0", "addr-d1")] and rpcs.opened[0][:2] == ("addr-d1", 5)
        assert "d0" in legs.migrating_from and "d1" in legs.run.workers
        assert fut.result().migrated and fut.result().blocks_copied == 4
        await m.abort(t)  # the request ended before the lifecycle took the stream
        assert rpcs.opened[0][2].cancelled
        assert book.in_flight() == frozenset()

        # a prefill worker is no destination, and the ticket's end is reported once
        t2 = MigrationTicket("r2", "d0", "p0", 3)
        fut2 = book.start("r2", "manual")
        res2 = await m.migrate(t2)
        assert isinstance(res2, MigrationAbort) and "p0 is not a registered decode worker" in res2.reason
        await m.abort(t2)
        assert fut2.result().result == "unknown_worker"

        # an abort from the workers clears the switch marker: the source's stream goes on
        rpcs.report = MigrationReport(MigrationResult.ABORTED_DEST_FULL, message="no blocks")
        legs.migrating_from.clear()
        res3 = await m.migrate(MigrationTicket("r3", "d0", "d1", 3))
        assert isinstance(res3, MigrationAbort) and res3.reason == "dest_full: no blocks"
        assert legs.migrating_from == set()

    asyncio.run(go())


def test_book_refuses_a_second_migration_and_unknown_reasons() -> None:
    async def go():
        book = MigrationBook(metrics=None)
        book.start("r", "drain")
        with pytest.raises(MigrationInFlightError, match="already being migrated"):
            book.start("r", "drain")
        book.request_ended("r")
        assert book.in_flight() == frozenset()

    asyncio.run(go())
    from prometheus_client import CollectorRegistry

    from pdserve.metrics import RouterMetrics

    m = RouterMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="unknown migration reason"):
        m.observe_migration("whim", "migrated")
    with pytest.raises(ValueError, match="unknown migration result"):
        m.observe_migration("drain", "maybe")
