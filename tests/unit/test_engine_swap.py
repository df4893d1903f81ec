"""Swap-based preemption and MLFQ in the real engine (tiny random Llama, fp32, CPU): resumed
requests produce exactly the tokens of an unpreempted run, and no block leaks on either pool."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulingPolicy
from pdserve.errors import ResourceExhaustedError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
BLOCK_NBYTES = 2 * 2 * 16 * 2 * 16 * 4  # layers * (K, V) * block_size * kv_heads * head_dim * fp32


def _prompts(n: int = 10, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [3, 17, 40, 64, 90, 130, 33, 8, 71, 50][:n]
    shared = torch.randint(3, 320, (48,), generator=g).tolist()  # a prefix some prompts share
    out = []
    for i, k in enumerate(lens):
        p = torch.randint(3, 320, (k,), generator=g).tolist()
        out.append(shared + p if i % 3 == 0 else p)
    return out


def _engine(path, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=256, block_size=16, max_num_batched_tokens=256)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def reference(llama):
    """Each prompt run alone on a roomy engine (never preempted)."""
    eng = _engine(llama, enable_prefix_caching=False)
    return [eng.generate([p], GREEDY)[0].token_ids for p in _prompts()]


def _assert_no_leaks(eng: LLMEngine, blocks: int) -> None:
    assert not eng.has_unfinished()
    assert eng.kv.num_free_blocks == blocks
    assert eng.kv.num_free_host_blocks == eng.kv.num_host_blocks
    assert eng.stats().num_swapped == 0


def test_block_nbytes_matches_the_engine(llama):
    eng = _engine(llama, num_kv_blocks=4, swap_space_bytes=BLOCK_NBYTES)
    assert eng.kv_shape.block_nbytes == BLOCK_NBYTES
    assert eng.kv.num_host_blocks == 1 and eng.runner.host_cache is not None
    assert eng.rates.swap_bytes_per_s is not None  # measured at start


def test_swap_resume_identical_under_memory_pressure(llama, reference):
    # 24 blocks of 16 tokens cannot hold ten sequences at once: many preemptions, all swapped
    eng = _engine(llama, num_kv_blocks=24, swap_space_bytes=256 * BLOCK_NBYTES)
    outs = eng.generate(_prompts(), GREEDY)
    st = eng.stats()
    assert st.num_swap_outs > 0 and st.num_swap_ins == st.num_swap_outs
    assert st.swapped_out_blocks > 0 and st.swapped_in_blocks > 0
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng, 24)


def test_adopted_requests_swap_on_their_first_preemption(llama):
    """A decode worker's engine: every request arrives with its KV (import_kv), so the engine has
    never prefilled when it first preempts; the decode steps' rate stands in for the recompute
    rate and the preempted requests swap (they recomputed before: no rate, no swap), exactly."""
    long = dataclasses.replace(GREEDY, max_tokens=80)
    pre = _engine(llama, enable_prefix_caching=False)
    # prompts of 17, 40, 8 and 50 tokens: 10 blocks adopted, 30 by the end of 80 tokens each
    dec = _engine(llama, num_kv_blocks=12, swap_space_bytes=64 * BLOCK_NBYTES, enable_prefix_caching=False)
    prompts = [_prompts()[i] for i in (1, 2, 7, 9)]
    reference = [pre.generate([p], long)[0].token_ids for p in prompts]  # each alone, never preempted
    for i, p in enumerate(prompts):
        pre.add_request(f"r{i}", p, long, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    exports = [pre.export_kv(f"r{i}") for i in range(len(prompts))]
    out: dict[str, list[int]] = {}
    while exports or dec.has_unfinished():
        if exports:  # adopted when there is room, as the decode worker's admission does
            e = exports[0]
            try:
                dec.import_kv(e.request_id, e.token_ids, e.first_token, e.blocks, long)
                exports.pop(0)
                continue
            except ResourceExhaustedError:
                assert dec.has_unfinished()
        for o in dec.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    assert dec.rates.prefill_tokens_per_s is None  # nothing prefilled here
    st = dec.stats()
    assert st.num_preemptions > 0 and st.num_swap_outs == st.num_preemptions, st
    assert dec.prefill_tokens_computed == 0  # nothing recomputed
    assert [out[f"r{i}"] for i in range(len(prompts))] == reference
    _assert_no_leaks(dec, 12)


def test_small_host_pool_mixes_swap_and_recompute_exactly(llama, reference):
    eng = _engine(llama, num_kv_blocks=24, swap_space_bytes=4 * BLOCK_NBYTES)
    outs = eng.generate(_prompts(), GREEDY)
    st = eng.stats()
    assert st.num_swap_outs > 0 and st.num_preemptions > st.num_swap_outs  # some recomputed
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng, 24)


def test_swap_resume_identical_with_chunked_prefill(llama, reference):
    eng = _engine(
        llama,
        num_kv_blocks=24,
        swap_space_bytes=64 * BLOCK_NBYTES,
        max_num_batched_tokens=40,
        long_prefill_token_threshold=32,
    )
    outs = eng.generate(_prompts(), GREEDY)
    assert eng.stats().num_swap_outs > 0
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng, 24)


def test_seeded_sampling_identical_after_swap(llama):
    params = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(10)]
    roomy = _engine(llama).generate(_prompts(), params)
    eng = _engine(llama, num_kv_blocks=24, swap_space_bytes=256 * BLOCK_NBYTES)
    tight = eng.generate(_prompts(), params)
    assert eng.stats().num_swap_outs > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    _assert_no_leaks(eng, 24)


def test_mlfq_with_swap_identical(llama, reference):
    eng = _engine(
        llama,
        num_kv_blocks=24,
        swap_space_bytes=256 * BLOCK_NBYTES,
        scheduling_policy=SchedulingPolicy.MLFQ,
        mlfq_quantum_iters=2,
        mlfq_base_prefill_s=1e-4,
        max_num_seqs=4,
    )
    # preempt at once (no wait of measured iterations: this test wants swaps on any host load)
    eng.scheduler.config = dataclasses.replace(eng.scheduler.config, mlfq_preempt_wait_iters=0)
    outs = eng.generate(_prompts(), GREEDY)
    assert eng.stats().num_swap_outs > 0
    # prompts sharing a prefix were all swapped out: their shared blocks went to the host once
    assert eng.kv.swap_stats.host_refs_shared > 0
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng, 24)


def test_abort_while_swapped_frees_both_pools(llama):
    eng = _engine(llama, num_kv_blocks=24, swap_space_bytes=256 * BLOCK_NBYTES)
    ids = [eng.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(_prompts())]
    for _ in range(200):
        eng.step()
        if eng.scheduler.swapped:
            break
    assert eng.scheduler.swapped
    for rid in ids:
        if eng.has_request(rid):
            eng.abort(rid)
    _assert_no_leaks(eng, 24)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(swap_space_bytes=-1), "swap_space_bytes must be >= 0"),
        (dict(swap_space_bytes=1.5), "must be an integer"),
        (dict(swap_space_bytes=1 << 20, tensor_parallel_size=2), "not supported with tensor_parallel_size"),
        (dict(scheduling_policy="mlfq"), "scheduling_policy must be one of"),
    ],
)
def test_bad_swap_config_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_swap_space_smaller_than_a_block_refused(llama):
    with pytest.raises(ValueError, match="holds no KV block"):
        _engine(llama, num_kv_blocks=8, swap_space_bytes=BLOCK_NBYTES - 1)
