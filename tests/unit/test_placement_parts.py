"""The parts that make placement scale (issue #12), each against its plain definition.

* ``ClusterView.prefix_hits``: one walk per instance equals each instance's ``cached_prefix_blocks``;
* ``prefill_time_each``/``decode_time_each`` and ``TtftTable``: bit-identical to per-item calls;
* the goodput policy's ledger: heap expiry, per-tenant and per-decode counts equal brute force
  over random operations, and its heaps stay bounded;
* ``ViewBuilder``: the same views as ``build_view``, reusing unchanged snapshots.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from router.cluster_view import OutstandingTokens, ViewBuilder, build_view
from router.policy import (
    ClusterView,
    InstanceRole,
    InstanceSnapshot,
    LinearLatency,
    ManualClock,
    Observation,
    OnlineCorrectedLatency,
    Phase,
    TtftEstimator,
)
from router.policy.estimate import TtftTable
from router.policy.latency import WithDecode, decode_time_each, prefill_time_each
from router.policy.ledger import Inflight, Ledger
from router.registry import Registry, WorkerKind, WorkerLoad

P, D = InstanceRole.PREFILL, InstanceRole.DECODE
KEYS = [bytes([k]) * 8 for k in range(30)]


class ListCache:
    """A non-snapshot instance (as the simulator's): the cache is asked through the method."""

    def __init__(self, iid: str, role: InstanceRole, cached: Sequence[bytes]) -> None:
        self.instance_id, self.role, self._cached = iid, role, set(cached)
        self.queued_tokens = self.queued_requests = self.running_requests = 0
        self.free_blocks = self.total_blocks = 0
        self.block_size, self.token_budget = 16, 2048

    def cached_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._cached:
                break
            n += 1
        return n


def test_prefix_hits_equal_each_instances_own_walk() -> None:
    rng = random.Random(3)
    for _ in range(50):
        insts = []
        for i in range(rng.randint(1, 12)):
            cached = rng.sample(KEYS[:12], rng.randint(0, 12))
            role = rng.choice([P, D])
            insts.append(
                InstanceSnapshot(f"s{i}", role, cached=frozenset(cached))
                if rng.random() < 0.5
                else ListCache(f"l{i}", role, cached)
            )
        view = ClusterView(insts)
        hashes = KEYS[: rng.randint(0, 14)]
        hits = view.prefix_hits(hashes)
        for inst in insts:
            assert hits.local(inst) == inst.cached_prefix_blocks(hashes)
        assert hits.holders == [
            (i.instance_id, i.cached_prefix_blocks(hashes)) for i in insts if i.cached_prefix_blocks(hashes)
        ]


def test_with_role_returns_a_fresh_list_in_view_order() -> None:
    view = ClusterView([InstanceSnapshot("a", P), InstanceSnapshot("b", D), InstanceSnapshot("c", P)])
    got = view.with_role(P)
    got.clear()
    assert [i.instance_id for i in view.with_role(P)] == ["a", "c"]
    assert [i.instance_id for i in view.with_role(D, P)] == ["a", "b", "c"]


class PrefillOnly:
    """A latency model without the batched methods (the generic fallback)."""

    kv_bytes_per_token = 100

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float:
        return 0.001 * sum(tokens) ** 1.1 + 1e-9 * sum(contexts or [0])

    def transfer_time(self, nbytes: float) -> float:
        return nbytes / 3e9


def _models() -> list:
    lin = LinearLatency(prefill_per_token_ctx_s=3e-9, decode_per_ctx_token_s=1.7e-7)
    corrected = OnlineCorrectedLatency(lin)
    corrected.observe(Phase.TTFT, 0.3, 0.71)
    corrected.observe(Phase.TPOT, 0.02, 0.013)
    return [lin, corrected, WithDecode(PrefillOnly()), OnlineCorrectedLatency(WithDecode(PrefillOnly()))]


@pytest.mark.parametrize("k", range(4))
def test_batched_latency_calls_equal_per_item_calls_bit_for_bit(k: int) -> None:
    model = _models()[k]
    rng = random.Random(k)
    tokens = [rng.randint(1, 5000) for _ in range(200)]
    ctx = [rng.randint(0, 30000) for _ in range(200)]
    batch = [rng.randint(-1, 200) for _ in range(200)]
    assert prefill_time_each(model, tokens) == [model.prefill_time([t]) for t in tokens]
    assert prefill_time_each(model, tokens, ctx) == [
        model.prefill_time([t], [c]) for t, c in zip(tokens, ctx, strict=True)
    ]
    want = [model.decode_time(b, c) for b, c in zip(batch, ctx, strict=True)]
    assert decode_time_each(model, batch, ctx) == want


def test_ttft_table_equals_the_estimator() -> None:
    rng = random.Random(5)
    for model in _models():
        est = TtftEstimator(model)
        insts = [
            InstanceSnapshot(
                f"i{i}",
                P,
                queued_tokens=rng.choice([-5, 0, 1, 2047, 2048, 2049, rng.randint(1, 99999)]),
                token_budget=rng.choice([0, 1, 512, 2048]) if i % 3 == 0 else 2048,
                block_size=16,
            )
            for i in range(60)
        ]
        for group in (insts, [i for i in insts if i.token_budget == 2048]):
            table = TtftTable(est, 777)
            assert table.queues(group) == [est.queue_time(i) for i in group]
        table = TtftTable(est, 777)
        for inst in insts:
            for reused, fetched in ((0, 0), (3, 0), (10, 7)):
                q = table.queues([inst])[0]
                assert table.ttft(q, inst.block_size, reused, fetched) == est.ttft(inst, 777, reused, fetched)


def test_ledger_counts_and_expiry_equal_brute_force() -> None:
    rng = random.Random(9)
    ledger = Ledger()
    model: dict[str, Inflight] = {}
    now = 0.0
    for _ in range(3000):
        op = rng.random()
        rid = f"r{rng.randint(0, 60)}"
        if op < 0.5:
            finish = now + rng.uniform(0, 5)
            e = Inflight(
                rid, rng.choice("abc"), rng.choice(["d0", "d1"]), rng.random() < 0.4, 1, 1, finish, finish + 1
            )
            ledger.add(e)
            model[rid] = e
        elif op < 0.7:
            assert (ledger.pop(rid) is not None) == (model.pop(rid, None) is not None)
        else:
            now += rng.uniform(0, 0.5)
            ledger.expire(now)
            model = {k: e for k, e in model.items() if e.expires_at > now}
        assert ledger.entries == model
        for t in "abc":
            assert ledger.count(t) == sum(e.tenant == t for e in model.values())
            assert sorted(e.request_id for e in ledger.of_tenant(t)) == sorted(
                e.request_id for e in model.values() if e.tenant == t
            )
        longs: dict[str, int] = {}
        for e in model.values():
            if e.long:
                longs[e.decode_id] = longs.get(e.decode_id, 0) + 1
        assert ledger.longs == longs
        first = min((e.predicted_finish for e in model.values()), default=None)
        assert ledger.earliest_finish() == first
        # lazily deleted heap items are dropped: the heaps stay within 2 x entries + 64
        assert len(ledger._by_expiry) <= 2 * len(model) + 64 + 1
        assert len(ledger._by_finish) <= 2 * len(model) + 64 + 1


def test_policy_ledger_released_by_feedback() -> None:
    from router.policy import GoodputAwarePolicy, RequestInfo

    clock = ManualClock()
    pol = GoodputAwarePolicy(clock=clock, latency=LinearLatency())
    view = ClusterView(
        [
            InstanceSnapshot("p", P, total_blocks=100, free_blocks=100),
            InstanceSnapshot("d", D, total_blocks=100, free_blocks=100),
        ]
    )
    for k in range(5):
        pol.place(RequestInfo(f"r{k}", 100, predicted_output_tokens=10), view)
    assert pol.inflight() == 5
    pol.on_finished(Observation("r0", 0.1, 0.01, 10))
    pol.release("r1")
    assert pol.inflight() == 3
    clock.advance(3600)
    assert pol.inflight() == 0


def _registry(n: int) -> Registry:
    reg = Registry(heartbeat_timeout_s=1e9)
    for i in range(n):
        kind = WorkerKind.PREFILL if i % 2 else WorkerKind.DECODE
        reg.register(f"w{i}", kind, f"a{i}", "m", WorkerLoad(1, 2, 800, i, 16, 2048))
    return reg


def _values(view: ClusterView) -> list[InstanceSnapshot]:
    return list(view.instances)  # InstanceSnapshot compares by value


def test_view_builder_equals_build_view_and_reuses_unchanged_snapshots() -> None:
    rng = random.Random(2)
    reg = _registry(12)
    queued, kv = OutstandingTokens(), OutstandingTokens()
    vb, vb_no_kv = ViewBuilder(), ViewBuilder()
    prev = vb.build(reg, "m", queued, kv)
    assert _values(prev) == _values(build_view(reg, "m", queued, kv))
    for _ in range(200):
        op = rng.randrange(6)
        w = f"w{rng.randrange(14)}"
        if op == 0:
            reg.heartbeat(
                w, WorkerLoad(rng.randint(0, 5), rng.randint(0, 5), 800, rng.randint(0, 800), 16, 2048)
            )
        elif op == 1:
            reg.add_inflight(w, rng.choice([-1, 1]))
        elif op == 2:
            queued.add(w, rng.choice([-100, 100]))
        elif op == 3:
            kv.add(w, rng.choice([-64, 64]))
        elif op == 4:
            reg.deregister(w)
        else:
            reg.register(w, rng.choice(list(WorkerKind)), "x", "m", WorkerLoad())
        view = vb.build(reg, "m", queued, kv)
        assert _values(view) == _values(build_view(reg, "m", queued, kv))
        assert _values(vb_no_kv.build(reg, "m", queued)) == _values(build_view(reg, "m", queued))
        again = vb.build(reg, "m", queued, kv)  # nothing changed: the very same snapshots
        assert all(a is b for a, b in zip(again.instances, view.instances, strict=True))
        if op in (2, 3):  # only w's tokens changed: every other worker keeps its snapshot object
            old = {i.instance_id: i for i in prev.instances}
            assert all(s is old[s.instance_id] for s in view.instances if s.instance_id != w)
        prev = view
