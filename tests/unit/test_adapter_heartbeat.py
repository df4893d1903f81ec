"""The worker's heartbeat reports how busy its adapter tiers are (#16), and the router prices it:
slots, slots pinned, requests waiting for an adapter, the measured full-table period, disk reads
queued; from the engine (LoRAManager, FullPeriods on a fake clock) through WorkerStats and the
registry to the snapshot the placement policies read."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.lora.slots import FullPeriods, SlotTable
from engine.sampling_params import SamplingParams
from pdserve.v1 import worker_pb2
from pdserve.worker_base import adapter_residency
from router.cluster_view import _snapshot
from router.registry import WorkerEntry, WorkerKind
from router.registry_service import load_from_proto
from tests.lora_adapters import make_adapter, make_tiny_llama


def test_full_periods_on_a_fake_clock() -> None:
    t = SlotTable(2)
    f = FullPeriods(window=2)
    t.acquire("a")
    f.acquired(t, 1.0)
    t.acquire("b")
    f.acquired(t, 2.0)  # full from t=2
    assert t.num_pinned() == 2 and f.mean_s == 0.0
    t.acquire("a")  # a second pin of a: still full, the period goes on
    f.acquired(t, 2.5)
    t.release("a")
    f.released(t, 3.0)  # a is still pinned once: still full
    assert f.samples == 0
    t.release("a")
    f.released(t, 4.0)
    assert f.samples == 1 and f.mean_s == pytest.approx(2.0)
    t.acquire("c")  # evicts a's unpinned slot: full again from t=5
    f.acquired(t, 5.0)
    t.release("c")
    f.released(t, 6.0)
    assert f.mean_s == pytest.approx(1.5)  # (2 + 1) / 2
    t.acquire("c")
    f.acquired(t, 7.0)
    t.release("b")
    f.released(t, 11.0)
    assert f.mean_s == pytest.approx(1.5 + (4.0 - 1.5) / 2)  # window 2: exponential from here
    with pytest.raises(ValueError, match="window"):
        FullPeriods(window=0)


def stats(**kw) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(
        worker_id="w0",
        kv_blocks_total=100,
        adapters_in_slot=["x", "y"],
        adapters_in_host=["a"],
        adapter_slot_load_s=0.01,
        adapter_disk_load_s=0.2,
        **kw,
    )


def test_the_router_keeps_the_report_and_prices_the_wait() -> None:
    s = stats(
        adapter_slots=2,
        adapter_slots_pinned=2,
        adapter_slot_waiters=1,
        adapter_slot_free_s=0.3,
        adapter_reads_queued=3,
    )
    load = load_from_proto(s)
    assert (load.adapter_slots, load.adapter_slots_pinned, load.adapter_slot_waiters) == (2, 2, 1)
    assert load.adapter_slot_free_s == 0.3 and load.adapter_reads_queued == 3
    snap = _snapshot(WorkerEntry("w0", WorkerKind.DECODE, "127.0.0.1:1", "m", load=load), 0, None)
    assert snap.adapter_load_s("x") == 0.0  # in a (pinned) slot: shared
    assert snap.adapter_load_s("a") == pytest.approx(2 * 0.3 + 0.01)  # second in line for a slot
    assert snap.adapter_load_s("z") == pytest.approx(max(4 * 0.2, 0.6) + 0.01)  # behind 3 reads
    # an older worker (no such fields): the load alone, as before
    old = _snapshot(
        WorkerEntry("w0", WorkerKind.DECODE, "127.0.0.1:1", "m", load=load_from_proto(stats())), 0, None
    )
    assert old.adapter_load_s("a") == pytest.approx(0.01) and old.adapter_load_s("z") == pytest.approx(0.21)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_bad_full_period_is_read_as_unknown(bad) -> None:
    assert load_from_proto(stats(adapter_slot_free_s=bad)).adapter_slot_free_s == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_heartbeat")
    base = make_tiny_llama(root)
    a1 = make_adapter(base, root / "a1", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=21)
    a2 = make_adapter(base, root / "a2", r=2, alpha=4, targets=["o_proj"], seed=22)
    return base, a1, a2


def test_the_engine_reports_a_full_slot_table_and_its_waiter(tiny) -> None:
    """One slot, two adapters: the second adapter's request waits for the slot; the report says
    so (1 slot, 1 pinned, 1 waiting), and once the first request finished a full period was
    measured (> 0) and nothing is pinned."""
    base, a1, a2 = tiny
    lora = LoRAConfig((AdapterSpec("a1", str(a1)), AdapterSpec("a2", str(a2))), max_loras=1)
    eng = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=32), lora=lora)
    try:
        greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        eng.add_request(None, list(range(5, 20)), greedy, adapter_id="a1")
        eng.add_request(None, list(range(5, 20)), greedy, adapter_id="a2")
        eng.step()
        r = adapter_residency(eng)
        assert (r["adapter_slots"], r["adapter_slots_pinned"], r["adapter_slot_waiters"]) == (1, 1, 1)
        assert r["adapter_reads_queued"] == 0 and r["adapter_slot_free_s"] == 0.0
        for _ in range(200):
            if not eng.has_unfinished():
                break
            eng.step()
        r = adapter_residency(eng)
        assert r["adapter_slots_pinned"] == 0 and r["adapter_slot_waiters"] == 0
        assert r["adapter_slot_free_s"] > 0.0
        # the fields fit the heartbeat message as they are
        assert worker_pb2.WorkerStats(**r).adapter_slots == 1
    finally:
        eng.close()
