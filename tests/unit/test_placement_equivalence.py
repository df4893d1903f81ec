"""Indexed placement decides exactly as the pre-index (quadratic) implementation did.

The oracle is ``bench/placement_reference.py``: the policies before issue #12, verbatim (a
remote-prefix scan of every instance per prefill candidate, a dict ledger scanned per decision).
Both run in lockstep on the same seeded random cluster states (snapshots and simulator-like
mutable instances, mixed roles and block sizes, shared cached prefixes, KV-store prefixes), the
same requests (SLOs, priorities, tenants, lengths, edge cases) and the same fake-clock times and
finished-request feedback; every decision (placement or rejection, with its floats, message and
retry-after) must be equal.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from bench import placement_reference as ref
from router.policy import (
    SLO,
    ClusterView,
    GlobalCacheAwarePolicy,
    GoodputAwarePolicy,
    GoodputConfig,
    InstanceRole,
    InstanceSnapshot,
    LinearLatency,
    LocalCacheAwarePolicy,
    ManualClock,
    Observation,
    Placement,
    Rejection,
    RequestInfo,
)

P, D, M = InstanceRole.PREFILL, InstanceRole.DECODE, InstanceRole.MIXED
DOCS = [[bytes([d, b]) * 4 for b in range(40)] for d in range(6)]  # shared prompt prefixes


@dataclass
class MutableInstance:
    """A simulator-like :class:`InstanceView`: state changes in place, the cache is a list walk."""

    instance_id: str
    role: InstanceRole
    queued_tokens: int = 0
    queued_requests: int = 0
    running_requests: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 16
    token_budget: int = 2048
    cache: tuple[bytes, ...] = ()

    def cached_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        return n


def _cached(rng: random.Random) -> set[bytes]:
    out: set[bytes] = set()
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        doc = rng.choice(DOCS)
        out.update(doc[: rng.randint(1, len(doc))])
    return out


def _state(rng: random.Random, role: InstanceRole, bs: int) -> dict:
    total = rng.choice([0, 50, 400, 4000])
    return {
        "queued_tokens": rng.choice([0, 0, rng.randint(1, 6000), 2048, 4096]),
        "queued_requests": rng.randint(0, 4),
        "running_requests": rng.choice([0, rng.randint(0, 40)]),
        "free_blocks": rng.randint(0, total) if total else 0,
        "total_blocks": total,
        "block_size": bs,
        "token_budget": rng.choice([512, 2048]),
    }


def random_instances(rng: random.Random, mutable: bool = False) -> list:
    n = rng.choice([1, 2, 3, 5, 8, 13, 24])
    roles = rng.choice([(P, D), (P, D, M), (M,), (D,), (P,), (P, M), (D, M)])
    sizes = rng.choice([(16,), (16,), (8, 16)])
    out = []
    for i in range(n):
        role = rng.choice(roles)
        st = _state(rng, role, rng.choice(sizes))
        cached = _cached(rng)
        if mutable:
            out.append(MutableInstance(f"i{i}", role, cache=tuple(cached), **st))
        else:
            out.append(InstanceSnapshot(f"i{i}", role, cached=frozenset(cached), **st))
    return out


def random_request(rng: random.Random, k: int) -> RequestInfo:
    doc = rng.choice(DOCS)
    prefix = doc[: rng.randint(0, len(doc))] if rng.random() < 0.8 else []
    suffix = [rng.randbytes(8) for _ in range(rng.randint(0, 4))]
    hashes = prefix + suffix
    tokens = rng.choice([1, len(hashes) * 16, len(hashes) * 16 + rng.randint(1, 15), rng.randint(1, 900)])
    tokens = max(1, tokens)
    slo = rng.choice([None, SLO(), SLO(10.0, 1.0), SLO(1.5, 0.08), SLO(0.4, 0.05), SLO(0.05, 0.01)])
    return RequestInfo(
        f"r{k % 97}",  # ids repeat: a retried id replaces its ledger entry
        tokens,
        tuple(hashes),
        max_output_tokens=rng.choice([0, 16, 512]),
        slo=slo,
        priority=rng.randint(0, 3),
        tenant=rng.choice(["", "a", "b"]),
        predicted_output_tokens=rng.choice([0, 0, 8, 300]),
        store_prefix_blocks=rng.choice([0, 0, rng.randint(0, 50)]),
    )


def random_latency(rng: random.Random) -> LinearLatency:
    return LinearLatency(
        kv_bytes_per_token=rng.choice([1000, 18432]),
        prefill_base_s=rng.choice([0.0, 0.02]),
        prefill_per_token_s=rng.choice([1e-4, 1e-3]),
        prefill_per_token_ctx_s=rng.choice([0.0, 1e-8]),
        decode_base_s=rng.choice([0.01, 0.04]),
        decode_per_seq_s=rng.choice([1e-3, 2e-3]),
        decode_per_ctx_token_s=rng.choice([0.0, 2e-7]),
        transfer_latency_s=rng.choice([0.0, 1e-3]),
        transfer_bandwidth=rng.choice([1e6, 1e8, 1e10]),
    )


def random_config(rng: random.Random) -> GoodputConfig:
    return GoodputConfig(
        slo_margin=rng.choice([0.0, 0.1]),
        tenant_max_inflight=rng.choice([None, None, 3]),
        tenant_quotas=rng.choice([(), (("a", 1),)]),
        local_prefill=rng.random() < 0.7,
        local_prefill_max_tokens=rng.choice([0, 256, 4096]),
        long_output_tokens=rng.choice([16, 256]),
        default_slo=rng.choice([None, SLO(2.0, 0.2)]),
        ledger_grace_s=rng.choice([0.5, 30.0]),
        shared_cores=rng.choice([None, None, 2]),
        price_handoff=False,  # the reference (before #14) has no handoff term
    )


def mutate(rng: random.Random, insts: list) -> None:
    """Change a mutable instance's load and cache in place (the simulator between decisions)."""
    inst = rng.choice(insts)
    for k, v in _state(rng, inst.role, inst.block_size).items():
        setattr(inst, k, v)
    inst.cache = tuple(_cached(rng))


