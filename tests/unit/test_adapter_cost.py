"""Adapter-affinity pricing (issue #16): what a request's LoRA adapter costs before its prefill on
an instance, from its worker's report: the load, the disk reads queued ahead and the wait for a
slot when every slot is pinned; and the candidate order the cache-aware policies decide in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from router.policy import (
    ClusterView,
    GlobalCacheAwarePolicy,
    InstanceSnapshot,
    LocalCacheAwarePolicy,
    ManualClock,
    Placement,
    RequestInfo,
)
from router.policy.adapter_cost import AdapterTiers, adapter_ready_s, affinity_order, slot_wait_s
from router.policy.view import adapter_load_time
from tests import policy_fakes as fakes
from tests.policy_fakes import DISK, SLOT, lat  # measured host -> slot copy, disk -> host read


def tiers(**kw) -> AdapterTiers:
    base: dict = dict(slot_load_s=SLOT, disk_load_s=DISK, slots=2)
    base.update(kw)
    return AdapterTiers(**base)


# ----------------------------------------------------------------------------- pure pricing
def test_load_alone_when_the_tiers_are_idle() -> None:
    t = tiers(in_slot=frozenset({"a"}), in_host=frozenset({"b"}), slots_pinned=1)
    assert adapter_ready_s("", t) == 0.0  # the base model
    assert adapter_ready_s("a", t) == 0.0  # in a slot
    assert adapter_ready_s("b", t) == pytest.approx(SLOT)  # the copy
    assert adapter_ready_s("c", t) == pytest.approx(DISK + SLOT)  # read + copy
    # adapter_load_time (the older entry point) is the same pricing with idle tiers
    assert adapter_load_time("c", frozenset(), frozenset(), SLOT, DISK) == pytest.approx(DISK + SLOT)


def test_every_slot_pinned_adds_the_wait_for_a_release_per_request_in_line() -> None:
    full = tiers(in_slot=frozenset({"a", "x"}), in_host=frozenset({"b"}), slots_pinned=2, slot_free_s=0.5)
    assert full.all_pinned and slot_wait_s(full) == pytest.approx(0.5)
    # the adapter in a pinned slot is shared: no wait
    assert adapter_ready_s("a", full) == 0.0
    assert adapter_ready_s("b", full) == pytest.approx(0.5 + SLOT)
    # two requests already wait for a slot: this one is third in line
    assert adapter_ready_s("b", replace(full, slot_waiters=2)) == pytest.approx(3 * 0.5 + SLOT)
    # a disk read runs while the request waits for the slot: the longer of the two, then the copy
    assert adapter_ready_s("c", full) == pytest.approx(0.5 + SLOT)
    assert adapter_ready_s("c", replace(full, slot_free_s=0.1)) == pytest.approx(DISK + SLOT)
    # one slot unpinned: no wait; never measured (0) or not reported (slots=0): no wait either
    assert adapter_ready_s("b", replace(full, slots_pinned=1)) == pytest.approx(SLOT)
    assert adapter_ready_s("b", replace(full, slot_free_s=0.0)) == pytest.approx(SLOT)
    assert adapter_ready_s("b", replace(full, slots=0)) == pytest.approx(SLOT)


def test_a_disk_read_queues_behind_the_reads_under_way() -> None:
    t = tiers(reads_queued=2)
    assert adapter_ready_s("c", t) == pytest.approx(3 * DISK + SLOT)
    # its own read already under way: what is left of it
    assert adapter_ready_s("c", t, read_left_s=0.05) == pytest.approx(0.05 + SLOT)
    assert adapter_ready_s("b", replace(t, in_host=frozenset({"b"}))) == pytest.approx(SLOT)


@pytest.mark.parametrize(
    ("field", "value"),
    [("slot_load_s", -1.0), ("disk_load_s", float("nan")), ("slot_free_s", -0.1), ("slots", -1)],
)
def test_bad_report_values_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        tiers(**{field: value})


# ----------------------------------------------------------------------------- placement
def snap(i: str, **kw) -> InstanceSnapshot:
    """A mixed instance with 2 adapter slots (tests.policy_fakes.snap)."""
    return fakes.snap(i, adapter_slots=2, **kw)


def req(adapter: str, n: int = 100) -> RequestInfo:
    return RequestInfo("r", n, adapter=adapter)


@pytest.mark.parametrize("cls", [LocalCacheAwarePolicy, GlobalCacheAwarePolicy])
def test_a_candidate_whose_slots_are_all_pinned_prices_the_wait(cls) -> None:
    """m0 holds the adapter in host memory but both its slots are pinned by other adapters'
    running requests (a full period lasts 300 ms there); m1 must read it from disk (200 ms) and
    copy it. Without the wait m0 looked 200 ms faster; with it m1 is."""
    pol = cls(latency=lat(), clock=ManualClock())
    busy = dict(adapter_slots_pinned=2, adapter_slot_free_s=0.3)
    view = ClusterView([snap("m0", slot=("x", "y"), host=("a",), **busy), snap("m1")])
    assert view.get("m0").adapter_load_s("a") == pytest.approx(0.3 + SLOT)
    d = pol.place(req("a"), view)
    assert isinstance(d, Placement) and d.instance_id == "m1"
    assert d.estimated_ttft_s == pytest.approx(DISK + SLOT + 0.1)
    # the same m0 with one slot free again: the copy alone, m0 wins
    view = ClusterView([snap("m0", slot=("x", "y"), host=("a",), adapter_slots_pinned=1), snap("m1")])
    assert pol.place(req("a"), view).instance_id == "m0"


def test_queued_reads_make_a_disk_miss_dearer() -> None:
    pol = LocalCacheAwarePolicy(latency=lat(), clock=ManualClock())
    # both must read it; m0's loader has 3 reads queued, m1 queues 300 prompt tokens (0.3 s)
    view = ClusterView([snap("m0", adapter_reads_queued=3), snap("m1", q=300)])
    assert pol.place(req("a"), view).instance_id == "m1"
    view = ClusterView([snap("m0", adapter_reads_queued=0), snap("m1", q=300)])
    assert pol.place(req("a"), view).instance_id == "m0"


def test_equally_fast_holders_go_to_the_least_loaded() -> None:
    """Three instances hold the adapter in a slot and queue nothing: the cache-aware policy takes
    the least loaded of them (fewest running requests), not the first in view order; a base-model
    request, equally fast everywhere, goes to the least loaded of all (m3)."""
    pol = LocalCacheAwarePolicy(latency=lat(), clock=ManualClock())
    view = ClusterView(
        [
            snap("m0", running=9, slot=("a",)),
            snap("m1", running=2, slot=("a",)),
            snap("m2", running=5, slot=("a",)),
            snap("m3", running=0),  # idle but must read the adapter
        ]
    )
    assert pol.place(req("a"), view).instance_id == "m1"
    assert pol.place(req(""), view).instance_id == "m3"
    order = affinity_order(view.instances, "a")
    assert [i.instance_id for i in order] == ["m1", "m2", "m0", "m3"]
    assert affinity_order(view.instances, "") == list(view.instances)
