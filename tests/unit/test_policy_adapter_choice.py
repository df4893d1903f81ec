"""Issue #16 follow-up: how the pure policies choose among candidates that differ in when a LoRA
adapter is ready and in load (fake snapshots, fake clock).

1. The goodput policy chose the decode instance by predicted TPOT alone, so the adapter's load,
   priced into the TTFT, only gated admission: every adapter request went wherever the batch was
   one request smaller (``bench/sim_adapter_affinity.py``: as many slot loads as least-loaded).
   An adapter's request now compares where it can start soonest before TPOT
   (``router.policy.decode_side.adapter_starts``).
2. The cache-aware policies took the first of equally fast candidates in view order; they now
   take the one whose adapter is ready soonest, then the least loaded
   (``router.policy.placement.tie_break``), for base-model requests too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from router.policy import (
    ClusterView,
    GlobalCacheAwarePolicy,
    GoodputAwarePolicy,
    GoodputConfig,
    InstanceRole,
    InstanceSnapshot,
    LocalCacheAwarePolicy,
    ManualClock,
    RequestInfo,
)
from router.policy.decode_side import adapter_starts, first_least
from router.policy.placement import tie_break
from tests import policy_fakes as fakes
from tests.policy_fakes import DISK, KEYS, MS, SLOT, D, M, P, lat, placed


def snap(i: str, role: InstanceRole = M, **kw) -> InstanceSnapshot:
    """An instance with 4 adapter slots (tests.policy_fakes.snap)."""
    return fakes.snap(i, role, adapter_slots=4, **kw)


def req(adapter: str = "", n: int = 100, out: int = 10, rid: str = "r") -> RequestInfo:
    return RequestInfo(rid, n, KEYS[: n // 16], predicted_output_tokens=out, adapter=adapter)


def goodput(**cfg) -> GoodputAwarePolicy:
    cfg.setdefault("price_handoff", False)
    return GoodputAwarePolicy(clock=ManualClock(), latency=lat(), config=GoodputConfig(**cfg))


# ----------------------------------------------------------------------------- 1. goodput
def test_goodput_sends_an_adapter_request_to_the_instance_holding_it() -> None:
    """m0 holds "a" in a slot and runs 3 requests; m1 runs 2 and must read "a" from disk (210 ms).
    By TPOT alone m1 won (one request fewer: 1 ms less per token); now m0 (starts 210 ms sooner).
    A base-model request in the same view still goes by TPOT: m1."""
    view = ClusterView([snap("m0", running=3, slot=("a",)), snap("m1", running=2)])
    d = placed(goodput().place(req("a"), view))
    assert d.instance_id == "m0" and d.local_prefill
    assert d.estimated_ttft_s == pytest.approx(0.100 + 13 * MS)  # prefill + co-scheduled decode step
    assert placed(goodput().place(req(""), view)).instance_id == "m1"
    # in host memory on m1: a 10 ms copy against m0's larger co-scheduled decode step (+1 ms):
    # still m0 (13 + 0 ms vs 12 + 10 ms), the adapter ready sooner wins
    view = ClusterView([snap("m0", running=3, slot=("a",)), snap("m1", running=2, host=("a",))])
    assert placed(goodput().place(req("a"), view)).instance_id == "m0"


def test_goodput_spreads_a_hot_adapter_when_its_holder_queues() -> None:
    """The start, not the adapter's readiness alone: m0 holds "a" but queues 400 prompt tokens
    (400 ms), m1 must read it (210 ms): m1 starts sooner and gets the request (readiness first
    would pile every request of a hot adapter on its holders: no SLO bound in the way)."""
    view = ClusterView([snap("m0", q=400, slot=("a",)), snap("m1")])
    assert placed(goodput().place(req("a"), view)).instance_id == "m1"


def test_goodput_equal_starts_fall_back_to_tpot_then_room() -> None:
    """Both hold "a": equal readiness, so TPOT decides (fewer running), then free blocks."""
    view = ClusterView([snap("m0", running=4, slot=("a",)), snap("m1", running=1, slot=("a",))])
    assert placed(goodput().place(req("a"), view)).instance_id == "m1"
    view = ClusterView([snap("m0", free=500, slot=("a",)), snap("m1", free=900, slot=("a",))])
    assert placed(goodput().place(req("a"), view)).instance_id == "m1"


def test_goodput_disaggregated_prefers_the_decode_instance_holding_the_adapter() -> None:
    """One prefill instance, two decode instances: d1 has one request fewer (lower TPOT) but must
    read "a" from disk before it can decode; d0 holds it in a slot. The decode side is d0."""
    view = ClusterView(
        [snap("p0", P, slot=("a",)), snap("d0", D, running=3, slot=("a",)), snap("d1", D, running=2)]
    )
    d = placed(goodput(local_prefill=False).place(req("a"), view))
    assert (d.instance_id, d.decode_instance_id) == ("p0", "d0")
    d = placed(goodput(local_prefill=False).place(req(""), view))
    assert (d.instance_id, d.decode_instance_id) == ("p0", "d1")


def test_adapter_starts_and_first_least_key() -> None:
    pool = [snap("d0", D, slot=("a",)), snap("d1", D, host=("a",)), snap("d2", D)]
    # remote prefill at 0.1 s, then the adapter's load on each decode instance
    got = adapter_starts(pool, "a", [None, None, None], 0.1)
    assert got == pytest.approx([0.1, 0.1 + SLOT, 0.1 + DISK + SLOT])
    # a local option when sooner; neither option: inf
    assert adapter_starts(pool, "a", [0.5, 0.05, None], None) == [0.5, 0.05, math.inf]
    assert adapter_starts(pool, "a", [0.5, 0.05, None], 0.1) == pytest.approx([0.1, 0.05, 0.1 + DISK + SLOT])
    # the start key sits between the long-request count and TPOT
    fits, tpots, free = [True, True, True], [0.03, 0.01, 0.02], [5, 5, 5]
    assert first_least([0, 1, 2], fits, None, tpots, free) == 1
    assert first_least([0, 1, 2], fits, None, tpots, free, [0.1, 0.2, 0.1]) == 2
    assert first_least([0, 1, 2], fits, [1, 0, 1], tpots, free, [0.1, 0.2, 0.1]) == 1
    # not fitting loses first; a NaN compares as min() would
    assert first_least([0, 1, 2], [True, False, True], None, tpots, free, [0.1, 0.0, 0.1]) == 2
    assert first_least([0, 1], fits, None, [math.nan, 0.01], free, [0.2, 0.1]) == 1


# ----------------------------------------------------------------------------- 2. cache-aware ties
@pytest.mark.parametrize("cls", [LocalCacheAwarePolicy, GlobalCacheAwarePolicy])
def test_cache_aware_base_requests_tie_to_the_least_loaded(cls) -> None:
    """No queue, no cached prefix anywhere: every candidate predicts the same TTFT. The least
    loaded wins (fewest requests here), not the first in view order (m0)."""
    pol = cls(latency=lat(), clock=ManualClock())
    view = ClusterView([snap("m0", running=5), snap("m1", running=1), snap("m2", running=3)])
    d = placed(pol.place(req(""), view))
    assert d.instance_id == "m1" and d.estimated_ttft_s == pytest.approx(0.100)
    # equal requests: most free blocks
    view = ClusterView([snap("m0", running=2, free=100), snap("m1", running=2, free=900)])
    assert placed(pol.place(req(""), view)).instance_id == "m1"
    # all equal: the first in view order, as before
    view = ClusterView([snap("m0"), snap("m1")])
    assert placed(pol.place(req(""), view)).instance_id == "m0"


@pytest.mark.parametrize("cls", [LocalCacheAwarePolicy, GlobalCacheAwarePolicy])
def test_cache_aware_keeps_prefix_affinity_over_load(cls) -> None:
    """m0 caches 5 blocks of the prompt and runs 9 requests; m1 is idle with nothing cached: the
    prefix hit is a faster TTFT, not a tie, so m0 keeps the request (prefix affinity)."""
    pol = cls(latency=lat(), clock=ManualClock())
    view = ClusterView([snap("m1"), snap("m0", running=9, cached=5)])
    d = placed(pol.place(req("", n=100), view))
    assert d.instance_id == "m0" and d.reused_blocks == 5
    # two holders of the same prefix: equal TTFT, the less loaded of them
    view = ClusterView([snap("m0", running=9, cached=5), snap("m1", running=1, cached=5), snap("m2")])
    assert placed(pol.place(req("", n=100), view)).instance_id == "m1"


def test_tie_break_orders_ready_then_load_and_only_among_equals() -> None:
    c = [snap("m0", running=1), snap("m1", running=0, host=("a",)), snap("m2", running=3, slot=("a",))]
    # all tied: the adapter ready soonest (m2's slot), then load; base model: load alone
    assert tie_break([1.0, 1.0, 1.0], 0, c, "a") == 2
    assert tie_break([1.0, 1.0, 1.0], 0, c, "") == 1
    # only the tied ones compete: m1 is faster, so no tie to break
    assert tie_break([1.0, 0.5, 1.0], 1, c, "") == 1
    assert tie_break([1.0, 2.0, 1.0], 0, c, "") == 0
    # queued prompt tokens weigh before requests (least-loaded's key)
    c2 = [replace(c[0], queued_tokens=10), c[2]]
    assert tie_break([1.0, 1.0], 0, c2, "") == 1