def _bare(d: object) -> object:
    """``d`` with the TTFT terms a goodput TTFT refusal now states (`` [...]``, #19) taken out of
    its message: the reference's message; everything else of the decision must be identical."""
    if isinstance(d, Rejection) and d.message.startswith("predicted TTFT"):
        assert " [" in d.message, d.message  # the terms are stated
        return dataclasses.replace(d, message=re.sub(r" \[[^\]]*\]", "", d.message, count=1))
    return d


SEEDS = range(200)


@pytest.fixture(autouse=True, params=["lists", "numpy"])
def pricing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: pools priced with Python lists (small pools, the default below 64
    instances) and with numpy over load columns (every pool, threshold 1)."""
    import router.policy.goodput as goodput

    if request.param == "numpy":
        monkeypatch.setattr(goodput, "NUMPY_MIN_POOL", 1)
    return request.param


@pytest.mark.parametrize("chunk", range(4))
def test_goodput_decisions_identical_to_reference(chunk: int) -> None:
    decisions = placed = 0
    for seed in SEEDS[chunk::4]:
        rng = random.Random(seed)
        mutable = seed % 3 == 0
        insts = random_instances(rng, mutable)
        lat, cfg = random_latency(rng), random_config(rng)
        clocks = ManualClock(), ManualClock()
        new = GoodputAwarePolicy(clock=clocks[0], latency=lat, config=cfg)
        old = ref.RefGoodputAwarePolicy(clock=clocks[1], latency=lat, config=cfg)
        view = ClusterView(insts)  # one view for the run when instances mutate, as in the simulator
        for k in range(12):
            if mutable:
                mutate(rng, insts)
            elif k % 4 == 3:
                insts = random_instances(rng)
                view = ClusterView(insts)
            req = random_request(rng, k)
            a, b = new.place(req, view), old.place(req, view)
            assert _bare(a) == b, (seed, k, req)
            decisions += 1
            if isinstance(a, Placement):
                placed += 1
                if rng.random() < 0.5:  # feedback: correction and length predictor move on both
                    obs = Observation(
                        req.request_id,
                        ttft_s=rng.uniform(0.01, 3.0),
                        tpot_s=rng.uniform(0.005, 0.3),
                        output_tokens=rng.choice([1, 20, 400]),
                        num_prompt_tokens=req.num_prompt_tokens,
                        max_output_tokens=req.max_output_tokens,
                    )
                    new.on_finished(obs)
                    old.on_finished(obs)
                elif rng.random() < 0.2:
                    new.release(req.request_id)
                    old.release(req.request_id)
            dt = rng.choice([0.0, 0.01, 0.3, 2.0])
            for c in clocks:
                c.advance(dt)
            assert new.inflight() == old.inflight()
            assert new.inflight("a") == old.inflight("a")
        assert vars(new.stats) == vars(old.stats)
    assert decisions == 12 * len(SEEDS[chunk::4]) and placed > 0


def test_goodput_decisions_identical_with_snapshots_reused_across_views() -> None:
    """The router's views (``router.cluster_view.ViewBuilder``): each request's view keeps most
    instances' snapshot objects and replaces a few with new ones of the same ids, so the policy's
    column cache reuses rows and re-reads (and re-prices the queues of) the changed ones; the
    online correction moves the queue prices' scale in between. Decisions as the reference's."""
    decisions = 0
    for seed in range(40):
        rng = random.Random(5000 + seed)
        n = rng.choice([16, 24, 40])
        roles = rng.choice([(P, D), (P, D, M), (M,)])
        insts = [
            InstanceSnapshot(
                f"i{i}", roles[i % len(roles)], cached=frozenset(_cached(rng)), **_state(rng, P, 16)
            )
            for i in range(n)
        ]
        lat, cfg = random_latency(rng), random_config(rng)
        clocks = ManualClock(), ManualClock()
        new = GoodputAwarePolicy(clock=clocks[0], latency=lat, config=cfg)
        old = ref.RefGoodputAwarePolicy(clock=clocks[1], latency=lat, config=cfg)
        for k in range(15):
            for _ in range(rng.choice([0, 1, 1, 2, n])):  # a few workers' state changed (or all)
                j = rng.randrange(n)
                i = insts[j]
                insts[j] = dataclasses.replace(i, **_state(rng, i.role, 16))
            view = ClusterView(list(insts))
            req = random_request(rng, k)
            a, b = new.place(req, view), old.place(req, view)
            assert _bare(a) == b, (seed, k, req)
            decisions += 1
            if isinstance(a, Placement) and rng.random() < 0.5:
                obs = Observation(req.request_id, rng.uniform(0.01, 3.0), rng.uniform(0.005, 0.3), 20)
                new.on_finished(obs)
                old.on_finished(obs)
            dt = rng.choice([0.0, 0.3])
            for c in clocks:
                c.advance(dt)
    assert decisions == 40 * 15


@pytest.mark.parametrize(
    ("new_cls", "old_cls"),
    [
        (GlobalCacheAwarePolicy, ref.RefGlobalCacheAwarePolicy),
        (LocalCacheAwarePolicy, ref.RefLocalCacheAwarePolicy),
        (GoodputAwarePolicy, ref.RefGoodputAwarePolicy),
    ],
)
def test_prefill_choice_identical_to_reference(new_cls: type, old_cls: type) -> None:
    for seed in SEEDS:
        rng = random.Random(1000 + seed)
        insts = random_instances(rng, mutable=seed % 2 == 0)
        lat = random_latency(rng)
        new = new_cls(clock=ManualClock(), latency=lat)
        old = old_cls(clock=ManualClock(), latency=lat)
        view = ClusterView(insts)
        pool = view.with_role(P) or view.with_role(M) or list(view.instances)
        for k in range(4):
            req = random_request(rng, k)
            assert new.choose_prefill(req, pool, view) == old.choose_prefill(req, pool, view), (seed, k)
            # candidates that are copies of the view's instances (not the same objects)
            copies = [dataclasses.replace(i) for i in pool]
            assert new.choose_prefill(req, copies, view) == old.choose_prefill(req, copies, view)
        if new_cls is not GoodputAwarePolicy:
            req = random_request(rng, 9)
            assert new.place(req, view) == old.place(req, view)


def test_remote_prefix_ties_go_to_the_store_then_the_first_holder() -> None:
    """Hand-checked tie-breaks of the O(1) remote-prefix lookup (the reference agrees)."""
    keys = DOCS[0]
    snaps = [
        InstanceSnapshot("p0", P, cached=frozenset(keys[:3])),
        InstanceSnapshot("p1", P, cached=frozenset(keys[:5])),
        InstanceSnapshot("d0", D, cached=frozenset(keys[:5])),
        InstanceSnapshot("d1", D, cached=frozenset(keys[:9])),
    ]
    view = ClusterView(snaps)
    # 4 usable blocks: p1, d0 and d1 all hold 4 usable; p1 is first -> p1 for p0, d0 for p1
    req = RequestInfo("r", 4 * 16 + 1, tuple(keys[:9]))
    hits = view.prefix_hits(req.block_hashes)
    assert hits.best_remote("p0", 4, 0, "store") == ("p1", 4)
    assert hits.best_remote("p1", 4, 0, "store") == ("d0", 4)
    assert hits.best_remote("p1", 4, 4, "store") == ("store", 4)  # the store on a tie
    assert hits.best_remote("d1", 20, 0, "store") == ("p1", 5)
    assert hits.best_remote("p0", 20, 0, "store") == ("d1", 9)
    assert hits.best_remote("p0", 0, 0, "store") == ("store", 0)
    for inst in snaps:
        assert hits.best_remote(inst.instance_id, 4, 1, "store") == _scan(req, inst, view, 4, 1)


def _scan(
    req: RequestInfo, inst: InstanceSnapshot, view: ClusterView, cap: int, store: int
) -> tuple[str, int]:
    src, best = "store", store
    for o in view.instances:
        if o.instance_id != inst.instance_id:
            h = min(cap, o.cached_prefix_blocks(req.block_hashes))
            if h > best:
                src, best = o.instance_id, h
    return src, best
