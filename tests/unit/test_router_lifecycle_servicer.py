"""Live migration through the router's servicer (GenerateServicer.migrate + a Migrator made per
request from its legs), against the in-process fake workers of test_router_redispatch: the
client's stream continues on the destination with no gap and no duplicate, text included, and
every count and lease returns to zero. The migrator here stands in for the decode workers'
MigrateOut + ResumeStream (the destination streams from the migration's start index)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.errors import RequestNotFoundError
from pdserve.v1 import common_pb2, worker_pb2
from router.lifecycle.grpc_legs import GrpcLegs
from router.lifecycle.migrator import MigrationAbort, MigrationCommit, MigrationTicket
from router.lifecycle.states import LifecycleError
from tests.unit.test_router_redispatch import PROMPT, FakeContext, _cluster, _request, _run, reference


class ResumingMigrator:
    """Commits at once: the destination replays from ``ticket.from_index`` (its fake engine runs
    prompt + the output so far), or aborts with ``abort``."""

    def __init__(self, legs: GrpcLegs, workers: dict, log: list, abort: str | None = None) -> None:
        self.legs, self.workers, self.log, self.abort_reason = legs, workers, log, abort

    async def migrate(self, ticket: MigrationTicket) -> MigrationCommit | MigrationAbort:
        self.log.append(("migrate", ticket.source, ticket.destination, ticket.from_index))
        if self.abort_reason:
            return MigrationAbort(self.abort_reason)
        k = ticket.from_index
        ref = reference(PROMPT, 12)
        sampling = common_pb2.SamplingParams(max_tokens=12 - k, temperature=0.0, ignore_eos=True)
        call = self.workers[ticket.destination].Decode(
            worker_pb2.DecodeRequest(
                request_id=ticket.request_id,
                prompt_token_ids=PROMPT + ref[:k],
                sampling=sampling,
                local_prefill=True,
            )
        )
        dest = self.legs.svc.registry.get(ticket.destination)
        self.log.append(("stream", call))
        return MigrationCommit(k, self.legs.stream(call, dest, k))

    async def abort(self, ticket: MigrationTicket) -> None:
        self.log.append(("abort", ticket.destination))


class MigratingContext(FakeContext):
    """Asks the router to migrate the request to ``dest`` once it wrote ``at`` responses."""

    def __init__(self, svc, dest: str, at: int) -> None:
        super().__init__()
        self.svc, self.dest, self.at = svc, dest, at

    async def write(self, msg) -> None:
        await super().write(msg)
        if len(self.written) == self.at:
            (cluster_id,) = self.svc._drivers  # the id workers know it by, not the client's
            self.svc.migrate(cluster_id, self.dest)


@pytest.fixture(scope="module")
def model_path(smollm_path):
    return str(smollm_path)


@pytest.mark.parametrize("abort", [None, "destination out of blocks"])
def test_a_request_migrated_mid_stream_continues_on_the_destination(model_path, abort) -> None:
    ref_svc, _, _, _ = _cluster(model_path, {"p0": None}, {"d0": None})
    ref_ids, ref_text, _ = _run(ref_svc, _request())
    svc, w, store, _ = _cluster(model_path, {"p0": None}, {"d0": None, "d1": None})
    log: list = []
    svc.migrator = lambda legs: ResumingMigrator(legs, w, log, abort)
    ids, text, last = _run(svc, _request(), MigratingContext(svc, "d1", at=4))
    assert ids == ref_ids == reference(PROMPT, 12) and text == ref_text
    assert last.finish.usage.completion_tokens == 12
    assert log[0] == ("migrate", "d0", "d1", 4)
    if abort is None:
        assert len(w["d1"].calls) == 1 and w["d0"].calls[0].kv.lease_id  # it ran on d0, then d1
    else:
        assert not w["d1"].calls
    assert svc.registry.get("d0").inflight == svc.registry.get("d1").inflight == 0
    assert svc.kv_tokens.get("d0") == svc.kv_tokens.get("d1") == 0
    assert store.leases == set() and svc._drivers == {}


def test_migrate_refuses_an_unknown_request_and_a_router_without_migrator(model_path) -> None:
    svc, _, _, _ = _cluster(model_path, {"p0": None}, {"d0": None, "d1": None})
    svc.migrator = None  # a router with migration off (RouterConfig.migration)
    with pytest.raises(RequestNotFoundError, match="no request 'nope'"):
        svc.migrate("nope", "d1")

    class Ctx(FakeContext):
        async def write(self, msg) -> None:
            await super().write(msg)
            if len(self.written) == 2:
                with pytest.raises(LifecycleError, match="needs a Migrator"):
                    svc.migrate(next(iter(svc._drivers)), "d1")

    ids, _, _ = _run(svc, _request(), Ctx())
    assert ids == reference(PROMPT, 12)


def test_the_live_request_table_is_emptied_when_a_client_leaves(model_path) -> None:
    svc, _, _, _ = _cluster(model_path, {"p0": None}, {"d0": None})
    ctx = FakeContext(leave_after=2)
    asyncio.run(svc.Generate(_request(), ctx))
    assert svc._drivers == {} and svc.registry.get("d0").inflight == 0
