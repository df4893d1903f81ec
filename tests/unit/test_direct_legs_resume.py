"""router.lifecycle.direct_legs: the client's ResumeDirect tokens as the lifecycle renders them
(after a lost worker, or a live migration: ``DirectLegs.moved``). A request those tokens already
end (the worker sent the client its last delta but not the router its finish) is finished there,
not re-dispatched; otherwise nothing is sent and the leg turns relayed."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from engine.sampling_params import SamplingParams
from pdserve.ticket import TicketSigner
from pdserve.v1 import client_pb2, common_pb2, direct_pb2
from router.lifecycle.direct_legs import DirectBook, DirectLegs, _Note
from router.lifecycle.grpc_legs import RequestRun
from router.lifecycle.ports import Chunk
from router.lifecycle.states import OutputMismatch

EOS = 2


def _legs(params: SamplingParams, out: list[int]) -> DirectLegs:
    run = RequestRun("r1", [5, 6, 7], params, time.monotonic(), detok=None, out_ids=list(out))  # type: ignore[arg-type]
    svc = SimpleNamespace(eos=frozenset({EOS}))
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


def test_moved_tells_the_client_to_resume_then_relays_the_destination():
    asyncio.run(_moved_resumes())


async def _moved_resumes():
    """DirectLegs.moved: the lost note (the source's redirect), the client's tokens, then the
    destination's chunks; a resume that does not extend the output is OutputMismatch."""
    legs = _legs(SamplingParams(max_tokens=50), [10, 11])
    legs._redirect = direct_pb2.DirectRedirect(address="a:1", worker_id="w-src", ticket="t1", request_id="r1")

    async def dest():
        yield Chunk(2, (12, 13, 14), "from the destination")

    moved = legs.moved(dest())
    note = await anext(moved)
    assert note.first_index == 2 and note.tokens == () and note.message.kind == "lost"
    assert note.message.redirect.lost and note.message.redirect.worker_id == "w-src"
    assert not legs._direct and legs._redirect is None  # what follows is relayed
    req = direct_pb2.ResumeDirectRequest(request_id="r1", ticket="t1", token_ids=[10, 11, 12], text_chars=5)
    await legs.book.ResumeDirect(req, None)
    resumed = await anext(moved)
    assert resumed.first_index == 2 and resumed.tokens == (12,) and resumed.message.text_chars == 5
    assert [c.tokens async for c in moved] == [(12, 13, 14)]
    assert "r1" not in legs.book._waiting

    legs = _legs(SamplingParams(max_tokens=50), [10, 11])
    legs._redirect = direct_pb2.DirectRedirect(ticket="t2", request_id="r1")
    moved = legs.moved(dest())
    await anext(moved)
    bad = direct_pb2.ResumeDirectRequest(request_id="r1", ticket="t2", token_ids=[10, 99, 12])
    await legs.book.ResumeDirect(bad, None)
    with pytest.raises(OutputMismatch):
        await anext(moved)


def test_moved_of_a_leg_never_redirected_is_the_destination_alone():
    asyncio.run(_never_redirected())


async def _never_redirected():
    legs = _legs(SamplingParams(max_tokens=50), [10])

    async def dest():
        yield Chunk(1, (11,), "d")

    assert [c.tokens async for c in legs.moved(dest())] == [(11,)]
    assert not legs._direct
