"""The KV placement's disk tier and packed staging buffers (engine.offload_policy, #15 part 4):
cold offloaded layers beyond the host budget go to the disk-backed pool and are priced at the disk
bandwidth; staging buffers of the blocks a step can use (not a whole layer's pool) make
offloading ``k`` layers save ``k`` pools less two staging buffers, and the cost model counts it."""

from __future__ import annotations

import pytest

from engine.offload_policy import (
    OffloadCostModel,
    OffloadPolicyError,
    WeightTier,
    disk_layers,
    kv_device_bytes,
    kv_placement,
    kv_step_cost,
    min_kv_device_budget,
    place_kv,
    predict_step_s,
    split_device_budget,
    staging_bound,
)

D = WeightTier.DEVICE
LB = 1000  # one layer's pool: 100 blocks x 10 bytes


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_packed_staging_saves_k_pools_less_two_buffers(k):
    staging = 25  # blocks a step can use, of 100
    sb = staging * 10
    budget = kv_device_bytes(8, LB, sb, k)
    p = place_kv(8, 100, 10, budget, staging_blocks=staging)
    assert len(p.offloaded) == k and p.staging == staging and p.staging_bytes == sb
    assert p.device_bytes == budget == (8 - k) * LB + min(k, 2) * sb
    saved = 8 * LB - p.device_bytes
    assert saved == k * LB - min(k, 2) * sb
    assert saved > (k - 2) * LB  # the whole-pool buffers saved only k - 2 pools
    if budget >= min_kv_device_budget(8, LB):  # the same budget with whole-pool buffers
        assert len(place_kv(8, 100, 10, budget).offloaded) >= len(p.offloaded)
    else:
        with pytest.raises(OffloadPolicyError):
            place_kv(8, 100, 10, budget)


def test_whole_pool_staging_is_the_default_and_the_old_accounting():
    p = place_kv(8, 100, 10, 5 * LB)
    assert p.staging == 100 and p.staging_blocks is None and len(p.offloaded) == 5
    assert p.device_bytes == (8 - 5 + 2) * LB
    assert kv_placement(8, 100, 10, (1, 3), staging_blocks=100).staging_blocks is None


def test_minimum_is_two_staging_buffers():
    assert min_kv_device_budget(8, LB, 250) == 500
    assert min_kv_device_budget(8, LB) == 2 * LB
    p = place_kv(8, 100, 10, 500, staging_blocks=25)
    assert len(p.offloaded) == 8 and p.device_bytes == 500
    with pytest.raises(OffloadPolicyError, match="minimum 500 bytes"):
        place_kv(8, 100, 10, 499, staging_blocks=25)


def test_device_bytes_never_exceed_the_budget_with_packed_staging():
    for staging in (1, 7, 33, 70):
        for budget in range(min_kv_device_budget(12, 700, staging * 10), 12 * 700 + 1, 83):
            p = place_kv(12, 70, 10, budget, staging_blocks=staging)
            assert p.device_bytes <= budget
            fewer = len(p.offloaded) - 1
            if fewer >= 1:  # the fewest layers that fit
                assert kv_device_bytes(12, 700, staging * 10, fewer) > budget


@pytest.mark.parametrize("bad", [0, 101])
def test_staging_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="staging_blocks must be in"):
        kv_placement(8, 100, 10, (1,), staging_blocks=bad)


def test_layers_beyond_the_host_budget_go_to_disk():
    p = place_kv(8, 100, 10, 4 * LB, host_budget_bytes=2 * LB + 999)  # 6 offloaded, 2 fit the host
    assert len(p.offloaded) == 6 and len(p.disk) == 4 and set(p.disk) <= set(p.offloaded)
    assert p.host_bytes == 2 * LB and p.disk_bytes == 4 * LB
    assert p.offloaded[0] not in p.disk  # the first offloaded layer's read starts the step: host
    none = place_kv(8, 100, 10, 4 * LB, host_budget_bytes=0)
    assert none.disk == none.offloaded and none.host_bytes == 0
    assert place_kv(8, 100, 10, 4 * LB).disk == ()  # no host limit: no disk


def test_disk_layers_spread():
    assert disk_layers((1, 3, 5, 7), 4) == ()
    assert disk_layers((1, 3, 5, 7), 0) == (1, 3, 5, 7)
    got = disk_layers((1, 3, 5, 7, 9), 3)
    assert len(got) == 2 and 1 not in got
    with pytest.raises(ValueError, match="not all offloaded"):
        kv_placement(8, 100, 10, (1, 3), disk=(2,))


def test_disk_layers_are_priced_at_the_disk_bandwidth():
    p = kv_placement(4, 100, 64, (1, 3), disk=(3,))
    c = kv_step_cost(p, held_blocks=10, new_tokens=8, block_size=16, host_bw=640.0, disk_bw=64.0)
    assert c.read_of(1) == 1.0 and c.read_of(3) == 10.0
    assert c.write_of(1) == 32 / 640.0 and c.write_of(3) == 32 / 64.0
    with pytest.raises(ValueError, match="need disk_bw"):
        kv_step_cost(p, 10, 8, 16, 640.0)
    tiers = [D] * 4
    comp = [0.01] * 4
    host_only = kv_step_cost(kv_placement(4, 100, 64, (1, 3)), 10, 8, 16, 640.0)
    assert predict_step_s(tiers, [0] * 4, comp, 640.0, 64.0, kv=c) > predict_step_s(
        tiers, [0] * 4, comp, 640.0, 64.0, kv=host_only
    )


def test_split_prices_packed_staging_and_the_disk_tier():
    n = 6
    cost = OffloadCostModel(
        layer_bytes=(100,) * n,
        compute_s=(0.01,) * n,
        fixed_bytes=50,
        device_budget_bytes=50 + 2 * 100 + 6 * 1000 - 1500,  # weights' minimum + KV 1500 short
        host_bw=1e6,
        disk_bw=1e5,
    )
    whole = split_device_budget(cost, 100, 10, 100, 4, 16)
    packed = split_device_budget(cost, 100, 10, 20, 4, 16, staging_blocks=20)
    assert packed.kv.staging == 20 and packed.kv_budget_bytes == packed.kv.device_bytes
    assert packed.weight_budget_bytes + packed.kv_budget_bytes <= cost.device_budget_bytes
    # two offloaded layers' KV (with 200-byte buffers) cover the 1500 bytes; whole-pool buffers need 4
    assert len(packed.kv.offloaded) < len(whole.kv.offloaded) or packed.weights.offloaded
    assert packed.predicted_step_s <= whole.predicted_step_s
    disk = split_device_budget(cost, 100, 10, 20, 4, 16, staging_blocks=20, kv_host_budget_bytes=0)
    assert disk.kv.disk == disk.kv.offloaded
    assert disk.predicted_step_s >= packed.predicted_step_s


def test_staging_bound_is_pure_policy_and_the_engine_uses_the_same_function():
    """staging_bound lives in the policy (no torch); engine.kv_offload re-exports it."""
    import engine.kv_offload as kv_offload

    assert kv_offload.staging_bound is staging_bound
    assert staging_bound(64, 16, 2, 256) == 2 * 16 + 1
    assert staging_bound(64, 16, 8, 256) == 64  # never over the pool
    assert staging_bound(1000, 16, 2, 100, lookahead=4) == 2 * 7 + 1
    assert staging_bound(5, 16, 0, 0) == 1  # at least one block
