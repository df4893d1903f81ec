"""Direct-stream tickets (pdserve.ticket) and the decode worker's attach checks
(decode_worker.direct.DirectStreams), in process: every refusal is PERMISSION_DENIED naming why."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from decode_worker.direct import DirectStreams, _Conn
from pdserve.errors import InvalidRequestError, PermissionDeniedError
from pdserve.ticket import TicketClaims, TicketSigner, decode_unverified, ticket_key
from pdserve.v1 import direct_pb2, worker_pb2

NOW = 1_000_000.0
CLAIMS = TicketClaims("req-1", "decode-0", "tenant-a", NOW + 30)


def signer(token: str = "cluster-token") -> TicketSigner:
    return TicketSigner(ticket_key(token))


def test_mint_and_verify_round_trip() -> None:
    t = signer().mint(CLAIMS)
    got = signer().verify(t, request_id="req-1", worker_id="decode-0", tenant="tenant-a", now=NOW)
    assert got == CLAIMS
    assert decode_unverified(t) == CLAIMS


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"request_id": "req-2"}, "for request 'req-1'"),
        ({"worker_id": "decode-1"}, "for decode worker 'decode-0'"),
        ({"tenant": "tenant-b"}, "another tenant"),
        ({"now": NOW + 31}, "expired"),
    ],
)
def test_claims_that_do_not_hold_are_refused(kw, why) -> None:
    args = {"request_id": "req-1", "worker_id": "decode-0", "tenant": "tenant-a", "now": NOW, **kw}
    with pytest.raises(PermissionDeniedError, match=why):
        signer().verify(signer().mint(CLAIMS), **args)


def test_forged_and_foreign_key_tickets_are_refused() -> None:
    t = signer().mint(CLAIMS)
    payload, mac = t.split(".")
    forged_claims = signer("another cluster").mint(TicketClaims("req-1", "decode-0", "tenant-b", NOW + 30))
    args = {"request_id": "req-1", "worker_id": "decode-0", "tenant": "tenant-a", "now": NOW}
    with pytest.raises(PermissionDeniedError, match="bad signature"):
        signer().verify(payload + "." + mac[::-1], **args)
    with pytest.raises(PermissionDeniedError, match="bad signature"):
        signer("another cluster").verify(t, **args)  # another key
    with pytest.raises(PermissionDeniedError, match="bad signature"):
        signer().verify(forged_claims.split(".")[0] + "." + mac, **{**args, "tenant": "tenant-b"})
    with pytest.raises(PermissionDeniedError, match="malformed"):
        signer().verify("not-a-ticket", **args)


def test_keys_agree_with_a_token_and_differ_without() -> None:
    assert ticket_key("t") == ticket_key("t") != ticket_key("u")
    assert ticket_key("") != ticket_key("")  # random per process: no token, no shared key
    with pytest.raises(ValueError, match="32 bytes"):
        TicketSigner(b"short")


class _Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def _decode_req(ticket: str, tenant: str = "tenant-a", **kw) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id="req-1", tenant=tenant, direct=direct_pb2.DirectGrant(ticket=ticket), **kw
    )


def test_worker_attach_checks() -> None:
    """A registered direct request: the wrong ticket, an expired one and an unknown request are
    refused on the presenter's connection only; its own ticket attaches it."""

    async def scenario():
        clock = _Clock()
        s = signer()
        ds = DirectStreams("decode-0", s, clock=clock)
        ticket = s.mint(CLAIMS)
        aborted: list[BaseException] = []
        ds._register("req-1", ticket, "tenant-a", aborted.append)
        other_tenant = s.mint(TicketClaims("req-1", "decode-0", "tenant-b", NOW + 30))
        conn = _Conn(ctx=None)  # type: ignore[arg-type]
        attach = direct_pb2.DirectAttach
        ds._attach(conn, attach(request_id="req-1", ticket=other_tenant))
        ds._attach(conn, attach(request_id="req-9", ticket=ticket))
        clock.t = NOW + 31
        ds._attach(conn, attach(request_id="req-1", ticket=ticket))
        refused = [(d.request_id, d.error_code, d.error) for d in conn.refusals]
        clock.t = NOW
        conn.refusals.clear()
        ds._attach(conn, attach(request_id="req-1", ticket=ticket))
        return refused, conn, aborted

    refused, conn, aborted = asyncio.run(scenario())
    denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert [(r, c) for r, c, _ in refused] == [("req-1", denied), ("req-9", denied), ("req-1", denied)]
    assert "not the ticket of this request" in refused[0][2]
    assert "no request 'req-9'" in refused[1][2]
    assert "expired" in refused[2][2]
    assert not conn.refusals and list(conn.slots) == ["req-1"] and not aborted


def test_worker_refuses_direct_requests_it_cannot_serve() -> None:
    ds = DirectStreams("decode-0", None)
    for bad in (_decode_req("t", prompt_tail_pending=True), _decode_req("t", resume_token_ids=[1])):
        with pytest.raises(InvalidRequestError, match="fresh request only"):
            ds.check(bad)
    ds.check(_decode_req("t", local_prefill=True))  # conditional disaggregation streams directly too
    with pytest.raises(InvalidRequestError, match="no ticket"):
        ds.check(_decode_req(""))


def test_worker_refuses_a_grant_for_another_worker() -> None:
    async def scenario():
        ds = DirectStreams("decode-1", None, clock=_Clock())
        ds._register("req-1", signer().mint(CLAIMS), "tenant-a", lambda e: None)

    with pytest.raises(PermissionDeniedError, match="decode worker 'decode-0', not 'decode-1'"):
        asyncio.run(scenario())


