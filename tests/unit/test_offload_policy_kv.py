"""The KV term of the offload cost model (engine.offload_policy: place_kv, kv_step_cost, the KV
copies in predict_step_s): placement under a KV device budget, and the predicted step time
between the compute bound and the bandwidth bound."""

from __future__ import annotations

import pytest

from engine.offload_policy import (
    KVStepCost,
    OffloadCostModel,
    OffloadPolicyError,
    WeightTier,
    kv_placement,
    kv_step_bytes,
    kv_step_cost,
    min_kv_device_budget,
    place_kv,
    place_weights,
    predict_step_s,
    split_device_budget,
)

D = WeightTier.DEVICE


def test_pool_within_the_budget_stays_on_the_device():
    p = place_kv(8, 100, 10, 8 * 1000)
    assert p.offloaded == () and p.num_slots == 0 and p.device_bytes == 8000 and p.host_bytes == 0


@pytest.mark.parametrize("k", [3, 4, 6, 8])
def test_budget_offloads_the_fewest_layers_that_fit(k):
    lb = 1000
    budget = (8 - k + 2) * lb
    p = place_kv(8, 100, 10, budget + lb - 1)  # a partial layer buys nothing
    assert len(p.offloaded) == k and p.device_bytes == budget and p.host_bytes == k * lb
    assert p.fraction == k / 8
    if k < 8:
        assert 0 not in p.offloaded  # layer 0's read cannot overlap an earlier layer


def test_device_bytes_never_exceed_the_budget():
    lb = 700
    for budget in range(min_kv_device_budget(12, lb), 12 * lb + 1, 97):
        p = place_kv(12, 70, 10, budget)
        assert p.device_bytes <= budget
        assert p.device_bytes + p.host_bytes - p.num_slots * lb == 12 * lb


def test_budget_below_the_minimum_is_refused_naming_it():
    with pytest.raises(OffloadPolicyError, match="minimum 2000 bytes"):
        place_kv(8, 100, 10, 1999)


def test_kv_step_cost_prices_the_held_blocks_and_new_rows():
    p = kv_placement(4, 100, 64, (1, 3))
    c = kv_step_cost(p, held_blocks=10, new_tokens=8, block_size=16, host_bw=640.0)
    assert c.layers == (1, 3) and c.read_s == 1.0 and c.write_s == 8 * 4 / 640.0
    assert kv_step_bytes(p, 10, 8, 16) == 2 * (640 + 32)
    with pytest.raises(ValueError, match="host_bw"):
        kv_step_cost(p, 1, 1, 16, 0.0)


def test_reads_hidden_behind_compute():
    """Each offloaded layer's read overlaps the layer before it: with compute >= a read the step
    takes the resident step's time."""
    tiers = [D] * 4
    comp = [2.0] * 4
    resident = predict_step_s(tiers, [1] * 4, comp, 1.0, 1.0)
    kv = KVStepCost((1, 3), read_s=1.0, write_s=0.0)
    assert resident == 8.0
    assert predict_step_s(tiers, [1] * 4, comp, 1.0, 1.0, kv=kv) == pytest.approx(8.0)


def test_bandwidth_bound_when_compute_is_negligible():
    """With no compute the step is the I/O: every read and write-back on the one channel."""
    kv = KVStepCost((1, 3), read_s=1.0, write_s=0.5)
    assert predict_step_s([D] * 4, [1] * 4, [0.0] * 4, 1.0, 1.0, kv=kv) == pytest.approx(3.0)


def test_kv_and_weight_copies_share_the_channel():
    """With no compute to hide behind, the KV reads add to the weight copies' time (one channel)."""
    two = [D, WeightTier.HOST, D, WeightTier.HOST]  # two offloaded layers keep their slots: no copies
    assert predict_step_s(two, [10] * 4, [0.0] * 4, 10.0, 1.0) == 0.0
    assert predict_step_s(two, [10] * 4, [0.0] * 4, 10.0, 1.0, kv=KVStepCost((2,), 1.0, 0.0)) == 1.0
    three = [D, WeightTier.HOST] * 3
    w_only = predict_step_s(three, [10] * 6, [0.0] * 6, 10.0, 1.0)
    both = predict_step_s(three, [10] * 6, [0.0] * 6, 10.0, 1.0, kv=KVStepCost((2, 4), 1.0, 0.0))
    assert w_only > 0 and both == pytest.approx(w_only + 2.0)


def _cost(budget: int) -> OffloadCostModel:
    # 8 layers of 100 weight bytes (a copy 0.5 s at 200 B/s) computing 0.1 s each: copies show
    return OffloadCostModel(
        layer_bytes=(100,) * 8,
        compute_s=(0.1,) * 8,
        fixed_bytes=50,
        device_budget_bytes=budget,
        host_bw=200.0,
        disk_bw=100.0,
    )


def test_split_offloads_kv_when_its_copies_are_cheaper():
    """KV of 10 blocks x 10 bytes a layer: a step holding 1 block reads 10 bytes a layer (cheap),
    so the split keeps every weight on the device and offloads five layers' KV."""
    s = split_device_budget(
        _cost(1350), kv_num_blocks=10, kv_block_bytes=10, held_blocks=1, new_tokens=4, block_size=16
    )
    assert s.weights.offloaded == () and len(s.kv.offloaded) == 5
    assert s.weight_budget_bytes + s.kv_budget_bytes <= 1350
    assert s.weights.device_bytes <= s.weight_budget_bytes and s.kv.device_bytes == s.kv_budget_bytes


def test_split_offloads_weights_when_the_kv_reads_cost_more():
    s = split_device_budget(
        _cost(1350), kv_num_blocks=10, kv_block_bytes=10, held_blocks=10, new_tokens=4, block_size=16
    )
    assert s.kv.offloaded == () and len(s.weights.offloaded) == 5
    only_weights = place_weights(_cost(1350 - 800))
    assert s.predicted_step_s == only_weights.predicted_step_s


def test_split_everything_resident_when_it_fits():
    s = split_device_budget(_cost(850 + 800), 10, 10, 10, 4, 16)
    assert s.weights.offloaded == () and s.kv.offloaded == ()


def test_split_below_the_minimum_is_refused_naming_it():
    with pytest.raises(OffloadPolicyError, match="minimum 450 bytes"):
        split_device_budget(_cost(400), 10, 10, 1, 4, 16)
