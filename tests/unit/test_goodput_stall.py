"""A local prefill stalls the requests decoding on its instance: the goodput policy allows it only
within what they absorb under their TPOT limits (#19), and a limit is the larger headroom of the
learned error spread and the margin, not both.

Latency model as in test_policy_goodput: prefill 1 ms per new token, decode step 10 ms + 1 ms per
request in the batch, transfers nearly free.
"""

from __future__ import annotations

import math

import pytest

from router.policy import SLO, ClusterView, GoodputConfig, RejectReason
from router.policy.ledger import Inflight, Ledger
from tests.unit.test_policy_goodput import D, P, placed, policy, rejected, req, snap


def _entry(rid: str, decode_id: str, budget: float, expires: float = 100.0) -> Inflight:
    return Inflight(rid, "", decode_id, False, 0.1, 0.01, 1.0, expires, stall_budget_s=budget)


def test_ledger_stall_room_is_the_least_budget_left_on_the_instance() -> None:
    led = Ledger()
    assert led.stall_room("d0") == math.inf
    led.add(_entry("a", "d0", 1.0))
    led.add(_entry("b", "d0", 0.5))
    led.add(_entry("c", "d1", 0.2))
    led.add(_entry("free", "d0", math.inf))  # no TPOT SLO: never limits the room
    assert led.stall_room("d0") == pytest.approx(0.5) and led.stall_room("d1") == pytest.approx(0.2)
    led.stall("d0", 0.3)
    assert led.stall_room("d0") == pytest.approx(0.2) and led.stall_room("d1") == pytest.approx(0.2)
    led.add(_entry("late", "d0", 0.4))  # admitted after the stall: not charged for it
    assert led.stall_room("d0") == pytest.approx(0.2)
    led.pop("b")
    assert led.stall_room("d0") == pytest.approx(0.4)
    led.pop("late")
    assert led.stall_room("d0") == pytest.approx(0.7)
    led.expire(now=200.0)  # every entry expired: no room limit left anywhere
    assert led.stall_room("d0") == math.inf and led.stall_room("d1") == math.inf
    led.add(_entry("new", "d0", 0.25))  # a fresh start: the old stalls are not charged to it
    assert led.stall_room("d0") == pytest.approx(0.25)
    led.stall("d9", 1.0)  # nobody there: no-op
    assert led.stall_room("d9") == math.inf
    with pytest.raises(ValueError, match="stall"):
        led.stall("d0", -1.0)


def test_local_prefill_only_while_the_decoding_requests_absorb_its_stall() -> None:
    pol = policy(local_prefill_max_tokens=256)
    # "a" decodes on d0 with a TPOT limit of 27 ms (30 ms SLO, 10% margin) against a predicted
    # 11 ms: over its 10 decode intervals it absorbs (27 - 11) x 10 = 160 ms of stall
    a = placed(
        pol.place(
            req("a", n=32, out=11, slo=SLO(ttft_s=2.0, tpot_s=0.030)),
            ClusterView([snap("p0", P), snap("d0", D)]),
        )
    )
    assert a.decode_instance_id == "d0"
    busy_prefill = ClusterView([snap("p0", P, q=2000), snap("d0", D, running=1)])
    # a 100-token prompt: local TTFT 100 ms + one co-scheduled decode step 11 ms = 111 ms, well
    # before the busy prefill worker's 2.1 s; within a's room: local
    b = placed(pol.place(req("b", n=100, slo=SLO(ttft_s=5.0)), busy_prefill))
    assert b.local_prefill and b.instance_id == "d0"
    # a's room is now 49 ms: another local prefill would push a past its TPOT limit, so the
    # next one goes to the (slower) prefill worker while its TTFT allows it ...
    c = placed(pol.place(req("c", n=100, slo=SLO(ttft_s=5.0)), busy_prefill))
    assert not c.local_prefill and c.instance_id == "p0"
    # ... and is refused when only the local option met the TTFT SLO
    r = rejected(pol.place(req("d", n=100, slo=SLO(ttft_s=2.0)), busy_prefill))
    assert r.reason is RejectReason.SLO_UNATTAINABLE and "predicted TTFT" in r.message
    # once a finished, nothing decoding on d0 has a TPOT SLO: local again
    pol.release("a")
    e = placed(pol.place(req("e", n=100, slo=SLO(ttft_s=2.0)), busy_prefill))
    assert e.local_prefill and e.instance_id == "d0"


def test_best_effort_request_prefills_locally_only_when_there_is_no_other_way() -> None:
    pol = policy(local_prefill_max_tokens=256)
    placed(
        pol.place(
            req("a", n=32, out=11, slo=SLO(ttft_s=2.0, tpot_s=0.013)),
            ClusterView([snap("p0", P), snap("d0", D)]),
        )
    )
    busy_prefill = ClusterView([snap("p0", P, q=2000), snap("d0", D, running=1)])
    d = placed(pol.place(req("b", n=100), busy_prefill))  # no SLO: best effort
    assert not d.local_prefill and d.instance_id == "p0"
    only_decode = ClusterView([snap("d0", D, running=1)])
    d = placed(pol.place(req("c", n=100), only_decode))
    assert d.local_prefill and d.instance_id == "d0"


def test_no_prefill_instance_and_no_stall_room_is_refused_saying_so() -> None:
    pol = policy(local_prefill_max_tokens=256)
    # a: predicted TPOT 11 ms against a limit of 11.7 ms: it absorbs 7 ms of stall
    placed(pol.place(req("a", n=32, out=11, slo=SLO(ttft_s=2.0, tpot_s=0.013)), ClusterView([snap("d0", D)])))
    r = rejected(pol.place(req("b", n=100, slo=SLO(ttft_s=2.0)), ClusterView([snap("d0", D, running=1)])))
    assert r.reason is RejectReason.SLO_UNATTAINABLE
    assert "would stall the requests decoding there past their TPOT SLO" in r.message
    assert r.retry_after_s > 0


def test_limit_takes_the_larger_headroom_of_spread_and_margin_then_the_priority_share() -> None:
    cfg = GoodputConfig(slo_margin=0.1, priority_margin_step=0.1)
    assert cfg.limit(0.2, 0, 1.0) == pytest.approx(0.18)  # no spread learned: the margin
    assert cfg.limit(0.2, 0, 1.35) == pytest.approx(0.2 / 1.35)  # the spread, not both
    assert cfg.limit(0.2, 2, 1.35) == pytest.approx(0.2 * 0.8 / 1.35)  # priority share on top
    assert cfg.limit(0.2, 2, 1.0) == pytest.approx(0.2 * 0.8 * 0.9)