def test_unattached_request_is_aborted_at_expiry() -> None:
    async def scenario():
        clock = _Clock()
        ds = DirectStreams("decode-0", None, clock=clock)
        aborted: list[BaseException] = []
        claims = TicketClaims("req-1", "decode-0", "tenant-a", NOW + 0.05)
        ds._register("req-1", signer().mint(claims), "tenant-a", aborted.append)
        clock.t = NOW + 1
        await asyncio.sleep(0.2)
        return aborted, ds

    aborted, ds = asyncio.run(scenario())
    assert len(aborted) == 1 and "did not attach" in str(aborted[0])
    assert not ds._slots


def test_the_attach_window_counts_from_the_workers_own_admission() -> None:
    """A Decode call that reached the worker with 30 s left on its ticket and was admitted 100 s
    later (waiting for free blocks, or for an admission thread, under a burst): the slot is
    registered (the ticket was valid when the call came) and its client has the same 30 s from
    then to attach, not a ticket that expired 70 s ago. The signed ticket's other claims still
    hold at the attach; past the shifted window the attach is refused, and a grant that had
    already expired when the call came is refused at registration. Before: 208 of a 1,000-request
    burst through the OpenAI server failed PERMISSION_DENIED "expired" at registration."""

    async def scenario():
        clock = _Clock()
        s = signer()
        ds = DirectStreams("decode-0", s, clock=clock)
        ticket = s.mint(CLAIMS)  # expires at NOW + 30
        clock.t = NOW + 100  # admitted 100 s after the call came at NOW
        slot = ds._register("req-1", ticket, "tenant-a", lambda e: None, arrived=NOW)
        assert slot.expires_at == NOW + 130 and slot.ticket_expires_at == NOW + 30
        conn = _Conn(ctx=None)  # type: ignore[arg-type]
        clock.t = NOW + 125
        other_tenant = s.mint(TicketClaims("req-1", "decode-0", "tenant-b", NOW + 30))
        ds._attach(conn, direct_pb2.DirectAttach(request_id="req-1", ticket=other_tenant))
        ds._attach(conn, direct_pb2.DirectAttach(request_id="req-1", ticket=ticket))
        refused = [d.error for d in conn.refusals]
        attached = list(conn.slots)
        ds2 = DirectStreams("decode-0", s, clock=clock)
        clock.t = NOW + 120
        ds2._register("req-1", ticket, "tenant-a", lambda e: None, arrived=NOW + 20)
        late = _Conn(ctx=None)  # type: ignore[arg-type]
        clock.t = NOW + 131
        ds2._attach(late, direct_pb2.DirectAttach(request_id="req-1", ticket=ticket))
        with pytest.raises(PermissionDeniedError, match="expired"):
            DirectStreams("decode-0", s, clock=clock)._register(
                "req-1", ticket, "tenant-a", lambda e: None, arrived=NOW + 31
            )
        return refused, attached, [d.error for d in late.refusals]

    refused, attached, late = asyncio.run(scenario())
    assert len(refused) == 1 and "not the ticket of this request" in refused[0]
    assert attached == ["req-1"]
    # its call came at NOW + 20 (10 s left), registered at NOW + 120: the window ends at NOW + 130
    assert len(late) == 1 and "expired 1.0s ago" in late[0]


def test_a_request_that_ended_before_its_client_attached_gives_its_verdict_not_a_refusal() -> None:
    """A drain migrates a direct request away before its client (slow to read) attached: the
    late attach gets the ABORTED "migrated" delta, which the client holds until the router's word,
    not PERMISSION_DENIED "no request" (which failed the call: CI run 23, test_ray_cluster). The
    request may come back to this worker (a later rebalance) while that slot waits."""
    from decode_worker.direct import _Slot
    from decode_worker.migration_wire import RequestMigratedError

    async def scenario():
        clock = _Clock()
        ds = DirectStreams("decode-0", None, clock=clock)
        ticket = signer().mint(CLAIMS)
        slot: _Slot = ds._register("req-1", ticket, "tenant-a", lambda e: None)
        slot.tokens.extend([5, 6])
        ds._push(slot, None, RequestMigratedError("request req-1 migrated to decode-1"))
        assert ds._waits_attach(slot)  # what serve()'s end checks before dropping it
        conn = _Conn(ctx=None)  # type: ignore[arg-type]
        ds._attach(conn, direct_pb2.DirectAttach(request_id="req-1", ticket=ticket))
        delta = conn.dirty["req-1"].take()
        ds._detach(conn, "req-1", "test")
        again = ds._register("req-1", ticket, "tenant-a", lambda e: None)
        ds._push(again, None, RequestMigratedError("migrated again"))
        back = ds._register("req-1", ticket, "tenant-a", lambda e: None)  # replaces the ended slot
        live = ds._slots["req-1"]
        with pytest.raises(InvalidRequestError, match="already streams directly"):
            ds._register("req-1", ticket, "tenant-a", lambda e: None)  # a live one is not replaced
        clock.t = NOW + 31
        return conn, delta, back, live, ds._waits_attach(back)

    conn, delta, back, live, waits_after_expiry = asyncio.run(scenario())
    assert not conn.refusals
    assert delta.done and delta.error_code == grpc.StatusCode.ABORTED.value[0]
    assert "migrated to decode-1" in delta.error and list(delta.token_ids) == [5, 6]
    assert live is back and not waits_after_expiry
