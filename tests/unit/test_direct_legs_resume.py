"""router.lifecycle.direct_legs: the client's ResumeDirect tokens as the lifecycle renders them
(after a lost worker, or a live migration: ``DirectLegs.moved``). A request those tokens already
end (the worker sent the client its last delta but not the router its finish: the length, a stop
token / EOS, or a stop string in their text) is finished there, not re-dispatched; otherwise
nothing is sent and the leg turns relayed. A live migration's destination is opened with a direct
grant from the client's index (a new redirect: the client streams from it), relayed when it
refuses or ignores the grant."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer
from pdserve.errors import InvalidRequestError
from pdserve.ticket import TicketSigner, decode_unverified
from pdserve.v1 import client_pb2, common_pb2, direct_pb2, worker_pb2
from router.lifecycle.direct_legs import DirectBook, DirectLegs, _Note
from router.lifecycle.grpc_legs import RequestRun, output_end
from router.lifecycle.ports import Chunk
from router.lifecycle.states import OutputMismatch
from router.progress import ProgressConfig
from router.registry import WorkerEntry, WorkerKind, WorkerLoad

EOS = 2


class _CharTokenizer:
    """Token t renders as chr(t) (enough for the detokenizer's stop-string matching)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(t) for t in ids)


TOK = _CharTokenizer()


def _legs(params: SamplingParams, out: list[int]) -> DirectLegs:
    detok = IncrementalDetokenizer(TOK, params.stop)  # type: ignore[arg-type]
    run = RequestRun("r1", [5, 6, 7], params, time.monotonic(), detok=detok, out_ids=list(out))
    run.workers["w-dst"] = WorkerEntry("w-dst", WorkerKind.DECODE, "b:2", "m", WorkerLoad(0, 0, 64, 0))
    svc = SimpleNamespace(
        eos=frozenset({EOS}), tokenizer=TOK, config=SimpleNamespace(progress=ProgressConfig())
    )
    book = DirectBook(signer=TicketSigner(b"k" * 32))
    legs = DirectLegs(svc, client_pb2.GenerateRequest(), run, None, book)  # type: ignore[arg-type]
    legs._direct = True
    return legs


def _resumed(legs: DirectLegs, tokens: list[int]) -> tuple[client_pb2.GenerateResponse | None, bool]:
    k = len(legs.run.out_ids)
    return legs.render(Chunk(k, tuple(tokens), _Note("resumed", text_chars=9)), 0)


def test_resumed_tokens_that_reach_max_tokens_finish_the_request():
    legs = _legs(SamplingParams(max_tokens=4, ignore_eos=True), [10])
    resp, done = _resumed(legs, [11, 12, 13])
    assert done and resp is not None and resp.request_id == "r1"
    assert resp.finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert legs.run.out_ids == [10, 11, 12, 13] and not resp.token_ids  # the client has them
    assert resp.finish.usage.completion_tokens == 4 and legs.run.sent_chars == 9


def test_resumed_tokens_ending_in_eos_finish_the_request_with_stop():
    legs = _legs(SamplingParams(max_tokens=50), [10])
    resp, done = _resumed(legs, [11, EOS])
    assert done and resp is not None and resp.finish.reason == common_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize(
    "params,tokens",
    [
        (SamplingParams(max_tokens=50), [11, 12]),  # neither EOS nor the length: goes on
        (SamplingParams(max_tokens=50, ignore_eos=True), [11, EOS]),  # EOS ignored
        (SamplingParams(max_tokens=50, min_tokens=10), [11, EOS]),  # EOS before min_tokens
    ],
)
def test_resumed_tokens_that_do_not_end_the_request_send_nothing_and_relay(params, tokens):
    legs = _legs(params, [10])
    assert _resumed(legs, tokens) == (None, False)
    assert legs.run.out_ids == [10, *tokens] and legs.run.finish is None and not legs._direct


def test_resumed_tokens_whose_text_holds_a_stop_string_finish_the_request_naming_it():
    """The worker matched a stop string (its engine's detokenizer), sent the client its last
    delta and was lost before the router's finish: the router's detokenizer, caught up with the
    client's tokens, finds it too (the same finish decision as for a prefill's token)."""
    legs = _legs(SamplingParams(max_tokens=50, stop=("END",)), [ord("a")])
    resp, done = _resumed(legs, [ord(c) for c in "bcEND"])
    assert done and resp is not None
    assert resp.finish.reason == common_pb2.FINISH_REASON_STOP and resp.finish.stop == "END"
    assert resp.finish.usage.completion_tokens == 6 and not resp.token_ids


def test_resumed_tokens_with_a_stop_string_prefix_only_go_on():
    legs = _legs(SamplingParams(max_tokens=50, stop=("END",)), [ord("a")])
    assert _resumed(legs, [ord(c) for c in "bcEN"]) == (None, False)
    assert legs.run.finish is None and not legs._direct


def test_output_end_is_one_decision_stop_strings_first_then_stop_tokens_then_length():
    p = SamplingParams(max_tokens=3, stop=("x",))
    assert output_end([1, 2, 3], p, frozenset({EOS}), "x") == output_end([1], p, frozenset(), "x")
    assert output_end([1, 2, 3], p, frozenset({EOS}), "x").stop == "x"  # type: ignore[union-attr]
    e = output_end([1, 2, EOS], p, frozenset({EOS}), None)
    assert e is not None and e.stop == str(EOS) and e.stop_token
    e = output_end([1, 2, 3], p, frozenset({EOS}), None)
    assert e is not None and e.reason == common_pb2.FINISH_REASON_LENGTH and e.stop is None
    assert output_end([1, 4], p, frozenset({EOS}), None) is None
    assert output_end([1, EOS], SamplingParams(max_tokens=9, min_tokens=5), frozenset({EOS}), None) is None


class _Dest:
    """A fake destination stream (chunks, ``cancel``); ``fail``: raised at its first read."""

    def __init__(self, chunks: list[Chunk], fail: BaseException | None = None) -> None:
        self.chunks, self.fail, self.cancelled = list(chunks), fail, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        if self.fail is not None:
            raise self.fail
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True

    async def aclose(self) -> None:
        self.cancelled = True


class _Opener:
    """Records the destination streams the legs open: (start index, direct fields or None)."""

    def __init__(self, *streams: _Dest) -> None:
        self.streams = list(streams)
        self.opened: list[tuple[int, worker_pb2.ResumeStreamRequest | None]] = []

    def __call__(self, start_index, direct, watch):
        self.opened.append((start_index, direct))
        return self.streams.pop(0)


def _redirected(params: SamplingParams, out: list[int]) -> DirectLegs:
    legs = _legs(params, out)
    legs._redirect = direct_pb2.DirectRedirect(address="a:1", worker_id="w-src", ticket="t1", request_id="r1")
    return legs


async def _resume(legs: DirectLegs, moved, tokens: list[int], chars: int) -> Chunk:
    note = await anext(moved)
    assert note.message.kind == "lost" and note.message.redirect.lost
    assert note.message.redirect.worker_id == "w-src"
    req = direct_pb2.ResumeDirectRequest(request_id="r1", ticket="t1", token_ids=tokens, text_chars=chars)
    await legs.book.ResumeDirect(req, None)
    resumed = await anext(moved)
    assert legs.render(resumed, 0) == (None, False)  # as the lifecycle does: joins the output
    return resumed


def test_moved_resumes_the_client_then_redirects_it_to_the_destination():
    asyncio.run(_moved_direct())


async def _moved_direct():
    params = SamplingParams(max_tokens=50, stop=("zz",))
    legs = _redirected(params, [10, 11])
    admitted = worker_pb2.DecodeResponse(request_id="r1", direct_address="b:3")
    progress = worker_pb2.DecodeResponse(request_id="r1", token_ids=[13, 14])
    dest = _Dest([Chunk(3, (), admitted), Chunk(3, (13, 14), progress)])
    opener = _Opener(dest)
    moved = legs.moved("w-dst", 5, 2, opener)
    assert opener.opened == []  # not before the client's tokens are known
    resumed = await _resume(legs, moved, [10, 11, 12], 5)
    assert resumed.first_index == 2 and resumed.tokens == (12,)
    redirect = await anext(moved)
    ((start, ask),) = opener.opened
    assert start == 3 and ask is not None  # from the client's index, direct
    assert ask.direct_text_chars == 5 and list(ask.direct_stop) == ["zz"]
    claims = decode_unverified(ask.direct.ticket)
    assert claims.worker_id == "w-dst" and claims.request_id == "r1"
    r = redirect.message.redirect
    assert redirect.message.kind == "redirect" and not r.lost
    assert r.address == "b:3" and r.worker_id == "w-dst" and r.ticket == ask.direct.ticket
    assert legs._direct and legs._redirect is r
    rendered = legs.render(await anext(moved), 0)
    assert rendered == (None, False) and legs.run.out_ids == [10, 11, 12, 13, 14]  # progress only
    assert [c async for c in moved] == []
    assert "r1" not in legs.book._waiting


def test_moved_relays_a_destination_that_refuses_the_grant():
    asyncio.run(_moved_refused())


async def _moved_refused():
    legs = _redirected(SamplingParams(max_tokens=50), [10, 11])
    refused = _Dest([], fail=InvalidRequestError("decode worker w-dst does not serve direct streams"))
    relayed = _Dest([Chunk(3, (13, 14), "relayed")])
    opener = _Opener(refused, relayed)
    moved = legs.moved("w-dst", 5, 2, opener)
    await _resume(legs, moved, [10, 11, 12], 5)
    assert [c.tokens async for c in moved] == [(13, 14)]
    assert [(s, d is not None) for s, d in opener.opened] == [(3, True), (3, False)]
    assert refused.cancelled and not legs._direct and legs._redirect is None


def test_moved_relays_a_destination_that_ignores_the_grant():
    asyncio.run(_moved_ignored())


async def _moved_ignored():
    legs = _redirected(SamplingParams(max_tokens=50), [10, 11])
    old = _Dest([Chunk(3, (13,), worker_pb2.DecodeResponse(token_ids=[13])), Chunk(4, (14,), "more")])
    opener = _Opener(old)
    moved = legs.moved("w-dst", 5, 2, opener)
    await _resume(legs, moved, [10, 11, 12], 5)
    assert [c.tokens async for c in moved] == [(13,), (14,)]
    assert not legs._direct and legs._redirect is None


def test_moved_checks_the_clients_tokens():
    asyncio.run(_moved_mismatch())


async def _moved_mismatch():
    legs = _redirected(SamplingParams(max_tokens=50), [10, 11])
    released = _Dest([Chunk(2, (11, 12), "replay")])
    opener = _Opener(released)
    moved = legs.moved("w-dst", 5, 2, opener)
    await anext(moved)
    bad = direct_pb2.ResumeDirectRequest(request_id="r1", ticket="t1", token_ids=[10, 99, 12])
    await legs.book.ResumeDirect(bad, None)
    with pytest.raises(OutputMismatch):
        await anext(moved)
    # the request ends: the destination, never streamed from, is opened relayed and let go at once
    for _ in range(20):
        if released.cancelled:
            break
        await asyncio.sleep(0.01)
    assert opener.opened == [(2, None)] and released.cancelled


def test_moved_of_a_leg_never_redirected_opens_the_destination_at_once_relayed():
    legs = _legs(SamplingParams(max_tokens=50), [10])
    dest = _Dest([Chunk(1, (11,), "d")])
    opener = _Opener(dest)
    assert legs.moved("w-dst", 4, 1, opener) is dest
    assert opener.opened == [(1, None)] and not legs._direct


class _Rpcs:
    """MigrateOut answers MIGRATED at index 4; resume calls are recorded fakes."""

    def __init__(self) -> None:
        self.resumed: list[tuple[int, object]] = []
        self.calls: list[_Call] = []

    async def migrate(self, request_id, source_address, dest_address):
        from router.migration_client import MigrationReport, MigrationResult

        return MigrationReport(MigrationResult.MIGRATED, resume_token_index=4, blocks_copied=2)

    def resume(self, request_id, dest_address, start_index, direct=None):
        self.resumed.append((start_index, direct))
        call = _Call()
        self.calls.append(call)
        return call


class _Call:
    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled:
            raise StopAsyncIteration
        return worker_pb2.DecodeResponse(token_ids=[13])

    def cancel(self) -> None:
        self.cancelled = True


def test_a_direct_commit_the_lifecycle_never_took_lets_its_destination_go():
    """The request ended between MigrateOut's answer and the switch: the destination's stream,
    which a direct leg opens only after the client's ResumeDirect, is opened and closed at once
    (the destination aborts the request now, not at its attach timeout)."""
    asyncio.run(_never_taken())


async def _never_taken():
    from router.lifecycle.grpc_migrator import GrpcLegsMigrator
    from router.lifecycle.migrator import MigrationCommit, MigrationTicket
    from router.registry import Registry

    legs = _redirected(SamplingParams(max_tokens=50), [10, 11])
    reg = Registry(heartbeat_timeout_s=1e9)
    for w in ("w-src", "w-dst"):
        reg.register(w, WorkerKind.DECODE, f"{w}:1", "m", WorkerLoad(0, 0, 64, 0))
    legs.svc.registry = reg
    legs.svc._streamed_at = {}
    legs.svc.config.progress = ProgressConfig()
    rpcs = _Rpcs()
    mig = GrpcLegsMigrator(legs, rpcs)  # type: ignore[arg-type]
    ticket = MigrationTicket("r1", "w-src", "w-dst", 2)
    commit = await mig.migrate(ticket)
    assert isinstance(commit, MigrationCommit) and rpcs.resumed == []  # not opened yet
    await mig.abort(ticket)
    for _ in range(50):
        if rpcs.calls and rpcs.calls[0].cancelled:
            break
        await asyncio.sleep(0.01)
    assert [(s, d is None) for s, d in rpcs.resumed] == [(2, True)] and rpcs.calls[0].cancelled
