"""Weight-offloading policy (engine.offload_policy): placement, the step-time model and the offline
batch size, as pure code."""

from __future__ import annotations

import pytest

from engine.offload_policy import (
    OffloadCostModel,
    OffloadPolicyError,
    WeightTier,
    min_device_budget,
    pick_offline_batch_size,
    place_weights,
    predict_step_s,
    spread,
)

D, H, K = WeightTier.DEVICE, WeightTier.HOST, WeightTier.DISK
MB = 1 << 20


def _cost(
    n=8, layer=10 * MB, fixed=20 * MB, budget=None, host=None, disk=None, c=0.01, hbw=1000 * MB, dbw=100 * MB
):
    return OffloadCostModel(
        layer_bytes=(layer,) * n,
        compute_s=(c,) * n,
        fixed_bytes=fixed,
        device_budget_bytes=budget if budget is not None else fixed + n * layer,
        host_bw=hbw,
        disk_bw=dbw,
        host_budget_bytes=host,
        disk_budget_bytes=disk,
    )


def test_spread_is_even_and_exact():
    assert spread(8, 4) == [1, 3, 5, 7]
    assert spread(8, 0) == [] and spread(8, 8) == list(range(8))
    assert spread(10, 3) == [3, 6, 9]
    with pytest.raises(ValueError):
        spread(3, 4)


def test_budget_holding_everything_keeps_all_resident():
    p = place_weights(_cost())
    assert p.tiers == (D,) * 8 and p.offloaded == () and p.num_slots == 0
    assert p.device_bytes == 20 * MB + 80 * MB and p.host_bytes == p.disk_bytes == 0
    assert p.predicted_step_s == pytest.approx(8 * 0.01)


def test_budget_below_the_minimum_is_refused_naming_it():
    floor = min_device_budget((10 * MB,) * 8, 20 * MB)
    assert floor == 40 * MB
    with pytest.raises(OffloadPolicyError, match=f"minimum {floor} bytes"):
        place_weights(_cost(budget=floor - 1))


@pytest.mark.parametrize("resident", [0, 2, 4, 5])
def test_as_many_layers_as_fit_stay_resident_spread_evenly(resident):
    budget = 40 * MB + resident * 10 * MB + 5 * MB  # the extra 5 MB holds no layer
    p = place_weights(_cost(budget=budget))
    assert [i for i, t in enumerate(p.tiers) if t is D] == spread(8, resident)
    assert all(t is H for t in p.tiers if t is not D)  # unbounded host
    assert p.device_bytes == 20 * MB + resident * 10 * MB + 2 * 10 * MB <= budget
    assert p.host_bytes == (8 - resident) * 10 * MB and p.disk_bytes == 0


def test_host_budget_overflows_to_disk_spread_and_refused_beyond_disk():
    p = place_weights(_cost(budget=40 * MB, host=35 * MB))
    assert p.tiers.count(H) == 3 and p.tiers.count(K) == 5
    assert p.host_bytes == 30 * MB and p.disk_bytes == 50 * MB
    assert [i for i, t in enumerate(p.tiers) if t is H] == spread(8, 3)
    assert place_weights(_cost(budget=40 * MB, host=0)).tiers == (K,) * 8
    with pytest.raises(OffloadPolicyError, match="disk budget"):
        place_weights(_cost(budget=40 * MB, host=35 * MB, disk=40 * MB))


def test_unequal_layers_never_exceed_the_budget():
    cost = OffloadCostModel(
        layer_bytes=(5, 30, 5, 30, 5, 30),
        compute_s=(0.0,) * 6,
        fixed_bytes=10,
        device_budget_bytes=10 + 60 + 40,  # fixed + 2 slots of 30 + 40 bytes of layers
        host_bw=1.0,
        disk_bw=1.0,
    )
    p = place_weights(cost)
    resident = [i for i, t in enumerate(p.tiers) if t is D]
    assert sum(cost.layer_bytes[i] for i in resident) <= 40
    assert len(resident) == 3  # the three small layers fit (and a large one would not)
    assert p.device_bytes <= cost.device_budget_bytes


