"""Parallel sampling (n > 1, best_of) in the real engine (tiny random Llama, fp32, CPU): one
prefill, choices forked over shared prompt blocks with copy-on-write of the partial block; each
choice == the request run alone with seed ``seed + i``; no block leaks on any path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.block_manager import KVCacheManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError, RequestNotFoundError

BS = 16
BLOCK_NBYTES = 2 * 2 * BS * 2 * 16 * 4  # layers * (K, V) * block_size * kv_heads * head_dim * fp32
PARAMS = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=7, logprobs=2, ignore_eos=True, n=3)


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=128, block_size=BS, max_num_batched_tokens=256)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def alone(llama):
    """``alone(prompt, params, i)``: the request run alone (n=1) with seed ``params.seed + i``."""
    eng = _engine(llama, enable_prefix_caching=False)
    memo: dict = {}

    def run(prompt: list[int], params: SamplingParams, i: int):
        key = (tuple(prompt), params, i)
        if key not in memo:
            one = replace(params, n=1, best_of=None, seed=params.seed + i)
            memo[key] = eng.generate([prompt], one)[0]
        return memo[key]

    return run


def _assert_same(choice, ref) -> None:
    assert choice.token_ids == ref.token_ids
    assert len(choice.logprobs) == len(ref.logprobs) == len(ref.token_ids)
    for a, b in zip(choice.logprobs, ref.logprobs, strict=True):
        assert a.token_id == b.token_id
        # a choice preempted by recompute re-scores its tokens through the prefill attention
        # path, the reference through the in-place decode kernel: same math, another float
        # summation order (differences of 1.4e-6 seen); tokens must match exactly
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def _no_leak(eng: LLMEngine, blocks: int) -> None:
    assert not eng.has_unfinished()
    assert eng.kv.num_free_blocks == blocks
    assert eng.kv.num_free_host_blocks == eng.kv.num_host_blocks
    assert not eng._groups and not eng._group_parents and not eng._tracked


# 37 tokens: the parent computes 36, so the 3rd block is partial and shared (copy-on-write);
# 33: the parent's 32 fill two blocks exactly (each choice starts a new block); 1: unforked
@pytest.mark.parametrize("plen", [37, 33, 1])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_each_choice_equals_the_request_alone_with_its_seed(llama, alone, plen, prefix_caching):
    eng = _engine(llama, enable_prefix_caching=prefix_caching)
    prompt = _prompt(plen, plen)
    outs = eng.generate_choices(prompt, PARAMS)
    assert [o.choice_index for o in outs] == [0, 1, 2]
    for i, o in enumerate(outs):
        assert o.finished and o.request_id == outs[0].request_id
        _assert_same(o, alone(prompt, PARAMS, i))
        assert o.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in o.logprobs), abs=1e-9)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # the choices diverged
    # the last choice to write the shared partial block owns it by then: n - 1 copies
    expect_cow = 2 if plen > 1 and (plen - 1) % BS else 0
    assert eng.kv.num_cow_copies == expect_cow
    _no_leak(eng, 128)


def test_prompt_blocks_are_shared_during_decode(llama):
    n, plen = 4, 100  # parent: 99 tokens = 6 full blocks + a partial one
    params = replace(PARAMS, n=n, max_tokens=8, logprobs=None)
    prompt = _prompt(plen, 3)
    used = {}
    for mode in ("group", "independent"):
        eng = _engine(llama, enable_prefix_caching=False)
        if mode == "group":
            eng.add_request("g", prompt, params)
        else:
            for i in range(n):
                eng.add_request(f"r{i}", prompt, replace(params, n=1, seed=7 + i))
        for _ in range(3):  # prefill (+ fork), then the choices' first tokens and a decode
            eng.step()
        used[mode] = eng.kv.num_used_blocks
        if mode == "group":
            tables = [eng.kv.block_table(f"g\x1f{i}") for i in range(n)]
            assert all(t[:6] == tables[0][:6] for t in tables)  # the full prompt blocks: shared
            assert all(eng.kv.ref_count(b) == n for b in tables[0][:6])
            assert len({t[6] for t in tables}) == n  # the partial block: one copy per choice
            assert all(eng.kv.ref_count(t[6]) == 1 for t in tables)
        while eng.has_unfinished():
            eng.step()
        _no_leak(eng, 128)
    assert used["group"] == 6 + n
    assert used["independent"] == n * 7


def test_abort_frees_every_choice_at_any_point(llama):
    params = replace(PARAMS, n=4, max_tokens=30)
    prompt = _prompt(50, 5)
    for steps in range(0, 5):
        eng = _engine(llama)
        eng.add_request("other", _prompt(20, 6), replace(params, n=1))
        eng.add_request("g", prompt, params)
        for _ in range(steps):
            eng.step()
        assert eng.has_request("g")
        eng.abort("g")
        assert not eng.has_request("g")
        with pytest.raises(RequestNotFoundError):
            eng.abort("g")
        while eng.has_unfinished():
            eng.step()
        _no_leak(eng, 128)


def test_internal_ids_are_not_client_ids(llama):
    eng = _engine(llama)
    eng.add_request("g", _prompt(20), PARAMS)
    eng.step()
    with pytest.raises(RequestNotFoundError):
        eng.abort("g\x1f0")
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("g", _prompt(5), PARAMS)
    with pytest.raises(InvalidRequestError, match="control character"):
        eng.add_request("x\x1fy", _prompt(5), PARAMS)
    eng.abort("g")
    _no_leak(eng, 128)


@pytest.mark.parametrize("swap", [False, True])
def test_preemption_under_memory_pressure_is_exact_and_frees_everything(llama, alone, swap):
    # 14 blocks cannot hold three groups of 3 choices decoding to ~60 tokens: choices are
    # preempted (recomputed, or swapped to the host) while siblings keep the shared blocks
    params = replace(PARAMS, max_tokens=24)
    prompts = [_prompt(37, 11), _prompt(20, 12), _prompt(45, 13)]
    kw = dict(num_kv_blocks=14, swap_space_bytes=64 * BLOCK_NBYTES if swap else 0)
    eng = _engine(llama, **kw)
    ids = [eng.add_request(f"g{k}", p, params) for k, p in enumerate(prompts)]
    final: dict = {}
    lps: dict = {}
    while eng.has_unfinished():
        for o in eng.step():
            key = (o.request_id, o.choice_index)
            lps.setdefault(key, []).extend(o.logprobs)
            if o.finished:
                o.logprobs = lps[key]
                final[key] = o
    st = eng.stats()
    assert st.num_preemptions > 0
    if swap:
        assert st.num_swap_outs > 0 and eng.kv.swap_stats.blocks_kept > 0
    for rid, p in zip(ids, prompts, strict=True):
        for i in range(3):
            _assert_same(final[(rid, i)], alone(p, params, i))
    _no_leak(eng, 14)


def test_best_of_returns_the_n_most_likely_candidates(llama, alone):
    params = replace(PARAMS, n=2, best_of=5, logprobs=None, seed=21)
    prompt = _prompt(30, 8)
    eng = _engine(llama)
    rid = eng.add_request(None, prompt, params)
    seen = []
    while eng.has_unfinished():
        seen.extend(eng.step())
    assert [o.choice_index for o in seen] == [0, 1]  # nothing streamed before the ranking
    assert all(o.finished and o.request_id == rid and o.logprobs == [] for o in seen)
    cands = []
    for j in range(5):
        ref = alone(prompt, replace(params, logprobs=0), j)
        cands.append((-sum(lp.logprob for lp in ref.logprobs), j, ref))
    cands.sort(key=lambda c: (c[0], c[1]))
    for o, (neg, _, ref) in zip(seen, cands[:2], strict=True):
        assert o.token_ids == ref.token_ids and o.new_token_ids == ref.token_ids
        assert o.cumulative_logprob == pytest.approx(-neg, abs=1e-5)
    _no_leak(eng, 128)


def test_unsupported_combinations_are_refused_naming_the_field(llama):
    for kw, match in [
        (dict(n=2, temperature=0.0), "n=2"),
        (dict(best_of=3, temperature=0.0), "best_of"),
        (dict(n=0), "n must be"),
        (dict(n=3, best_of=2), "best_of must be"),
        (dict(n=True), "n must be"),
        (dict(n=2, seed_position_offset=3), "seed_position_offset"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kw)
    eng = _engine(llama)
    p = SamplingParams(n=2, seed=1)
    with pytest.raises(InvalidRequestError, match="n=2"):
        eng.add_request(None, _prompt(10), p, prefill_only=True)
    with pytest.raises(InvalidRequestError, match="generate_choices"):
        eng.generate([_prompt(10)], p)
    with pytest.raises(InvalidRequestError, match="n=2"):
        eng.import_kv("x", _prompt(10), 5, torch.zeros(1), p)
    _no_leak(eng, 128)
    small = _engine(llama, num_kv_blocks=8)
    with pytest.raises(InvalidRequestError, match="max_tokens"):  # one choice alone cannot fit
        small.add_request("big", _prompt(10), replace(p, max_tokens=200))
    assert not small.has_request("big")
    _no_leak(small, 8)


# ---------------------------------------------------------------- block manager (pure)
def test_fork_and_copy_on_write_reference_counts():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=4)
    parent = Request("p", list(range(10)), sp)
    assert kv.allocate_slots(parent, 10)
    parent.num_computed_tokens = 10  # blocks 0,1 full; block 2 holds 2 of 4 tokens
    kids = [Request(f"c{i}", list(range(11)), sp) for i in range(3)]
    for c in kids:
        c.num_computed_tokens = 10
        kv.fork("p", c)
    table = kv.block_table("p")
    assert [kv.ref_count(b) for b in table] == [4, 4, 4]
    kv.free("p")
    assert kv.num_used_blocks == 3 and [kv.ref_count(b) for b in table] == [3, 3, 3]
    assert kv.allocate_slots(kids[0], 1)  # writes into the shared partial block: copies it
    (copy,) = kv.take_copies()
    assert copy[0] == table[2] and kv.block_table("c0")[2] == copy[1] != table[2]
    assert kv.ref_count(table[2]) == 2 and kv.ref_count(table[0]) == 3
    assert kv.take_copies() == []
    assert kv.allocate_slots(kids[1], 1) and kv.allocate_slots(kids[2], 1)
    # the last holder owns the block by then: it writes in place
    assert len(kv.take_copies()) == 1
    assert kv.ref_count(table[2]) == 1 and kv.block_table("c2")[2] == table[2]
    kids[0].num_computed_tokens = 11
    assert kv.allocate_slots(kids[0], 1) and kv.take_copies() == []  # its own block now
    kv.free("c1")  # one choice's end does not free what the others still reference
    assert [kv.ref_count(b) for b in table[:2]] == [2, 2]
    kv.free("c0")
    kv.free("c2")
    assert kv.num_free_blocks == 16


def test_copy_on_write_refused_when_no_block_is_free():
    kv = KVCacheManager(3, 4, enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=4)
    parent = Request("p", list(range(6)), sp)
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    c = Request("c", list(range(7)), sp)
    c.num_computed_tokens = 6
    kv.fork("p", c)
    other = Request("o", list(range(4)), sp)
    assert kv.allocate_slots(other, 4)  # the pool is full now
    assert not kv.allocate_slots(c, 1)  # the copy needs a block: refused, nothing changed
    assert kv.take_copies() == [] and kv.block_table("c") == kv.block_table("p")
    kv.free("o")
    assert kv.allocate_slots(c, 1) and len(kv.take_copies()) == 1
    for rid in ("p", "c"):
        kv.free(rid)
    assert kv.num_free_blocks == 3


def test_swapping_one_choice_keeps_the_blocks_its_siblings_reference():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False, num_host_blocks=8)
    sp = SamplingParams(max_tokens=4)
    parent = Request("p", list(range(10)), sp)
    assert kv.allocate_slots(parent, 10)
    parent.num_computed_tokens = 10
    kids = [Request(f"c{i}", list(range(11)), sp) for i in range(3)]
    for c in kids:
        c.num_computed_tokens = 10
        kv.fork("p", c)
    kv.free("p")
    table = kv.block_table("c0")
    assert kv.allocate_slots(kids[0], 1) and len(kv.take_copies()) == 1  # c0: own partial block
    own = kv.block_table("c0")[2]
    kids[0].num_computed_tokens = 11
    pairs = kv.swap_out(kids[0])
    assert pairs == [(own, pairs[0][1])]  # only c0's own block moves to the host
    assert [kv.ref_count(b) for b in table] == [3, 3, 2]  # shared blocks stay, c0 keeps its refs
    for c in kids[1:]:  # the siblings still decode over the shared blocks
        assert kv.allocate_slots(c, 1)
    assert len(kv.take_copies()) == 1  # c1 copies the partial block c2 still shares; c2 owns it
    assert kv.swap_in_blocks_needed(kids[0], 1) == 1
    kv.swap_in(kids[0])
    assert kv.block_table("c0")[:2] == table[:2] and [kv.ref_count(b) for b in table[:2]] == [3, 3]
    for rid in ("c1", "c0", "c2"):
        kv.free(rid)
    assert kv.num_free_blocks == 16 and kv.num_free_host_blocks == 8


def test_a_swapped_choice_counts_its_copy_on_write_block_to_come_back():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False, num_host_blocks=8)
    sp = SamplingParams(max_tokens=4)
    parent = Request("p", list(range(10)), sp)
    assert kv.allocate_slots(parent, 10)
    parent.num_computed_tokens = 10
    kids = [Request(f"c{i}", list(range(11)), sp) for i in range(2)]
    for c in kids:
        c.num_computed_tokens = 10
        kv.fork("p", c)
    kv.free("p")
    table = kv.block_table("c0")
    assert kv.swap_out(kids[0]) == []  # every block is shared with c1: all kept on device
    assert [kv.ref_count(b) for b in table] == [2, 2, 2]
    assert kv.swap_in_blocks_needed(kids[0], 1) == 1  # its next write copies the partial block
    assert kv.swap_in(kids[0]) == []
    assert kv.allocate_slots(kids[0], 1) and kv.take_copies() == [(table[2], kv.block_table("c0")[2])]
    assert kv.ref_count(table[2]) == 1  # c1's, untouched
    kv.free("c0")
    kv.free("c1")
    assert kv.num_free_blocks == 16 and kv.num_free_host_blocks == 8