def test_predicted_step_copies_overlap_compute():
    n, c = 4, 1.0
    lb = (10,) * n
    # every layer on host, copy 0.5 s < compute 1 s: copies hidden except nothing (o_0 prefetched
    # during the previous step's tail) -> step = compute
    assert predict_step_s((H,) * n, lb, (c,) * n, host_bw=20, disk_bw=1) == pytest.approx(4.0)
    # copy 2 s > compute 1 s: I/O bound, one copy per layer back to back -> 4 copies of 2 s
    assert predict_step_s((H,) * n, lb, (c,) * n, host_bw=5, disk_bw=1) == pytest.approx(8.0)
    # resident layers between offloaded ones give the copies more compute to hide behind
    lb8 = (10,) * 8
    mixed = predict_step_s((H, D) * 4, lb8, (c,) * 8, host_bw=5, disk_bw=1)
    assert mixed == pytest.approx(8.0)  # each 2 s copy hides behind two 1 s layers
    assert predict_step_s((D,) * 4 + (H,) * 4, lb8, (c,) * 8, host_bw=5, disk_bw=1) > mixed + 1
    # <= 2 offloaded layers keep their slots: no copies after the first step
    assert predict_step_s((H, D, D, H), lb, (c,) * n, host_bw=0.001, disk_bw=1) == pytest.approx(4.0)


def test_odd_offloaded_count_waits_for_the_slot_it_reuses():
    # 3 offloaded layers: o_2 and o_0 share slot 0, so o_0's copy starts only when o_2 ends
    lb = (10, 10, 10)
    t = predict_step_s((H, H, H), lb, (1.0, 1.0, 1.0), host_bw=10, disk_bw=1, other_s=0.0)
    # copies take 1 s: o_1 hidden behind o_0, o_2 behind o_1, o_0 starts after o_2 ends + 1 s copy
    assert t == pytest.approx(4.0)
    assert predict_step_s((H, H, H), lb, (1.0,) * 3, host_bw=10, disk_bw=1, other_s=1.0) == pytest.approx(4.0)


def test_offline_batch_size_hides_copies_and_is_the_smallest_near_best():
    n = 4
    tiers, lb = (H,) * n, (100,) * n
    # copy 1 s per layer; compute 0.1 + 0.1 b per layer: from b = 9 the copies are hidden
    ch = pick_offline_batch_size(tiers, lb, (0.1,) * n, (0.1,) * n, host_bw=100, disk_bw=1, max_batch=64)
    assert ch.max_seqs_per_s == pytest.approx(64 / (4 * (0.1 + 6.4)))
    assert ch.seqs_per_s >= 0.9 * ch.max_seqs_per_s
    prev = ch.batch_size - 1
    step_prev = predict_step_s(tiers, lb, [0.1 + 0.1 * prev] * n, 100, 1)
    assert prev / step_prev < 0.9 * ch.max_seqs_per_s
    # resident model: throughput b / (0.4 + 0.4 b) is near its best well before 64
    r = pick_offline_batch_size((D,) * n, lb, (0.1,) * n, (0.1,) * n, 100, 1, max_batch=64)
    assert r.batch_size < ch.batch_size
    assert pick_offline_batch_size(tiers, lb, (0.1,) * n, (0.1,) * n, 100, 1, max_batch=1).batch_size == 1
    with pytest.raises(ValueError):
        pick_offline_batch_size(tiers, lb, (0.1,) * n, (0.1,) * n, 100, 1, max_batch=0)


def test_cost_model_validates():
    with pytest.raises(ValueError):
        _cost(hbw=0)
    with pytest.raises(ValueError):
        OffloadCostModel((1, 2), (0.1,), 0, 10, 1.0, 1.0)
    with pytest.raises(ValueError):
        _cost(host=-1)
